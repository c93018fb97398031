"""The outline table: detection (classifier gate + outlines, the pipeline end to end) on the masked
sets' validation splits (choices) or, once, their test splits, per source, at each image's own GSD
and degraded to 0.6 m (NAIP).

    python scripts/validate_outline.py --model FILE [--split val|test] [--gsd native,0.6] [--json OUT]
                                       [--joins 4,2,6,8] [--[no-]cam-fallback] [--cam-fallback-min-score S]

Scenes: Bolzano and NREL images one scene each (NREL without its logo strip); PV01 (4 x 4) and
Bradbury (8 x 8) chips laid out side by side, as in validate_real.py. Georeferenced at their own
GSD in UTM 11N; ``--gsd 0.6`` resamples each scene to 0.6 m first (area average), as NAIP would show
it; the truth stays on the native grid, and the predicted polygons are rasterized onto it.

Per source: pixel IoU and drawn / true area (pooled over its images) of the ``panels`` layer against
module masks (PV01, Bradbury, Bolzano) and of the ``installations`` layer against NREL's footprint
masks; arrays found (a fifth of the array drawn), under 20 m² and larger; on Bolzano, the area drawn
on roofs without panels as a fraction of the panel area. Nothing here chooses anything.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.features import rasterize

from solarmap.geo.output import write_geotiff
from solarmap.model.scorer import build_scorer, resample
from solarmap.pipeline import DetectConfig, detect_scene
from solarmap.pipeline.footprints import installations_with_footprints
from solarmap.training.mask_data import MaskedImage, load_masked_source
from solarmap.training.outline import evaluate_outline

UTM = "EPSG:32611"
NATIVE_GSD_M = {"pv01": 0.1, "bradbury": 0.3, "bolzano": 0.2, "nrel": 0.5}
MOSAIC_SIDE = {"pv01": 4, "bradbury": 8}


def mosaics(images: list[MaskedImage], side: int) -> list[MaskedImage]:
    """Chips laid out ``side`` x ``side`` (padded to the largest chip; padding is blank, truth 0)."""
    out = []
    cell = max(max(im.pixels.shape[1:]) for im in images)
    for start in range(0, len(images), side * side):
        group = images[start: start + side * side]
        cols = math.ceil(math.sqrt(len(group)))
        rows = math.ceil(len(group) / cols)
        pixels = np.zeros((3, rows * cell, cols * cell), np.uint8)
        panel = np.zeros((rows * cell, cols * cell), np.float32)
        for k, image in enumerate(group):
            r, c = divmod(k, cols)
            h, w = image.pixels.shape[1:]
            pixels[:, r * cell: r * cell + h, c * cell: c * cell + w] = image.pixels
            panel[r * cell: r * cell + h, c * cell: c * cell + w] = image.panel
        out.append(MaskedImage(pixels, panel, panel.copy(), group[0].source, f"{group[0].source}:mosaic{start}",
                               group[0].group, group[0].split, native_gsd_m=group[0].native_gsd_m))
    return out


def scenes_of(source: str, data: Path, split: str) -> list[MaskedImage]:
    images = [im for im in load_masked_source(source, data, gsd_m=NATIVE_GSD_M[source]) if im.split == split]
    return mosaics(images, MOSAIC_SIDE[source]) if source in MOSAIC_SIDE else images


def detect_on(scorer, config: DetectConfig, image: MaskedImage, workdir: Path, gsd_m: float | None,
              index: int, joins_m: tuple[float, ...]) -> list[np.ndarray]:
    """(panels drawn, installations drawn) as float32 (2, h, w) on the image's own grid, one for each
    join distance of the installations."""
    native = image.native_gsd_m
    origin = (500_000.0 + 2_000.0 * index, 4_000_000.0)
    transform = Affine(native, 0, origin[0], 0, -native, origin[1])
    pixels, shown = image.pixels, transform
    if gsd_m and gsd_m > native:
        factor = native / gsd_m
        pixels = np.clip(np.rint(resample(image.pixels.astype(np.float32), factor)), 0, 255).astype(np.uint8)
        shown = transform @ Affine.scale(image.pixels.shape[2] / pixels.shape[2], image.pixels.shape[1] / pixels.shape[1])
    scene = write_geotiff(workdir / f"{image.key.replace(':', '_')}.tif", pixels, transform=shown, crs=UTM,
                          overwrite=True)
    frame, _ = detect_scene(str(scene), scorer=scorer, config=config)
    shape = image.panel.shape
    out = []
    for join_m in joins_m:
        drawn = np.zeros((2, *shape), np.float32)
        if len(frame):
            drawn[0] = rasterize(list(frame.geometry), out_shape=shape, transform=transform)
            installations = installations_with_footprints(frame, sources=[(scene.name, scene)], scorer=scorer,
                                                          config=replace(config, join_m=join_m))
            drawn[1] = rasterize(list(installations.geometry), out_shape=shape, transform=transform)
        out.append(drawn)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Checkpoint (default: the bundled model).")
    parser.add_argument("--method", default=None, help="Outline method (default: the model's).")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="Tile probability that gates the outlines (default: the model's).")
    parser.add_argument("--cam-fallback", action=argparse.BooleanOptionalAction, default=None,
                        help="As detect's --[no-]cam-fallback (default: the model's).")
    parser.add_argument("--cam-fallback-min-score", type=float, default=None, metavar="S",
                        help="As detect's --cam-fallback-min-score (default: the model's).")
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--gsd", default="native,0.6", help="Comma-separated: native and/or metres.")
    parser.add_argument("--sources", default="pv01,bradbury,bolzano,nrel")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "solarmap-validate-outline")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--negative-scene", action="store_true",
                        help="Also the area drawn on validate_real.py's negative scene (UC Merced images of the split).")
    parser.add_argument("--joins", default=None, help="Installations' join distances to measure, m (default: the "
                                                      "model's); the first is the one reported per source.")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    scorer = build_scorer(args.model, method=args.method, decision_threshold=args.score_threshold,
                          cam_fallback=args.cam_fallback, cam_fallback_min_score=args.cam_fallback_min_score)
    config = DetectConfig.for_scorer(scorer)
    t0 = time.perf_counter()
    joins_m = tuple(float(v) for v in args.joins.split(",")) if args.joins else (config.join_m,)
    result = {"model": args.model or "bundled", "method": scorer.method.value, "split": args.split,
              "mask_threshold": config.mask_threshold, "score_threshold": config.score_threshold, "join_m": joins_m[0],
              "cam_fallback": scorer.metadata().get("cam_fallback")}
    for gsd in args.gsd.split(","):
        gsd_m = None if gsd == "native" else float(gsd)
        for source in args.sources.split(","):
            images = scenes_of(source, args.data, args.split)
            drawn = [detect_on(scorer, config, image, args.workdir, gsd_m, i, joins_m) for i, image in enumerate(images)]
            for k, join_m in enumerate(joins_m):
                metrics = evaluate_outline([d[k] for d in drawn], images, thresholds=(0.5,),
                                           gsd_m=NATIVE_GSD_M[source])["0.5"][source]
                key = f"{source}@{gsd}" + (f" join {join_m:g} m" if k else "")
                result[key] = metrics
                print(f"{key.replace('@', ' at ')}: {json.dumps(metrics)}", flush=True)
    if args.negative_scene:
        from validate_real import negative_scene

        from solarmap.training.real_data import load_source

        negatives = [im for im in load_source("ucmerced", args.data, gsd_m=0.3) if im.split == args.split]
        result["negative_scene"] = negative_scene(scorer, negatives, args.workdir)
        print(f"negative scene: {json.dumps(result['negative_scene'])}", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
