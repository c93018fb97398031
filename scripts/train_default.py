"""Train the bundled default model: Fresno chips + synthetic towns, with the recipe of ``solarmap train``
(solarmap.training.recipe): classifier (two cycles) -> branch1 -> branch2, then calibration.

Resumable: every stage checkpoints each epoch under --workdir and a finished stage is skipped on
the next run, so an interrupted job continues where it stopped:

    python scripts/train_default.py --workdir ~/solarmap-train --chips ../shared/data/duke-fresno-pv

Splits are deterministic (hash of each chip id / tile key): Fresno 65 % train, 15 % validation
(checkpoint selection and threshold choice), 20 % test (reported, never used for any choice).
Synthetic training towns use seeds 1..N; validation and test towns use disjoint seed ranges.

After the stages: calibration on validation data (decision threshold, CAM offsets and scales, mask
rules per CAM method), the pseudo-seg head (training towns), the colour prior of mask refinement
(from the classifier's training tiles) and its rule (validation towns); then held-out metrics.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import geopandas as gpd
import numpy as np
import torch

from solarmap import model as model_lib
from solarmap.evaluate import evaluate
from solarmap.model.scorer import ModelScorer
from solarmap.pipeline import DetectConfig, detect_scene
from solarmap.training.data import load_chips, split_samples, synthetic_samples, town_paths
from solarmap.training.recipe import DEFAULT_PLAN, calibrate_model, run_stages
from solarmap.training.stages import score_samples

SYNTH_TRAIN_SEEDS = range(1, 25)
SYNTH_MORE_TRAIN_SEEDS = range(25, 49)  # only for the classifier's second cycle (DEFAULT_PLAN's extra data)
SYNTH_VAL_SEEDS = range(101, 105)
SYNTH_TEST_SEEDS = range(201, 207)
SYNTH_DETECT_TEST_SEEDS = range(301, 304)  # whole towns for detection metrics, never used for any choice


def log_line(workdir: Path, text: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {text}"
    print(line, flush=True)
    with open(workdir / "train.log", "a") as fh:
        fh.write(line + "\n")


def detection_metrics(net, out_dir: Path, seeds, say) -> dict:
    """Detect on whole held-out towns and evaluate against their truth (tile grids: model's and 299 px)."""
    scorer = ModelScorer(net)
    config = DetectConfig.for_scorer(scorer)
    per_town = {}
    for seed, (scene, truth_path) in zip(seeds, town_paths(out_dir, seeds=seeds)):
        truth = gpd.read_file(truth_path, layer="panels")
        t0 = time.perf_counter()
        frame, stats = detect_scene(scene, scorer=scorer, config=config)
        seconds = time.perf_counter() - t0
        for grid in (net.config.tile_size_px, 299):
            result = evaluate(frame, truth, scene, tile_size_px=grid).as_dict()
            per_town[f"{seed}@{grid}px"] = {**result, "seconds": seconds, "tiles": stats.tiles_total}
            say(f"detection town {seed}, tile grid {grid} px: {result}")
    keys = ["tile_precision", "tile_recall", "box_iou", "pixel_iou", "object_precision", "object_recall",
            "total_area_error", "per_system_area_error"]
    summary = {}
    for grid in (net.config.tile_size_px, 299):
        rows = [v for k, v in per_town.items() if k.endswith(f"@{grid}px")]
        summary[f"mean@{grid}px"] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        say(f"detection mean over held-out towns, tile grid {grid} px: {summary[f'mean@{grid}px']}")
    return {**summary, "towns": per_town}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path.home() / "solarmap-train")
    parser.add_argument("--chips", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data/duke-fresno-pv")
    parser.add_argument("--chip-gsd", type=float, default=0.3)
    parser.add_argument("--town-px", type=int, default=1024)
    parser.add_argument("--real-repeat", type=int, default=2, help="Oversample real chips in training.")
    parser.add_argument("--out", type=Path, default=model_lib.DEFAULT_MODEL_PATH)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    say = lambda text: log_line(workdir, text)  # noqa: E731
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = model_lib.ModelConfig()
    if not args.chips.is_dir():
        sys.exit(f"Fresno chips not found at {args.chips} (pass --chips)")
    t0 = time.perf_counter()
    chips = load_chips(args.chips, chip_gsd_m=args.chip_gsd, model=config)
    real_train, real_val, real_test = split_samples(chips, val_fraction=0.15, test_fraction=0.20)
    towns = workdir / "towns"
    synth_train = synthetic_samples(towns, seeds=SYNTH_TRAIN_SEEDS, size_px=args.town_px, model=config)
    synth_val = synthetic_samples(towns, seeds=SYNTH_VAL_SEEDS, size_px=args.town_px, model=config)
    synth_test = synthetic_samples(towns, seeds=SYNTH_TEST_SEEDS, size_px=args.town_px, model=config)
    say(f"data ready in {time.perf_counter() - t0:.0f} s: real train/val/test "
        f"{len(real_train)}/{len(real_val)}/{len(real_test)} "
        f"(positives {sum(s.label for s in real_train)}/{sum(s.label for s in real_val)}/{sum(s.label for s in real_test)}); "
        f"synthetic train/val/test {len(synth_train)}/{len(synth_val)}/{len(synth_test)} "
        f"(positives {sum(s.label for s in synth_train)}/{sum(s.label for s in synth_val)}/{sum(s.label for s in synth_test)})")
    train = real_train * args.real_repeat + synth_train
    val = real_val + synth_val

    def more_towns():
        more = synthetic_samples(towns, seeds=SYNTH_MORE_TRAIN_SEEDS, size_px=args.town_px, model=config)
        say(f"{len(more)} more synthetic training tiles ({sum(s.label for s in more)} positive) "
            f"from towns {min(SYNTH_MORE_TRAIN_SEEDS)}-{max(SYNTH_MORE_TRAIN_SEEDS)}")
        return more

    net = model_lib.SolarNet(config).to(memory_format=torch.channels_last)
    results = run_stages(net, DEFAULT_PLAN, train, val, workdir=workdir, say=say, extra_train=more_towns)
    # calibrate on validation data only; report on test data only
    calibration = calibrate_model(net, train=train, val=val, workdir=workdir, say=say,
                                  val_scenes=town_paths(towns, seeds=SYNTH_VAL_SEEDS, size_px=args.town_px),
                                  seg_scenes=town_paths(towns, seeds=SYNTH_TRAIN_SEEDS, size_px=args.town_px))
    metrics = {}
    for name, samples in (("fresno_test", real_test), ("synthetic_test", synth_test), ("fresno_val", real_val)):
        metrics[name] = asdict(score_samples(net, samples))
        say(f"{name} at threshold {net.config.decision_threshold:.2f}: {metrics[name]}")
    metrics["detection_test_towns"] = detection_metrics(net, workdir / "towns_eval", SYNTH_DETECT_TEST_SEEDS, say)
    net.config = replace(net.config, metrics=metrics,
                         provenance={"script": "scripts/train_default.py", "chips": str(args.chips.name),
                                     "chip_gsd_m": args.chip_gsd,
                                     "synthetic_train_seeds": [min(SYNTH_TRAIN_SEEDS), max(SYNTH_TRAIN_SEEDS)],
                                     "calibration": calibration, "stages": results,
                                     "trained": time.strftime("%Y-%m-%d")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model_lib.save(net, args.out, half=True)
    say(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB); "
        f"decision threshold {net.config.decision_threshold:.2f}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
