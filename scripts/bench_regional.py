"""Benchmark regional runs: the same multi-raster input in one process and on 1 and 2 local dask workers.

Prints tiles/s and the speed-up over one worker, and checks every run gives the same polygons.

    python scripts/bench_regional.py [--towns 4] [--size 1024] [--workdir /tmp/solarmap-bench-regional]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from solarmap.model.scorer import ScorerSpec
from solarmap.pipeline import DetectConfig
from solarmap.pipeline.regional import detect_regional
from solarmap.training.data import town_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--towns", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/solarmap-bench-regional"))
    parser.add_argument("--schedulers", nargs="+", default=["none", "local:1", "local:2"])
    parser.add_argument("--rows-per-chunk", type=int, default=2)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rasters = [scene for scene, _ in town_paths(args.workdir, seeds=range(900, 900 + args.towns), size_px=args.size)]
    spec = ScorerSpec()
    config = DetectConfig.for_scorer(spec.build())
    rows = []
    reference = None
    for scheduler in args.schedulers:
        t0 = time.perf_counter()
        frame, stats = detect_regional(rasters, args.workdir / f"out-{scheduler.replace(':', '')}.gpkg",
                                       scorer_spec=spec, config=config, overwrite=True,
                                       scheduler=None if scheduler == "none" else scheduler,
                                       rows_per_chunk=args.rows_per_chunk)
        seconds = time.perf_counter() - t0
        area = float(frame["area_m2"].sum())
        same = reference is None or (len(frame) == reference[0] and np.isclose(area, reference[1], rtol=1e-9))
        reference = reference or (len(frame), area)
        rows.append((scheduler, stats.tiles_total, stats.chunks_total, seconds, stats.tiles_total / seconds,
                     len(frame), area, same))
    base = next((r for r in rows if r[0] == "local:1"), rows[0])
    print(f"{args.towns} rasters of {args.size} px, {rows[0][1]} tiles, {rows[0][2]} chunks "
          f"({args.rows_per_chunk} tile rows each); times include cluster start-up and model loading")
    print("| scheduler | seconds | tiles/s | vs local:1 | polygons | area m² | same result |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for scheduler, _, _, seconds, rate, count, area, same in rows:
        print(f"| {scheduler} | {seconds:.1f} | {rate:.1f} | {rate / base[4]:.2f}x | {count} | {area:.1f} | {same} |")


if __name__ == "__main__":
    main()
