"""Benchmark `solarmap detect` with the real model: per-stage times, tiles/s, km²/hour, pipeline efficiency, memory.

    python scripts/bench_detect.py --sizes 2000 8000 20000 [--efficiency-size 4000] [--repeat 2] [--model FILE] [--device auto]
    python scripts/bench_detect.py --scene YOURS.tif [MORE.tif ...] [--repeat 2]

For each size, a fresh process runs the full pipeline (read/resample -> model -> CAM -> vectorize ->
write) on a generated RGB scene and reports per-stage seconds, tiles/s and peak RSS; with --scene, on
those rasters instead (real imagery: the generated texture makes the model call most tiles positive,
real scenes far fewer, and time per tile follows the positive share). Another fresh
process times the scorer alone on the batches of the --efficiency-size scene (a few thousand tiles; the
first --scene),
read into memory beforehand: end-to-end tiles/s over model-only tiles/s on the same batches says
whether the pipeline (reading, vectorizing, writing) slows the model down. Its own process, so the
tiles it holds in memory do not count in the peak RSS of the end-to-end runs. The model's own speed
varies between processes (±5 % on 2 cores), so both are run --repeat times, alternately, and the
ratio is taken of the best of each (all runs are printed; from 3 runs on, the ratio of the
medians too).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_tiling import build_raster, peak_rss_mib


def make_scorer(model_path, device):
    from solarmap.model.scorer import build_scorer

    return build_scorer(model_path, device=device)


def run_one(raster: str, out: str, model_path, device: str, model_only: bool) -> dict:
    import os

    from solarmap.pipeline import DetectConfig, detect_to_file

    scorer = make_scorer(model_path, device)
    batch = 64 if scorer.device.type == "cuda" else 16
    config = DetectConfig.for_scorer(scorer, batch_size=batch)
    if model_only:  # the scorer alone on the same batches, read into memory beforehand
        from solarmap.geo.raster import SceneReader
        from solarmap.geo.tiling import iter_tiles

        with SceneReader(raster, gsd_m=config.gsd_m) as reader:
            images = [reader.read_tile(t).pixels for t in iter_tiles(reader.info.grid, config.tile_spec)]
        batches = [np.stack(images[i:i + batch]) for i in range(0, len(images), batch)]
        scorer(batches[0])  # warm-up
        t0 = time.perf_counter()
        for b in batches:
            scorer(b)
        return {"model_only_tiles_per_s": len(images) / (time.perf_counter() - t0), "tiles": len(images)}
    if os.path.exists(out):
        os.remove(out)
    from solarmap.geo.raster import describe_scene

    grid = describe_scene(raster).grid
    gx, gy = grid.ground_resolution_m()
    area_km2 = grid.width * grid.height * gx * gy / 1e6
    started = time.perf_counter()
    stats = detect_to_file(raster, out, scorer=scorer, config=config)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tiles_per_s": stats.tiles_total / wall, "km2_per_hour": area_km2 / wall * 3600,
            "peak_rss_mib": peak_rss_mib(), "device": str(scorer.device),
            "backbone": scorer.model.backbone.display_name, **stats.as_dict()}


def child(args, raster: Path, out: Path, model_only: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(raster), str(out), "1" if model_only else "0",
           "--device", args.device] + (["--model", args.model] if args.model else [])
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 20000])
    parser.add_argument("--efficiency-size", type=int, default=4000,
                        help="Scene side (px) for the end-to-end / model-only ratio.")
    parser.add_argument("--repeat", type=int, default=2, help="End-to-end and model-only runs at --efficiency-size.")
    parser.add_argument("--workdir", default="/tmp/solarmap-bench")
    parser.add_argument("--scene", nargs="+", type=Path, default=None, metavar="RASTER",
                        help="Benchmark on these rasters instead of generated scenes (e.g. your own imagery).")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--child", nargs=3, metavar=("RASTER", "OUT", "MODEL_ONLY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        raster, out, model_only = args.child
        print(json.dumps(run_one(raster, out, args.model, args.device, model_only == "1")))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.scene:
        missing = [str(p) for p in args.scene if not p.is_file()]
        if missing:
            parser.error(f"--scene: not found: {', '.join(missing)}")
        rasters = {p.name: p for p in args.scene}
    else:
        rasters = {}
        for size in dict.fromkeys(args.sizes + [args.efficiency_size]):
            rasters[size] = work / f"scene_{size}.tif"
            build_raster(rasters[size], size)
    rows = {name: child(args, raster, work / f"detect_{i}.gpkg", model_only=False)
            for i, (name, raster) in enumerate(rasters.items())}
    e = next(iter(rasters)) if args.scene else args.efficiency_size
    end_to_end_runs, model_only_runs = [rows[e]], []
    for i in range(max(1, args.repeat)):
        model_only_runs.append(child(args, rasters[e], work / "unused.gpkg", model_only=True))
        if i + 1 < args.repeat:
            end_to_end_runs.append(child(args, rasters[e], work / "detect_again.gpkg", model_only=False))
    rows[e] = max(end_to_end_runs, key=lambda r: r["tiles_per_s"])
    model_only = max(model_only_runs, key=lambda r: r["model_only_tiles_per_s"])
    print(f"device: {rows[e]['device']}; model: {args.model or 'bundled'} ({rows[e]['backbone']})")
    print(f"{'scene' if args.scene else 'size px':>8} {'tiles':>6} {'positive':>8} {'polygons':>8} {'read s':>7} {'model s':>8} {'vector s':>8} "
          f"{'write s':>7} {'total s':>8} {'tiles/s':>7} {'km²/h':>7} {'peak RSS MiB':>12}")
    for size, r in rows.items():
        st = r["stage_seconds"]
        print(f"{size:>8} {r['tiles_total']:>6} {r['tiles_positive']:>8} {r['polygons']:>8} {st['read']:>7.1f} "
              f"{st['model']:>8.1f} {st['vectorize']:>8.1f} {st['write']:>7.1f} {r['wall_s']:>8.1f} "
              f"{r['tiles_per_s']:>7.2f} {r['km2_per_hour']:>7.2f} {r['peak_rss_mib']:>12.0f}")
    listed = lambda runs, key: ", ".join(f"{r[key]:.2f}" for r in runs)  # noqa: E731
    where = e if args.scene else f"{e} px"
    print(f"runs at {where}: end-to-end {listed(end_to_end_runs, 'tiles_per_s')} tiles/s; "
          f"model-only {listed(model_only_runs, 'model_only_tiles_per_s')} tiles/s")
    print(f"pipeline efficiency at {where} ({model_only['tiles']} tiles): end-to-end {rows[e]['tiles_per_s']:.2f} "
          f"tiles/s / model-only {model_only['model_only_tiles_per_s']:.2f} tiles/s = "
          f"{rows[e]['tiles_per_s'] / model_only['model_only_tiles_per_s']:.2f} (best of {len(end_to_end_runs)} / "
          f"{len(model_only_runs)})")
    if len(end_to_end_runs) > 2 and len(model_only_runs) > 2:  # a middle value, less luck than the bests
        e2e_median = float(np.median([r["tiles_per_s"] for r in end_to_end_runs]))
        model_median = float(np.median([r["model_only_tiles_per_s"] for r in model_only_runs]))
        print(f"medians: end-to-end {e2e_median:.2f} / model-only {model_median:.2f} = {e2e_median / model_median:.2f}")
    if args.scene:
        return
    first = args.sizes[0]
    for size in args.sizes[1:]:
        print(f"peak RSS {size} px / {first} px: {rows[size]['peak_rss_mib'] / rows[first]['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
