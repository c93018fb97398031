"""The segmentation head (``--cam-method pseudo-seg``): a per-pixel panel probability from RGB and
the backbone's early features (and, in newer models, the CAM branch's maps and the backbone's
stride-16 stage), gated to where the branch CAM sees a panel: pixel by pixel in older models, blob
by blob in newer ones (:func:`gate_blobs`), or not at all where the calibrated floor is 0 (the
bundled model since version 12: the gate dropped arrays on coarser imagery).

It is trained on real pixel masks (the bundled model: PV01's) or on pseudo masks made from
image-level labels (:mod:`solarmap.training.pseudoseg`); inference needs only this module. It never
sees the CAM itself: trained on pseudo masks made from the CAM, it would only learn to copy it. The
branch's maps (128 channels, of which the CAM is one weighted sum) are features, not that answer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from solarmap.errors import ModelError
from solarmap.model.align import align_to_window
from solarmap.model.network import SolarNet

__all__ = ["BLOB_LEVELS", "class_attention", "gate_blobs", "segment"]

# the thresholds the head's mask rule is calibrated on, where gate_blobs is exact during calibration
BLOB_LEVELS = tuple(np.round(np.arange(0.3, 0.96, 0.05), 2))
_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = True  # label each window of a (batch, H, W) stack on its own, 8-connected


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
            attention_floor: float | None = None) -> torch.Tensor:
    """Panel probability per pixel (batch, H, W) from the trained head, several scales fused by max,
    gated by the class attention: kept where it reaches ``attention_floor`` (None: the checkpoint's
    calibrated ``seg_attention_floor``; 0: no gate), pixel by pixel or, where the checkpoint names
    ``seg_blob_levels``, blob by blob at those levels (:func:`gate_blobs`; a calibrated model names
    its mask threshold, and calibration every threshold it tries).

    The gate keeps the head from drawing where the classifier's CAM sees nothing: on PV01
    validation, without it, false outlines away from any array rose from 13 to 22 m² per image.
    Pixel by pixel it also cut the inside of large arrays, whose CAM peaks on a part of them
    (area -20 %); blob by blob keeps them whole."""
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
        floor = model.config.seg_attention_floor if attention_floor is None else attention_floor
        if floor <= 0:
            return out
        support = class_attention(model, pixels, features) >= floor
        if not model.config.seg_blob_levels:
            return out * support
        gated = gate_blobs(out.float().cpu().numpy(), support.cpu().numpy(), model.config.seg_blob_levels)
        return torch.from_numpy(gated).to(out.device)


def gate_blobs(prob: np.ndarray, support: np.ndarray, levels: Sequence[float] = BLOB_LEVELS) -> np.ndarray:
    """``prob`` (batch, H, W) in [0, 1] gated blob by blob: thresholded at any of ``levels``, the
    result holds exactly the blobs of ``prob`` (8-connected, per window) that touch ``support``
    somewhere, each whole; a threshold between two levels gets an answer between theirs, one above
    the highest level keeps that level's blobs. Below the lowest level, pixels are gated one by one.
    Each level costs one labelling pass: detection names one (its mask threshold), calibration all
    it sweeps.

    Why blobs: a head's false outlines on roofs or pavement lie where the CAM sees nothing, while
    a real array's CAM often covers only part of it. Where a pixel's own blob is supported, it
    keeps its probability; where not, it gets the highest level at which it still belongs to a
    supported blob, so every threshold on the grid sees the right blobs."""
    if not len(levels):
        return np.where(support, prob, 0).astype(prob.dtype)
    grid = np.asarray(levels, prob.dtype)  # compared in prob's own precision, here and below
    level_of = np.zeros(prob.shape, prob.dtype)  # the highest level whose blob of the pixel is supported
    for level in grid:
        above = prob >= level
        labels, count = ndimage.label(above, structure=_IN_PLANE)
        if not count:
            break
        supported = np.bincount(labels[support], minlength=count + 1) > 0
        supported[0] = False
        level_of[supported[labels]] = level
    own = grid[np.clip(np.searchsorted(grid, prob, side="right") - 1, 0, None)]  # the level a pixel sits at
    gated = np.where(level_of >= own, prob, level_of)  # its own blob supported: kept; else the last level it was
    return np.where(prob >= grid[0], gated, np.where(support, prob, 0)).astype(prob.dtype)
