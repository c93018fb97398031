"""Compare the localization methods (``--cam-method``) on one benchmark, like the seed paper's Tables 1-2.

For every method: the mask rule (CAM threshold and weak-tile peak fraction) is chosen on validation
towns with the same rule as the bundled model (best pixel IoU among rules reaching 90 % tile recall);
then detection runs on held-out test towns and is evaluated: tile precision / recall (from the
polygons, on the model's tile grid), box IoU of the largest component per positive tile, pixel IoU,
total and mean per-system area error, and seconds per 1,000 tiles (one process, this machine).
Classification (the shared Inception classifier) is reported once, on the real Fresno test chips.

    python scripts/compare_localization.py [--model FILE] [--methods gap branch1 branch2 gradcam feedback pseudo-seg]

Branch and GAP maps are each divided by their own scale (median peak on positive validation
windows). Without a pseudo-seg head in the model, one is trained first on the positive windows of
the training towns (image-level labels only) and its training time is printed.

Towns are generated under --workdir when missing (validation seeds 101-104, test seeds 301-303: the
same held-out seeds scripts/train_default.py uses for its synthetic supplement).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import geopandas as gpd

from solarmap import model as model_lib
from solarmap.evaluate import evaluate
from solarmap.model.scorer import ModelScorer
from solarmap.pipeline import DetectConfig, detect_scene
from solarmap.training.calibrate import MASK_THRESHOLDS, calibrate_cam_shifts, cam_scales, sweep_mask_rules
from solarmap.training.data import positive_windows, scene_samples, stack_samples, town_paths
from solarmap.training.pseudoseg import train_pseudo_seg

VAL_SEEDS = range(101, 105)
TEST_SEEDS = range(301, 304)
VARIANTS = {
    "gap": dict(method="gap"),
    "branch1": dict(method="branch", branch_levels=1),
    "branch2": dict(method="branch", branch_levels=2),
    "gradcam": dict(method="gradcam"),
    "feedback": dict(method="feedback"),
    "pseudo-seg": dict(method="pseudo-seg"),
    "pseudo-seg-ms": dict(method="pseudo-seg", seg_scales=(0.5, 0.75, 1.0)),
}
TRAIN_SEEDS = range(1, 25)  # pseudo-seg head: positive windows of the training towns (image-level labels)
KEYS = ["tile_precision", "tile_recall", "box_iou", "pixel_iou", "total_area_error", "per_system_area_error"]


def towns(workdir: Path, seeds) -> list[tuple[str, object]]:
    return [(scene, gpd.read_file(truth, layer="panels")) for scene, truth in town_paths(workdir, seeds=seeds)]


def run(scorer, config: DetectConfig, scenes, tile_px: int) -> tuple[dict, float, int]:
    rows, seconds, tiles = [], 0.0, 0
    for scene, truth in scenes:
        t0 = time.perf_counter()
        frame, stats = detect_scene(scene, scorer=scorer, config=config)
        seconds += time.perf_counter() - t0
        tiles += stats.tiles_read
        rows.append(evaluate(frame, truth, scene, tile_size_px=tile_px))
    return {k: float(np.mean([getattr(r, k) for r in rows])) for k in KEYS}, seconds, tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/solarmap-compare"))
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--save-model", type=Path, default=None,
                        help="Save the model with its freshly trained pseudo-seg head here.")
    parser.add_argument("--train-towns", type=Path, default=Path.home() / "solarmap-train" / "towns",
                        help="Synthetic training towns (seeds 1-24) for the pseudo-seg head.")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    net = model_lib.load(args.model)
    val, test = towns(args.workdir, VAL_SEEDS), towns(args.workdir, TEST_SEEDS)
    windows = [w for scene, _ in val for w in scene_samples(
        scene, str(Path(scene).with_name("truth.gpkg")), model=net.config, context_px=net.config.context_px)]
    shifts = calibrate_cam_shifts(net, windows)  # every variant's own offset, from validation windows
    print(f"CAM offsets (rows, cols px) from validation windows: {shifts}", flush=True)
    scales = cam_scales(net, windows, {name: VARIANTS[name] for name in ("gap", "branch1", "branch2")})
    print(f"CAM scales (median peak, positive validation windows): {scales}", flush=True)
    if any(name.startswith("pseudo-seg") for name in args.methods) and net.seg_head is None:
        train_windows = positive_windows(town_paths(args.train_towns, seeds=TRAIN_SEEDS), model=net.config)
        x_train, _ = stack_samples(train_windows)
        info = train_pseudo_seg(net, x_train, progress=lambda line: print(line, flush=True))
        print(f"pseudo-seg head trained: {info}", flush=True)
        if args.save_model:
            model_lib.save(net, args.save_model, half=True)  # reuse with --model next time
            print(f"saved the model with its pseudo-seg head to {args.save_model}", flush=True)
    results = {}
    for name in args.methods:
        scorer = ModelScorer(net, **VARIANTS[name], cam_scale=scales.get(name))
        threshold, fraction, _ = sweep_mask_rules(scorer, val, thresholds=MASK_THRESHOLDS,
                                                  peak_fractions=(None, 0.5, 0.7))
        config = DetectConfig.for_scorer(scorer, mask_threshold=threshold, mask_peak_fraction=fraction)
        metrics, seconds, tiles = run(scorer, config, test, net.config.tile_size_px)
        results[name] = {**metrics, "cam_threshold": threshold, "peak_fraction": fraction,
                         "s_per_1000_tiles": 1000 * seconds / max(tiles, 1)}
        print(f"{name}: {results[name]}", flush=True)
    print()
    print(f"{len(list(TEST_SEEDS))} held-out synthetic towns (1024 px at 0.3 m), {net.config.tile_size_px} px tiles; "
          f"mask rule per method chosen on {len(list(VAL_SEEDS))} validation towns")
    print("| method | mask rule | tile P | tile R | box IoU | pixel IoU | total-area error | per-system area error "
          "| s / 1,000 tiles |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        rule = f"≥ {r['cam_threshold']}" + (f", weak tiles ≥ {r['peak_fraction']} × peak" if r["peak_fraction"] else "")
        print(f"| {name} | {rule} | {r['tile_precision']:.3f} | {r['tile_recall']:.3f} | {r['box_iou']:.3f} | "
              f"{r['pixel_iou']:.3f} | {100 * r['total_area_error']:+.0f} % | {100 * r['per_system_area_error']:.0f} % | "
              f"{r['s_per_1000_tiles']:.0f} |")
    fresno = net.config.metrics.get("fresno_test")
    if fresno:
        print(f"\nclassification (shared by all methods), Fresno test chips: precision {fresno['precision']:.3f}, "
              f"recall {fresno['recall']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"shifts": shifts, "results": results}, indent=1))


if __name__ == "__main__":
    main()
