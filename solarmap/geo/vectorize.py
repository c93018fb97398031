"""Score maps -> masks -> polygons in the raster's CRS, merged across tile seams, with areas in m².

Polygons are built and merged in *grid pixel coordinates* (x = column, y = row, integers on pixel
edges), where pieces from neighbouring tile cores share exact edges; only finished polygons are
moved into the CRS. That makes seam merging exact (no slivers, no float tolerance) and lets the
merger stream: a polygon is final once it cannot touch any tile still to come.

Areas are geodesic (on the CRS's ellipsoid), so they are right in any CRS: UTM, EPSG:4326 and web
mercator alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS as ProjCRS
from pyproj import Transformer
from rasterio.features import shapes
from rasterio.windows import Window
from scipy import ndimage
from shapely.geometry import Polygon, shape

from solarmap.geo.tiling import Tile


@dataclass(frozen=True)
class Piece:
    """A polygon in grid pixel coordinates with the evidence that produced it."""

    geometry: Polygon
    score: float
    cam_peak: float


# ---------------------------------------------------------------------------------------------
# Score map -> mask -> pieces


def upsample_scores(score_map: np.ndarray, size_px: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize a coarse score map (e.g. a 35x35 CAM) to the tile's pixel size.

    Cells are treated as areas (cell centres at half-cell offsets), so the map stays aligned
    with the tile whatever the ratio of sizes.
    """
    score_map = np.asarray(score_map, dtype=np.float32)
    if score_map.shape == tuple(size_px):
        return score_map
    zoom = (size_px[0] / score_map.shape[0], size_px[1] / score_map.shape[1])
    out = ndimage.zoom(score_map, zoom, order=1, mode="nearest", grid_mode=True)
    if out.shape != tuple(size_px):  # zoom rounds; fix an off-by-one
        out = out[: size_px[0], : size_px[1]]
        out = np.pad(out, ((0, size_px[0] - out.shape[0]), (0, size_px[1] - out.shape[1])), mode="edge")
    return out


def mask_pieces(mask: np.ndarray, *, row_off: int, col_off: int, score: float = 1.0,
                cam_map: np.ndarray | None = None) -> list[Piece]:
    """Connected components (4-connected) of ``mask`` as polygons with holes, in grid pixels.

    ``row_off``/``col_off`` place the mask's top-left pixel on the grid. ``cam_map`` (same shape)
    gives each piece's CAM peak; without it the peak is the tile score.
    """
    return polygonize_masks([(mask, row_off, col_off, score, cam_map)])[0]


def polygonize_masks(windows: Sequence[tuple[np.ndarray, int, int, float, np.ndarray | None]]) -> list[list[Piece]]:
    """:func:`mask_pieces` of many masks at once: for each (mask, row_off, col_off, score, CAM map
    or None), its pieces, in the order a call of its own would give them.

    The masks are laid side by side in one strip, one empty column between neighbours, and
    labelled and polygonized in one pass: GDAL's polygonize has a fixed cost of about 0.7 ms per
    call, more than a typical tile's own work, and a batch's positive tiles would pay it each.
    """
    out: list[list[Piece]] = [[] for _ in windows]
    used = [(k, np.asarray(mask, dtype=bool), r, c, score, cam)
            for k, (mask, r, c, score, cam) in enumerate(windows) if np.any(mask)]
    if not used:
        return out
    height = max(mask.shape[0] for _, mask, *_ in used)
    starts = np.cumsum([0] + [mask.shape[1] + 1 for _, mask, *_ in used])
    strip = np.zeros((height, int(starts[-1])), dtype=bool)
    peak_source = np.zeros(strip.shape, dtype=np.float64)  # each pixel's CAM value, or its mask's score
    for (_, mask, _, _, score, cam), c0 in zip(used, starts):
        h, w = mask.shape
        strip[:h, c0:c0 + w] = mask
        peak_source[:h, c0:c0 + w] = score if cam is None else cam
    labels, count = ndimage.label(strip)  # 4-connected like shapes(); the empty columns keep masks apart
    inside = labels > 0
    peaks = np.full(count + 1, -np.inf)  # each component's peak (np.maximum.at: no sort, unlike ndimage.maximum)
    np.maximum.at(peaks, labels[inside], peak_source[inside])
    first_col = np.array([box[1].start for box in ndimage.find_objects(labels)])
    owner = np.searchsorted(starts, first_col, side="right") - 1  # index into used, per label - 1
    geoms, values = [], []
    for geojson, value in shapes(labels.astype(np.int32), mask=inside, connectivity=4):
        geoms.append(shape(geojson))
        values.append(int(value))
    values = np.array(values)
    which = owner[values - 1]
    shifts = np.array([(c - c0, r) for (_, _, r, c, _, _), c0 in zip(used, starts)], dtype=np.float64)
    moved = shapely.transform(np.array(geoms, dtype=object),
                              lambda xy: xy + np.repeat(shifts[which], shapely.get_num_coordinates(geoms), axis=0))
    for geom, i, value in zip(moved, which, values):
        k, score = used[i][0], used[i][4]
        out[k].append(Piece(geometry=geom, score=float(score), cam_peak=float(peaks[value])))
    return out


def core_pieces(tile: Tile, mask: np.ndarray, *, score: float = 1.0,
                cam_map: np.ndarray | None = None) -> list[Piece]:
    """Pieces of a full-tile mask, cut to the tile's core (the part of the grid it owns)."""
    return batch_core_pieces([(tile, mask, score, cam_map)])[0]


def batch_core_pieces(masks: Sequence[tuple[Tile, np.ndarray, float, np.ndarray | None]]) -> list[list[Piece]]:
    """:func:`core_pieces` of many tiles (tile, full-tile mask, score, CAM map or None) in one
    polygonizing pass (:func:`polygonize_masks`)."""
    return polygonize_masks([(mask[tile.core_slices], int(tile.core.row_off), int(tile.core.col_off), score,
                          None if cam is None else cam[tile.core_slices]) for tile, mask, score, cam in masks])


# ---------------------------------------------------------------------------------------------
# Seam merging


def _touches_inner_seam(bounds: np.ndarray, core: Window, grid_shape: tuple[int, int]) -> np.ndarray:
    minx, miny, maxx, maxy = bounds.T
    c0, r0 = core.col_off, core.row_off
    c1, r1 = c0 + core.width, r0 + core.height
    height, width = grid_shape
    return ((minx <= c0) & (c0 > 0)) | ((maxx >= c1) & (c1 < width)) | \
           ((miny <= r0) & (r0 > 0)) | ((maxy >= r1) & (r1 < height))


def connected_groups(count: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Indices 0..count-1 grouped by the transitive closure of ``pairs`` (union-find), each group
    in ascending order, groups in order of their smallest index."""
    parent = np.arange(count)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(count):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def merge_pieces(pieces: Sequence[Piece]) -> list[Piece]:
    """Union pieces that share an edge; each result keeps the max score and CAM peak of its group."""
    if len(pieces) < 2:
        return list(pieces)
    geoms = np.array([p.geometry for p in pieces], dtype=object)
    left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
    merged = []
    for members in connected_groups(len(pieces), zip(left, right)):
        if len(members) == 1:
            merged.append(pieces[members[0]])
            continue
        union = shapely.union_all(geoms[members])
        score = max(pieces[i].score for i in members)
        peak = max(pieces[i].cam_peak for i in members)
        for part in shapely.get_parts(union):  # corner-only contacts stay separate polygons
            merged.append(Piece(geometry=_clean(part), score=score, cam_peak=peak))
    return merged


def _clean(polygon: Polygon) -> Polygon:
    """Drop collinear vertices left on former seams (pure cosmetics; geometry unchanged)."""
    return shapely.simplify(polygon, 0.0, preserve_topology=True)


class SeamMerger:
    """Streams pieces tile by tile (row-major) and yields each polygon once it is complete.

    Pieces touching an inner seam of their tile's core wait in an *open* set; at the end of each
    tile row the open set is merged, and merged polygons that do not reach the next tile row are
    final. Only polygons along one row boundary are ever held, so memory grows with the raster's
    width at most, never with its area.
    """

    def __init__(self, grid_shape: tuple[int, int]):
        self.grid_shape = grid_shape
        self._open: list[Piece] = []
        self._ready: list[Piece] = []
        self._row_stop: int | None = None

    @property
    def open_count(self) -> int:
        return len(self._open)

    def add(self, core: Window, pieces: Iterable[Piece]) -> list[Piece]:
        """Add one tile's pieces; returns the polygons that became final (at a row change)."""
        finished: list[Piece] = []
        row_stop = int(core.row_off + core.height)
        if self._row_stop is not None and row_stop != self._row_stop:
            finished = self.close_row()
        self._row_stop = row_stop
        pieces = list(pieces)
        if pieces:
            bounds = shapely.bounds(np.array([p.geometry for p in pieces], dtype=object))
            seam = _touches_inner_seam(bounds, core, self.grid_shape)
            for piece, on_seam in zip(pieces, seam):
                (self._open if on_seam else self._ready).append(piece)
        finished.extend(self._ready)
        self._ready = []
        return finished

    def close_row(self) -> list[Piece]:
        """Merge the open set after the last tile of a row; returns what became final.

        Called automatically when a new row starts; calling it again before that changes nothing.
        """
        if self._row_stop is None:
            return []
        merged = merge_pieces(self._open)
        finished, still_open = [], []
        for piece in merged:
            reaches_next_row = piece.geometry.bounds[3] >= self._row_stop and self._row_stop < self.grid_shape[0]
            (still_open if reaches_next_row else finished).append(piece)
        self._open = still_open
        return finished

    def state(self) -> dict:
        """What a resumed run needs (after :meth:`close_row`): the open pieces and the row reached."""
        return {"open": list(self._open), "row_stop": self._row_stop, "grid_shape": self.grid_shape}

    @classmethod
    def from_state(cls, state: dict) -> "SeamMerger":
        merger = cls(tuple(state["grid_shape"]))
        merger._open = list(state["open"])
        merger._row_stop = state["row_stop"]
        return merger

    def finish(self) -> list[Piece]:
        """All remaining polygons (call once, after the last tile)."""
        finished = merge_pieces(self._open) + self._ready
        self._open, self._ready = [], []
        return finished


# ---------------------------------------------------------------------------------------------
# Pixel space -> CRS, areas


def to_map_coordinates(geoms: Sequence[Polygon], grid_transform: Affine) -> np.ndarray:
    """Move polygons from grid pixel coordinates to the grid's CRS."""
    t = grid_transform
    matrix = np.array([[t.a, t.d], [t.b, t.e]])
    offset = np.array([t.c, t.f])
    return shapely.transform(np.asarray(geoms, dtype=object), lambda xy: xy @ matrix + offset)


def simplify_pixels(pieces: Sequence[Piece], tolerance_px: float) -> list[Piece]:
    """Smooth pixel staircases (Douglas-Peucker, topology kept) with a tolerance in pixels."""
    if tolerance_px <= 0:
        return list(pieces)
    return [replace(p, geometry=shapely.simplify(p.geometry, tolerance_px, preserve_topology=True))
            for p in pieces]


def _to_lonlat(geoms: np.ndarray, crs) -> tuple[np.ndarray, ProjCRS]:
    pcrs = ProjCRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    geodetic = pcrs if pcrs.is_geographic else pcrs.geodetic_crs
    if pcrs.is_geographic:
        return geoms, geodetic
    transformer = Transformer.from_crs(pcrs, geodetic, always_xy=True)

    def project(xy: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geoms, project), geodetic


def geodesic_area_m2(geoms: Sequence, crs) -> np.ndarray:
    """Area on the ellipsoid of ``crs`` in m², correct whatever the CRS (never planar degrees)."""
    geoms = np.asarray(geoms, dtype=object)
    if geoms.size == 0:
        return np.zeros(0)
    lonlat, geodetic = _to_lonlat(geoms, crs)
    geod = geodetic.get_geod()
    return np.array([abs(geod.geometry_area_perimeter(g)[0]) for g in lonlat])


def centroids_lonlat(geoms: Sequence, crs) -> tuple[np.ndarray, np.ndarray]:
    """Centroids as WGS84 longitude/latitude (for tables and quick look-ups)."""
    geoms = np.asarray(geoms, dtype=object)
    if geoms.size == 0:
        return np.zeros(0), np.zeros(0)
    centres = shapely.centroid(geoms)
    pcrs = ProjCRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    transformer = Transformer.from_crs(pcrs, ProjCRS.from_epsg(4326), always_xy=True)
    lon, lat = transformer.transform(shapely.get_x(centres), shapely.get_y(centres))
    return np.asarray(lon), np.asarray(lat)


PANEL_FIELDS = ("id", "area_m2", "score", "cam_peak", "centroid_lon", "centroid_lat", "source")


def panels_frame(pieces: Sequence[Piece], *, grid_transform: Affine, crs, source: str,
                 min_area_m2: float = 0.0, simplify_px: float = 0.0, first_id: int = 1):
    """Finished pieces -> GeoDataFrame in the raster's CRS with the panel fields, ids in order."""
    import geopandas as gpd

    pieces = simplify_pixels(pieces, simplify_px)
    geoms = to_map_coordinates([p.geometry for p in pieces], grid_transform)
    areas = geodesic_area_m2(geoms, crs)
    keep = areas >= min_area_m2
    geoms, areas = geoms[keep], areas[keep]
    kept = [p for p, k in zip(pieces, keep) if k]
    lon, lat = centroids_lonlat(geoms, crs)
    columns = {
        "id": np.arange(first_id, first_id + len(kept), dtype=np.int64),
        "area_m2": areas.astype(np.float64),
        "score": np.array([p.score for p in kept], dtype=np.float64),
        "cam_peak": np.array([p.cam_peak for p in kept], dtype=np.float64),
        "centroid_lon": lon.astype(np.float64),
        "centroid_lat": lat.astype(np.float64),
        "source": np.array([source] * len(kept), dtype=object),
    }
    return gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(geoms, crs=_crs_text(crs)), crs=_crs_text(crs))


def _crs_text(crs) -> str:
    return crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs)
