"""Scene grid -> tiles: pure window and affine arithmetic, no file access.

A :class:`Grid` is the georeferenced pixel grid the model sees (the raster's own grid, or a
resampled one at a target ground sample distance). A :class:`Tile` is a fully georeferenced square
piece of that grid: its window, its own affine transform and the CRS travel with it, so nothing
downstream needs the raster to place a tile on the map.

Each tile also owns a *core*: the tiles' cores partition the grid (the overlap between two
neighbours is split down the middle). Polygons are cut to the core of the tile that produced them,
so a panel seen twice in an overlap is counted once and pieces meet exactly at the seams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from affine import Affine
from pyproj import CRS as ProjCRS
from rasterio.crs import CRS
from rasterio.windows import Window

from solarmap.errors import GeoreferenceError, OptionError

# Mean radius of the WGS84 ellipsoid's meridian degree and equator degree, in metres; only used to
# choose a resampling factor for geographic rasters (areas are computed geodesically elsewhere).
_M_PER_DEG_LAT = 110_574.0
_M_PER_DEG_LON_EQUATOR = 111_320.0


@dataclass(frozen=True)
class Grid:
    """A georeferenced pixel grid (like odc-geo's GeoBox): shape, affine transform, CRS."""

    height: int
    width: int
    transform: Affine
    crs: CRS

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise OptionError(f"grid must have a positive size, got {self.height} x {self.width} px")

    def window_transform(self, window: Window) -> Affine:
        """Transform of the pixel at ``window``'s top-left corner (windows may extend past the grid)."""
        return self.transform @ Affine.translation(window.col_off, window.row_off)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) in the grid's CRS."""
        xs, ys = zip(*(self.transform @ (c, r) for c in (0, self.width) for r in (0, self.height)))
        return min(xs), min(ys), max(xs), max(ys)

    def ground_resolution_m(self) -> tuple[float, float]:
        """Pixel size on the ground in metres (x, y); approximate at the grid's centre if geographic."""
        return ground_resolution_m(self.transform, self.crs, self.height, self.width)


@dataclass(frozen=True)
class TileSpec:
    """How to cut a grid: square tiles of ``tile_size_px`` overlapping by ``overlap_px``.

    ``context_px`` widens every tile's window by that many pixels on each side (padded past the
    grid's edges) without moving the tiles: the model sees the surroundings of what it classifies,
    which a CAM whose responses sit off the object (see :mod:`solarmap.cam`) needs.
    """

    tile_size_px: int
    overlap_px: int = 0
    context_px: int = 0

    def __post_init__(self) -> None:
        if self.tile_size_px <= 0:
            raise OptionError(f"tile size must be a positive number of pixels, got {self.tile_size_px}")
        if self.overlap_px < 0:
            raise OptionError(f"overlap must be zero or more pixels, got {self.overlap_px}")
        if self.overlap_px >= self.tile_size_px:
            raise OptionError(
                f"overlap ({self.overlap_px} px) must be smaller than the tile size ({self.tile_size_px} px)"
            )
        if self.context_px < 0:
            raise OptionError(f"context must be zero or more pixels, got {self.context_px}")

    @property
    def stride_px(self) -> int:
        return self.tile_size_px - self.overlap_px

    @property
    def window_px(self) -> int:
        """Side of the window read for each tile: the tile and its context."""
        return self.tile_size_px + 2 * self.context_px


@dataclass(frozen=True)
class Tile:
    """One georeferenced tile of a grid.

    ``window`` is what is read: the tile plus its context on every side (always
    ``TileSpec.window_px`` square; past the grid's edges it is padded when read). ``valid`` is the
    part of the window inside the grid and ``core`` the part this tile owns; all three are in grid
    pixel coordinates (a window may start at negative offsets).
    """

    tile_row: int
    tile_col: int
    window: Window
    valid: Window
    core: Window
    transform: Affine
    crs: CRS

    @property
    def key(self) -> tuple[int, int]:
        return (self.tile_row, self.tile_col)

    @property
    def core_slices(self) -> tuple[slice, slice]:
        """The core as (rows, cols) slices of the window's pixel array."""
        r0 = int(self.core.row_off - self.window.row_off)
        c0 = int(self.core.col_off - self.window.col_off)
        return slice(r0, r0 + int(self.core.height)), slice(c0, c0 + int(self.core.width))

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of the full tile window in the CRS."""
        size_w, size_h = int(self.window.width), int(self.window.height)
        xs, ys = zip(*(self.transform @ (c, r) for c in (0, size_w) for r in (0, size_h)))
        return min(xs), min(ys), max(xs), max(ys)


def axis_offsets(length_px: int, spec: TileSpec) -> list[int]:
    """Start offsets of the tiles along one axis; the last tile may overhang the end (padding)."""
    if length_px <= 0:
        raise OptionError(f"axis length must be positive, got {length_px}")
    count = max(1, math.ceil((length_px - spec.overlap_px) / spec.stride_px))
    return [i * spec.stride_px for i in range(count)]


def axis_cores(offsets: list[int], length_px: int, spec: TileSpec) -> list[tuple[int, int]]:
    """(start, stop) of each tile's core along one axis: a partition of [0, length_px).

    The seam between two neighbours sits in the middle of their overlap, so every core pixel is
    at least ``overlap_px // 2`` from the edge of its tile, where CNN context is poorest.
    """
    seams = [(offsets[i + 1] + offsets[i] + spec.tile_size_px) // 2 for i in range(len(offsets) - 1)]
    starts = [0, *seams]
    stops = [*seams, length_px]
    return list(zip(starts, stops))


def tile_grid_shape(grid: Grid, spec: TileSpec) -> tuple[int, int]:
    """Number of tile rows and columns."""
    return len(axis_offsets(grid.height, spec)), len(axis_offsets(grid.width, spec))


def iter_tiles(grid: Grid, spec: TileSpec) -> Iterator[Tile]:
    """Tiles in row-major order (the order the seam merger expects)."""
    row_offsets = axis_offsets(grid.height, spec)
    col_offsets = axis_offsets(grid.width, spec)
    row_cores = axis_cores(row_offsets, grid.height, spec)
    col_cores = axis_cores(col_offsets, grid.width, spec)
    size, context = spec.window_px, spec.context_px
    for tile_row, (row_off, (core_r0, core_r1)) in enumerate(zip(row_offsets, row_cores)):
        row0 = row_off - context
        valid_r0, valid_r1 = max(0, row0), min(grid.height, row0 + size)
        for tile_col, (col_off, (core_c0, core_c1)) in enumerate(zip(col_offsets, col_cores)):
            col0 = col_off - context
            valid_c0, valid_c1 = max(0, col0), min(grid.width, col0 + size)
            window = Window(col0, row0, size, size)
            yield Tile(
                tile_row=tile_row,
                tile_col=tile_col,
                window=window,
                valid=Window(valid_c0, valid_r0, valid_c1 - valid_c0, valid_r1 - valid_r0),
                core=Window(core_c0, core_r0, core_c1 - core_c0, core_r1 - core_r0),
                transform=grid.window_transform(window),
                crs=grid.crs,
            )


def ground_resolution_m(transform: Affine, crs: CRS | None, height: int, width: int) -> tuple[float, float]:
    """Ground size of one pixel in metres along x and y.

    Projected CRSs use their linear unit; geographic CRSs use the local size of a degree at the
    grid's centre latitude (good to a fraction of a percent over a scene, which is all that
    choosing a resampling factor needs).
    """
    if crs is None:
        raise GeoreferenceError("the raster has no CRS; georeference it first (e.g. gdal_edit.py -a_srs EPSG:xxxx)")
    col_step = math.hypot(transform.a, transform.d)
    row_step = math.hypot(transform.b, transform.e)
    pcrs = ProjCRS.from_user_input(crs.to_wkt())
    if pcrs.is_geographic:
        _, centre_lat = transform @ (width / 2, height / 2)
        lon_m = _M_PER_DEG_LON_EQUATOR * math.cos(math.radians(centre_lat))
        return col_step * lon_m, row_step * _M_PER_DEG_LAT
    unit_m = pcrs.axis_info[0].unit_conversion_factor if pcrs.axis_info else 1.0
    return col_step * unit_m, row_step * unit_m


def resampled_grid(grid: Grid, gsd_m: float | None) -> Grid:
    """The grid covering the same extent with pixels of ``gsd_m`` metres (``None``: unchanged).

    The extent is kept exactly; the pixel size is rounded so a whole number of pixels fits, so the
    realised GSD differs from ``gsd_m`` by less than one pixel over the whole raster.
    """
    if gsd_m is None:
        return grid
    if not gsd_m > 0:
        raise OptionError(f"target GSD must be positive metres, got {gsd_m}")
    res_x_m, res_y_m = grid.ground_resolution_m()
    width = max(1, round(grid.width * res_x_m / gsd_m))
    height = max(1, round(grid.height * res_y_m / gsd_m))
    if (width, height) == (grid.width, grid.height):
        return grid
    transform = grid.transform @ Affine.scale(grid.width / width, grid.height / height)
    return Grid(height=height, width=width, transform=transform, crs=grid.crs)
