"""Time `solarmap evaluate` at county scale: N predicted and N true polygons on one scene.

    python scripts/bench_evaluate.py [--polygons 20000] [--size-px 8000]

The scene is a blank GeoTIFF at 0.3 m; truth is N random arrays of 2-60 m², predictions the same
arrays moved by up to 1 m with a third of them missing and as many false ones added.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from affine import Affine

from solarmap.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polygons", type=int, default=20_000)
    parser.add_argument("--size-px", type=int, default=8000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    side_m = args.size_px * 0.3
    x0, y0 = 500_000.0, 4_000_000.0
    n = args.polygons
    x, y = x0 + rng.uniform(0, side_m - 10, n), y0 - rng.uniform(10, side_m, n)
    w, h = rng.uniform(1.5, 8, n), rng.uniform(1.5, 8, n)
    truth = shapely.box(x, y, x + w, y + h)
    dx, dy = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    kept = rng.random(n) > 1 / 3
    false_x, false_y = x0 + rng.uniform(0, side_m - 10, n - kept.sum()), y0 - rng.uniform(10, side_m, n - kept.sum())
    predicted = np.concatenate([shapely.box(x + dx, y + dy, x + dx + w, y + dy + h)[kept],
                                shapely.box(false_x, false_y, false_x + 4, false_y + 3)])
    with tempfile.TemporaryDirectory() as tmp:
        scene = Path(tmp) / "scene.tif"
        with rasterio.open(scene, "w", driver="GTiff", height=args.size_px, width=args.size_px, count=3, dtype="uint8",
                           crs="EPSG:32611", transform=Affine(0.3, 0, x0, 0, -0.3, y0), tiled=True,
                           compress="deflate") as dst:
            pass
        truth_frame = gpd.GeoDataFrame(geometry=truth, crs="EPSG:32611")
        predicted_frame = gpd.GeoDataFrame(geometry=predicted, crs="EPSG:32611")
        t0 = time.perf_counter()
        result = evaluate(predicted_frame, truth_frame, str(scene))
        seconds = time.perf_counter() - t0
    print(f"evaluate: {len(predicted)} predicted and {n} true polygons on a {args.size_px} px scene: {seconds:.1f} s "
          f"(object recall {result.object_recall:.3f}, precision {result.object_precision:.3f}, "
          f"pixel IoU {result.pixel_iou:.3f})")


if __name__ == "__main__":
    main()
