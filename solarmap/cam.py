"""Class activation maps: raw float maps out, normalisation as a separate, named step.

Methods (``--cam-method``), all returning raw maps (batch, h, w) for the positive class:

* ``branch``  the greedy layerwise branch's CAM at Mixed_5d resolution (35 x 35 for 299 px tiles);
* ``gap``     Zhou et al.'s CAM of the main classifier at Mixed_7c (8 x 8 for 299 px tiles);
* ``gradcam`` Grad-CAM: ReLU of the activations at a chosen layer weighted by the spatially averaged
  gradient of the positive logit (default layer Mixed_6e, 17 x 17).
* ``feedback`` feedback-network localization (Cao et al.): a gate on every hidden ReLU output of
  the Mixed_5*/6* blocks, all open at first, is optimised for a fixed number of steps to keep the
  panel score while closing as many gates as possible (L1); the map is the image-gradient saliency
  of the panel score through the optimised gates, at pixel resolution.

Alignment (:func:`align_to_window`): a map cell is not a uniform slice of the tile. Inception's
stem uses unpadded convolutions, so cell ``k`` of Mixed_5d is centred on pixel ``8k + 13`` (Mixed_6*:
``16k + 21``, Mixed_7*: ``32k + 37``); maps are interpolated from those centres to every pixel of the
window. On top of that a weakly supervised CAM may respond *beside* the object: nothing in an
image-level loss pins the response to the object when the receptive field (159 px at the branch)
exceeds the tile. The bundled model's branch CAM sat a steady 32 px "above" panels in its own frame
(the same offset for flipped inputs, flipped back). :func:`estimate_cam_shift` measures that offset
without any pixel truth — the CAM of a vertically flipped image, flipped back, is displaced by twice
the offset — and the checkpoint stores the correction (``cam_shifts``). Tiles are read with context
around them (``context_px``) so responses displaced past the tile edge are still seen.

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
import torch.nn.functional as F

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
    FEEDBACK = "feedback"
    PSEUDO_SEG = "pseudo-seg"


FEEDBACK_LAYERS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")


def feedback_saliency(model: SolarNet, pixels: torch.Tensor, *, steps: int = 10, lr: float = 0.1,
                      sparsity: float = 0.05, smooth_px: float = 4.0) -> torch.Tensor:
    """Feedback localization maps (batch, H, W) at pixel resolution, raw scale.

    Gates in [0, 1] on the hidden ReLU outputs (the block outputs of ``FEEDBACK_LAYERS``, which are
    concatenations of ReLU outputs) start open; ``steps`` of projected gradient ascent raise the
    positive logit while closing gates: each step moves a gate by ``lr`` x (its logit gradient relative
    to the largest in its layer, minus ``sparsity``), so gates that do not help the panel score
    close and those that do stay open whatever the logit's scale; then the saliency is the channel-wise
    maximum of |d logit / d pixel| through the optimised gates, smoothed by a Gaussian of
    ``smooth_px`` (gradients are speckled at pixel level).
    """
    backbone = model.backbone
    gates: dict[str, torch.Tensor] = {}

    def gate(name):
        def apply(_module, _inputs, output):
            if name not in gates:
                gates[name] = torch.ones_like(output, requires_grad=True)
            return output * gates[name]
        return apply

    handles = [getattr(backbone, name).register_forward_hook(gate(name)) for name in FEEDBACK_LAYERS]
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


# (stride, first cell centre) in input pixels of Inception-v3 feature maps, by layer name prefix
_LAYER_GEOMETRY = {"Mixed_5": (8, 13), "Mixed_6": (16, 21), "Mixed_7": (32, 37)}


def layer_geometry(method: CamMethod, gradcam_layer: str = "Mixed_6e") -> tuple[int, int] | None:
    """Where a method's map cells sit on the input; None where unknown (maps are then stretched)."""
    if method in (CamMethod.FEEDBACK, CamMethod.PSEUDO_SEG):
        return (1, 0)  # already one value per pixel
    layer = {CamMethod.BRANCH: "Mixed_5d", CamMethod.GAP: "Mixed_7c"}.get(method, gradcam_layer)
    return next((g for prefix, g in _LAYER_GEOMETRY.items() if layer.startswith(prefix)), None)


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
    puts them, moved by ``shift_px`` (rows, cols)."""
    h, w = maps.shape[-2:]
    if geometry is None:  # cells as equal areas of the window
        geometry_r = (window_px[0] / h, window_px[0] / h / 2 - 0.5)
        geometry_c = (window_px[1] / w, window_px[1] / w / 2 - 0.5)
    else:
        geometry_r = geometry_c = geometry
    rows = _interpolation_matrix(window_px[0], h, *geometry_r, shift_px[0]).to(maps.device)
    cols = _interpolation_matrix(window_px[1], w, *geometry_c, shift_px[1]).to(maps.device)
    return rows @ maps.float() @ cols.T


def estimate_cam_shift(raw_maps, pixels: torch.Tensor, geometry: tuple[int, int] | None, *,
                       max_shift_px: int = 96, edge_px: int = 32, batch_size: int = 32) -> tuple[float, float]:
    """The (rows, cols) correction that puts a method's CAM responses on the objects, from images
    alone (no pixel truth): with the response displaced by ``d`` in the network's own frame, the map
    of a flipped image flipped back is displaced by ``-d``, so the two maps are ``2d`` apart.

    ``raw_maps(pixels) -> (batch, h, w)``; ``pixels`` should be tiles that contain objects. Maps
    are compared without their outer ``edge_px``: responses to the window's own border stay put
    under flipping and would pull the estimate towards zero.
    """
    size = tuple(pixels.shape[-2:])
    sums = {2: None, 3: None}  # flip axis of (batch, 3, H, W) -> summed cross-power spectrum
    for i in range(0, len(pixels), batch_size):
        x = pixels[i: i + batch_size]
        plain = _peaks_only(align_to_window(raw_maps(x), size, geometry), edge_px)
        for axis in sums:
            flipped = align_to_window(raw_maps(torch.flip(x, [axis])), size, geometry)
            back = _peaks_only(torch.flip(flipped, [axis - 1]), edge_px)
            spectrum = _cross_power(plain, back, max_shift_px)
            sums[axis] = spectrum if sums[axis] is None else sums[axis] + spectrum
    inner = plain.shape[-2:]
    ones = torch.ones((1, *inner))
    overlap = torch.fft.fftshift(torch.fft.irfft2(_cross_power(ones, ones, max_shift_px), s=_padded(inner, max_shift_px)))
    enough = overlap > 0.25 * inner[0] * inner[1]  # shifts that still compare a quarter of the map
    shifts = []
    for axis, spectrum in sums.items():
        corr = torch.fft.fftshift(torch.fft.irfft2(spectrum, s=_padded(inner, max_shift_px)))
        corr = torch.where(enough, corr / overlap.clamp(min=1), torch.full_like(corr, -torch.inf))
        centre = (corr.shape[0] // 2, corr.shape[1] // 2)
        peak = divmod(int(corr.argmax()), corr.shape[1])
        displacement = peak[axis - 2] - centre[axis - 2]  # plain is displaced 2d from flipped-back
        shifts.append(-displacement / 2)
    return float(shifts[0]), float(shifts[1])


def _peaks_only(maps: torch.Tensor, edge_px: int) -> torch.Tensor:
    """Each map's inner part, above its mean: the responses, not the background level."""
    if edge_px and min(maps.shape[-2:]) > 2 * edge_px + 8:
        maps = maps[:, edge_px:-edge_px, edge_px:-edge_px]
    return torch.relu(maps - maps.mean(dim=(1, 2), keepdim=True))


def _padded(size: tuple[int, int], margin: int) -> tuple[int, int]:
    return size[0] + 2 * margin, size[1] + 2 * margin


def _cross_power(a: torch.Tensor, b: torch.Tensor, margin: int) -> torch.Tensor:
    """Sum over the batch of FFT(a) * conj(FFT(b)), zero-padded so shifts up to ``margin`` don't wrap."""
    shape = _padded(tuple(a.shape[-2:]), margin)
    fa = torch.fft.rfft2(a.double(), s=shape)
    fb = torch.fft.rfft2(b.double(), s=shape)
    return (fa * fb.conj()).sum(dim=0)


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
        x = pixels.detach().requires_grad_(True)  # activations need a graph even when the weights are frozen
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


def normalise(raw: torch.Tensor, method: CamMethod, model: SolarNet, scale: float | None = None) -> torch.Tensor:
    """Raw maps -> the basis the CAM threshold is expressed in (see module docstring); ``scale``
    overrides the checkpoint's for branch and GAP maps (e.g. a shallower branch level's own)."""
    if method is CamMethod.BRANCH:
        return raw / (scale or model.config.cam_scale)
    if method is CamMethod.GAP:
        return raw / (scale or model.config.gap_cam_scale)
    if method is CamMethod.PSEUDO_SEG:
        return raw  # already a probability
    peak = raw.flatten(1).max(dim=1).values.clamp(min=1e-12)  # Grad-CAM and feedback: per-tile maximum
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

    Input windows are tiles with ``context_px`` of surroundings on each side: the classifier sees
    the tile in the middle, the CAM the whole window. Maps come back at the window's pixel size,
    aligned and shifted (see the module docstring) and normalised (:func:`normalise`) so the
    pipeline's mask threshold applies. On a GPU it runs in bf16 autocast with channels-last tensors;
    on the CPU in fp32, channels-last.
    """

    model: SolarNet
    method: CamMethod = CamMethod.BRANCH
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    decision_threshold: float | None = None
    gradcam_layer: str = "Mixed_6e"
    name: str = "solarmap"
    context_px: int | None = None  # None: the model's
    branch_levels: int | None = None  # None: all the model's trained levels
    feedback_steps: int = 10
    seg_scales: tuple[float, ...] = (1.0,)  # pseudo-seg: e.g. (0.5, 0.75, 1.0), fused by maximum
    cam_scale: float | None = None  # None: the checkpoint's scale for the method

    def __post_init__(self) -> None:
        self.method = CamMethod(self.method)
        if self.context_px is None:
            self.context_px = self.model.config.context_px
        trained = self.model.config.branch_levels
        if self.branch_levels is not None and not 1 <= self.branch_levels <= max(trained, 0):
            raise OptionError(f"--branch-levels {self.branch_levels}: this model has {trained} trained branch level(s)")
        self.geometry = layer_geometry(self.method, self.gradcam_layer)
        self.shift_px = tuple(self.model.config.cam_shifts.get(self.shift_key,
                                                                self.model.config.cam_shifts.get(self.method.value, (0.0, 0.0))))
        if self.method in (CamMethod.BRANCH, CamMethod.PSEUDO_SEG) and self.model.config.branch_levels < 1:
            raise ModelError("this model has no trained CAM branch; use --cam-method gap, gradcam or feedback")
        if self.method is CamMethod.PSEUDO_SEG and self.model.seg_head is None:
            raise ModelError("this model has no pseudo-seg head; train one with solarmap train --stage pseudo-seg")
        self.model = self.model.to(self.device, memory_format=torch.channels_last).eval()
        if self.decision_threshold is None:
            self.decision_threshold = self.model.config.decision_threshold

    @property
    def colour_prior(self) -> np.ndarray | None:
        """The model's panel-colour table for mask refinement (solarmap.refine), if it has one."""
        table = self.model.config.colour_prior
        return None if table is None else np.asarray(table, dtype=np.float32)

    @property
    def shift_key(self) -> str:
        """Which measured offset applies: per method, and per branch depth when not the deepest."""
        if self.method is CamMethod.BRANCH and self.branch_levels not in (None, self.model.config.branch_levels):
            return f"branch{self.branch_levels}"
        return self.method.value

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def raw_maps(self, x: torch.Tensor, f5d: torch.Tensor | None = None) -> torch.Tensor:
        """The method's raw maps (batch, h, w) for whole windows (``f5d``: their Mixed_5d, if known)."""
        model = self.model
        if self.method is CamMethod.GRADCAM:
            with self._autocast():
                return grad_cam(model, x.clone(), layer=self.gradcam_layer).float()
        if self.method is CamMethod.FEEDBACK:
            return feedback_saliency(model, x.clone(), steps=self.feedback_steps).float()
        if self.method is CamMethod.PSEUDO_SEG:
            from solarmap.pseudoseg import segment

            return segment(model, x.float(), scales=self.seg_scales).float()
        with torch.inference_mode(), self._autocast():
            f5d = model.mixed_5d(x) if f5d is None else f5d
            if self.method is CamMethod.BRANCH:
                raw = model.branch_cam(f5d, levels=self.branch_levels)
            else:
                raw = model.gap_cam(model.mixed_7c(f5d))
        return raw.float()

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(pixels).to(self.device).contiguous(memory_format=torch.channels_last)
        c = self.context_px
        tiles = x[:, :, c: x.shape[2] - c, c: x.shape[3] - c] if c else x
        with torch.inference_mode(), self._autocast():
            f5d = self.model.mixed_5d(tiles)
            probs = torch.softmax(self.model.classify_7c(self.model.mixed_7c(f5d)).float(), dim=1)[:, 1]
        maps = np.zeros((len(pixels), *pixels.shape[2:]), dtype=np.float32)
        positive = (probs >= self.decision_threshold).nonzero().flatten()
        if len(positive):
            raw = self.raw_maps(x[positive], None if c else f5d[positive])
            aligned = align_to_window(raw, tuple(pixels.shape[2:]), self.geometry, self.shift_px)
            maps[positive.cpu().numpy()] = normalise(aligned, self.method, self.model, self.cam_scale).cpu().numpy()
        return probs.cpu().numpy(), maps
