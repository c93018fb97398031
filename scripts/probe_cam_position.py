"""Diagnostic: does the CAM peak move with a panel's position inside a tile?

Pastes a dark-blue rectangle at the top, bottom, left and right of a plain grass tile of the model's
size and prints the peak cell of the branch CAM (levels 2 and 1) and of the GAP CAM.

    python scripts/probe_cam_position.py [--model FILE]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from solarmap import model as model_lib


def peak(cam: np.ndarray) -> tuple[int, int]:
    row, col = np.unravel_index(cam.argmax(), cam.shape)
    return int(row), int(col)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    net = model_lib.load(args.model)
    size = net.config.tile_size_px
    base = np.tile(np.array([0.25, 0.38, 0.18], np.float32)[:, None, None], (1, size, size))
    base += np.random.default_rng(0).normal(0, 0.02, base.shape).astype(np.float32)
    s = size / 101  # positions are given for a 101 px tile
    places = {"top": (5, 40, 15, 25), "bottom": (80, 40, 15, 25), "left": (40, 5, 25, 15), "right": (40, 80, 25, 15)}
    for name, (r, c, h, w) in places.items():
        r, c, h, w = (round(v * s) for v in (r, c, h, w))
        x = base.copy()
        x[:, r:r + h, c:c + w] = np.array([0.05, 0.07, 0.17], np.float32)[:, None, None]
        with torch.inference_mode():
            f5d = net.mixed_5d(torch.from_numpy(x)[None])
            level2 = net.branch_cam(f5d)[0].numpy()
            level1 = net.branch_cam(f5d, levels=1)[0].numpy()
            gap = net.gap_cam(net.mixed_7c(f5d))[0].numpy()
        print(f"{name:7s} rows {r}-{r + h} cols {c}-{c + w} of {size}: branch2 peak {peak(level2)} of {level2.shape}, "
              f"branch1 {peak(level1)}, gap {peak(gap)} of {gap.shape}")


if __name__ == "__main__":
    main()
