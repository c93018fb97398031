import os
import sqlite3
import xml.dom.minidom

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine

from conftest import UTM_ORIGIN
from solarmap.errors import GeoreferenceError, InputError, OutputError
from solarmap.geo.output import check_output_path, read_layer_metadata, write_geopackage
from solarmap.geo.raster import SceneReader, describe_scene, parse_bands
from solarmap.geo.style import panels_qml
from solarmap.geo.tiling import TileSpec, iter_tiles


def first_tile(reader, size=16, overlap=0):
    return next(iter_tiles(reader.info.grid, TileSpec(size, overlap)))


def test_read_tile_scales_uint8_and_pads_a_raster_smaller_than_a_tile_with_zeros(geotiff):
    """A raster smaller than one window (a chip) is zero past its edges: mirrored, its windows would be
    mostly mirror. ``valid`` marks the raster's own pixels only."""
    array = np.full((3, 10, 12), 51, dtype=np.uint8)
    with SceneReader(geotiff(array)) as reader:
        image = reader.read_tile(first_tile(reader))
    assert image.pixels.shape == (3, 16, 16) and image.pixels.dtype == np.float32
    assert image.pixels[:, :10, :12] == pytest.approx(0.2)
    assert (image.pixels[:, 10:, :] == 0).all() and (image.pixels[:, :, 12:] == 0).all()
    assert image.valid[:10, :12].all() and not image.valid[10:, :].any() and not image.valid[:, 12:].any()


def test_context_is_read_around_the_tile_and_mirrored_outside_the_raster(geotiff):
    """On a raster of at least one window, the part of a window past its edges holds the raster
    mirrored (as training views are padded), not black."""
    array = (np.arange(40 * 40, dtype=np.uint32).reshape(40, 40) % 251).astype(np.uint8)
    with SceneReader(geotiff(np.stack([array] * 3))) as reader:
        tiles = list(iter_tiles(reader.info.grid, TileSpec(16, 0, context_px=5)))
        first, inner = tiles[0], tiles[4]  # (0, 0) at the corner, (1, 1) inside
        corner, middle = reader.read_tile(first), reader.read_tile(inner)
    assert corner.pixels.shape == (3, 26, 26)
    assert not corner.valid[:5].any() and not corner.valid[:, :5].any()  # before the raster: padding
    assert (corner.pixels[:, 4::-1, 5:] == corner.pixels[:, 5:10, 5:]).all()  # the raster mirrored
    assert (corner.pixels[:, :, 4::-1] == corner.pixels[:, :, 5:10]).all()
    assert corner.pixels[0, 5:, 5:] * 255 == pytest.approx(array[:21, :21], abs=1e-3)
    assert middle.valid.all()
    assert middle.pixels[0] * 255 == pytest.approx(array[11:37, 11:37], abs=1e-3)


def test_reading_into_a_given_array_gives_the_same_pixels_bit_for_bit(geotiff):
    array = (np.arange(3 * 40 * 40, dtype=np.uint32).reshape(3, 40, 40) % 256).astype(np.uint8)
    with SceneReader(geotiff(array)) as reader:
        tiles = list(iter_tiles(reader.info.grid, TileSpec(16, 0, context_px=5)))
        block = np.full((len(tiles), 3, 26, 26), np.nan, dtype=np.float32)  # stale values must go
        for i, tile in enumerate(tiles):
            fresh, into = reader.read_tile(tile), reader.read_tile(tile, out=block[i])
            assert np.shares_memory(into.pixels, block)
            assert fresh.pixels.tobytes() == block[i].tobytes()  # the mirrored margin rewritten too
            assert (fresh.valid == into.valid).all()
        # the uint8 lookup is what dividing by the scale gives, to the bit
        expected = np.zeros((3, 21, 21), np.float32)
        np.divide(array[:, :21, :21], np.float32(reader.info.scale), out=expected, casting="unsafe")
        assert block[0].tobytes() == np.pad(expected, ((0, 0), (5, 0), (5, 0)), mode="symmetric").tobytes()
        with pytest.raises(ValueError, match="out must be float32"):
            reader.read_tile(tiles[0], out=np.zeros((3, 16, 16), np.float32))


def test_nodata_tiles_are_empty_and_partial_nodata_is_masked(geotiff):
    array = np.full((3, 32, 16), 100, dtype=np.uint8)
    array[:, :16, :] = 0  # first tile entirely nodata
    array[:, 16:20, :4] = 0
    with SceneReader(geotiff(array, nodata=0)) as reader:
        assert reader.info.has_mask
        tiles = list(iter_tiles(reader.info.grid, TileSpec(16, 0)))
        first, second = (reader.read_tile(t) for t in tiles)
    assert first.is_empty
    assert not second.is_empty
    assert not second.valid[:4, :4].any() and second.valid[4:, :].all()


def test_uniform_black_or_white_fill_without_nodata_is_skipped(geotiff):
    for value in (0, 255):
        with SceneReader(geotiff(np.full((3, 16, 16), value, dtype=np.uint8))) as reader:
            assert reader.read_tile(first_tile(reader)).is_empty
    with SceneReader(geotiff(np.full((3, 16, 16), 90, dtype=np.uint8))) as reader:
        assert not reader.read_tile(first_tile(reader)).is_empty


def test_16_bit_uses_nbits_or_percentile(geotiff):
    array = np.full((3, 16, 16), 2047, dtype=np.uint16)
    assert describe_scene(geotiff(array, NBITS=12)).scale == 4095
    ramp = np.tile(np.arange(256, dtype=np.uint16) * 40, (3, 16, 1))  # max 10200
    info = describe_scene(geotiff(ramp))
    assert 9_000 < info.scale <= 10_200
    with SceneReader(geotiff(ramp)) as reader:
        pixels = reader.read_tile(first_tile(reader, size=256)).pixels
    assert pixels.max() == 1.0 and pixels.min() == 0.0


def test_float_reflectance_is_kept(geotiff):
    array = np.full((3, 8, 8), 0.4, dtype=np.float32)
    with SceneReader(geotiff(array)) as reader:
        assert reader.info.scale == 1.0
        image = reader.read_tile(first_tile(reader))
    assert image.pixels[:, :8, :8] == pytest.approx(0.4)


def test_reading_at_a_coarser_gsd_averages(geotiff):
    array = np.zeros((3, 32, 32), dtype=np.uint8)
    array[:, :, ::2] = 200  # stripes one pixel wide at 0.5 m
    with SceneReader(geotiff(array), gsd_m=1.0) as reader:
        assert (reader.info.grid.height, reader.info.grid.width) == (16, 16)
        image = reader.read_tile(first_tile(reader))
    assert image.pixels[:, :16, :16] == pytest.approx(100 / 255, abs=0.01)


def test_bands_option_picks_bands(geotiff):
    array = np.stack([np.full((8, 8), v, np.uint8) for v in (10, 20, 30, 40)])
    with SceneReader(geotiff(array), bands=parse_bands("4,3,2")) as reader:
        image = reader.read_tile(first_tile(reader, 8))
    assert image.pixels[:, 0, 0] * 255 == pytest.approx([40, 30, 20])
    with pytest.raises(InputError, match="three band numbers"):
        parse_bands("1,2")


@pytest.mark.parametrize("bands", [1, 2])
def test_too_few_bands_is_an_input_error(geotiff, bands):
    path = geotiff(np.zeros((bands, 8, 8), np.uint8))
    with pytest.raises(InputError, match=f"has {bands} band"):
        describe_scene(path)


def test_raster_without_crs_is_refused(geotiff):
    with pytest.raises(GeoreferenceError, match="no CRS"):
        describe_scene(geotiff(np.zeros((3, 8, 8), np.uint8), crs=None))


def test_missing_and_non_raster_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        describe_scene(tmp_path / "nope.tif")
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    with pytest.raises(InputError, match="cannot read"):
        describe_scene(text)


# ---- GeoPackage --------------------------------------------------------------------------------

def panels(n=2):
    x0, y0 = UTM_ORIGIN
    geoms = [shapely.box(x0 + 10 * i, y0, x0 + 10 * i + 3, y0 + 2) for i in range(n)]
    return gpd.GeoDataFrame({"id": np.arange(1, n + 1), "area_m2": [6.0] * n, "score": [0.9] * n,
                             "cam_peak": [3.5] * n, "centroid_lon": [-117.0] * n, "centroid_lat": [36.1] * n,
                             "source": ["a.tif"] * n}, geometry=geoms, crs="EPSG:32611")


def test_geopackage_round_trip_with_style_and_metadata(tmp_path):
    out = tmp_path / "panels.gpkg"
    write_geopackage(panels(), out, metadata={"model": "m1", "tile_size_px": 299}, style_qml=panels_qml())
    back = gpd.read_file(out, layer="panels")
    assert back.crs.to_epsg() == 32611
    assert list(back.columns[:-1]) == ["id", "area_m2", "score", "cam_peak", "centroid_lon", "centroid_lat", "source"]
    assert back.geometry.iloc[1].bounds == panels().geometry.iloc[1].bounds
    assert read_layer_metadata(out) == {"model": "m1", "tile_size_px": "299"}
    with sqlite3.connect(out) as con:
        table, column, qml, default = con.execute(
            "SELECT f_table_name, f_geometry_column, styleQML, useAsDefault FROM layer_styles").fetchone()
    assert (table, column, default) == ("panels", "geom", 1)
    doc = xml.dom.minidom.parseString(qml.split("\n", 1)[1])
    assert doc.getElementsByTagName("renderer-v2")[0].getAttribute("attr") == "area_m2"
    assert not [p for p in os.listdir(tmp_path) if p != "panels.gpkg"]  # no temporary files left


def test_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "panels.gpkg"
    write_geopackage(panels(1), out)
    before = out.read_bytes()
    with pytest.raises(OutputError, match="--overwrite"):
        write_geopackage(panels(3), out)
    assert out.read_bytes() == before
    write_geopackage(panels(3), out, overwrite=True)
    assert len(gpd.read_file(out, layer="panels")) == 3


def test_failed_write_leaves_previous_output_intact(tmp_path, monkeypatch):
    out = tmp_path / "panels.gpkg"
    write_geopackage(panels(1), out)
    before = out.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # the features are written, then the disk fills up while the style is added
    monkeypatch.setattr("solarmap.geo.output.add_layer_style", disk_full)
    with pytest.raises(OutputError, match="No space left"):
        write_geopackage(panels(2), out, overwrite=True, style_qml=panels_qml())
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["panels.gpkg"]


@pytest.mark.parametrize("name, match", [("missing/dir/out.gpkg", "does not exist"), ("out.shp", "must end in")])
def test_bad_output_paths(tmp_path, name, match):
    with pytest.raises(OutputError, match=match):
        check_output_path(tmp_path / name, overwrite=False)


def test_unwritable_output_directory(tmp_path):
    """Checked by writing, so it holds for root too: /proc takes no new file from anyone."""
    with pytest.raises(OutputError, match=r"output directory is not writable: /proc \("):
        check_output_path("/proc/x.gpkg", overwrite=False)
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="not writable"):
            check_output_path(locked / "x.gpkg", overwrite=False)
    assert os.listdir(tmp_path) in ([], ["locked"])  # the probe file is gone


def test_an_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="is not a directory"):
        check_output_path(tmp_path / "notes.txt" / "x.gpkg", overwrite=False)


def test_cog_and_vrt_inputs_read_like_geotiff(tmp_path):
    import rasterio

    array = np.zeros((3, 64, 64), np.uint8)
    array[:, 10:20, 30:50] = 200
    transform = Affine(0.5, 0, UTM_ORIGIN[0], 0, -0.5, UTM_ORIGIN[1])
    cog = tmp_path / "scene_cog.tif"
    with rasterio.open(cog, "w", driver="COG", height=64, width=64, count=3, dtype="uint8", crs="EPSG:32611",
                       transform=transform) as dst:
        dst.write(array)
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename relativeToVRT="1">scene_cog.tif'
        f'</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>' for b in (1, 2, 3))
    with rasterio.open(cog) as src:
        srs = src.crs.to_wkt()
    vrt = tmp_path / "scene.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="64" rasterYSize="64"><SRS>{srs}</SRS>'
                   f'<GeoTransform>{UTM_ORIGIN[0]}, 0.5, 0, {UTM_ORIGIN[1]}, 0, -0.5</GeoTransform>{bands}</VRTDataset>')
    for path in (cog, vrt):
        with SceneReader(path) as reader:
            assert reader.info.grid.crs.to_epsg() == 32611
            image = reader.read_tile(first_tile(reader, size=64))
        assert image.pixels[0, 15, 40] == pytest.approx(200 / 255) and image.pixels[0, 0, 0] == 0


def test_block_cache_holds_two_rows_of_windows_and_grows_with_width_not_height():
    from types import SimpleNamespace

    from solarmap.geo.raster import block_cache_bytes

    def raster(width, height, block=(512, 512), count=3, dtype="uint8"):
        return SimpleNamespace(width=width, height=height, count=count, dtypes=[dtype] * count,
                               block_shapes=[block] * count)

    wide = block_cache_bytes(raster(40_000, 1000), window_rows=181)
    assert wide == (1 + 2) * 512 * 40_000 * 3  # the window's block row, the next, one spare
    assert block_cache_bytes(raster(40_000, 400_000), window_rows=181) == wide  # not the raster's height
    assert block_cache_bytes(raster(80_000, 1000), window_rows=181) == 2 * wide
    assert block_cache_bytes(raster(40_000, 1000, count=4, dtype="uint16"), window_rows=181) == wide * 4 * 2 // 3
    striped = block_cache_bytes(raster(40_000, 5000, block=(1, 40_000)), window_rows=600)
    assert striped == 602 * 40_000 * 3
    assert block_cache_bytes(raster(500, 500), window_rows=181) == 32 * 2**20  # small rasters: a floor


def test_a_raster_placed_by_gcps_only_is_read_where_it_lies(tmp_path):
    """A GCP-only copy of a scene (GCPs from its transform, an identity geotransform) gives the same
    polygons within 0.5 m, in the GCPs' CRS; `info` says how it was placed; an RPC-only raster is
    one clear line."""
    import rasterio
    from click.testing import CliRunner
    from rasterio.control import GroundControlPoint
    from rasterio.rpc import RPC

    from conftest import BandOneScorer, UTM_11N, rectangle_raster, write_tif
    from solarmap.cli import main
    from solarmap.errors import GeoreferenceError
    from solarmap.pipeline import DetectConfig, detect_scene

    image = rectangle_raster(200, 240, (40, 50, 90, 130))
    image[0, 120:170, 150:200] = 1.0
    plain = write_tif(tmp_path / "plain.tif", image)
    with rasterio.open(plain) as src:
        transform = src.transform
    corners = [(0, 0), (0, 240), (200, 0), (200, 240), (100, 120)]
    gcps = [GroundControlPoint(row=r, col=c, x=(transform * (c, r))[0], y=(transform * (c, r))[1]) for r, c in corners]
    placed = tmp_path / "gcps.tif"
    with rasterio.open(placed, "w", driver="GTiff", height=200, width=240, count=3, dtype="float32",
                       gcps=gcps, crs=UTM_11N) as dst:
        dst.write(image)
    config = DetectConfig(tile_size_px=64, overlap_px=8)
    expected, _ = detect_scene(plain, scorer=BandOneScorer(), config=config)
    got, _ = detect_scene(str(placed), scorer=BandOneScorer(), config=config)
    assert got.crs.to_epsg() == 32611 and len(got) == len(expected) == 2
    for geometry in expected.geometry:
        nearest = got.geometry.iloc[int(got.distance(geometry).argmin())]
        assert nearest.hausdorff_distance(geometry) <= 0.5 + 1e-6
    info = CliRunner().invoke(main, ["info", str(placed), "--tile-size", "64", "--overlap", "8", "--gsd", "0.5"])
    assert info.exit_code == 0 and "georeferencing: 5 ground control points in EPSG:32611" in info.output, info.output
    rpc_only = tmp_path / "rpc.tif"
    rpcs = RPC(height_off=0, height_scale=100, lat_off=36, lat_scale=0.1, line_den_coeff=[1] + [0] * 19,
               line_num_coeff=[0, 0, -1] + [0] * 17, line_off=100, line_scale=100, long_off=-117, long_scale=0.1,
               samp_den_coeff=[1] + [0] * 19, samp_num_coeff=[0, 1] + [0] * 18, samp_off=120, samp_scale=120)
    with rasterio.open(rpc_only, "w", driver="GTiff", height=200, width=240, count=3, dtype="float32", rpcs=rpcs) as dst:
        dst.write(image)
    with pytest.raises(GeoreferenceError, match="placed by RPCs only"):
        detect_scene(str(rpc_only), scorer=BandOneScorer(), config=config)


@pytest.mark.parametrize("kind", ["uint8", "uint8 with nodata", "float32 with nan", "resampled"])
def test_reading_tiles_from_row_strips_gives_what_reading_each_gives(geotiff, kind):
    rng = np.random.default_rng(3)
    array = rng.integers(1, 256, (3, 45, 61)).astype(np.uint8)
    options, gsd = {}, None
    if kind == "uint8 with nodata":
        array[:, 10:20, 30:50] = 0
        options["nodata"] = 0
    elif kind == "float32 with nan":
        array = array.astype(np.float32)
        array[1, 30:33, 5:9] = np.nan
    elif kind == "resampled":
        gsd = 0.7  # the file is 0.5 m
    with SceneReader(geotiff(array, **options), gsd_m=gsd) as reader:
        assert reader.info.has_mask == (kind == "uint8 with nodata")
        tiles = list(iter_tiles(reader.info.grid, TileSpec(16, 4, context_px=5)))
        assert len({t.tile_row for t in tiles}) > 2
        size = tiles[0].window.height
        block = np.full((len(tiles), 3, size, size), np.nan, dtype=np.float32)  # stale values must go
        images = reader.read_tiles(tiles, block)
        for tile, slot, image in zip(tiles, block, images):
            alone = reader.read_tile(tile)
            assert image.tile == tile and np.shares_memory(image.pixels, slot)
            if kind == "resampled":  # GDAL's kernel over another window: a rounding step at most
                assert np.abs(alone.pixels - slot).max() <= 1.01 / 255
            else:
                assert alone.pixels.tobytes() == slot.tobytes()
            assert (alone.valid == image.valid).all()
        # batched otherwise (as a resumed run would), the same pixels to the bit
        again = np.zeros_like(block)
        for start in range(0, len(tiles), 5):
            reader.read_tiles(tiles[start:start + 5][::-1], again[start:start + 5][::-1])
        assert again.tobytes() == block.tobytes()
