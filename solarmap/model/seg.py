"""The segmentation head (``--cam-method pseudo-seg``): a per-pixel panel probability from RGB and
the backbone's early features (and, in newer models, the CAM branch's maps), gated to where the
branch CAM sees a panel.

It is trained on real pixel masks (the bundled model: PV01's) or on pseudo masks made from
image-level labels (:mod:`solarmap.training.pseudoseg`); inference needs only this module. It never
sees the CAM itself: trained on pseudo masks made from the CAM, it would only learn to copy it. The
branch's maps (128 channels, of which the CAM is one weighted sum) are features, not that answer.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from solarmap.errors import ModelError
from solarmap.model.align import align_to_window
from solarmap.model.network import SolarNet

__all__ = ["class_attention", "segment"]


def class_attention(model: SolarNet, pixels: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
    """Branch CAM at pixel resolution, aligned and on the model's scale, clipped to [0, 1]
    (``features``: the pixels' branch features, where the caller has them)."""
    backbone = model.backbone
    shift = tuple(model.config.cam_shifts.get("branch", (0.0, 0.0)))
    with torch.no_grad():
        raw = model.branch_cam(model.branch_features(pixels) if features is None else features)
        cam = align_to_window(raw, tuple(pixels.shape[-2:]), backbone.layer_geometry(backbone.branch_layer), shift)
    return (cam / model.config.cam_scale).clamp(0, 1)


def segment(model: SolarNet, pixels: torch.Tensor, *, scales: Sequence[float] = (1.0,),
            attention_floor: float = 0.1) -> torch.Tensor:
    """Panel probability per pixel (batch, H, W) from the trained head, several scales fused by max,
    kept where the class attention reaches ``attention_floor``."""
    if model.seg_head is None:
        raise ModelError("this model has no pseudo-seg head (train one: solarmap train --stage pseudo-seg)")
    size = tuple(pixels.shape[-2:])
    out = None
    with torch.no_grad():
        features = model.branch_features(pixels)  # the attention gate's, and the head's at scale 1
        for scale in scales:
            x = pixels if scale == 1.0 else F.interpolate(pixels, scale_factor=scale, mode="bilinear",
                                                          align_corners=False)
            if min(x.shape[-2:]) < model.min_input_px:
                continue  # too small for the stem
            prob = torch.sigmoid(model.seg_logits(x, features if scale == 1.0 else None))
            if scale != 1.0:
                prob = F.interpolate(prob[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            out = prob if out is None else torch.maximum(out, prob)
        if out is None:
            raise ValueError(f"windows of {size} px are too small for every scale in {tuple(scales)}")
        return out * (class_attention(model, pixels, features) >= attention_floor)
