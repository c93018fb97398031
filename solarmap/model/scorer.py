"""The model as the pipeline's scorer, and :func:`build_scorer`: the one way the CLI, the Python
API and regional workers turn a checkpoint and options into a scorer.

A scorer maps a batch of windows (tiles with ``context_px`` of surroundings) to tile probabilities
and score maps; it also says which detection settings its checkpoint was calibrated for
(:meth:`ModelScorer.detect_settings`), so every entry point detects with the same rule for the
same ``--cam-method``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from solarmap.errors import ModelError, OptionError
from solarmap.geo.refine import ColourRefine
from solarmap.model.align import align_to_window
from solarmap.model.cam import METHODS, CamMethod, autocast_for
from solarmap.model.checkpoint import load
from solarmap.model.fold import fold_batchnorm
from solarmap.model.network import SolarNet
from solarmap.model.outline import FOOTPRINT

__all__ = ["ModelScorer", "ScorerSpec", "build_scorer", "classify_images", "fit_square", "resample", "resolve_device"]


FALLBACK_METHODS = (CamMethod.PSEUDO_SEG, CamMethod.OUTLINE)  # the methods --cam-fallback applies to


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
    """The pipeline's scorer: tile probabilities from the classifier, maps for positive tiles only.

    Input windows are tiles with ``context_px`` of surroundings on each side: the classifier sees
    the tile in the middle, the map method the whole window. Maps come back at the window's pixel
    size, aligned, shifted and normalised (see :mod:`solarmap.model.cam`) so the pipeline's mask
    threshold applies. On a GPU it runs in bf16 autocast with channels-last tensors; on the CPU in
    fp32, channels-last.
    """

    model: SolarNet
    method: CamMethod = CamMethod.BRANCH
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    decision_threshold: float | None = None  # None: the checkpoint's (the outline method: its outline_gate, if set)
    gradcam_layer: str | None = None  # None: the backbone's default
    name: str = "solarmap"
    context_px: int | None = None  # None: the model's
    branch_levels: int | None = None  # None: all the model's trained levels
    feedback_steps: int = 10
    seg_scales: tuple[float, ...] = (1.0,)  # pseudo-seg: e.g. (0.5, 0.75, 1.0), fused by maximum
    cam_scale: float | None = None  # None: the checkpoint's scale for the method
    refine: bool | None = None  # colour refinement: None = the method's default
    cam_fallback: bool | None = None  # branch CAM where the head or outline draws nothing (None: the checkpoint's)
    cam_fallback_min_score: float | None = None  # ... on tiles at least this probable (None: the checkpoint's)

    def __post_init__(self) -> None:
        self.method = CamMethod(self.method)
        self.impl = METHODS[self.method]
        config = self.model.config
        if self.context_px is None:
            self.context_px = config.context_px
        if self.branch_levels is not None and not 1 <= self.branch_levels <= max(config.branch_levels, 0):
            raise OptionError(f"--branch-levels {self.branch_levels}: this model has {config.branch_levels} "
                              f"trained branch level(s)")
        if self.refine and config.colour_prior is None:
            raise ModelError("--refine: this model has no colour prior (solarmap train --stage colour-prior adds one)")
        self.impl.check(self.model)
        if self.gradcam_layer is None:
            self.gradcam_layer = self.model.backbone.default_gradcam_layer
        self.geometry = self.impl.geometry(self)
        self.shift_px = self._measured_shift(self.shift_key, self.method)
        self.model = self.model.to(self.device, memory_format=torch.channels_last).eval()
        if self.decision_threshold is None:
            gate = config.outline_gate if self.method is CamMethod.OUTLINE else None
            self.decision_threshold = config.decision_threshold if gate is None else gate
        # a floor given without --cam-fallback asks for the fallback too
        asked = self.cam_fallback or (self.cam_fallback is None and self.cam_fallback_min_score is not None)
        if asked and self.method not in FALLBACK_METHODS:
            raise OptionError("--cam-fallback, --cam-fallback-min-score: only the pseudo-seg and outline methods fall "
                              "back to the branch CAM")
        if asked and config.branch_levels < 1:
            raise ModelError("--cam-fallback: this model has no trained CAM branch to fall back on")
        outline_floor = config.outline_cam_fallback_min_score if self.method is CamMethod.OUTLINE else None
        if self.cam_fallback_min_score is None:
            self.cam_fallback_min_score = (config.seg_cam_fallback_min_score if outline_floor is None
                                           else outline_floor)
        if self.cam_fallback is None:
            by_default = (config.seg_cam_fallback if self.method is CamMethod.PSEUDO_SEG
                          else outline_floor is not None and config.branch_levels >= 1)
            self.cam_fallback = asked or by_default

    @property
    def has_footprints(self) -> bool:
        """Whether installations take this scorer's footprint output (:meth:`footprint_maps`): with
        the outline method, whose panels come from the same network."""
        return self.method is CamMethod.OUTLINE and self.model.outline is not None

    def footprint_maps(self, pixels: np.ndarray) -> np.ndarray:
        """The outline network's footprint probability (batch, h, w) for whole windows
        (:mod:`solarmap.pipeline.footprints`)."""
        if self.model.outline is None:
            raise ModelError("this model has no outline network, so no footprint output")
        x = torch.from_numpy(pixels).to(self.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.autocast():
            return self.model.outline.probabilities(x.float())[:, FOOTPRINT].float().cpu().numpy()

    @property
    def colour_prior(self) -> np.ndarray | None:
        """The model's panel-colour table for mask refinement (solarmap.geo.refine), if it has one."""
        table = self.model.config.colour_prior
        return None if table is None else np.asarray(table, dtype=np.float32)

    @property
    def refine_rule(self) -> ColourRefine | None:
        """The colour refinement this scorer's masks get: the checkpoint's calibrated rule, on by
        default for the method it was calibrated on, off without a colour prior or when refused."""
        config = self.model.config
        wanted = self.impl.refines_by_default and bool(config.refine_rule) if self.refine is None else self.refine
        if not wanted or config.colour_prior is None:
            return None
        return ColourRefine(**config.refine_rule)

    @property
    def shift_key(self) -> str:
        """Which measured offset applies: per method, and per branch depth when not the deepest."""
        return self.branch_shift_key if self.method is CamMethod.BRANCH else self.method.value

    @property
    def branch_shift_key(self) -> str:
        """The branch CAM's offset at this scorer's depth (the fallback reads it whatever the method)."""
        if self.branch_levels not in (None, self.model.config.branch_levels):
            return f"branch{self.branch_levels}"
        return CamMethod.BRANCH.value

    def _measured_shift(self, key: str, method: CamMethod) -> tuple[float, ...]:
        """A CAM offset measured at calibration: ``key``'s, else the method's at full depth, else none."""
        shifts = self.model.config.cam_shifts
        return tuple(shifts.get(key, shifts.get(method.value, (0.0, 0.0))))

    def detect_settings(self) -> dict:
        """The detection settings the checkpoint was calibrated for with this method (solarmap.pipeline's
        ``DetectConfig`` fields): tile size, overlap, context, GSD, thresholds, refinement."""
        config = self.model.config
        threshold, fraction = self.impl.mask_rule(config)
        return dict(tile_size_px=config.tile_size_px, overlap_px=config.overlap_px, context_px=self.context_px,
                    gsd_m=config.gsd_m, score_threshold=self.decision_threshold, mask_threshold=threshold,
                    mask_peak_fraction=fraction, refine=self.refine_rule)

    def metadata(self) -> dict:
        """What a GeoPackage records about how its maps were made."""
        meta = {"cam_method": self.method.value, "device": str(self.device), "model_gsd_m": self.model.config.gsd_m,
                "model_backbone": self.model.config.backbone, "cam_threshold_basis": self.impl.threshold_basis,
                "branch_levels": self.branch_levels or self.model.config.branch_levels}
        if self.method is CamMethod.PSEUDO_SEG:
            meta["seg_gate"] = seg_gate_text(self.model.config)
        if self.method in FALLBACK_METHODS:
            floor = f" on tiles scoring >= {self.cam_fallback_min_score:g}" if self.cam_fallback_min_score > 0 else ""
            meta["cam_fallback"] = f"branch CAM where the head draws nothing{floor}" if self.cam_fallback else "none"
        return meta

    def autocast(self):
        return autocast_for(self.device)

    def raw_maps(self, x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """The method's raw maps (batch, h, w) for whole windows (``features``: their branch features)."""
        return self.impl.raw_maps(self, x, features)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(pixels).to(self.device).contiguous(memory_format=torch.channels_last)
        c = self.context_px
        tiles = x[:, :, c: x.shape[2] - c, c: x.shape[3] - c] if c else x
        with torch.inference_mode(), self.autocast():
            features = self.model.branch_features(tiles)
            logits = self.model.classify(self.model.top_features(features))
            probs = torch.softmax(logits.float(), dim=1)[:, 1]
        maps = np.zeros((len(pixels), *pixels.shape[2:]), dtype=np.float32)
        positive = (probs >= self.decision_threshold).nonzero().flatten()
        if len(positive):
            normalised = self._window_maps(self.impl, x[positive], None if c else features[positive],
                                           geometry=self.geometry, shift=self.shift_px, scale=self.cam_scale)
            maps[positive.cpu().numpy()] = normalised.cpu().numpy()
            if self.cam_fallback:
                confident = positive[probs[positive] >= self.cam_fallback_min_score]
                self._fall_back_to_cam(x, maps, confident.cpu().numpy())
        return probs.cpu().numpy(), maps

    def _fall_back_to_cam(self, x: torch.Tensor, maps: np.ndarray, positive: np.ndarray) -> None:
        """Positive tiles whose head (or outline network) map never reaches its mask threshold inside
        the tile take the branch CAM instead, rescaled so that the CAM's own calibrated threshold lands
        on the head's.

        Why: the pseudo-seg head learnt outlines from one UAV set (PV01) and draws nothing on many
        arrays in other imagery, where the classifier and its CAM branch, trained on every real set,
        still point at them; a rough outline beats none for an inventory. The outline network too
        draws nothing on a fifth of the Swiss register's chips the classifier gates (dark arrays set
        into dark roofs): there it falls back only on tiles the classifier is sure of
        (``ModelConfig.outline_cam_fallback_min_score``), as it also draws more on roofs without panels."""
        if not len(positive):
            return
        config, c = self.model.config, self.context_px
        seg_threshold = self.impl.mask_rule(config)[0]
        cam_threshold = METHODS[CamMethod.BRANCH].mask_rule(config)[0]
        cores = maps[positive][:, c: maps.shape[1] - c, c: maps.shape[2] - c] if c else maps[positive]
        empty = positive[cores.reshape(len(positive), -1).max(axis=1) < seg_threshold]
        if not len(empty):
            return
        branch = METHODS[CamMethod.BRANCH]
        cam = self._window_maps(branch, x[torch.from_numpy(empty).to(x.device)], None, geometry=branch.geometry(self),
                                shift=self._measured_shift(self.branch_shift_key, CamMethod.BRANCH))
        maps[empty] = (cam * (seg_threshold / cam_threshold)).cpu().numpy()

    def _window_maps(self, impl, x: torch.Tensor, features: torch.Tensor | None, *, geometry: tuple[int, int] | None,
                     shift: tuple[float, ...], scale: float | None = None) -> torch.Tensor:
        """One method's maps for whole windows ``x``: raw, aligned to the window's pixels with the
        method's measured offset, normalised so its calibrated mask threshold applies."""
        raw = impl.raw_maps(self, x, features)
        aligned = align_to_window(raw, tuple(x.shape[2:]), geometry, shift)
        return impl.normalise(aligned, self.model.config, scale)


def build_scorer(model: str | Path | SolarNet | None = None, *, method: str | CamMethod | None = None,
                 device: str = "auto", decision_threshold: float | None = None, branch_levels: int | None = None,
                 refine: bool | None = None, cam_fallback: bool | None = None,
                 cam_fallback_min_score: float | None = None) -> ModelScorer:
    """A scorer from a checkpoint path (None: the bundled model) or a loaded network, named for
    the run metadata. Every option left at None takes the checkpoint's calibrated value (``method``:
    the checkpoint's default outline method). The scorer's network has its batch norms folded
    (:mod:`solarmap.model.fold`): a copy of a network passed in, which stays as it was."""
    net = fold_batchnorm(copy.deepcopy(model) if isinstance(model, SolarNet) else load(model))
    name = "bundled" if model is None else str(model) if not isinstance(model, SolarNet) else "solarmap"
    method = CamMethod(method or net.config.default_cam_method)
    return ModelScorer(net, method=method, device=resolve_device(str(device)),
                       decision_threshold=decision_threshold, branch_levels=branch_levels, refine=refine, name=name,
                       cam_fallback=cam_fallback, cam_fallback_min_score=cam_fallback_min_score)


@dataclass(frozen=True)
class ScorerSpec:
    """:func:`build_scorer`'s arguments as a plain value: what a dask worker gets, to build its
    scorer once (a model is never sent over the wire)."""

    model_path: str | None = None
    method: str | None = None  # None: the checkpoint's default
    device: str = "auto"
    decision_threshold: float | None = None
    branch_levels: int | None = None
    refine: bool | None = None
    cam_fallback: bool | None = None
    cam_fallback_min_score: float | None = None

    def build(self) -> ModelScorer:
        options = asdict(self)
        return build_scorer(options.pop("model_path"), **options)


def resample(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Resize (3, h, w) by ``factor`` (area average when shrinking, bilinear when enlarging)."""
    if abs(factor - 1.0) < 1e-6:
        return pixels
    t = torch.from_numpy(pixels)[None]
    size = (max(1, round(pixels.shape[1] * factor)), max(1, round(pixels.shape[2] * factor)))
    mode = "area" if factor < 1 else "bilinear"
    out = F.interpolate(t, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return out[0].numpy()


def fit_square(pixels: np.ndarray, size_px: int, *, edge_mode: str = "symmetric") -> np.ndarray:
    """(c, h, w) centre-cropped or reflect-padded to (c, size, size); ``edge_mode`` pads where the
    image is too small to reflect."""
    _, h, w = pixels.shape
    top, left = max(0, (h - size_px) // 2), max(0, (w - size_px) // 2)
    pixels = pixels[:, top: top + size_px, left: left + size_px]
    pad_h, pad_w = size_px - pixels.shape[1], size_px - pixels.shape[2]
    if pad_h or pad_w:
        mode = "reflect" if pad_h < pixels.shape[1] and pad_w < pixels.shape[2] else edge_mode
        pixels = np.pad(pixels, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)),
                        mode=mode)
    return pixels


def classify_images(model: SolarNet, images, *, gsd_m: float) -> list[float]:
    """Tile probability of each (3, h, w) image in [0, 1] taken at ``gsd_m``: resampled to the
    model's GSD, then fitted to the model's tile (:func:`fit_square`), the input detection gives it
    (a backbone with "same" padding answers differently at other sizes)."""
    probabilities = []
    for pixels in images:
        pixels = fit_square(resample(pixels, gsd_m / model.config.gsd_m), model.config.tile_size_px)
        prob, _ = model.predict(torch.from_numpy(np.ascontiguousarray(pixels))[None], with_cam=False)
        probabilities.append(float(prob[0]))
    return probabilities


def seg_gate_text(config) -> str:
    """The segmentation head's attention gate in words, for a run's metadata."""
    floor, levels = config.seg_attention_floor, config.seg_blob_levels
    if floor <= 0:
        return "none"
    how = f"whole blobs at {', '.join(f'{level:g}' for level in levels)}" if levels else "pixel by pixel"
    return f"branch CAM >= {floor:g} of its scale, {how}"
