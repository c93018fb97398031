"""Installation footprints from the outline network's own footprint output.

The outline network draws two things per pixel: module pixels (the ``panels`` layer) and the whole
installation, a farm's rows *with the gaps between them* (learnt from NREL's footprint masks).
Panels grouped and closed by ``join_m`` (:func:`solarmap.geo.installations.group_installations`)
fill gaps narrower than ``join_m`` only; the footprint output knows a farm's wider gaps, its edge
rows drawn faintly, and which rows belong together. So after a run, the tiles around its panels are
read once more, the footprint output is polygonized where it reaches the mask threshold, and the
regions that touch panels join and widen the installations. Regions that touch no panel are
dropped: the footprint output never adds an installation, only shapes those the panels found.

Measured on NREL's validation footprints (scripts/validate_outline.py, docs/real-imagery.md): see
"Installations from the footprint output" there. Costs one more outline pass over the tiles that
hold panels (a few percent of a county) after the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import shapely

from solarmap.geo.installations import group_installations
from solarmap.geo.raster import SceneReader
from solarmap.geo.tiling import axis_cores, axis_offsets, iter_tiles
from solarmap.geo.vectorize import batch_core_pieces, to_map_coordinates
from solarmap.pipeline.config import DetectConfig, Scorer

__all__ = ["installations_with_footprints", "network_footprints"]


def _tiles_near(grid, spec, boxes_px: np.ndarray) -> set[tuple[int, int]]:
    """Keys of the tiles whose core meets any of ``boxes_px`` (col0, row0, col1, row1 in grid pixels)."""
    rows = np.array(axis_cores(axis_offsets(grid.height, spec), grid.height, spec))
    cols = np.array(axis_cores(axis_offsets(grid.width, spec), grid.width, spec))
    keys = set()
    for c0, r0, c1, r1 in boxes_px:
        for r in np.nonzero((rows[:, 1] > r0) & (rows[:, 0] < r1))[0]:
            for c in np.nonzero((cols[:, 1] > c0) & (cols[:, 0] < c1))[0]:
                keys.add((int(r), int(c)))
    return keys


def network_footprints(path: str | Path, panels, *, scorer: Scorer, config: DetectConfig) -> list:
    """Polygons (in ``panels``' CRS) where the scorer's footprint output reaches the mask threshold,
    on the tiles of raster ``path`` within ``config.join_m`` of a panel; [] for a scorer without a
    footprint output or no panels. ``panels`` are those of this raster."""
    if not len(panels) or not getattr(scorer, "has_footprints", False):  # such a scorer offers footprint_maps
        return []
    spec = config.tile_spec
    with SceneReader(str(path), bands=config.bands, gsd_m=config.gsd_m, src_crs=config.src_crs,
                     window_px=spec.window_px) as reader:
        grid = reader.info.grid
        gsd = float(np.mean(grid.ground_resolution_m()))
        margin_px = config.join_m / gsd + 1
        bounds = panels.to_crs(grid.crs).geometry.bounds.to_numpy()  # minx, miny, maxx, maxy
        inv = ~grid.transform
        xs, ys = bounds[:, [0, 2, 0, 2]], bounds[:, [1, 3, 3, 1]]  # the four corners of each box
        cols, rows = inv.a * xs + inv.b * ys + inv.c, inv.d * xs + inv.e * ys + inv.f
        boxes = np.stack([cols.min(1) - margin_px, rows.min(1) - margin_px,
                          cols.max(1) + margin_px, rows.max(1) + margin_px], axis=1)
        wanted = _tiles_near(grid, spec, boxes)
        tiles = [tile for tile in iter_tiles(grid, spec) if tile.key in wanted]
        shapes = []
        for start in range(0, len(tiles), config.batch_size):
            images = [reader.read_tile(tile) for tile in tiles[start:start + config.batch_size]]
            images = [image for image in images if not image.is_empty]
            if not images:
                continue
            maps = scorer.footprint_maps(np.stack([image.pixels for image in images]))
            masks = [(image.tile, (prob >= config.mask_threshold) & image.valid, 0.0, None)
                     for image, prob in zip(images, maps)]
            shapes += [piece.geometry for pieces in batch_core_pieces(masks) for piece in pieces]
    if not shapes:
        return []
    merged = shapely.union_all(shapes)  # cores abut on pixel edges: seams merge exactly
    simplify_px = config.simplify_m / gsd
    parts = shapely.get_parts(shapely.simplify(merged, simplify_px) if simplify_px > 0 else merged)
    import geopandas as gpd

    placed = to_map_coordinates(list(parts), grid.transform)
    return list(gpd.GeoSeries(placed, crs=grid.crs).to_crs(panels.crs).to_numpy())


def installations_with_footprints(panels, *, sources: Sequence[tuple[str, str | Path]], scorer: Scorer | None,
                                  config: DetectConfig):
    """The installations of ``panels``: grouped by ``config.join_m`` and, where the scorer has a
    footprint output, joined and widened by it on each source raster (``sources``: (panels'
    ``source`` value, raster path) pairs; panels of other sources, e.g. merged across two rasters'
    edge, keep grouped panels only)."""
    footprints = []
    if scorer is not None and len(panels):
        for name, path in sources:
            own = panels[panels["source"] == name]
            footprints += [(name, shape) for shape in network_footprints(path, own, scorer=scorer, config=config)]
    return group_installations(panels, join_m=config.join_m, footprints=footprints or None)
