"""Class activation maps: one small object per ``--cam-method`` in one table (:data:`METHODS`); raw
float maps out, normalisation a separate, named step.

Methods, all returning raw maps (batch, h, w) for the positive class:

* ``branch``   the greedy layerwise branch's CAM where it attaches (Inception-v3: Mixed_5d, 35 x 35
  for 299 px tiles);
* ``gap``      Zhou et al.'s CAM of the main classifier on its last feature maps (Mixed_7c, 8 x 8);
* ``gradcam``  Grad-CAM: ReLU of the activations at a chosen layer weighted by the spatially averaged
  gradient of the positive logit (default Mixed_6e, 17 x 17);
* ``feedback`` feedback-network localization (Cao et al.): a gate on every hidden ReLU output of the
  backbone's feedback layers, all open at first, is optimised for a fixed number of steps to keep the
  panel score while closing as many gates as possible (L1); the map is the image-gradient saliency
  of the panel score through the optimised gates, at pixel resolution;
* ``pseudo-seg`` the segmentation head's panel probability (:mod:`solarmap.model.seg`);
* ``outline``  the outline network's panel probability (:mod:`solarmap.model.outline`: a U-Net of
  its own, trained on real pixel masks).

A new method is a subclass of :class:`CamMethodImpl` that overrides :meth:`~CamMethodImpl.raw_maps`
(and where it differs, the geometry and the normalisation), added to :data:`METHODS`.

Alignment (:func:`align_to_window`): a map cell is not a uniform slice of the tile. Inception's stem
uses unpadded convolutions, so cell ``k`` of Mixed_5d is centred on pixel ``8k + 13``; maps are
interpolated from those centres to every pixel of the window. On top of that a weakly supervised
CAM may respond *beside* the object (nothing in an image-level loss pins the response to the object
when the receptive field exceeds the tile); that offset is measured at training time without pixel
truth (:func:`solarmap.training.calibrate.estimate_cam_shift`), stored in the checkpoint
(``cam_shifts``) and undone here. Tiles are read with context around them (``context_px``) so
responses displaced past the tile edge are still seen.

Normalisation (:meth:`CamMethodImpl.normalise`): ``branch`` and ``gap`` maps are divided by a fixed
scale stored in the checkpoint (the median CAM peak of positive validation tiles), so one threshold
means the same thing on every tile and a tile with weak evidence stays weak. Grad-CAM and feedback
have no calibrated scale: their maps are divided by their own tile maximum (the seed paper's
"fraction of the max" rule). The pseudo-seg head's output is already a probability.
"""

from __future__ import annotations

import contextlib
from enum import Enum
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from solarmap.errors import ModelError, OptionError
from solarmap.model.network import ModelConfig, SolarNet
from solarmap.model.outline import PANEL
from solarmap.model.seg import segment

if TYPE_CHECKING:
    from solarmap.model.scorer import ModelScorer

__all__ = ["CamMethod", "CamMethodImpl", "METHODS", "feedback_saliency", "grad_cam"]


class CamMethod(str, Enum):
    BRANCH = "branch"
    GAP = "gap"
    GRADCAM = "gradcam"
    FEEDBACK = "feedback"
    PSEUDO_SEG = "pseudo-seg"
    OUTLINE = "outline"


# ---------------------------------------------------------------------------------------------
# Map computations


def feedback_saliency(model: SolarNet, pixels: torch.Tensor, *, steps: int = 10, lr: float = 0.1,
                      sparsity: float = 0.05, smooth_px: float = 4.0) -> torch.Tensor:
    """Feedback localization maps (batch, H, W) at pixel resolution, raw scale.

    Gates in [0, 1] on the hidden ReLU outputs (the outputs of the backbone's ``feedback_layers``)
    start open; ``steps`` of projected gradient ascent raise the positive logit while closing gates:
    each step moves a gate by ``lr`` x (its logit gradient relative to the largest in its layer,
    minus ``sparsity``), so gates that do not help the panel score close and those that do stay
    open whatever the logit's scale; then the saliency is the channel-wise maximum of
    |d logit / d pixel| through the optimised gates, smoothed by a Gaussian of ``smooth_px``
    (gradients are speckled at pixel level).
    """
    gates: dict[str, torch.Tensor] = {}

    def gate(name):
        def apply(_module, _inputs, output):
            if name not in gates:
                gates[name] = torch.ones_like(output, requires_grad=True)
            return output * gates[name]
        return apply

    backbone = model.backbone
    handles = [backbone.layer(name).register_forward_hook(gate(name)) for name in backbone.feedback_layers]
    try:
        with torch.enable_grad():
            x = pixels.detach().float()
            model(x)  # creates the gates at this input size
            params = list(gates.values())
            for _ in range(steps):
                grads = torch.autograd.grad(model(x)[:, 1].sum(), params)
                with torch.no_grad():
                    for g, d in zip(params, grads):
                        g += lr * (d / (d.abs().amax(dim=(1, 2, 3), keepdim=True) + 1e-12) - sparsity)
                        g.clamp_(0.0, 1.0)
            x = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
    finally:
        for handle in handles:
            handle.remove()
    saliency = grad.abs().amax(dim=1)
    if smooth_px > 0:
        saliency = _gaussian_blur(saliency, smooth_px)
    return saliency.detach()


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def grad_cam(model: SolarNet, pixels: torch.Tensor, *, layer: str) -> torch.Tensor:
    """Raw Grad-CAM maps (batch, h, w) of the positive class at backbone layer ``layer``."""
    target = model.backbone.layer(layer)
    if target is None:
        raise OptionError(f"no backbone layer named {layer!r} for Grad-CAM")
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["activation"] = output

    handle = target.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = pixels.detach().requires_grad_(True)  # activations need a graph even when the weights are frozen
            logits = model(x)
            activation = captured["activation"]
            grads = torch.autograd.grad(logits[:, 1].sum(), activation)[0]
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1)).detach()


# ---------------------------------------------------------------------------------------------
# The methods


class CamMethodImpl:
    """How one ``--cam-method`` makes, places and scales its maps. Subclasses override small hooks."""

    method: CamMethod
    threshold_basis = "map / tile max"  # what the mask threshold is compared with (run metadata)
    needs_branch = False  # needs a trained CAM branch level
    refines_by_default = False  # colour refinement on unless --no-refine (its rule is calibrated on this method)

    def check(self, model: SolarNet) -> None:
        """Raise ModelError if ``model`` cannot make this method's maps."""
        if self.needs_branch and model.config.branch_levels < 1:
            raise ModelError("this model has no trained CAM branch; use --cam-method gap, gradcam or feedback")

    def geometry(self, scorer: "ModelScorer") -> tuple[int, int] | None:
        """(stride, first cell centre) of the maps on the input; None where unknown (maps are stretched)."""
        return (1, 0)  # one value per pixel

    def raw_maps(self, scorer: "ModelScorer", x: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Raw maps (batch, h, w) of windows ``x`` (``features``: their branch features, if known)."""
        raise NotImplementedError

    def normalise(self, raw: torch.Tensor, config: ModelConfig, scale: float | None = None) -> torch.Tensor:
        """Raw maps -> the basis the mask threshold is expressed in (default: each map's own peak)."""
        peak = raw.flatten(1).max(dim=1).values.clamp(min=1e-12)
        return raw / peak[:, None, None]

    def mask_rule(self, config: ModelConfig) -> tuple[float, float | None]:
        """The checkpoint's calibrated (mask threshold, peak fraction) for this method."""
        return tuple(config.mask_rules.get(self.method.value, (config.cam_threshold, config.cam_peak_fraction)))


class BranchCam(CamMethodImpl):
    method = CamMethod.BRANCH
    threshold_basis = "CAM / cam_scale"
    needs_branch = True
    refines_by_default = True

    def geometry(self, scorer):
        backbone = scorer.model.backbone
        return backbone.layer_geometry(backbone.branch_layer)

    def raw_maps(self, scorer, x, features):
        with torch.inference_mode(), scorer.autocast():
            features = scorer.model.branch_features(x) if features is None else features
            return scorer.model.branch_cam(features, levels=scorer.branch_levels).float()

    def normalise(self, raw, config, scale=None):
        return raw / (scale or config.cam_scale)

    def mask_rule(self, config):
        return config.cam_threshold, config.cam_peak_fraction


class GapCam(CamMethodImpl):
    method = CamMethod.GAP
    threshold_basis = "CAM / gap_cam_scale"

    def geometry(self, scorer):
        backbone = scorer.model.backbone
        return backbone.layer_geometry(backbone.top_layer)

    def raw_maps(self, scorer, x, features):
        with torch.inference_mode(), scorer.autocast():
            features = scorer.model.branch_features(x) if features is None else features
            return scorer.model.gap_cam(scorer.model.top_features(features)).float()

    def normalise(self, raw, config, scale=None):
        return raw / (scale or config.gap_cam_scale)


class GradCam(CamMethodImpl):
    method = CamMethod.GRADCAM
    threshold_basis = "gradcam / tile max"

    def geometry(self, scorer):
        return scorer.model.backbone.layer_geometry(scorer.gradcam_layer)

    def raw_maps(self, scorer, x, features):
        with scorer.autocast():
            return grad_cam(scorer.model, x.clone(), layer=scorer.gradcam_layer).float()


class FeedbackCam(CamMethodImpl):
    method = CamMethod.FEEDBACK
    threshold_basis = "feedback / tile max"

    def raw_maps(self, scorer, x, features):
        return feedback_saliency(scorer.model, x.clone(), steps=scorer.feedback_steps).float()


class PseudoSegMaps(CamMethodImpl):
    method = CamMethod.PSEUDO_SEG
    threshold_basis = "probability"
    needs_branch = True  # its output is gated by the branch CAM

    def check(self, model):
        super().check(model)
        if model.seg_head is None:
            raise ModelError("this model has no pseudo-seg head; train one with solarmap train --stage pseudo-seg")

    def raw_maps(self, scorer, x, features):
        return segment(scorer.model, x.float(), scales=scorer.seg_scales).float()

    def normalise(self, raw, config, scale=None):
        return raw  # already a probability


class OutlineMaps(CamMethodImpl):
    method = CamMethod.OUTLINE
    threshold_basis = "probability"

    def check(self, model):
        if model.outline is None:
            raise ModelError("this model has no outline network (scripts/train_outline.py trains one)")

    def raw_maps(self, scorer, x, features):
        with torch.inference_mode(), scorer.autocast():
            return scorer.model.outline.probabilities(x.float())[:, PANEL].float()

    def normalise(self, raw, config, scale=None):
        return raw  # already a probability

    def mask_rule(self, config):
        return tuple(config.mask_rules.get(self.method.value, (0.5, None)))


METHODS: dict[CamMethod, CamMethodImpl] = {impl.method: impl for impl in (
    BranchCam(), GapCam(), GradCam(), FeedbackCam(), PseudoSegMaps(), OutlineMaps())}


def autocast_for(device: torch.device):
    """bf16 autocast on a GPU; nothing on the CPU (fp32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
