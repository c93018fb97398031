"""Training the segmentation head (``--cam-method pseudo-seg``) from image-level labels only.

1. *Class attention*: the branch CAM of a positive window (:func:`solarmap.model.seg.class_attention`).
2. *Class-agnostic saliency* by iterative erasing: the channel norm of the branch features says
   where the network sees "something"; the most salient region is erased (filled with the window's
   mean colour) and the saliency recomputed, a few rounds; the pixel-wise maximum over the rounds
   also covers the less salient objects the first round was blind to.
3. *Pseudo masks* from two thresholds: panel where the fused map (CAM x saliency) is high;
   background where either the fused map or the saliency is low; everything else is ignored.
4. The head (:class:`solarmap.model.network.SegHead`: RGB + stem features, optionally the branch's
   maps and the backbone's stride-16 stage) learns those masks.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F

from solarmap.model.align import align_to_window
from solarmap.model.network import SolarNet
from solarmap.model.seg import class_attention

__all__ = ["IGNORE", "erasing_saliency", "pseudo_masks", "train_pseudo_seg"]

IGNORE = 255


def erasing_saliency(model: SolarNet, pixels: torch.Tensor, *, rounds: int = 3, erase_above: float = 0.5) -> torch.Tensor:
    """Class-agnostic saliency in [0, 1] (batch, H, W): max over rounds of erasing the most salient part."""
    geometry = model.backbone.layer_geometry(model.backbone.branch_layer)
    x = pixels.clone()
    size = tuple(pixels.shape[-2:])
    fill = pixels.mean(dim=(2, 3), keepdim=True)
    combined = torch.zeros(pixels.shape[0], *size)
    with torch.no_grad():
        for _ in range(rounds):
            norm = model.branch_features(x).norm(dim=1)
            sal = align_to_window(norm, size, geometry)
            low = sal.flatten(1).min(dim=1).values[:, None, None]
            high = sal.flatten(1).max(dim=1).values[:, None, None]
            sal = (sal - low) / (high - low).clamp(min=1e-6)
            combined = torch.maximum(combined, sal)
            x = torch.where((sal >= erase_above)[:, None], fill, x)
    return combined


def pseudo_masks(cam: torch.Tensor, saliency: torch.Tensor, *, high: float = 0.5, low: float = 0.2,
                 saliency_low: float = 0.25) -> torch.Tensor:
    """1 = panel, 0 = background, IGNORE = unsure (uint8, same shape as the maps)."""
    fused = cam * saliency
    peak = fused.flatten(1).max(dim=1).values[:, None, None]
    labels = torch.full(cam.shape, IGNORE, dtype=torch.uint8)
    labels[fused >= high * peak.clamp(min=1e-6)] = 1
    labels[(fused < low * peak) | (saliency < saliency_low)] = 0
    labels[cam <= 0.05] = 0
    return labels


def train_pseudo_seg(model: SolarNet, windows: torch.Tensor, *, masks: torch.Tensor | None = None,
                     epochs: int = 6, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Fit ``model.seg_head`` on pseudo masks of positive windows (everything else frozen).

    ``masks``: pseudo masks of ``windows`` made by the caller (uint8 0 / 1 / ``IGNORE``, e.g.
    colour-refined CAM masks) instead of CAM x saliency.
    """
    torch.manual_seed(seed)
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    model.seg_head = model.new_seg_head()
    started = time.perf_counter()
    if masks is not None:
        labelled = masks.to(torch.uint8)
    else:
        labelled = torch.cat([pseudo_masks(class_attention(model, x), erasing_saliency(model, x))
                              for x in windows.split(batch_size)])
    order = torch.randperm(len(windows))  # towns arrive in order: mix them in every batch
    windows, labelled = windows[order], labelled[order]
    labels = list(labelled.split(batch_size))
    fraction = {"panel": float((labelled == 1).float().mean()), "background": float((labelled == 0).float().mean())}
    positive_weight = torch.tensor(fraction["background"] / max(fraction["panel"], 1e-6)).clamp(1, 20)
    optimiser = torch.optim.AdamW(model.seg_head.parameters(), lr=lr, weight_decay=1e-4)
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for batch, x in enumerate(windows.split(batch_size)):
            y = labels[batch]
            k = (epoch + batch) % 4  # rot90 augmentation: the head must not learn a direction
            x, y = torch.rot90(x, k, dims=(-2, -1)), torch.rot90(y, k, dims=(-2, -1))
            logits = model.seg_logits(x)  # the frozen features of the turned window, as detection sees one
            known = y != IGNORE
            loss = F.binary_cross_entropy_with_logits(logits[known], y[known].float(), pos_weight=positive_weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, count = total + loss.item() * len(x), count + len(x)
        history.append(total / max(count, 1))
        if progress:
            progress(f"pseudo-seg epoch {epoch + 1}/{epochs}: loss {history[-1]:.4f}")
    model.seg_head.eval()
    for p in frozen:
        p.requires_grad_(True)
    model.config = replace(model.config, pseudo_seg=True)
    return {"epochs": epochs, "loss": history, "pseudo_label_fractions": fraction,
            "seconds": time.perf_counter() - started, "windows": len(windows)}
