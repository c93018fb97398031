"""Class activation maps: raw float maps out, normalisation as a separate, named step.

Methods (``--cam-method``), all returning raw maps (batch, h, w) for the positive class:

* ``branch``  the greedy layerwise branch's CAM at Mixed_5d resolution (35 x 35 for 299 px tiles);
* ``gap``     Zhou et al.'s CAM of the main classifier at Mixed_7c (8 x 8 for 299 px tiles);
* ``gradcam`` Grad-CAM: ReLU of the activations at a chosen layer weighted by the spatially averaged
  gradient of the positive logit (default layer Mixed_6e, 17 x 17).

Normalisation basis (:func:`normalise`): ``branch`` and ``gap`` maps are divided by a fixed scale
stored in the checkpoint (the median CAM peak of positive validation tiles), so one threshold means
the same thing on every tile and a tile with weak evidence stays weak. Grad-CAM has no calibrated
scale: its maps are divided by their own tile maximum (the seed paper's "fraction of the max" rule).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from solarmap.errors import ModelError, OptionError
from solarmap.model import SolarNet


MIN_TILE_PX = 75  # Inception-v3's smallest input (its stem and reductions need it)


def check_tile_size(tile_size_px: int) -> None:
    if tile_size_px < MIN_TILE_PX:
        raise OptionError(f"tile size {tile_size_px} px is too small for Inception-v3 (needs at least {MIN_TILE_PX} px)")


class CamMethod(str, Enum):
    BRANCH = "branch"
    GAP = "gap"
    GRADCAM = "gradcam"


def grad_cam(model: SolarNet, pixels: torch.Tensor, *, layer: str = "Mixed_6e") -> torch.Tensor:
    """Raw Grad-CAM maps (batch, h, w) of the positive class at backbone layer ``layer``."""
    target = getattr(model.backbone, layer, None)
    if target is None:
        raise OptionError(f"no backbone layer named {layer!r} for Grad-CAM")
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["activation"] = output

    with _hook(target, keep), torch.enable_grad():
        x = pixels.detach().requires_grad_(False)
        logits = model(x)
        activation = captured["activation"]
        grads = torch.autograd.grad(logits[:, 1].sum(), activation)[0]
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation).sum(dim=1)).detach()


@contextlib.contextmanager
def _hook(module: torch.nn.Module, fn):
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def normalise(raw: torch.Tensor, method: CamMethod, model: SolarNet) -> torch.Tensor:
    """Raw maps -> the basis the CAM threshold is expressed in (see module docstring)."""
    if method is CamMethod.BRANCH:
        return raw / model.config.cam_scale
    if method is CamMethod.GAP:
        return raw / model.config.gap_cam_scale
    peak = raw.flatten(1).max(dim=1).values.clamp(min=1e-12)
    return raw / peak[:, None, None]


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> first GPU if present else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {name} asked for, but no CUDA GPU is available (use --device auto or cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise OptionError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None


@dataclass
class ModelScorer:
    """The pipeline's scorer: tile probabilities from the classifier, CAMs for positive tiles only.

    On a GPU it runs in bf16 autocast with channels-last tensors; on the CPU in fp32, channels-last.
    Maps come back normalised (see :func:`normalise`) so the pipeline's mask threshold applies.
    """

    model: SolarNet
    method: CamMethod = CamMethod.BRANCH
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    decision_threshold: float | None = None
    gradcam_layer: str = "Mixed_6e"
    name: str = "solarmap"

    def __post_init__(self) -> None:
        self.method = CamMethod(self.method)
        if self.method is CamMethod.BRANCH and self.model.config.branch_levels < 1:
            raise ModelError("this model has no trained CAM branch; use --cam-method gap or gradcam")
        self.model = self.model.to(self.device, memory_format=torch.channels_last).eval()
        if self.decision_threshold is None:
            self.decision_threshold = self.model.config.decision_threshold

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(pixels).to(self.device).contiguous(memory_format=torch.channels_last)
        model = self.model
        with torch.inference_mode(), self._autocast():
            f5d = model.mixed_5d(x)
            f7c = model.mixed_7c(f5d)
            probs = torch.softmax(model.classify_7c(f7c).float(), dim=1)[:, 1]
        positive = (probs >= self.decision_threshold).nonzero().flatten()
        if len(positive) == 0:
            return probs.cpu().numpy(), np.zeros((len(pixels), *f5d.shape[2:]), dtype=np.float32)
        if self.method is CamMethod.BRANCH:
            with torch.inference_mode(), self._autocast():
                raw = model.branch_cam(f5d[positive])
        elif self.method is CamMethod.GAP:
            with torch.inference_mode(), self._autocast():
                raw = model.gap_cam(f7c[positive])
        else:
            with self._autocast():
                raw = grad_cam(model, x[positive].clone(), layer=self.gradcam_layer)
        maps = torch.zeros((len(pixels), *raw.shape[1:]), dtype=torch.float32, device=self.device)
        maps[positive] = normalise(raw.float(), self.method, model)
        return probs.cpu().numpy(), maps.cpu().numpy()
