"""Panels grouped into installations: a farm's rows become one footprint, neighbours stay apart."""

import geopandas as gpd
import numpy as np
import pytest
import shapely

from solarmap.geo.installations import INSTALLATION_COLUMNS, group_installations

UTM = "EPSG:32611"


def panels(geoms, crs=UTM, sources=None):
    geoms = list(geoms)
    frame = gpd.GeoDataFrame({"id": np.arange(1, len(geoms) + 1), "area_m2": [g.area for g in geoms],
                              "score": np.linspace(0.6, 0.9, len(geoms)) if geoms else [],
                              "source": sources or ["a.tif"] * len(geoms)}, geometry=geoms, crs=UTM)
    return frame.to_crs(crs)


def farm(x0=500_000.0, y0=4_000_000.0, rows=6, row_m=2.0, gap_m=3.0, length_m=40.0):
    return [shapely.box(x0, y0 + k * (row_m + gap_m), x0 + length_m, y0 + k * (row_m + gap_m) + row_m)
            for k in range(rows)]


def test_a_farms_rows_become_one_footprint_with_its_gaps():
    rows = farm()
    result = group_installations(panels(rows), join_m=4.0)
    assert list(result.columns) == [*INSTALLATION_COLUMNS, "geometry"]
    assert len(result) == 1
    one = result.iloc[0]
    assert one.n_panels == 6 and one.panel_area_m2 == pytest.approx(6 * 80)
    hull = shapely.box(500_000, 4_000_000, 500_040, 4_000_000 + 5 * 5 + 2)  # the rows and the gaps between them
    assert shapely.symmetric_difference(one.geometry, hull).area < 0.02 * hull.area
    assert one.footprint_area_m2 == pytest.approx(hull.area, rel=0.03)  # geodesic, near the UTM central meridian
    assert one.score == pytest.approx(0.9) and one.kind == "unknown"


def test_neighbours_further_apart_than_the_join_distance_stay_apart():
    roof_a = shapely.box(500_000, 4_000_000, 500_008, 4_000_004)
    roof_b = shapely.box(500_018, 4_000_000, 500_026, 4_000_004)  # 10 m away, across a street
    result = group_installations(panels([roof_a, roof_b]), join_m=4.0)
    assert len(result) == 2 and result.n_panels.tolist() == [1, 1]
    assert result.footprint_area_m2.to_numpy() == pytest.approx([32, 32], rel=0.01)  # closing keeps a box a box
    assert len(group_installations(panels([roof_a, roof_b]), join_m=12.0)) == 1


def test_rasters_are_never_joined_and_any_crs_gives_the_same_groups():
    rows = farm()
    two_rasters = group_installations(panels(rows, sources=["a.tif"] * 3 + ["b.tif"] * 3), join_m=4.0)
    assert sorted(two_rasters.n_panels) == [3, 3] and set(two_rasters.source) == {"a.tif", "b.tif"}
    in_degrees = group_installations(panels(rows, crs="EPSG:4326"), join_m=4.0)
    in_utm = group_installations(panels(rows), join_m=4.0)
    assert in_degrees.crs == "EPSG:4326" and len(in_degrees) == 1
    assert in_degrees.footprint_area_m2.iloc[0] == pytest.approx(in_utm.footprint_area_m2.iloc[0], rel=0.01)


def test_no_panels_give_an_empty_layer_with_the_columns():
    result = group_installations(panels([]))
    assert len(result) == 0 and list(result.columns) == [*INSTALLATION_COLUMNS, "geometry"]


def test_detect_writes_the_installations_layer_beside_the_panels(tmp_path, geotiff, band_one_scorer):
    """A farm of five rows 1.5 m apart (0.5 m pixels) and a roof 15 m away: five panels, two
    installations, styled, in the same GeoPackage; a regional run writes the same layer."""
    import pyogrio
    import rasterio

    from conftest import write_tif
    from solarmap.geo.output import read_layer_metadata
    from solarmap.pipeline import DetectConfig, detect_to_file
    from solarmap.pipeline.regional import detect_regional

    image = np.zeros((3, 120, 120), np.float32)
    for k in range(4):
        image[0, 10 + 7 * k: 14 + 7 * k, 10:70] = 1.0  # rows 2 m wide, 1.5 m apart
    image[0, 80:90, 80:90] = 1.0  # a roof array 5 m across
    scene = geotiff(image)
    config = DetectConfig(tile_size_px=64, overlap_px=8, join_m=4.0)
    out = tmp_path / "out.gpkg"
    stats = detect_to_file(scene, out, scorer=band_one_scorer, config=config)
    layers = [name for name, _ in pyogrio.list_layers(out)]
    assert "panels" in layers and "installations" in layers
    panels, installations = (gpd.read_file(out, layer=name) for name in ("panels", "installations"))
    assert len(panels) == 5 and len(installations) == stats.installations == 2
    farm_row = installations.loc[installations.n_panels.idxmax()]
    assert farm_row.n_panels == 4 and farm_row.footprint_area_m2 == pytest.approx(30 * (3 * 3.5 + 2), rel=0.05)
    assert installations.panel_area_m2.sum() == pytest.approx(panels.area_m2.sum())
    assert read_layer_metadata(out, "installations")["join_m"] == "4.0"
    import sqlite3

    with sqlite3.connect(out) as con:
        styled = {row[0] for row in con.execute("SELECT f_table_name FROM layer_styles")}
    assert styled == {"panels", "installations"}
    regional, rstats = detect_regional([scene, write_tif(tmp_path / "empty.tif", np.zeros((3, 40, 40), np.float32))],
                                       tmp_path / "region.gpkg", scorer_spec=band_one_scorer, config=config)
    assert rstats.installations == 2
    assert len(gpd.read_file(tmp_path / "region.gpkg", layer="installations")) == 2
    with rasterio.open(scene) as src:
        assert src.res == (0.5, 0.5)


def test_panels_touching_one_footprint_region_are_one_installation_that_covers_it():
    """The outline network's footprint regions join rows farther apart than the join distance and
    widen the footprint; regions of another raster, or touching no panel, change nothing."""
    rows = [shapely.box(500_000, 4_000_000, 500_040, 4_000_002), shapely.box(500_000, 4_000_012, 500_040, 4_000_014)]
    ground = shapely.box(499_999, 3_999_999, 500_041, 4_000_015)  # the farm with its 10 m gap
    far = shapely.box(500_200, 4_000_200, 500_210, 4_000_210)
    alone = group_installations(panels(rows), join_m=4.0)
    assert len(alone) == 2
    joined = group_installations(panels(rows), join_m=4.0, footprints=[("a.tif", ground), ("a.tif", far)])
    assert len(joined) == 1 and joined.n_panels.iloc[0] == 2
    assert joined.panel_area_m2.iloc[0] == pytest.approx(160)  # capacity still from the modules
    assert shapely.symmetric_difference(joined.geometry.iloc[0], ground).area < 1e-6 * ground.area
    assert joined.footprint_area_m2.iloc[0] == pytest.approx(ground.area, rel=0.01)
    other_raster = group_installations(panels(rows), join_m=4.0, footprints=[("b.tif", ground)])
    assert len(other_raster) == 2
    in_degrees = group_installations(panels(rows, crs="EPSG:4326"), join_m=4.0, footprints=[
        ("a.tif", gpd.GeoSeries([ground], crs=UTM).to_crs("EPSG:4326").iloc[0])])
    assert len(in_degrees) == 1 and in_degrees.footprint_area_m2.iloc[0] == pytest.approx(ground.area, rel=0.01)


class FootprintScorer:
    """Test scorer: panels are band 1, the footprint output band 2 (as the outline network's two outputs)."""

    name = "band-one-footprint-two"
    has_footprints = True

    def __call__(self, pixels):
        maps = pixels[:, 0].astype(np.float32)
        return (maps.reshape(len(maps), -1).max(axis=1) >= 0.5).astype(np.float32), maps

    def footprint_maps(self, pixels):
        return pixels[:, 1].astype(np.float32)


def test_detect_joins_and_widens_installations_by_the_footprint_output(tmp_path, geotiff):
    """Two rows 10 m apart (0.5 m pixels, join 4 m) inside one footprint region that spans tiles:
    one installation covering the region, in single, API and regional runs; without a footprint
    output, two."""
    from solarmap.pipeline import DetectConfig, detect, detect_to_file
    from solarmap.pipeline.regional import detect_regional

    image = np.zeros((3, 120, 120), np.float32)
    image[0, 20:24, 20:100] = 1.0
    image[0, 44:48, 20:100] = 1.0  # 10 m below the first row
    image[1, 18:50, 18:102] = 1.0  # the installation's ground, across a tile seam (tiles of 64 px)
    image[1, 100:110, 100:110] = 1.0  # footprint without panels: never an installation
    scene = geotiff(image)
    config = DetectConfig(tile_size_px=64, overlap_px=8, join_m=4.0)
    ground_m2 = 32 * 84 * 0.25
    out = tmp_path / "out.gpkg"
    stats = detect_to_file(scene, out, scorer=FootprintScorer(), config=config)
    installations = gpd.read_file(out, layer="installations")
    assert stats.installations == len(installations) == 1
    assert installations.n_panels.iloc[0] == 2 and installations.footprint_area_m2.iloc[0] == pytest.approx(ground_m2, rel=0.03)
    detect(scene, scorer=FootprintScorer(), config=config, out=tmp_path / "api.gpkg")
    assert len(gpd.read_file(tmp_path / "api.gpkg", layer="installations")) == 1
    _, rstats = detect_regional([scene], tmp_path / "region.gpkg", scorer_spec=FootprintScorer(), config=config)
    regional = gpd.read_file(tmp_path / "region.gpkg", layer="installations")
    assert rstats.installations == 1 and regional.footprint_area_m2.iloc[0] == pytest.approx(ground_m2, rel=0.03)
    without = tmp_path / "without.gpkg"
    assert detect_to_file(scene, without, scorer=type("NoFootprints", (FootprintScorer,), {"has_footprints": False})(),
                          config=config).installations == 2
