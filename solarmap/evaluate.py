"""Metrics of predicted panel polygons against truth polygons on a scene.

Everything is measured on the scene's own pixel grid (both layers rasterized there), so the
metrics do not depend on how the prediction was tiled:

* tile precision / recall on a grid of ``tile_size_px`` tiles: a tile is positive when it holds at
  least ``min_panel_m2`` of panel; truth tiles with a sliver (0 < area < min) are left out;
* box IoU (the seed paper's localization metric): for each truth-positive tile, the bounding box of
  the largest predicted component in the tile against the box of the truth component it overlaps
  most (0 when nothing was predicted), averaged;
* pixel IoU of the union of all polygons;
* object precision / recall: a truth array is found when predictions cover ≥ ``cover`` of it; a
  predicted polygon is correct when truth covers ≥ ``cover`` of it;
* total-area relative error over the scene, and mean per-system area error: each predicted polygon is
  assigned to the truth array it overlaps most; |assigned area − true area| / true area, averaged over
  truth arrays (an array with nothing assigned counts as 100 %). Areas are geodesic m².
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import shapely
from rasterio.features import rasterize
from scipy import ndimage

from solarmap.geo.raster import describe_scene
from solarmap.geo.tiling import TileSpec, iter_tiles
from solarmap.geo.vectorize import geodesic_area_m2


@dataclass(frozen=True)
class Evaluation:
    tiles: int
    truth_positive_tiles: int
    tile_precision: float
    tile_recall: float
    box_iou: float
    pixel_iou: float
    object_precision: float
    object_recall: float
    truth_area_m2: float
    predicted_area_m2: float
    total_area_error: float
    per_system_area_error: float
    truth_objects: int
    predicted_objects: int

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [
            ("tile precision", f"{self.tile_precision:.3f}"),
            ("tile recall", f"{self.tile_recall:.3f}"),
            ("box IoU (largest component per positive tile)", f"{self.box_iou:.3f}"),
            ("pixel IoU", f"{self.pixel_iou:.3f}"),
            ("object precision", f"{self.object_precision:.3f}"),
            ("object recall", f"{self.object_recall:.3f}"),
            ("total area: truth / predicted m²", f"{self.truth_area_m2:.1f} / {self.predicted_area_m2:.1f}"),
            ("total-area relative error", f"{self.total_area_error:+.1%}"),
            ("mean per-system area error", f"{self.per_system_area_error:.1%}"),
            ("tiles (truth-positive)", f"{self.tiles} ({self.truth_positive_tiles})"),
            ("objects: truth / predicted", f"{self.truth_objects} / {self.predicted_objects}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return rows.min(), cols.min(), rows.max() + 1, cols.max() + 1


def box_iou(a, b) -> float:
    if a is None or b is None:
        return 0.0
    r0, c0 = max(a[0], b[0]), max(a[1], b[1])
    r1, c1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, r1 - r0) * max(0, c1 - c0)
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    return _ratio(inter, area(a) + area(b) - inter)


def evaluate(predicted, truth, scene: str, *, tile_size_px: int = 299, min_panel_m2: float = 2.0,
             cover: float = 0.5, gsd_m: float | None = None) -> Evaluation:
    """Compare GeoDataFrames ``predicted`` and ``truth`` on ``scene``'s grid (see module docstring)."""
    info = describe_scene(scene, gsd_m=gsd_m)
    grid = info.grid
    crs_wkt = grid.crs.to_wkt()
    predicted = predicted.to_crs(crs_wkt) if predicted.crs is not None and len(predicted) else predicted
    truth = truth.to_crs(crs_wkt) if truth.crs is not None and len(truth) else truth
    shape = (grid.height, grid.width)
    pred_geoms = [g for g in predicted.geometry if g is not None and not g.is_empty]
    truth_geoms = [g for g in truth.geometry if g is not None and not g.is_empty]
    pred_mask = rasterize([(g, 1) for g in pred_geoms], out_shape=shape, transform=grid.transform).astype(bool) \
        if pred_geoms else np.zeros(shape, bool)
    truth_ids = rasterize([(g, i + 1) for i, g in enumerate(truth_geoms)], out_shape=shape, transform=grid.transform,
                          dtype=np.int32) if truth_geoms else np.zeros(shape, np.int32)
    truth_mask = truth_ids > 0
    gx, gy = grid.ground_resolution_m()
    pixel_m2 = gx * gy

    tp = fp = fn = 0
    ious, tiles, truth_tiles = [], 0, 0
    for tile in iter_tiles(grid, TileSpec(tile_size_px, 0)):
        window = (slice(int(tile.valid.row_off), int(tile.valid.row_off + tile.valid.height)),
                  slice(int(tile.valid.col_off), int(tile.valid.col_off + tile.valid.width)))
        t_area = truth_mask[window].sum() * pixel_m2
        p_area = pred_mask[window].sum() * pixel_m2
        if 0 < t_area < min_panel_m2:
            continue
        tiles += 1
        is_true, is_pred = t_area >= min_panel_m2, p_area >= min_panel_m2
        tp += is_true and is_pred
        fp += (not is_true) and is_pred
        fn += is_true and not is_pred
        if is_true:
            truth_tiles += 1
            ious.append(_tile_box_iou(pred_mask[window], truth_ids[window]))

    union = (pred_mask | truth_mask).sum()
    pixel_iou = _ratio((pred_mask & truth_mask).sum(), union)

    pred_areas = geodesic_area_m2(pred_geoms, crs_wkt) if pred_geoms else np.zeros(0)
    truth_areas = geodesic_area_m2(truth_geoms, crs_wkt) if truth_geoms else np.zeros(0)
    obj_p, obj_r, per_system = _object_metrics(pred_geoms, truth_geoms, pred_areas, truth_areas, cover)
    total_truth, total_pred = float(truth_areas.sum()), float(pred_areas.sum())
    return Evaluation(
        tiles=tiles, truth_positive_tiles=truth_tiles,
        tile_precision=_ratio(tp, tp + fp), tile_recall=_ratio(tp, tp + fn),
        box_iou=float(np.mean(ious)) if ious else 0.0, pixel_iou=pixel_iou,
        object_precision=obj_p, object_recall=obj_r,
        truth_area_m2=total_truth, predicted_area_m2=total_pred,
        total_area_error=_ratio(total_pred - total_truth, total_truth),
        per_system_area_error=per_system, truth_objects=len(truth_geoms), predicted_objects=len(pred_geoms),
    )


def _tile_box_iou(pred: np.ndarray, truth_ids: np.ndarray) -> float:
    labels, count = ndimage.label(pred)
    if count == 0:
        return 0.0
    sizes = ndimage.sum(pred, labels, np.arange(1, count + 1))
    largest = labels == (int(np.argmax(sizes)) + 1)
    overlapped = truth_ids[largest]
    overlapped = overlapped[overlapped > 0]
    if overlapped.size:
        target = np.bincount(overlapped).argmax()
    else:  # no overlap: compare with the largest truth array in the tile
        ids, counts = np.unique(truth_ids[truth_ids > 0], return_counts=True)
        target = ids[np.argmax(counts)]
    return box_iou(_bbox(largest), _bbox(truth_ids == target))


def _object_metrics(pred, truth, pred_areas, truth_areas, cover) -> tuple[float, float, float]:
    """Object precision, recall and mean per-system area error from every intersecting (truth,
    prediction) pair, found in one bulk spatial-index query and intersected as arrays: a county's
    20,000 polygons a side take seconds, not a Python loop over pairs."""
    if not truth:
        return (0.0 if pred else 1.0), 1.0, 0.0
    if not pred:
        return 1.0, 0.0, 1.0
    truth, pred = np.asarray(truth, dtype=object), np.asarray(pred, dtype=object)
    ti, pi = shapely.STRtree(pred).query(truth, predicate="intersects")
    inter = shapely.area(shapely.intersection(truth[ti], pred[pi]))
    covered = np.bincount(ti, weights=inter, minlength=len(truth))
    pred_covered = np.bincount(pi, weights=inter, minlength=len(pred))
    # each prediction to the truth array it overlaps most (the first such, as truth order goes)
    best_truth = np.full(len(pred), -1)
    order = np.lexsort((ti, -inter, pi))  # by prediction, then largest overlap first, then truth order
    first = order[np.r_[True, pi[order][1:] != pi[order][:-1]]] if len(order) else order
    first = first[inter[first] > 0]
    best_truth[pi[first]] = ti[first]
    # planar ratios are unit-free, so they are fine in any CRS
    recall = float(np.mean(covered / shapely.area(truth) >= cover))
    precision = float(np.mean(pred_covered / shapely.area(pred) >= cover))
    has = best_truth >= 0
    assigned = np.bincount(best_truth[has], weights=pred_areas[has], minlength=len(truth))
    per_system = float(np.mean(np.abs(assigned - truth_areas) / truth_areas))
    return precision, recall, per_system
