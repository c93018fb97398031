"""Where the cells of a coarse map sit on the input: maps -> pixel maps of the window.

A map cell is not a uniform slice of the tile: with an unpadded stem, cell ``k`` of a stride-8 map
may be centred on pixel ``8k + 13`` rather than ``8k + 3.5``. Each backbone states (stride, first
centre) per layer; maps are interpolated from those centres to every pixel, then moved by the
response offset measured for the method (``cam_shifts``).
"""

from __future__ import annotations

import torch

__all__ = ["align_to_window"]


def _interpolation_matrix(out_px: int, cells: int, stride: float, first_centre: float, shift: float) -> torch.Tensor:
    """(out_px, cells) linear-interpolation weights from cell centres to pixels, clamped at the ends."""
    u = ((torch.arange(out_px, dtype=torch.float64) - shift - first_centre) / stride).clamp(0, cells - 1)
    lower = u.floor().long()
    upper = (lower + 1).clamp(max=cells - 1)
    weight = (u - lower).float()
    matrix = torch.zeros(out_px, cells)
    matrix[torch.arange(out_px), lower] += 1 - weight
    matrix[torch.arange(out_px), upper] += weight
    return matrix


def align_to_window(maps: torch.Tensor, window_px: tuple[int, int], geometry: tuple[int, int] | None,
                    shift_px: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Coarse maps (batch, h, w) -> pixel maps (batch, *window_px), cell centres where the network
    puts them (``geometry`` = (stride, first centre); None: cells as equal areas of the window),
    moved by ``shift_px`` (rows, cols)."""
    h, w = maps.shape[-2:]
    if geometry is None:
        geometry_r = (window_px[0] / h, window_px[0] / h / 2 - 0.5)
        geometry_c = (window_px[1] / w, window_px[1] / w / 2 - 0.5)
    else:
        geometry_r = geometry_c = geometry
    rows = _interpolation_matrix(window_px[0], h, *geometry_r, shift_px[0]).to(maps.device)
    cols = _interpolation_matrix(window_px[1], w, *geometry_c, shift_px[1]).to(maps.device)
    return rows @ maps.float() @ cols.T
