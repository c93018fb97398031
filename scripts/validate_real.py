"""The real-data table: one row per model, on the validation splits (choices) or, once, the test splits.

    python scripts/validate_real.py --model FILE [--split val|test] [--data ../shared/data] [--json OUT]
                                    [--seg-rule THRESHOLD,FLOOR,pixel|blob]

Columns: Fresno chips precision / recall (classification); PV01 (real UAV photos with pixel truth,
detected in georeferenced mosaics at their own 0.1 m): tile precision / recall, pooled pixel IoU and
total-area error (and, per array size, how many were found and how much was drawn on and around
them; and the area drawn away from every array, per image); Bern recall (positives only);
false-positive rate on real negative tiles (Fresno negatives, UC Merced, OpenAerialMap); the share
of tiles called positive on a scene assembled from negative images; synthetic test towns (last: a
supplement, never the evidence). Splits come from solarmap.training.real_data (by spatial group,
deterministic); nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
from affine import Affine

from solarmap.evaluate import evaluate
from solarmap.geo.output import write_geotiff
from solarmap.geo.raster import describe_scene
from solarmap.model import load
from solarmap.model.scorer import build_scorer, classify_images
from solarmap.pipeline import DetectConfig, detect_scene
from solarmap.training.data import town_paths
from solarmap.training.real_data import NEGATIVE_SOURCES, RealImage, load_all, write_pv01_scenes
from solarmap.training.stages import binary_scores

UTM = "EPSG:32611"
SYNTH_TEST_SEEDS = range(301, 304)
ARRAY_SIZES_M2 = (("under 20 m²", 0, 20), ("20-100 m²", 20, 100), ("100 m² and more", 100, float("inf")))
ARRAY_REACH_M = 3.0  # predicted area this close to a truth array counts as drawn for it


def rates(labels: np.ndarray, called: np.ndarray) -> dict:
    scores = binary_scores(labels, called)
    return {"precision": scores.precision, "recall": scores.recall, "n": scores.n, "positives": scores.positives}


def write_scene(path: Path, pixels: np.ndarray, gsd_m: float, origin: tuple[float, float]) -> str:
    return str(write_geotiff(path, pixels, transform=Affine(gsd_m, 0, origin[0], 0, -gsd_m, origin[1]), crs=UTM,
                             overwrite=True))


PV01_IMAGE_M = 25.6  # one PV01 image (256 px at 0.1 m) on the ground: a cell of the mosaics


def pv01_detection(scorer, data: Path, names: list[str], workdir: Path, *, gsd_m: float | None = None) -> dict:
    """Detect on PV01 mosaics at their own 0.1 m (write_pv01_scenes: whole images side by side, so
    the model sees them inside a raster as it would a user's, not padded with nothing), or resampled
    to ``gsd_m``; each image is a tile for tile precision / recall (and has its truth and predicted
    area in ``per_image``); intersections and unions are pooled over all images."""
    config = DetectConfig.for_scorer(scorer)
    totals = dict(truth=0.0, predicted=0.0, intersection=0.0, union=0.0, away=0.0)
    labels, called, arrays, per_image = [], [], [], []
    for index, (scene, truth_path) in enumerate(write_pv01_scenes(data, names, workdir, per_side=4, gsd_m=gsd_m)):
        images_here = len(names[16 * index: 16 * (index + 1)])
        frame, _ = detect_scene(scene, scorer=scorer, config=config)
        predicted = shapely.union_all(frame.geometry.to_numpy()) if len(frame) else shapely.Polygon()
        truth_arrays = gpd.read_file(truth_path, layer="panels").geometry.to_numpy()
        truth = shapely.union_all(truth_arrays)
        arrays += per_array(truth_arrays, predicted)
        left, bottom, right, top = describe_scene(scene).grid.bounds
        columns = round((right - left) / PV01_IMAGE_M)
        for r in range(round((top - bottom) / PV01_IMAGE_M)):
            for c in range(columns):
                x0, y0 = left + c * PV01_IMAGE_M, top - r * PV01_IMAGE_M
                cell = shapely.box(x0, y0 - PV01_IMAGE_M, x0 + PV01_IMAGE_M, y0)
                if r * columns + c >= images_here:
                    continue  # an empty cell of the mosaic's last row
                here = {"truth_m2": truth.intersection(cell).area, "predicted_m2": predicted.intersection(cell).area}
                per_image.append(here)
                labels.append(here["truth_m2"] >= 2.0)
                called.append(here["predicted_m2"] >= 2.0)
        totals["truth"] += truth.area
        totals["predicted"] += predicted.area
        totals["intersection"] += truth.intersection(predicted).area
        totals["union"] += truth.union(predicted).area
        totals["away"] += area_away(truth, predicted)
    return {**{f"tile_{k}": v for k, v in rates(np.array(labels), np.array(called)).items()},
            "pixel_iou": totals["intersection"] / max(totals["union"], 1e-9), "truth_m2": totals["truth"],
            "predicted_m2": totals["predicted"],
            "total_area_error": (totals["predicted"] - totals["truth"]) / max(totals["truth"], 1e-9),
            "by_array_size": by_array_size(np.array(arrays).reshape(-1, 3)),
            "away_m2_per_image": totals["away"] / max(len(names), 1), "per_image": per_image}


def area_away(truth, predicted) -> float:
    """Predicted area farther than ARRAY_REACH_M from every truth array: false outlines, which the
    size split (per_array) does not count. Given per image, not per m² of truth: where arrays are
    small, the same false area is a much larger share of the total."""
    return float(predicted.difference(truth.buffer(ARRAY_REACH_M)).area)


def per_array(truth_arrays: np.ndarray, predicted) -> list[tuple[float, float, float]]:
    """(area, predicted area inside it, predicted area in its share of the ground) per truth array.
    Its share is the ground within ARRAY_REACH_M of it that is nearer to it than to any other array
    (a Voronoi partition of points along the arrays' outlines), so predicted area drawn between two
    close arrays, or one polygon spanning both, counts once, split where they meet."""
    rings = [shapely.get_coordinates(shapely.segmentize(array.boundary, 0.5)) for array in truth_arrays]
    owner = np.concatenate([[index] * len(ring) for index, ring in enumerate(rings)]).astype(int)
    points, first = np.unique(np.concatenate(rings), axis=0, return_index=True)  # GEOS wants each point once
    owner = owner[first]
    cloud = shapely.MultiPoint(points)
    cells = shapely.get_parts(shapely.voronoi_polygons(cloud, ordered=True, extend_to=shapely.box(*cloud.bounds).buffer(
        10 * ARRAY_REACH_M, join_style="mitre")))
    everything, rows = shapely.union_all(truth_arrays), []
    for index, array in enumerate(truth_arrays):
        share = (shapely.union_all(cells[owner == index]).union(array).difference(everything.difference(array))
                 .intersection(array.buffer(ARRAY_REACH_M)))  # other arrays' own ground is theirs
        rows.append((array.area, predicted.intersection(array).area, predicted.intersection(share).area))
    return rows


def by_array_size(arrays: np.ndarray) -> dict:
    """Truth arrays (see per_array) grouped by size: how many were found and the area of the pieces
    drawn on and around them against their own. The pooled total mixes missed arrays with
    over-drawn ones; this tells them apart."""
    groups = {}
    for name, low, high in ARRAY_SIZES_M2:
        part = arrays[(arrays[:, 0] >= low) & (arrays[:, 0] < high)]
        if len(part):
            groups[name] = {"arrays": len(part), "found": float((part[:, 1] > 0).mean()), "truth_m2": float(part[:, 0].sum()),
                            "drawn_error": float(part[:, 2].sum() / part[:, 0].sum() - 1)}
    return groups


def negative_mosaic(negatives: list[RealImage], side: int = 8) -> np.ndarray:
    """Up to ``side`` x ``side`` negative images (256 px crops at 0.3 m) side by side: a scene with no panels."""
    crops = [im.pixels[:, :256, :256] for im in negatives if min(im.pixels.shape[1:]) >= 256][: side * side]
    side = int(np.sqrt(len(crops)))
    return np.concatenate([np.concatenate(crops[r * side:(r + 1) * side], axis=2) for r in range(side)], axis=1)


def negative_scene(scorer, negatives: list[RealImage], workdir: Path) -> dict:
    """A scene tiled from negative images (:func:`negative_mosaic`): share of tiles positive."""
    scene = write_scene(workdir / "negatives.tif", negative_mosaic(negatives), scorer.model.config.gsd_m,
                        (500_000.0, 4_100_000.0))
    frame, stats = detect_scene(scene, scorer=scorer, config=DetectConfig.for_scorer(scorer))
    return {"tiles": stats.tiles_read, "positive_share": stats.tiles_positive / max(stats.tiles_read, 1),
            "polygons": len(frame), "area_m2": float(frame["area_m2"].sum()) if len(frame) else 0.0}


def synthetic_towns(scorer, workdir: Path) -> dict:
    config = DetectConfig.for_scorer(scorer)
    rows = []
    for scene, truth in town_paths(workdir / "towns", seeds=SYNTH_TEST_SEEDS):
        frame, _ = detect_scene(scene, scorer=scorer, config=config)
        rows.append(evaluate(frame, gpd.read_file(truth, layer="panels"), scene,
                             tile_size_px=scorer.model.config.tile_size_px).as_dict())
    keys = ("tile_precision", "tile_recall", "pixel_iou", "total_area_error")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def with_seg_rule(net, rule: str):
    """The network with its segmentation head's rule replaced (``THRESHOLD,FLOOR,pixel|blob``)."""
    threshold, floor, gate = rule.split(",")
    if gate not in ("pixel", "blob"):
        raise SystemExit(f"--seg-rule: the gate is pixel or blob, not {gate!r}")
    net.config = replace(net.config, seg_attention_floor=float(floor),
                         seg_blob_levels=(float(threshold),) if gate == "blob" else (),
                         mask_rules={**net.config.mask_rules, "pseudo-seg": [float(threshold), None]})
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Checkpoint (default: the bundled model).")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "solarmap-validate")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seg-rule", default=None, metavar="THRESHOLD,FLOOR,pixel|blob",
                        help="Try another segmentation-head rule than the checkpoint's: mask threshold, "
                             "attention floor (0: no gate), gate pixel by pixel or blob by blob.")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    scorer = build_scorer(with_seg_rule(load(args.model), args.seg_rule) if args.seg_rule else args.model)
    net = scorer.model
    t0 = time.perf_counter()
    images = [im for im in load_all(args.data, gsd_m=0.3, cache_dir=args.workdir / "cache") if im.split == args.split]
    probs = classify_images(net, (im.pixels.astype(np.float32) / 255 for im in images), gsd_m=0.3)
    called = np.array(probs) >= net.config.decision_threshold
    source = np.array([im.source for im in images])
    labels = np.array([im.label for im in images]).astype(bool)
    name = (args.model or "bundled") + (f" ({args.seg_rule})" if args.seg_rule else "")
    row = {"model": name, "backbone": net.config.backbone, "split": args.split,
           "fresno": rates(labels[source == "fresno"], called[source == "fresno"]),
           "bern_recall": float(called[source == "bern"].mean()),
           "negatives_fpr": {s: float(called[(source == s) & ~labels].mean()) for s in NEGATIVE_SOURCES}}
    negatives = np.isin(source, NEGATIVE_SOURCES) & ~labels
    row["negatives_fpr"]["all"] = float(called[negatives].mean())
    pv01 = [im.key.split(":")[1] for im in images if im.source == "pv01"]
    scenes = args.workdir / f"scenes-{args.split}"
    scenes.mkdir(exist_ok=True)
    row["pv01"] = pv01_detection(scorer, args.data, pv01, scenes)
    row["negative_scene"] = negative_scene(scorer, [im for im in images if im.source == "ucmerced"], scenes)
    row["synthetic"] = synthetic_towns(scorer, args.workdir)
    row["seconds"] = time.perf_counter() - t0
    print(json.dumps(row, indent=1))
    f, p = row["fresno"], row["pv01"]
    print(f"| {row['model']} ({row['backbone']}, {args.split}) | {f['precision']:.3f} / {f['recall']:.3f} | "
          f"{p['tile_precision']:.3f} / {p['tile_recall']:.3f} | {p['pixel_iou']:.3f} | "
          f"{100 * p['total_area_error']:+.0f} % | {row['bern_recall']:.3f} | "
          f"{100 * row['negatives_fpr']['all']:.1f} % | {100 * row['negative_scene']['positive_share']:.1f} % | "
          f"{row['synthetic']['tile_precision']:.3f} / {row['synthetic']['tile_recall']:.3f}, "
          f"{row['synthetic']['pixel_iou']:.3f}, {100 * row['synthetic']['total_area_error']:+.0f} % |")
    print(f"PV01 by array size (found; area drawn on them and within {ARRAY_REACH_M:g} m vs theirs): " + "; ".join(
        f"{name}: {g['arrays']} arrays, {g['truth_m2']:.0f} m², found {g['found']:.2f}, drawn {100 * g['drawn_error']:+.0f} %"
        for name, g in p["by_array_size"].items())
        + f"; away from every array: {p['away_m2_per_image']:.1f} m² per image")
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
