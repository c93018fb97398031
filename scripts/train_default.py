"""Train the bundled default model on real imagery with a pretrained backbone (solarmap.training.real_recipe):
EfficientNet-Lite0 (or --backbone efficientnet-lite2) from ImageNet, fine-tuned on the five real sets
shown in every look, the greedy CAM branch, a segmentation head on PV01's masks, everything calibrated
on real validation data.

    python scripts/train_default.py --workdir ~/solarmap-real --out model.pt.xz [--data ../shared/data]
    python scripts/train_default.py --over-model released.pt.xz --workdir DIR --out FILE --seg-...  # head only

Resumable: every stage checkpoints under --workdir. Test splits are not read here
(scripts/validate_real.py --split test reads them, once, at the end).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from solarmap.errors import ModelError
from solarmap.model import ModelConfig, SolarNet, load, save
from solarmap.training.finetune import FinetuneConfig
from solarmap.training.pretrained import init_from_imagenet
from solarmap.training.real_data import load_all, synthetic_images
from solarmap.training.real_recipe import (HARD_NEGATIVE_GROUP, finish_model, mine_hard_negatives,
                                           released_network, train_real_model)
from solarmap.training.views import ViewConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path.home() / "solarmap-real")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data")
    parser.add_argument("--backbone", choices=("efficientnet-lite0", "efficientnet-lite2"),
                        default="efficientnet-lite0",
                        help="Pretrained backbone (its ImageNet weights come with solarmap[train]).")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--views", action="append", default=[], metavar="SOURCE:LABEL=N",
                        help="Views per epoch of one source's class instead of the recipe's (e.g. fresno:1=900); "
                             "repeatable.")
    parser.add_argument("--look-coarser", type=float, default=ViewConfig.p_coarser, metavar="P",
                        help="Share of fine-tuning views shown at a coarser GSD and back (default %(default)s).")
    parser.add_argument("--look-jpeg", type=float, default=ViewConfig.p_jpeg, metavar="P",
                        help="Share of fine-tuning views JPEG-compressed (default %(default)s).")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--over-model", type=Path, metavar="FILE",
                        help="Keep this released model's network and CAM branch (its head, calibration and CAM "
                             "fallback are dropped): train only the segmentation head, then calibrate everything "
                             "again (scripts/set_cam_fallback.py sets a fallback afterwards).")
    parser.add_argument("--hard-negatives-from", type=Path, metavar="FILE",
                        help="Also draw the training negatives this model scores >= --hard-negative-score as a group "
                             "of their own (--views hard:0=N, default 400 a fine-tuning epoch).")
    parser.add_argument("--hard-negative-score", type=float, default=0.2, metavar="P")
    parser.add_argument("--synthetic-towns", type=int, default=0,
                        help="Also train on this many synthetic towns (a supplement; validation towns 101-104).")
    parser.add_argument("--seg-negatives", type=int, default=60,
                        help="Background-only views per other source (Fresno, UC Merced, OpenAerialMap negatives) "
                             "beside PV01's masks when training the segmentation head (0: masks only).")
    parser.add_argument("--seg-pseudo-positives", type=int, default=0, metavar="N",
                        help="Also N views each of Bern and Fresno training positives, labelled by the network's own "
                             "pseudo masks (CAM x saliency), for the segmentation head (default 0: none).")
    parser.add_argument("--seg-pseudo-high", type=float, default=0.5, metavar="F",
                        help="Pseudo masks: panel where CAM x saliency reaches F of its peak (default %(default)s).")
    parser.add_argument("--seg-hard-negatives", type=int, default=0, metavar="N",
                        help="Segmentation head, second round: N hard negative views per source mined by the first "
                             "round's head from training negatives (default 0: one round).")
    parser.add_argument("--seg-relabel", action="store_true",
                        help="With --seg-hard-negatives and --seg-pseudo-positives: the second round's pseudo masks "
                             "tightened by the first round's head where it sees the array.")
    args = parser.parse_args()
    if args.seg_relabel and not (args.seg_hard_negatives and args.seg_pseudo_positives):
        parser.error("--seg-relabel needs --seg-hard-negatives and --seg-pseudo-positives")
    network_options = ("backbone", "epochs", "lr", "views", "synthetic_towns", "look_coarser", "look_jpeg",
                       "hard_negatives_from")
    changed = [f"--{name.replace('_', '-')}" for name in network_options
               if getattr(args, name) != parser.get_default(name)]
    if args.over_model and changed:
        parser.error(f"--over-model keeps the model's network: {', '.join(changed)} would change how it is trained")
    if args.over_model:
        try:
            over = released_network(load(args.over_model))
        except (ModelError, ValueError) as exc:
            parser.error(f"--over-model: {exc}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = args.workdir / "train.log"

    def say(text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        print(line, flush=True)
        with open(log, "a") as fh:
            fh.write(line + "\n")

    torch.manual_seed(0)
    config = over.config if args.over_model else ModelConfig.for_backbone(args.backbone)
    t0 = time.perf_counter()
    images = load_all(args.data, gsd_m=config.gsd_m, cache_dir=args.workdir / "cache")
    say(f"{len(images)} real images in {time.perf_counter() - t0:.0f} s")
    if not (0 <= args.look_coarser <= 1 and 0 <= args.look_jpeg <= 1):
        parser.error("--look-coarser and --look-jpeg are shares between 0 and 1")
    per_source = dict(FinetuneConfig().per_source)
    hard_negatives = []
    if args.hard_negatives_from:
        try:
            miner = load(args.hard_negatives_from)
        except ModelError as exc:
            parser.error(str(exc))
        hard_negatives = mine_hard_negatives(miner, images, min_score=args.hard_negative_score)
        per_source[HARD_NEGATIVE_GROUP] = 400
        say(f"{len(hard_negatives)} training negatives scored >= {args.hard_negative_score:g} by "
            f"{args.hard_negatives_from.name}: drawn as {HARD_NEGATIVE_GROUP}")
    for item in args.views:
        key, _, count = item.partition("=")
        if key not in per_source or not count.isdigit():
            parser.error(f"--views {item}: expected one of {', '.join(per_source)} = a whole number")
        per_source[key] = int(count)
    if args.synthetic_towns:
        towns = args.workdir / "towns"
        images += synthetic_images(towns, seeds=range(1, args.synthetic_towns + 1), split="train", gsd_m=config.gsd_m)
        images += synthetic_images(towns, seeds=range(101, 105), split="val", gsd_m=config.gsd_m)
        per_source.update({"synthetic:1": 200, "synthetic:0": 200})
        say(f"with synthetic chips: {sum(im.source == 'synthetic' for im in images)}")
    looks = ViewConfig(p_coarser=args.look_coarser, p_jpeg=args.look_jpeg)
    finetune = FinetuneConfig(epochs=args.epochs, lr=args.lr, per_source=per_source, view=looks)
    head_options = dict(seg_negatives_per_source=args.seg_negatives, seg_pseudo_per_source=args.seg_pseudo_positives,
                        seg_pseudo_high=args.seg_pseudo_high, seg_hard_negatives_per_source=args.seg_hard_negatives,
                        seg_relabel=args.seg_relabel)
    if args.over_model:
        net = over
        say(f"over {args.over_model}: its network and CAM branch kept, head and calibration made again")
        info = {"over_model": args.over_model.name,
                **finish_model(net, images, data_root=args.data, workdir=args.workdir, say=say, **head_options)}
    else:
        net = init_from_imagenet(SolarNet(config))
        info = train_real_model(net, images, data_root=args.data, workdir=args.workdir, say=say, finetune=finetune,
                                hard_negatives=hard_negatives, **head_options)
    net.config = replace(net.config, default_cam_method="pseudo-seg" if info["default_outline"] == "pseudo-seg"
                         else "branch", refine_rule=net.config.refine_rule if info["default_outline"] != "branch-plain"
                         else {}, provenance={"script": "scripts/train_default.py", "trained": time.strftime("%Y-%m-%d"),
                                              **json.loads(json.dumps(info, default=str))})
    save(net, args.out, half=True)
    say(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
