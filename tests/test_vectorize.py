import math

import numpy as np
import pytest
import shapely
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.windows import Window
from scipy import ndimage

from conftest import BandOneScorer, UTM_ORIGIN, rectangle_raster, write_tif
from solarmap.pipeline import DetectConfig, detect_scene
from solarmap.geo.tiling import Grid, TileSpec, iter_tiles
from solarmap.geo.vectorize import (Piece, SeamMerger, batch_core_pieces, core_pieces, geodesic_area_m2, mask_pieces, merge_pieces,
                                upsample_scores)

WGS84_A = 6_378_137.0
WGS84_E2 = 0.0066943799901413165
LAT = 36.75


def radii(lat_deg):
    """Meridian (M) and prime-vertical (N) radii of curvature of WGS84 at a latitude."""
    s = math.sin(math.radians(lat_deg))
    w = 1 - WGS84_E2 * s * s
    return WGS84_A * (1 - WGS84_E2) / w ** 1.5, WGS84_A / math.sqrt(w)


def detect(path, tile=299, overlap=0, **kw):
    cfg = DetectConfig(tile_size_px=tile, overlap_px=overlap, min_area_m2=0.0, **kw)
    frame, stats = detect_scene(path, scorer=BandOneScorer(), config=cfg)
    return frame, stats


# ---- golden cases: a 6 x 4 px rectangle of 0.5 m pixels is one 6 m² polygon -------------------

def test_golden_rectangle_utm(geotiff):
    path = geotiff(rectangle_raster(20, 20, (5, 3, 9, 9)))  # rows 5-8, cols 3-8
    frame, _ = detect(path)
    assert len(frame) == 1
    x0, y0 = UTM_ORIGIN
    assert frame.geometry.iloc[0].bounds == pytest.approx((x0 + 1.5, y0 - 4.5, x0 + 4.5, y0 - 2.5))
    # near the central meridian the UTM scale factor is 0.9996: ground area is 6 / 0.9996² m²
    assert frame.area_m2.iloc[0] == pytest.approx(6 / 0.9996 ** 2, rel=1e-4)
    assert frame.crs.to_epsg() == 32611


def test_golden_rectangle_epsg4326(geotiff):
    m, n = radii(LAT)
    dlat = math.degrees(0.5 / m)
    dlon = math.degrees(0.5 / (n * math.cos(math.radians(LAT))))
    transform = Affine(dlon, 0, -119.8, 0, -dlat, LAT + 10 * dlat)
    path = geotiff(rectangle_raster(20, 20, (5, 3, 9, 9)), transform=transform, crs="EPSG:4326")
    frame, _ = detect(path)
    assert len(frame) == 1
    minx, miny, maxx, maxy = frame.geometry.iloc[0].bounds
    assert (minx, maxx) == pytest.approx((-119.8 + 3 * dlon, -119.8 + 9 * dlon), abs=1e-12)
    assert (maxy, miny) == pytest.approx((LAT + 5 * dlat, LAT + 1 * dlat), abs=1e-12)
    assert frame.area_m2.iloc[0] == pytest.approx(6.0, rel=1e-4)
    assert frame.centroid_lat.iloc[0] == pytest.approx(LAT + 3 * dlat, abs=1e-9)


def test_golden_rectangle_web_mercator_is_not_inflated(geotiff):
    m, n = radii(LAT)
    cos = math.cos(math.radians(LAT))
    px_x = 0.5 * WGS84_A / (n * cos)  # web-mercator units per 0.5 m of ground
    px_y = 0.5 * WGS84_A / (m * cos)
    transform = Affine(px_x, 0, -13_335_000.0, 0, -px_y, 4_405_000.0)
    path = geotiff(rectangle_raster(20, 20, (5, 3, 9, 9)), transform=transform, crs="EPSG:3857")
    frame, _ = detect(path)
    assert len(frame) == 1
    planar = frame.geometry.iloc[0].area
    assert planar == pytest.approx(6 / cos ** 2, rel=2e-3)  # what a naive area would report
    assert frame.area_m2.iloc[0] == pytest.approx(6.0, rel=1e-3)


# ---- seams ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rect, tiles_touched", [((10, 12, 20, 20), 2), ((12, 12, 20, 20), 4)])
@pytest.mark.parametrize("overlap", [0, 4])
def test_rectangle_cut_by_tiles_is_one_polygon(geotiff, rect, tiles_touched, overlap):
    path = geotiff(rectangle_raster(40, 40, rect))
    frame, stats = detect(path, tile=16, overlap=overlap)
    assert stats.tiles_positive >= tiles_touched
    assert len(frame) == 1
    r0, c0, r1, c1 = rect
    geom = frame.geometry.iloc[0]
    assert geom.is_valid and len(geom.exterior.coords) == 5  # a clean rectangle, no seam vertices
    x0, y0 = UTM_ORIGIN
    assert geom.bounds == pytest.approx((x0 + c0 * 0.5, y0 - r1 * 0.5, x0 + c1 * 0.5, y0 - r0 * 0.5))
    assert geom.area == pytest.approx((r1 - r0) * (c1 - c0) * 0.25)


def test_holes_are_kept(geotiff):
    array = rectangle_raster(30, 30, (5, 5, 20, 20))
    array[:, 9:13, 9:13] = 0
    frame, _ = detect(geotiff(array), tile=12, overlap=2)
    (geom,) = frame.geometry
    assert len(geom.interiors) == 1
    assert geom.area == pytest.approx((15 * 15 - 16) * 0.25)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), tile=st.integers(6, 40), overlap_frac=st.floats(0, 0.6))
def test_tiled_vectorization_equals_whole_mask(tmp_path, seed, tile, overlap_frac):
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((57, 63)) < 0.35, iterations=1)
    overlap = min(int(tile * overlap_frac), tile - 1)
    path = write_tif(tmp_path / f"m{seed}.tif", np.repeat(mask[None].astype(np.float32), 3, axis=0))
    frame, _ = detect(path, tile=tile, overlap=overlap)
    whole = mask_pieces(mask, row_off=0, col_off=0)
    assert len(frame) == len(whole)
    assert frame.geometry.area.sum() == pytest.approx(mask.sum() * 0.25)
    assert all(frame.geometry.is_valid)
    assert not shapely.union_all(frame.geometry.values).is_empty


# ---- pieces, merging, score maps ------------------------------------------------------------

def test_empty_mask_gives_nothing():
    assert mask_pieces(np.zeros((8, 8), bool), row_off=0, col_off=0) == []


def test_cam_peak_is_the_max_of_each_component():
    mask = np.zeros((10, 10), bool)
    mask[1:3, 1:3] = True
    mask[6:9, 6:9] = True
    cam = np.zeros((10, 10), np.float32)
    cam[2, 2] = 0.7
    cam[7, 7] = 0.9
    peaks = sorted(p.cam_peak for p in mask_pieces(mask, row_off=0, col_off=0, cam_map=cam))
    assert peaks == pytest.approx([0.7, 0.9])


def test_merge_keeps_corner_contacts_apart_and_takes_max_score():
    a = Piece(shapely.box(0, 0, 2, 2), score=0.6, cam_peak=1.0)
    b = Piece(shapely.box(2, 0, 4, 2), score=0.9, cam_peak=2.0)  # shares an edge with a
    c = Piece(shapely.box(4, 2, 5, 3), score=0.5, cam_peak=3.0)  # touches b at a corner only
    merged = merge_pieces([a, b, c])
    areas = sorted(p.geometry.area for p in merged)
    assert areas == [1.0, 8.0]
    big = max(merged, key=lambda p: p.geometry.area)
    assert big.score == 0.9


def test_merger_holds_only_one_row_of_open_polygons():
    grid = Grid(200, 200, Affine(0.5, 0, 0, 0, -0.5, 0), crs=None)
    spec = TileSpec(20, 0)
    merger = SeamMerger((200, 200))
    finished, peak_open = [], 0
    for tile in iter_tiles(grid, spec):
        mask = np.zeros((20, 20), bool)
        mask[8:12, :] = True  # a horizontal strip through every tile: open on left/right seams
        finished += merger.add(tile.core, core_pieces(tile, mask))
        peak_open = max(peak_open, merger.open_count)
    finished += merger.finish()
    assert len(finished) == 10  # one strip per tile row, each merged across 10 tiles
    assert peak_open <= 10  # never more than one row of tiles' pieces


def test_upsample_scores_resizes_and_keeps_alignment():
    coarse = np.zeros((4, 4), np.float32)
    coarse[:, 2:] = 1.0
    fine = upsample_scores(coarse, (16, 16))
    assert fine.shape == (16, 16)
    assert (fine[:, :7] < 0.5).all() and (fine[:, 9:] > 0.5).all()  # edge stays in the middle


def test_geodesic_area_of_a_degree_box_matches_closed_form():
    # area of a lat/lon box on the ellipsoid, small enough for the local-radius formula
    m, n = radii(LAT)
    d = 1e-4
    expected = math.radians(d) * m * math.radians(d) * n * math.cos(math.radians(LAT))
    box = shapely.box(-119.8, LAT - d / 2, -119.8 + d, LAT + d / 2)
    assert geodesic_area_m2([box], "EPSG:4326")[0] == pytest.approx(expected, rel=1e-4)


def test_core_pieces_are_placed_on_the_grid():
    grid = Grid(100, 100, Affine(1, 0, 0, 0, -1, 0), crs=None)
    tiles = {t.key: t for t in iter_tiles(grid, TileSpec(40, 10))}
    tile = tiles[(1, 1)]  # window starts at (30, 30); core starts at 35
    mask = np.zeros((40, 40), bool)
    mask[10:14, 10:16] = True  # grid rows 40-43, cols 40-45
    (piece,) = core_pieces(tile, mask)
    assert piece.geometry.bounds == (40, 40, 46, 44)
    assert tile.core == Window(35, 35, 30, 30)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), with_cam=st.booleans())
def test_batch_core_pieces_equal_core_pieces_tile_by_tile(seed, with_cam):
    rng = np.random.default_rng(seed)
    grid = Grid(70, 95, Affine(1, 0, 0, 0, -1, 0), crs=None)  # edge tiles have larger cores
    spec = TileSpec(24, 6, context_px=4)
    items = []
    for tile in list(iter_tiles(grid, spec))[rng.integers(0, 5):][:rng.integers(1, 12)]:
        size = int(tile.window.height)
        mask = ndimage.binary_opening(rng.random((size, size)) < rng.uniform(0, 0.7))  # blobs, holes, empties
        cam = rng.random((size, size)).astype(np.float32) if with_cam else None
        items.append((tile, mask, float(rng.random()), cam))
    batched = batch_core_pieces(items)
    assert len(batched) == len(items)
    for (tile, mask, score, cam), pieces in zip(items, batched):
        expected = core_pieces(tile, mask, score=score, cam_map=cam)
        assert [(p.score, p.cam_peak) for p in pieces] == [(p.score, p.cam_peak) for p in expected]
        assert all(a.geometry.equals_exact(b.geometry, 0) for a, b in zip(pieces, expected))
