"""How the model holds when real imagery looks like another sensor's (validation splits only).

    python scripts/robustness_real.py [--model FILE] [--data ../shared/data] [--json OUT]

Users run solarmap on NAIP (0.6 m), state orthophotos (0.15-0.5 m) and vendor mosaics, JPEG-compressed
or soft; the real-data table (validate_real.py) shows each set in its own look. Here every validation
image is shown again coarser (the pipeline resamples it back to the model's GSD, as detection does
with a coarser raster), JPEG-compressed or blurred: recall on each source's positives and the
false-positive rate on its negatives, per look. PV01's validation mosaics (0.1 m, pixel truth) are
also resampled to coarser GSDs and detected whole: tile precision / recall, pooled pixel IoU and
total-area error. Nothing here chooses anything; the test splits are not read.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from chips_alone import coarser  # a chip as a coarser raster holds it
from validate_real import negative_mosaic, pv01_detection, with_seg_rule, write_scene  # the real-data table

from solarmap.model import load
from solarmap.model.scorer import build_scorer, classify_images, resample
from solarmap.pipeline import DetectConfig, detect_scene
from solarmap.training.real_data import load_all

CACHE_GSD_M = 0.3  # load_all resamples every source to this
PV01_GSD_M = 0.1  # the mosaics' own pixels


def _jpeg(pixels: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")).transpose(2, 0, 1)


def _blur(pixels: np.ndarray, radius: float) -> np.ndarray:
    image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(image).transpose(2, 0, 1)


def _coarser(pixels: np.ndarray, gsd_m: float) -> np.ndarray:
    return resample(pixels.astype(np.float32), CACHE_GSD_M / gsd_m)


def _coarser_uint8(pixels: np.ndarray, gsd_m: float) -> np.ndarray:
    """As an 8-bit raster at ``gsd_m`` holds it."""
    return coarser(pixels, gsd_m / CACHE_GSD_M)


# look -> (what it does to a uint8 (3, h, w) image at 0.3 m, as float in [0, 1]; the GSD it is then at)
LOOKS = {
    "as is (0.3 m)": (lambda p: p / 255.0, CACHE_GSD_M),
    "0.5 m": (lambda p: _coarser(p, 0.5) / 255.0, 0.5),
    "0.6 m (NAIP)": (lambda p: _coarser(p, 0.6) / 255.0, 0.6),
    "JPEG quality 50": (lambda p: _jpeg(p, 50) / 255.0, CACHE_GSD_M),
    "JPEG quality 25": (lambda p: _jpeg(p, 25) / 255.0, CACHE_GSD_M),
    "0.6 m, JPEG quality 50": (lambda p: _jpeg(_coarser_uint8(p, 0.6), 50) / 255.0, 0.6),
    "blur 1 px": (lambda p: _blur(p, 1.0) / 255.0, CACHE_GSD_M),
}


def classification_by_look(net, images) -> dict:
    """Per look and source: recall on positives, false-positive rate on negatives."""
    sources = np.array([im.source for im in images])
    labels = np.array([im.label for im in images]).astype(bool)
    out = {}
    for look, (change, gsd_m) in LOOKS.items():
        probs = classify_images(net, (change(im.pixels).astype(np.float32) for im in images), gsd_m=gsd_m)
        called = np.array(probs) >= net.config.decision_threshold
        row = {}
        for source in sorted(set(sources)):
            here = sources == source
            if (here & labels).any():
                row[f"{source} recall"] = float(called[here & labels].mean())
            if (here & ~labels).any():
                row[f"{source} fpr"] = float(called[here & ~labels].mean())
        out[look] = row
    return out


def pv01_by_gsd(scorer, data: Path, names: list[str], workdir: Path, gsds=(0.1, 0.3, 0.5, 0.6)) -> dict:
    """PV01 validation mosaics detected at each GSD (validate_real.pv01_detection): tile precision /
    recall (each source image a tile), pooled pixel IoU and total-area error."""
    keys = ("tile_precision", "tile_recall", "pixel_iou", "total_area_error")
    out = {}
    for gsd_m in gsds:
        row = pv01_detection(scorer, data, names, workdir, gsd_m=gsd_m if gsd_m != PV01_GSD_M else None)
        out[f"{gsd_m:g} m"] = {key: row[key] for key in keys}
    return out


def negative_scene_by_gsd(scorer, negatives, workdir: Path, gsds=(0.3, 0.5, 0.6)) -> dict:
    """The real-data table's negative scene (validate_real.negative_mosaic: UC Merced validation
    images, no panels, at 0.3 m) resampled to each GSD and detected: share of tiles called positive
    and area drawn."""
    mosaic = negative_mosaic(negatives)
    size_m = mosaic.shape[1] * CACHE_GSD_M
    out = {}
    for gsd_m in gsds:
        pixels = _coarser_uint8(mosaic, gsd_m)
        scene = write_scene(workdir / f"negatives_{gsd_m:g}m.tif", pixels, size_m / pixels.shape[1],
                            (500_000.0, 4_100_000.0))
        frame, stats = detect_scene(scene, scorer=scorer, config=DetectConfig.for_scorer(scorer))
        out[f"{gsd_m:g} m"] = {"positive_share": stats.tiles_positive / max(stats.tiles_read, 1),
                               "area_m2": float(frame["area_m2"].sum()) if len(frame) else 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Checkpoint (default: the bundled model).")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "solarmap-validate")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seg-rule", default=None, metavar="THRESHOLD,FLOOR,pixel|blob",
                        help="Another segmentation-head rule than the checkpoint's (as validate_real.py).")
    parser.add_argument("--outlines-only", action="store_true", help="Only the PV01 mosaics (the outline rule's part).")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    scorer = build_scorer(with_seg_rule(load(args.model), args.seg_rule) if args.seg_rule else args.model)
    images = [im for im in load_all(args.data, gsd_m=CACHE_GSD_M, cache_dir=args.workdir / "cache") if im.split == "val"]
    looks = {} if args.outlines_only else classification_by_look(scorer.model, images)
    pv01_names = [im.key.split(":")[1] for im in images if im.source == "pv01"]
    scenes = args.workdir / "robustness-pv01"
    scenes.mkdir(exist_ok=True)
    result = {"model": args.model or "bundled", "seg_rule": args.seg_rule, "looks": looks,
              "pv01": pv01_by_gsd(scorer, args.data, pv01_names, scenes),
              "negative_scene": negative_scene_by_gsd(scorer, [im for im in images if im.source == "ucmerced"
                                                               and not im.label], scenes)}
    columns = list(next(iter(looks.values()), {}))
    print("| look | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for look, row in looks.items():
        print(f"| {look} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    print("\n| PV01 mosaics at | tile P / R | pixel IoU | area |\n| --- | --- | --- | --- |")
    for gsd, row in result["pv01"].items():
        print(f"| {gsd} | {row['tile_precision']:.3f} / {row['tile_recall']:.3f} | {row['pixel_iou']:.3f} | "
              f"{100 * row['total_area_error']:+.0f} % |")
    print("\n| negative scene at | tiles called positive | area drawn |\n| --- | --- | --- |")
    for gsd, row in result["negative_scene"].items():
        print(f"| {gsd} | {100 * row['positive_share']:.1f} % | {row['area_m2']:.0f} m² |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
