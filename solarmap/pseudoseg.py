"""The pseudo-ground-truth route: CAM + class-agnostic saliency -> pseudo masks -> a small segmentation head.

Image-level labels only, as everywhere in solarmap:

1. *Class attention*: the branch CAM of a positive window (aligned, normalised by the model's scale).
2. *Class-agnostic saliency* by iterative erasing: the channel norm of the Mixed_5d features says
   where the network sees "something"; the most salient region is erased (filled with the window's
   mean colour) and the saliency recomputed, a few rounds; the pixel-wise maximum over the rounds
   also covers the less salient objects the first round was blind to.
3. *Pseudo masks* from two thresholds: panel where the fused map (CAM x saliency) is high;
   background where either the fused map or the saliency is low; everything else is ignored.
4. A small *segmentation head* (RGB + early stem features, at stride 1; not the CAM, or it would only
   learn to copy it) learns those masks from appearance; its output, gated to where the class
   attention is not nil and optionally over scales 0.5 / 0.75 / 1.0 fused by maximum, is the map.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from solarmap.model import SolarNet

IGNORE = 255


class SegHead(nn.Module):
    """Per-pixel panel logit from RGB and the stem's Conv2d_2b features (64 channels, stride 2)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3 + 64, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, pixels: torch.Tensor, stem: torch.Tensor) -> torch.Tensor:
        size = pixels.shape[-2:]
        stem = F.interpolate(stem, size=size, mode="bilinear", align_corners=False)
        return self.net(torch.cat([pixels, stem], dim=1))[:, 0]


def stem_features(model: SolarNet, pixels: torch.Tensor) -> torch.Tensor:
    b = model.backbone
    return b.Conv2d_2b_3x3(b.Conv2d_2a_3x3(b.Conv2d_1a_3x3(model.normalize(pixels))))


def class_attention(model: SolarNet, pixels: torch.Tensor) -> torch.Tensor:
    """Branch CAM at pixel resolution, aligned and on the model's scale, clipped to [0, 1]."""
    from solarmap.cam import CamMethod, align_to_window, layer_geometry

    shift = tuple(model.config.cam_shifts.get("branch", (0.0, 0.0)))
    with torch.no_grad():
        raw = model.branch_cam(model.mixed_5d(pixels))
        cam = align_to_window(raw, tuple(pixels.shape[-2:]), layer_geometry(CamMethod.BRANCH), shift)
    return (cam / model.config.cam_scale).clamp(0, 1)


def erasing_saliency(model: SolarNet, pixels: torch.Tensor, *, rounds: int = 3, erase_above: float = 0.5) -> torch.Tensor:
    """Class-agnostic saliency in [0, 1] (batch, H, W): max over rounds of erasing the most salient part."""
    from solarmap.cam import CamMethod, align_to_window, layer_geometry

    geometry = layer_geometry(CamMethod.BRANCH)  # Mixed_5d cells
    x = pixels.clone()
    size = tuple(pixels.shape[-2:])
    fill = pixels.mean(dim=(2, 3), keepdim=True)
    combined = torch.zeros(pixels.shape[0], *size)
    with torch.no_grad():
        for _ in range(rounds):
            norm = model.mixed_5d(x).norm(dim=1)
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


def segment(model: SolarNet, pixels: torch.Tensor, *, scales: Sequence[float] = (1.0,),
            attention_floor: float = 0.1) -> torch.Tensor:
    """Panel probability per pixel (batch, H, W) from the trained head, several scales fused by max,
    kept where the class attention reaches ``attention_floor``."""
    if model.seg_head is None:
        from solarmap.errors import ModelError

        raise ModelError("this model has no pseudo-seg head (train one: solarmap train --stage pseudo-seg)")
    size = tuple(pixels.shape[-2:])
    out = None
    with torch.no_grad():
        for scale in scales:
            x = pixels if scale == 1.0 else F.interpolate(pixels, scale_factor=scale, mode="bilinear",
                                                          align_corners=False)
            if min(x.shape[-2:]) < 75:
                continue  # too small for the stem
            prob = torch.sigmoid(model.seg_head(x, stem_features(model, x)))
            if scale != 1.0:
                prob = F.interpolate(prob[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            out = prob if out is None else torch.maximum(out, prob)
        if out is None:
            raise ValueError(f"windows of {size} px are too small for every scale in {tuple(scales)}")
        return out * (class_attention(model, pixels) >= attention_floor)


def feedback_attention(model: SolarNet, pixels: torch.Tensor) -> torch.Tensor:
    """Feedback saliency (sharper than the branch CAM) as class attention in [0, 1]: each window's
    map over its own peak, kept where the branch CAM agrees there is a panel nearby."""
    from solarmap.cam import feedback_saliency

    sal = feedback_saliency(model, pixels)
    sal = sal / sal.flatten(1).max(dim=1).values.clamp(min=1e-12)[:, None, None]
    return sal * (class_attention(model, pixels) >= 0.1)


def background_labels(windows: torch.Tensor, context_px: int) -> torch.Tensor:
    """Labels for windows whose middle tile holds no panel: that tile is certain background (0);
    the context ring around it may hold panels of the neighbouring tiles, so it is ignored."""
    labels = torch.full((len(windows), *windows.shape[-2:]), IGNORE, dtype=torch.uint8)
    h, w = windows.shape[-2:]
    labels[:, context_px: h - context_px, context_px: w - context_px] = 0
    return labels


def train_pseudo_seg(model: SolarNet, windows: torch.Tensor, *, negatives: torch.Tensor | None = None,
                     masks: torch.Tensor | None = None,
                     context_px: int = 0, attention: str = "branch", background_in_positives: bool = True,
                     epochs: int = 6, batch_size: int = 16,
                     lr: float = 2e-3, seed: int = 0, progress: Callable[[str], None] | None = None) -> dict:
    """Fit ``model.seg_head`` on pseudo masks of positive windows (everything else frozen).

    ``negatives``: windows whose middle tile the image-level labels call panel-free; they teach the
    head what panels are *not* (dark roofs, cars, pools), which pseudo masks of positive windows alone
    cannot: there the roof around an array is only "unsure". ``attention``: "branch" (the CAM) or
    "feedback" (feedback saliency, sharper, ~10x slower to compute) as the class attention of the
    pseudo masks. ``masks``: pseudo masks of ``windows`` made by the caller (uint8 0 / 1 /
    ``IGNORE``, e.g. colour-refined CAM masks) instead of CAM × saliency.
    """
    if attention not in ("branch", "feedback"):
        raise ValueError(f"attention must be 'branch' or 'feedback', not {attention!r}")
    torch.manual_seed(seed)
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    model.seg_head = SegHead()
    started = time.perf_counter()
    attend = class_attention if attention == "branch" else feedback_attention
    if masks is not None:
        labels = [masks.to(torch.uint8)]
    else:
        labels = []
        for i in range(0, len(windows), batch_size):
            x = windows[i: i + batch_size]
            batch_masks = pseudo_masks(attend(model, x), erasing_saliency(model, x))
            if not background_in_positives:
                batch_masks[batch_masks == 0] = IGNORE  # background is learnt from the negative windows only
            labels.append(batch_masks)
            if progress and attention == "feedback":
                progress(f"pseudo masks {min(i + batch_size, len(windows))}/{len(windows)}")
    if negatives is not None and len(negatives):
        windows = torch.cat([windows, negatives])
        labels.append(background_labels(negatives, context_px))
    labelled = torch.cat(labels)
    order = torch.randperm(len(windows))  # mix positive and negative windows in every batch
    windows, labelled = windows[order], labelled[order]
    labels = list(labelled.split(batch_size))
    inputs = []
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            inputs.append(stem_features(model, windows[i: i + batch_size]))
    fraction = {"panel": float((labelled == 1).float().mean()), "background": float((labelled == 0).float().mean())}
    positive_weight = torch.tensor(fraction["background"] / max(fraction["panel"], 1e-6)).clamp(1, 20)
    optimiser = torch.optim.AdamW(model.seg_head.parameters(), lr=lr, weight_decay=1e-4)
    history = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for batch, x_start in enumerate(range(0, len(windows), batch_size)):
            x = windows[x_start: x_start + batch_size]
            stem, y = inputs[batch], labels[batch]
            k = (epoch + batch) % 4  # rot90 augmentation: the head must not learn a direction
            x, stem, y = (torch.rot90(t, k, dims=(-2, -1)) for t in (x, stem, y))
            logits = model.seg_head(x, stem)
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
    return {"epochs": epochs, "loss": history, "pseudo_label_fractions": fraction, "attention": attention,
            "seconds": time.perf_counter() - started, "windows": len(windows),
            "negative_windows": 0 if negatives is None else len(negatives)}
