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
from pyproj import Geod, Transformer
from rasterio.crs import CRS
from rasterio.windows import Window

from solarmap.errors import GeoreferenceError, OptionError


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
        """Pixel size on the ground in metres (x, y) at the grid's centre, for any CRS."""
        return ground_resolution_m(self.transform, self.crs, self.height, self.width)

    def ground_resolution(self) -> "GroundResolution":
        return ground_resolution(self.transform, self.crs, self.height, self.width)


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


@dataclass(frozen=True)
class GroundResolution:
    """The size of a grid's pixels on the ground, and how it was found.

    ``x_m``, ``y_m``: metres on the ground at the grid's centre, measured geodesically on the CRS's
    ellipsoid, so they are right for any CRS: projections whose scale varies (web mercator: one unit
    is cos(latitude) metres), geographic CRSs and linear units other than metres alike.
    ``x_units``, ``y_units``: the same pixel in CRS units. ``variation``: the largest relative
    difference between the ground pixel size on the top and the bottom row (resampling a scene to
    one GSD is approximate where it is large).
    """

    x_m: float
    y_m: float
    x_units: float
    y_units: float
    unit: str
    centre_lat: float
    variation: float

    @property
    def mean_m(self) -> float:
        """One pixel size for the grid (the mean of x and y), where one number is compared, e.g. with a
        model's training GSD."""
        return (self.x_m + self.y_m) / 2

    @property
    def differs_from_units(self) -> bool:
        """Whether a CRS unit is not a metre on the ground here (beyond 0.1 %)."""
        return abs(self.x_m / self.x_units - 1) > 1e-3 or abs(self.y_m / self.y_units - 1) > 1e-3

    def describe(self) -> str:
        """E.g. 'pixel 0.2986 x 0.2986 metre = 0.258 x 0.258 m on the ground at 30.30° N'."""
        hemisphere = "N" if self.centre_lat >= 0 else "S"
        ground = f"{self.x_m:.3f} x {self.y_m:.3f} m on the ground at {abs(self.centre_lat):.2f}° {hemisphere}"
        if not self.differs_from_units:
            return f"pixel {ground}"
        return f"pixel {self.x_units:.4g} x {self.y_units:.4g} {self.unit} = {ground}"


def ground_resolution(transform: Affine, crs: CRS | None, height: int, width: int) -> GroundResolution:
    """Ground size of the pixels of a grid (see :class:`GroundResolution`)."""
    if crs is None:
        raise GeoreferenceError("the raster has no CRS; georeference it first (e.g. gdal_edit.py -a_srs EPSG:xxxx)")
    pcrs = ProjCRS.from_user_input(crs.to_wkt())
    to_lonlat = Transformer.from_crs(pcrs, pcrs.geodetic_crs, always_xy=True)
    geod = pcrs.get_geod() or Geod(ellps="WGS84")

    def metres(col: float, row: float) -> tuple[float, float]:
        """Ground size of one pixel around (col, row), from a step of up to 64 pixels."""
        step_c, step_r = min(64.0, max(width, 1)), min(64.0, max(height, 1))
        points = [transform @ (col - step_c / 2, row), transform @ (col + step_c / 2, row),
                  transform @ (col, row - step_r / 2), transform @ (col, row + step_r / 2)]
        lon, lat = to_lonlat.transform([p[0] for p in points], [p[1] for p in points])
        _, _, along_x = geod.inv(lon[0], lat[0], lon[1], lat[1])
        _, _, along_y = geod.inv(lon[2], lat[2], lon[3], lat[3])
        return along_x / step_c, along_y / step_r

    x_m, y_m = metres(width / 2, height / 2)
    top, bottom = metres(width / 2, 0.5), metres(width / 2, height - 0.5)
    variation = max(abs(t - b) / c for t, b, c in zip(top, bottom, (x_m, y_m)))
    _, centre_lat = to_lonlat.transform(*(transform @ (width / 2, height / 2)))
    unit = pcrs.axis_info[0].unit_name if pcrs.axis_info else "unit"
    return GroundResolution(x_m=x_m, y_m=y_m, x_units=math.hypot(transform.a, transform.d),
                            y_units=math.hypot(transform.b, transform.e), unit=unit, centre_lat=float(centre_lat),
                            variation=variation)


GSD_VARIATION_WARNING = 0.03  # above this, one GSD per scene is said to be approximate


def ground_variation_note(ground: GroundResolution) -> str:
    """Why one GSD per scene is approximate for a raster whose ground pixel size varies."""
    return (f"the ground pixel size changes by {100 * ground.variation:.1f} % from the top to the bottom of this "
            f"raster (a large range of latitudes); it is resampled to one GSD, right at its centre, so tiles far "
            f"from the centre are seen at a scale up to that much off (split the raster into bands of rows to "
            f"avoid it)")


def ground_resolution_m(transform: Affine, crs: CRS | None, height: int, width: int) -> tuple[float, float]:
    """Ground size of one pixel in metres along x and y, at the grid's centre."""
    ground = ground_resolution(transform, crs, height, width)
    return ground.x_m, ground.y_m


def resampled_grid(grid: Grid, gsd_m: float | None) -> Grid:
    """The grid covering the same extent with pixels of ``gsd_m`` metres on the ground at its centre
    (``None``: unchanged), whatever the CRS's units and scale there.

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
