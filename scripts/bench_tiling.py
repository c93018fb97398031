"""Benchmark: tiling + vectorizing large rasters (no model), time per stage and peak memory.

Builds RGB GeoTIFFs of N x N px (tiled, deflate) by repeating a rendered synthetic town, then runs
the detect pipeline with the spectral baseline scorer (dark bluish pixels; no CNN, so the figures
are the geometry pipeline's own) in a fresh process per size, and reports peak RSS.

    python scripts/bench_tiling.py --sizes 2000 8000 20000 --workdir /tmp/solarmap-bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def build_raster(path: Path, size_px: int, town_px: int = 1024) -> None:
    import rasterio
    from rasterio.windows import Window

    from solarmap.training.synth import SynthConfig, render_town

    if path.exists():
        return
    town = render_town(SynthConfig(size_px=town_px, seed=11))
    tmp = path.with_suffix(".part.tif")
    profile = dict(driver="GTiff", height=size_px, width=size_px, count=3, dtype="uint8", crs=town.crs,
                   transform=town.transform, tiled=True, blockxsize=512, blockysize=512, compress="deflate",
                   BIGTIFF="IF_SAFER")
    tile = np.moveaxis(town.image, -1, 0)
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, size_px, town_px):
            for col in range(0, size_px, town_px):
                h, w = min(town_px, size_px - row), min(town_px, size_px - col)
                dst.write(tile[:, :h, :w], window=Window(col, row, w, h))
    tmp.rename(path)


def run_one(raster: str, out: str) -> dict:
    """Runs in a child process: the detect pipeline with the spectral baseline, peak RSS included."""
    from solarmap.pipeline import DetectConfig, SpectralBaseline, detect_to_file

    if os.path.exists(out):
        os.remove(out)
    started = time.perf_counter()
    stats = detect_to_file(raster, out, scorer=SpectralBaseline(),
                                  config=DetectConfig(tile_size_px=299, overlap_px=32, batch_size=16, min_area_m2=2.0))
    wall = time.perf_counter() - started
    return {"raster": raster, "wall_s": wall, "peak_rss_mib": peak_rss_mib(), **stats.as_dict()}


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 20000])
    parser.add_argument("--workdir", default="/tmp/solarmap-bench")
    parser.add_argument("--child", nargs=2, metavar=("RASTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for size in args.sizes:
        raster = work / f"scene_{size}.tif"
        t0 = time.perf_counter()
        build_raster(raster, size)
        built = time.perf_counter() - t0
        out = subprocess.run([sys.executable, __file__, "--child", str(raster), str(work / f"panels_{size}.gpkg")],
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["build_s"] = built
        results.append(result)
    print(f"{'size px':>8} {'tiles':>7} {'skipped':>7} {'polygons':>8} {'read s':>7} {'score s':>7} "
          f"{'vector s':>8} {'write s':>7} {'total s':>7} {'tiles/s':>7} {'peak RSS MiB':>12}")
    for size, r in zip(args.sizes, results):
        st = r["stage_seconds"]
        print(f"{size:>8} {r['tiles_total']:>7} {r['tiles_skipped_nodata']:>7} {r['polygons']:>8} "
              f"{st['read']:>7.1f} {st['model']:>7.1f} {st['vectorize']:>8.1f} {st['write']:>7.1f} "
              f"{r['wall_s']:>7.1f} {r['tiles_total'] / r['wall_s']:>7.1f} {r['peak_rss_mib']:>12.0f}")
    base = results[0]
    for size, r in zip(args.sizes[1:], results[1:]):
        print(f"{size} px vs {args.sizes[0]} px: {r['tiles_total'] / base['tiles_total']:.1f}x the tiles, "
              f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x the peak RSS")


if __name__ == "__main__":
    main()
