"""Set a model's CAM fallback (detect --cam-fallback) and the tile probability it needs, as the model's
default: the bundled model's is chosen on validation chips with `scripts/chips_alone.py
--cam-fallback --cam-fallback-min-score S` (docs/real-imagery.md, Rasters the size of one chip).

    python scripts/set_cam_fallback.py --model IN.pt.xz --min-score 0.7 --out OUT.pt.xz [--off]

The weights are not touched; the change is recorded in the model's provenance.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from solarmap.errors import ModelError
from solarmap.model import load, save, with_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--min-score", type=float, default=0.0, metavar="S",
                        help="Fall back only on positive tiles at least this probable (0: every positive tile).")
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
    change = {"seg_cam_fallback": not args.off, "seg_cam_fallback_min_score": 0.0 if args.off else args.min_score}
    provenance = {**net.config.provenance,
                  "cam_fallback_set": {**change, "from": args.model.name, "on": time.strftime("%Y-%m-%d")}}
    save(with_config(net, **change, provenance=provenance), args.out, half=True)
    print(f"wrote {args.out}: {change}")


if __name__ == "__main__":
    main()
