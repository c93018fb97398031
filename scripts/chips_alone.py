"""Detection on single real chips, each written as its own small GeoTIFF: what `solarmap detect chip.tif`
gives a user (or an evaluation) whose rasters are the size of one chip.

    python scripts/chips_alone.py [--model FILE] [--[no-]cam-fallback] [--cam-fallback-min-score S] [--split val|test]
                                  [--gsd M] [--per-source 150] [--json OUT]

Per source: the share of positive chips with at least one polygon ("found"), and with at least one tile
called positive, outlined or not ("called": the gap is what the outline stage misses); the same two
shares on negative chips; and for PV01 (pixel truth) the pooled pixel IoU and total-area error.
Validation split unless told; a sample of ``--per-source`` chips per set (fixed seed). Bern chips keep
their own Swiss LV95 georeference; the others get a transform at their own GSD in UTM 11N.

Why: the real-data table detects PV01 inside mosaics and classifies Fresno and Bern chips; neither shows
that the outline stage, run on a raster no larger than a chip, can draw nothing on an array the
classifier found.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.features import rasterize

from solarmap.geo.output import write_geotiff
from solarmap.model.scorer import build_scorer, resample
from solarmap.pipeline import DetectConfig, detect_scene
from solarmap.training.real_data import load_source

SOURCE_GSD_M = {"bern": 0.2, "fresno": 0.3, "pv01": 0.1, "ucmerced": 0.3048}


def chip_transform(source: str, key: str, gsd_m: float) -> tuple[Affine, str]:
    """A chip's georeference: Bern's own (its name holds its centre in LV95), elsewhere any at its GSD."""
    if source == "bern":
        _, east, north = key.split(":")[1].split("_")
        return Affine(gsd_m, 0, float(east) - 12.5, 0, -gsd_m, float(north) + 12.5), "EPSG:2056"
    return Affine(gsd_m, 0, 500_000.0, 0, -gsd_m, 4_000_000.0), "EPSG:32611"


def coarser(pixels: np.ndarray, factor: float) -> np.ndarray:
    """(c, h, w) uint8 as a raster ``factor`` times coarser holds it (area average)."""
    return np.clip(np.rint(resample(pixels.astype(np.float32), 1 / factor)), 0, 255).astype(np.uint8)


def measure_source(source: str, scorer, config: DetectConfig, data: Path, split: str, per_source: int,
                   workdir: Path, gsd_m: float | None = None) -> dict:
    native_m = SOURCE_GSD_M[source]
    gsd_m = max(native_m, gsd_m or native_m)
    images = [im for im in load_source(source, data, gsd_m=native_m) if im.split == split]
    if len(images) > per_source:
        chosen = np.random.default_rng(0).choice(len(images), per_source, replace=False)
        images = [images[i] for i in sorted(chosen)]
    drawn: dict[int, list[bool]] = {0: [], 1: []}
    called: dict[int, list[bool]] = {0: [], 1: []}  # any tile called positive, outlined or not
    pooled = dict(intersection=0.0, union=0.0, truth=0.0, predicted=0.0)
    for k, image in enumerate(images):
        transform, crs = chip_transform(source, image.key, gsd_m)
        pixels, mask = image.pixels, image.mask
        if gsd_m > native_m:  # the same place in a coarser raster
            pixels = coarser(pixels, gsd_m / native_m)
            mask = None if mask is None else coarser(mask[None], gsd_m / native_m)[0]
        path = workdir / f"{source}_{k}.tif"
        write_geotiff(path, pixels, transform=transform, crs=crs, overwrite=True)
        frame, stats = detect_scene(str(path), scorer=scorer, config=config)
        drawn[image.label].append(len(frame) > 0)
        called[image.label].append(stats.tiles_positive > 0)
        if mask is not None:
            shape = pixels.shape[1:]
            predicted = (rasterize(((g, 1) for g in frame.geometry), out_shape=shape, transform=transform)
                         if len(frame) else np.zeros(shape, np.uint8)).astype(bool)
            truth = mask >= 128
            pooled["intersection"] += float((predicted & truth).sum())
            pooled["union"] += float((predicted | truth).sum())
            pooled["truth"] += float(truth.sum())
            pooled["predicted"] += float(predicted.sum())
    row = {"positives": len(drawn[1]), "found": float(np.mean(drawn[1])) if drawn[1] else None,
           "called": float(np.mean(called[1])) if called[1] else None,
           "negatives": len(drawn[0]), "negatives_with_polygon": float(np.mean(drawn[0])) if drawn[0] else None,
           "negatives_called": float(np.mean(called[0])) if called[0] else None}
    if pooled["union"]:
        row["pixel_iou"] = pooled["intersection"] / pooled["union"]
        row["total_area_error"] = (pooled["predicted"] - pooled["truth"]) / pooled["truth"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Checkpoint (default: the bundled model).")
    parser.add_argument("--cam-fallback", action=argparse.BooleanOptionalAction, default=None,
                        help="As detect's --cam-fallback (default: the model's).")
    parser.add_argument("--cam-fallback-min-score", type=float, default=None, metavar="S",
                        help="The fallback only on tiles at least this probable (default: the model's).")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--gsd", type=float, default=None, metavar="M",
                        help="Write each chip at this coarser GSD (e.g. 0.6 for NAIP), resampled from its own; "
                             "finer sources stay as they are.")
    parser.add_argument("--per-source", type=int, default=150)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    scorer = build_scorer(args.model, device="cpu", cam_fallback=args.cam_fallback,
                          cam_fallback_min_score=args.cam_fallback_min_score)
    config = DetectConfig.for_scorer(scorer)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="solarmap-chips-") as tmp:
        for source in SOURCE_GSD_M:
            rows[source] = measure_source(source, scorer, config, args.data, args.split, args.per_source, Path(tmp),
                                          gsd_m=args.gsd)
            print(source, " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in rows[source].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model or "bundled", "cam_fallback": scorer.cam_fallback,
                                         "cam_fallback_min_score": scorer.cam_fallback_min_score,
                                         "split": args.split, "gsd_m": args.gsd, "sources": rows}, indent=1))


if __name__ == "__main__":
    main()
