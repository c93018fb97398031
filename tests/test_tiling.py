import math

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.crs import CRS

from solarmap.errors import GeoreferenceError, OptionError
from solarmap.geo.tiling import (Grid, TileSpec, axis_cores, axis_offsets, ground_resolution_m, iter_tiles,
                             resampled_grid, tile_grid_shape)

UTM = CRS.from_epsg(32611)


def grid(h, w, res=0.5, crs=UTM):
    return Grid(height=h, width=w, transform=Affine(res, 0, 500_000, 0, -res, 4_000_000), crs=crs)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 900), tile=st.integers(1, 300), overlap_frac=st.floats(0, 0.95))
def test_every_pixel_covered_and_cores_partition(length, tile, overlap_frac):
    overlap = min(int(tile * overlap_frac), tile - 1)
    spec = TileSpec(tile, overlap)
    offsets = axis_offsets(length, spec)
    covered = np.zeros(length, dtype=int)
    for off in offsets:
        covered[off: off + tile] += 1
    assert covered.min() >= 1  # every pixel covered
    assert offsets[-1] < length  # no tile entirely outside the raster
    cores = axis_cores(offsets, length, spec)
    owned = np.zeros(length, dtype=int)
    for (start, stop), off in zip(cores, offsets):
        assert off <= start <= stop <= off + tile  # a core lies inside its tile
        owned[start:stop] += 1
    assert (owned == 1).all()  # cores partition the axis


def test_tiles_carry_their_own_transform_and_crs():
    g = grid(700, 500)
    tiles = list(iter_tiles(g, TileSpec(256, 32)))
    assert tile_grid_shape(g, TileSpec(256, 32)) == (3, 3)
    assert len(tiles) == 9
    for t in tiles:
        assert t.crs == UTM
        # the tile's own transform maps its pixel (0, 0) to the grid pixel at its window offset
        assert t.transform @ (0, 0) == g.transform @ (t.window.col_off, t.window.row_off)
        assert t.transform @ (10, 20) == pytest.approx(g.transform @ (t.window.col_off + 10, t.window.row_off + 20))
        assert t.window.width == t.window.height == 256
    last = tiles[-1]
    assert (last.window.col_off, last.window.row_off) == (448, 448)
    assert (last.valid.width, last.valid.height) == (500 - 448, 700 - 448)  # padded past the edge


def test_raster_smaller_than_one_tile_gives_one_padded_tile():
    (tile,) = list(iter_tiles(grid(40, 30), TileSpec(299, 32)))
    assert (tile.valid.width, tile.valid.height) == (30, 40)
    assert (tile.core.width, tile.core.height) == (30, 40)


@pytest.mark.parametrize("size, overlap, match", [(0, 0, "positive"), (-5, 0, "positive"),
                                                   (64, 64, "smaller than"), (64, 80, "smaller than"),
                                                   (64, -1, "zero or more")])
def test_bad_tile_specs_are_refused(size, overlap, match):
    with pytest.raises(OptionError, match=match):
        TileSpec(size, overlap)


def test_resampled_grid_keeps_extent_and_reaches_target_gsd():
    g = grid(1000, 800, res=0.15)
    r = resampled_grid(g, 0.3)
    assert (r.height, r.width) == (500, 400)
    assert r.bounds == pytest.approx(g.bounds)
    assert r.ground_resolution_m() == pytest.approx((0.3, 0.3), rel=1e-3)  # UTM's scale factor: 0.04 % here
    assert resampled_grid(g, None) is g


def test_ground_resolution_of_geographic_grid_uses_local_degree_size():
    from pyproj import Geod

    lat = 36.75
    deg = 1e-5
    g = Grid(height=100, width=100, transform=Affine(deg, 0, -119.8, 0, -deg, lat + 50 * deg),
             crs=CRS.from_epsg(4326))
    gx, gy = g.ground_resolution_m()
    geod = Geod(ellps="WGS84")  # the lengths of 100 degrees' worth of pixels along a parallel and a meridian
    assert gx == pytest.approx(geod.line_length([-119.8, -119.8 + 100 * deg], [lat, lat]) / 100, rel=1e-4)
    assert gy == pytest.approx(geod.line_length([-119.8, -119.8], [lat - 50 * deg, lat + 50 * deg]) / 100, rel=1e-4)
    assert gx == pytest.approx(deg * 111_320 * math.cos(math.radians(lat)), rel=5e-3)  # the textbook sizes


def test_missing_crs_is_a_georeference_error():
    with pytest.raises(GeoreferenceError, match="no CRS"):
        ground_resolution_m(Affine.identity(), None, 10, 10)


def test_context_widens_windows_without_moving_tiles_or_cores():
    g = grid(300, 260)
    plain = list(iter_tiles(g, TileSpec(101, 24)))
    wide = list(iter_tiles(g, TileSpec(101, 24, context_px=40)))
    assert len(plain) == len(wide)
    for p, w in zip(plain, wide):
        assert w.core == p.core and w.key == p.key
        assert (w.window.col_off, w.window.row_off) == (p.window.col_off - 40, p.window.row_off - 40)
        assert w.window.width == w.window.height == 181
        # valid = the window clipped to the grid, on all four sides
        assert w.valid.col_off == max(0, w.window.col_off) and w.valid.row_off == max(0, w.window.row_off)
        assert w.valid.col_off + w.valid.width == min(260, w.window.col_off + 181)
        assert w.valid.row_off + w.valid.height == min(300, w.window.row_off + 181)
        assert w.transform @ (0, 0) == g.transform @ (w.window.col_off, w.window.row_off)
    with pytest.raises(OptionError, match="context"):
        TileSpec(101, 24, context_px=-1)
