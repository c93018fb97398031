"""Set a model's CAM fallback (detect --cam-fallback) and the tile probability it needs, as the model's
default: the bundled model's is chosen on validation chips with `scripts/chips_alone.py
--cam-fallback --cam-fallback-min-score S` (docs/real-imagery.md, Rasters the size of one chip).

    python scripts/set_cam_fallback.py --model IN.pt.xz --min-score 0.7 [--gsd-scales] --out OUT.pt.xz
    python scripts/set_cam_fallback.py --model IN.pt.xz --off --out OUT.pt.xz

``--gsd-scales`` also measures how the branch CAM's peak on arrays falls on coarser rasters (on
training positives of Fresno and Bern in ``--data``; ``calibrate.fallback_cam_scales``), so the
fallback's CAM threshold asks for the same share of an array's response at every GSD.
The weights are not touched; the change is recorded in the model's provenance.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from solarmap.errors import InputError, ModelError
from solarmap.model import load, save, with_config
from solarmap.training.calibrate import fallback_cam_scales
from solarmap.training.real_data import load_source

SCALE_GSDS_M = (0.4, 0.5, 0.6, 0.75)  # state orthophotos to NAIP and a little beyond
SCALE_CHIPS_PER_SOURCE = 100


def training_positives(data: Path, gsd_m: float) -> list[np.ndarray]:
    """A fixed draw of Fresno and Bern training positives, float in [0, 1] at ``gsd_m``."""
    chips = []
    for source in ("fresno", "bern"):
        positives = [im for im in load_source(source, data, gsd_m=gsd_m) if im.split == "train" and im.label]
        chosen = np.random.default_rng(0).choice(len(positives), min(SCALE_CHIPS_PER_SOURCE, len(positives)),
                                                 replace=False)
        chips += [positives[i].pixels.astype(np.float32) / 255 for i in sorted(chosen)]
    return chips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--min-score", type=float, default=0.0, metavar="S",
                        help="Fall back only on positive tiles at least this probable (0: every positive tile).")
    parser.add_argument("--gsd-scales", action="store_true",
                        help=f"Scale the fallback's CAM per raster GSD ({', '.join(map(str, SCALE_GSDS_M))} m), "
                             "measured on training positives in --data.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--off", action="store_true", help="Turn the fallback off instead.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not 0.0 <= args.min_score <= 1.0:
        parser.error(f"--min-score {args.min_score}: a tile probability between 0 and 1")
    try:
        net = load(args.model)
    except ModelError as exc:
        parser.error(str(exc))
    if not net.config.pseudo_seg:
        parser.error(f"{args.model} has no segmentation head: the fallback is the pseudo-seg method's")
    change = {"seg_cam_fallback": not args.off, "seg_cam_fallback_min_score": 0.0 if args.off else args.min_score,
              "seg_cam_fallback_scales": ()}
    if args.gsd_scales and not args.off:
        try:
            chips = training_positives(args.data, net.config.gsd_m)
        except InputError as exc:
            parser.error(str(exc))
        change["seg_cam_fallback_scales"] = fallback_cam_scales(net, chips, SCALE_GSDS_M)
    provenance = {**net.config.provenance,
                  "cam_fallback_set": {**change, "from": args.model.name, "on": time.strftime("%Y-%m-%d")}}
    save(with_config(net, **change, provenance=provenance), args.out, half=True)
    print(f"wrote {args.out}: {change}")


if __name__ == "__main__":
    main()
