"""Ground sample distance in any CRS: the model sees the same scale whatever CRS a raster is in.

The rasters here are one synthetic town's pixels written in several CRSs, each pixel sized to the
same metres on the ground by an oracle independent of solarmap's own rule: pyproj's projection
scale factors (solarmap measures geodesic distances instead).
"""

import math

import numpy as np
import pytest
from affine import Affine
from pyproj import CRS, Geod, Proj, Transformer

from conftest import BandOneScorer, write_tif
from solarmap.geo.raster import describe_scene
from solarmap.geo.tiling import Grid, ground_resolution, resampled_grid, tile_grid_shape
from solarmap.pipeline import DetectConfig, detect_scene
from solarmap.training.synth import SynthConfig, render_town

GSD_M = 0.3


def town_in(crs_code: str, pixels: np.ndarray, lon: float, lat: float, path) -> str:
    """``pixels`` centred on (lon, lat) in ``crs_code``, each pixel GSD_M metres on the ground."""
    crs = CRS.from_user_input(crs_code)
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    if crs.is_geographic:
        geod = Geod(ellps="WGS84")
        step_x = geod.fwd(lon, lat, 90, GSD_M)[0] - lon
        step_y = geod.fwd(lon, lat, 0, GSD_M)[1] - lat
    else:
        factors = Proj(crs).get_factors(lon, lat)
        unit_m = crs.axis_info[0].unit_conversion_factor
        step_x = GSD_M * factors.parallel_scale / unit_m
        step_y = GSD_M * factors.meridional_scale / unit_m
    _, height, width = pixels.shape
    transform = Affine(step_x, 0, x - step_x * width / 2, 0, -step_y, y + step_y * height / 2)
    return write_tif(path, pixels, transform=transform, crs=crs.to_wkt())


@pytest.fixture(scope="module", params=[(-105.3, 38.0), (3.0, 52.0)], ids=["38N", "52N"])
def towns(request, tmp_path_factory):
    from rasterio.features import rasterize

    lon, lat = request.param
    town = render_town(SynthConfig(size_px=500, seed=11, lon=lon, lat=lat))
    pixels = np.moveaxis(town.image, -1, 0).copy()
    # band 1 holds the panel arrays (255) and nothing else, for a scorer that reads it as the map
    pixels[0] = 255 * rasterize([a["geometry"] for a in town.arrays], out_shape=pixels.shape[1:],
                                transform=town.transform)
    root = tmp_path_factory.mktemp(f"towns{lat:.0f}")
    codes = ["EPSG:4326", "EPSG:3857"] + (["EPSG:2233"] if lat < 40 else [])  # Colorado South, US survey feet
    utm = f"EPSG:{32600 + int((lon + 180) // 6) + 1}"
    rasters = {code: town_in(code, pixels, lon, lat, root / f"{code.replace(':', '')}.tif") for code in [utm] + codes}
    return rasters, float(town.truth_frame()["area_m2"].sum())


def test_working_grids_tiles_and_panel_area_agree_across_crss(towns):
    rasters, truth_area_m2 = towns
    config = DetectConfig(tile_size_px=16, overlap_px=0, gsd_m=GSD_M, min_area_m2=0.0)
    results = {}
    for code, path in rasters.items():
        grid = describe_scene(path, gsd_m=GSD_M).grid
        frame, _ = detect_scene(path, scorer=BandOneScorer(), config=config)
        results[code] = (grid.ground_resolution_m(), tile_grid_shape(grid, config.tile_spec), frame.area_m2.sum())
    (reference_gsd, reference_tiles, reference_area), *_ = results.values()
    assert reference_area == pytest.approx(truth_area_m2, rel=0.05)
    for code, (gsd, (rows, cols), area) in results.items():
        assert gsd == pytest.approx((GSD_M, GSD_M), rel=0.01), code
        assert rows * cols == pytest.approx(reference_tiles[0] * reference_tiles[1], rel=0.02), code
        assert area == pytest.approx(reference_area, rel=0.05), code


def test_web_mercator_pixels_are_smaller_on_the_ground_and_info_says_so():
    lat = 30.30
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(-97.74, lat)
    ground = ground_resolution(Affine(0.2986, 0, x, 0, -0.2986, y), _rasterio_crs("EPSG:3857"), 1000, 1000)
    assert ground.x_m == pytest.approx(0.2986 * math.cos(math.radians(lat)), rel=0.005)  # ~0.258 m
    assert ground.describe().startswith("pixel 0.2986 x 0.2986 metre = 0.258 x 0.257 m on the ground at ")  # not conformal on the ellipsoid
    assert "30.30° N" in ground.describe() or "30.29° N" in ground.describe()
    grid = Grid(1000, 1000, Affine(0.2986, 0, x, 0, -0.2986, y), _rasterio_crs("EPSG:3857"))
    assert resampled_grid(grid, 0.3).width == pytest.approx(1000 * 0.258 / 0.3, abs=2)  # not left at 1000


def test_utm_units_are_metres_and_not_flagged():
    ground = ground_resolution(Affine(0.3, 0, 500_000, 0, -0.3, 4_000_000), _rasterio_crs("EPSG:32611"), 100, 100)
    assert not ground.differs_from_units and ground.describe().startswith("pixel 0.300 x 0.300 m on the ground")


def test_a_raster_spanning_many_latitudes_reports_its_variation(tmp_path):
    from click.testing import CliRunner

    from solarmap.cli import main

    pixels = np.full((3, 200, 200), 90, np.uint8)  # 2 degrees of latitude per pixel row span: 40-60 N
    path = write_tif(tmp_path / "tall.tif", pixels, transform=Affine(0.001, 0, 10, 0, -0.1, 60), crs="EPSG:4326")
    assert describe_scene(path).source_grid.ground_resolution().variation > 0.3  # cos(40°) vs cos(60°)
    result = CliRunner().invoke(main, ["info", path])
    assert result.exit_code == 0 and "changes by" in result.output
    small = write_tif(tmp_path / "small.tif", pixels, transform=Affine(1e-5, 0, 10, 0, -1e-5, 52), crs="EPSG:4326")
    assert "changes by" not in CliRunner().invoke(main, ["info", small]).output


def _rasterio_crs(code):
    from rasterio.crs import CRS as RioCRS

    return RioCRS.from_user_input(code)
