"""Calibration on validation data: everything a checkpoint decides besides its weights.

The decision threshold, the CAM scales and offsets, each CAM method's mask rule, the colour prior
and its refinement rule. Each is chosen on validation data only and stored in ``model.config``;
test data decide nothing.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

import geopandas as gpd
import numpy as np
import torch

from solarmap.errors import InputError, ModelError
from solarmap.evaluate import evaluate
from solarmap.geo.refine import ColourRefine, colour_histograms, colour_log_ratio
from solarmap.model.align import align_to_window
from solarmap.model.cam import CamMethod
from solarmap.model.network import SolarNet
from solarmap.model.scorer import ModelScorer
from solarmap.model.seg import BLOB_LEVELS
from solarmap.pipeline import DetectConfig, detect_scene
from solarmap.training.data import Sample, stack_samples
from solarmap.training.stages import array_digest, binary_scores, predict_probabilities

__all__ = ["MASK_THRESHOLDS", "best_rule", "calibrate", "calibrate_cam_scales", "calibrate_cam_shifts",
           "calibrate_cam_threshold", "calibrate_mask_rules", "calibrate_refine_rule", "calibrate_seg_rule",
           "cam_scales", "estimate_cam_shift", "fit_colour_prior", "sweep_detect_configs", "sweep_mask_rules"]

# CAM thresholds every mask-rule sweep tries (branch calibration, per-method rules, comparisons)
MASK_THRESHOLDS = tuple(np.round(np.arange(0.3, 0.95, 0.1), 2))
# the segmentation head's probabilities crowd near its best threshold: a finer grid (where its blob
# gate is exact), and the gate's floors (0: none)
SEG_MASK_THRESHOLDS = BLOB_LEVELS
SEG_ATTENTION_FLOORS = (0.0, 0.1, 0.2, 0.3)


@torch.inference_mode()
def calibrate(model: SolarNet, val: Sequence[Sample]) -> dict:
    """Choose the decision threshold (best validation F1) and the CAM scales (median CAM peak on
    positive validation tiles) and store them in ``model.config``. Validation data only."""
    x, labels = stack_samples(val)
    y = labels.numpy()
    probs = predict_probabilities(model, x)
    thresholds = np.round(np.linspace(0.05, 0.95, 91), 2)
    f1s = [binary_scores(y, probs >= t).f1 for t in thresholds]
    decision = float(thresholds[int(np.argmax(f1s))])
    positives = x[torch.from_numpy(y == 1)]
    branch_peaks, gap_peaks = [], []
    for i in range(0, len(positives), 64):
        features = model.branch_features(positives[i: i + 64])
        if model.config.branch_levels:
            branch_peaks.append(model.branch_cam(features).flatten(1).max(dim=1).values)
        gap_peaks.append(model.gap_cam(model.top_features(features)).flatten(1).max(dim=1).values)
    changes = {"decision_threshold": decision}
    if branch_peaks:
        changes["cam_scale"] = max(float(torch.cat(branch_peaks).median()), 1e-6)
    if gap_peaks:
        changes["gap_cam_scale"] = max(float(torch.cat(gap_peaks).median()), 1e-6)
    model.config = replace(model.config, **changes)
    return changes


def calibrate_cam_shifts(model: SolarNet, windows: Sequence[Sample], *, max_windows: int = 128) -> dict:
    """Measure each CAM method's response offset on positive windows (tiles with context; image-level
    labels only, see :func:`estimate_cam_shift`) and store the corrections in
    ``model.config.cam_shifts``."""
    positives = [w for w in windows if w.label][:max_windows]
    if not positives:
        raise ValueError("no positive windows to measure CAM offsets on")
    x, _ = stack_samples(positives)
    shifts = {}
    variants = [dict(method=CamMethod.GAP), dict(method=CamMethod.GRADCAM)]
    variants += [dict(method=CamMethod.BRANCH, branch_levels=level) for level in range(1, model.config.branch_levels + 1)]
    for options in variants:  # feedback maps are input gradients: aligned by construction
        scorer = ModelScorer(model, **options)
        shifts[scorer.shift_key] = list(estimate_cam_shift(scorer.raw_maps, x, scorer.geometry))
    model.config = replace(model.config, cam_shifts=shifts)
    return shifts


def cam_scales(model: SolarNet, windows: Sequence[Sample], variants: dict[str, dict]) -> dict[str, float]:
    """Median peak of each variant's aligned map (ModelScorer options) on positive windows: the
    value its normalised map reaches on a typical panel tile."""
    x, _ = stack_samples([w for w in windows if w.label])
    scales = {}
    for name, options in variants.items():
        scorer = ModelScorer(model, **options)
        peaks = [align_to_window(scorer.raw_maps(x[i: i + 32]), tuple(x.shape[-2:]), scorer.geometry,
                                 scorer.shift_px).flatten(1).max(dim=1).values for i in range(0, len(x), 32)]
        scales[name] = max(float(torch.cat(peaks).median()), 1e-6)
    return scales


def calibrate_cam_scales(model: SolarNet, windows: Sequence[Sample]) -> dict[str, float]:
    """Set ``cam_scale`` (branch) and ``gap_cam_scale`` from windows as detection reads them (tile +
    context, aligned and shifted): scales measured on bare tiles differ, e.g. the GAP map of a 101 px
    tile is a single cell."""
    scales = cam_scales(model, windows, {"branch": dict(method="branch"), "gap": dict(method="gap")})
    model.config = replace(model.config, cam_scale=scales["branch"], gap_cam_scale=scales["gap"])
    return scales


class _CachingScorer:
    """Remembers a scorer's answers per tile, so a threshold sweep runs the network once per tile."""

    def __init__(self, scorer):
        self.scorer, self.name, self._memo = scorer, scorer.name, {}
        self.context_px = getattr(scorer, "context_px", 0)
        self.colour_prior = getattr(scorer, "colour_prior", None)

    def __call__(self, pixels: np.ndarray):
        keys = [array_digest(p) for p in pixels]
        todo = [i for i, k in enumerate(keys) if k not in self._memo]
        if todo:
            probs, maps = self.scorer(pixels[todo])
            for i, p, m in zip(todo, probs, maps):
                self._memo[keys[i]] = (p, m)
        return (np.array([self._memo[k][0] for k in keys]), np.stack([self._memo[k][1] for k in keys]))


def _with_truth_frames(scenes: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    """(scene, truth) pairs with each truth given as a path read once into its panels frame, for
    callers that sweep the same scenes many times."""
    return [(scene, gpd.read_file(truth, layer="panels") if isinstance(truth, (str, Path)) else truth)
            for scene, truth in scenes]


def sweep_detect_configs(scorer, configs: dict, scenes: Sequence[tuple[str, object]], *,
                         tile_size_px: int) -> dict:
    """Detect on validation scenes (scene, truth path or frame) under every config of ``configs``
    (key -> DetectConfig), the network run once per tile; mean metrics per key."""
    cached = _CachingScorer(scorer)
    scenes = _with_truth_frames(scenes)
    sweep = {}
    for key, config in configs.items():
        results = [evaluate(detect_scene(scene, scorer=cached, config=config)[0], truth, scene,
                            tile_size_px=tile_size_px) for scene, truth in scenes]
        sweep[key] = {metric: float(np.mean([getattr(r, metric) for r in results]))
                      for metric in ("pixel_iou", "box_iou", "tile_precision", "tile_recall", "total_area_error")}
    return sweep


def best_rule(sweep: dict, *, min_tile_recall: float = 0.9, area_tie_iou: float | None = None):
    """The key with the best mean pixel IoU among those whose polygons still reach
    ``min_tile_recall`` of the truth's tiles (finding arrays comes before outlining them), or the
    best pixel IoU if none does.

    With ``area_tie_iou``, rules within that much pixel IoU of the best count as tied, and the tie
    goes to the smallest |total-area error|: an inventory sums areas, and near the best IoU the
    rules differ mostly in whether the mixed pixels on an array's edge count as panel, a bias that
    adds up over every array while the IoU hardly moves."""
    eligible = [k for k, v in sweep.items() if v["tile_recall"] >= min_tile_recall] or list(sweep)
    best = max(eligible, key=lambda k: sweep[k]["pixel_iou"])
    if area_tie_iou is None:
        return best
    tied = [k for k in eligible if sweep[k]["pixel_iou"] >= sweep[best]["pixel_iou"] - area_tie_iou]
    return min(tied, key=lambda k: (abs(sweep[k]["total_area_error"]), -sweep[k]["pixel_iou"]))


def sweep_mask_rules(scorer: ModelScorer, scenes: Sequence[tuple[str, object]], *,
                     thresholds: Sequence[float], peak_fractions: Sequence[float | None],
                     min_tile_recall: float = 0.9) -> tuple[float, float | None, dict]:
    """Every mask rule (CAM threshold, peak fraction for weak tiles) on validation scenes, detected
    as ``solarmap detect`` runs the scorer's method, and the best one (:func:`best_rule`). Returns
    (threshold, fraction, sweep)."""
    configs = {(float(t), f): DetectConfig.for_scorer(scorer, mask_threshold=float(t), mask_peak_fraction=f)
               for t in thresholds for f in peak_fractions}
    sweep = sweep_detect_configs(scorer, configs, scenes, tile_size_px=scorer.model.config.tile_size_px)
    threshold, fraction = best_rule(sweep, min_tile_recall=min_tile_recall)
    return threshold, fraction, sweep


def fit_colour_prior(model: SolarNet, samples: Sequence[Sample]) -> dict:
    """Learn the panel-colour table of mask refinement (solarmap.refine) from labelled training
    tiles and store it in ``model.config``; image-level labels are all it needs."""
    if not any(s.label for s in samples) or all(s.label for s in samples):
        raise InputError("a colour prior needs training tiles with and without panels")
    counts = colour_histograms((s.pixels, s.label) for s in samples)
    table = colour_log_ratio(counts)
    model.config = replace(model.config, colour_prior=tuple(round(float(v), 4) for v in table))
    return {"tiles": len(samples), "positive_tiles": sum(s.label for s in samples),
            "panel_colours": int((table > 1.0).sum()), "pixels": [int(c) for c in counts.sum(axis=1)]}


def calibrate_refine_rule(model: SolarNet, scenes: Sequence[tuple[str, object]], *,
                          grows_px: Sequence[int] = (16, 32, 48, 64, 96),
                          min_log_ratios: Sequence[float] = (0.5, 0.75, 0.9, 1.0, 1.25),
                          smooths_px: Sequence[int] = (1, 2), min_tile_recall: float = 0.9,
                          area_tie_iou: float = 0.01) -> dict:
    """Pick the colour refinement rule (solarmap.refine) of the branch CAM's masks on validation
    scenes, like the mask rules (:func:`best_rule`) but with near-ties in pixel IoU going to the
    least area bias, store it in ``model.config`` and return the sweep. The model must already
    carry its colour table (``config.colour_prior``)."""
    if model.config.colour_prior is None:
        raise ModelError("calibrating the refinement needs the model's colour prior first")
    rules = {(g, m, s): ColourRefine(grow_px=g, min_log_ratio=m, smooth_px=s)
             for g in grows_px for m in min_log_ratios for s in smooths_px}
    scorer = ModelScorer(model)
    configs = {None: DetectConfig.for_scorer(scorer, refine=None),
               **{key: DetectConfig.for_scorer(scorer, refine=rule) for key, rule in rules.items()}}
    sweep = sweep_detect_configs(scorer, configs, scenes, tile_size_px=model.config.tile_size_px)
    key = best_rule(sweep, min_tile_recall=min_tile_recall, area_tie_iou=area_tie_iou)
    model.config = replace(model.config, refine_rule=asdict(rules[key]) if key is not None else {})
    return {"refine_rule": model.config.refine_rule,
            "sweep": {("none" if k is None else "/".join(map(str, k))): v for k, v in sweep.items()}}


def calibrate_cam_threshold(model: SolarNet, scenes: Sequence[tuple[str, str]], *,
                            thresholds: Sequence[float] = MASK_THRESHOLDS,
                            peak_fractions: Sequence[float | None] = (None, 0.5, 0.7, 0.9),
                            min_tile_recall: float = 0.9) -> dict:
    """Pick the branch CAM's mask rule on validation scenes (see :func:`sweep_mask_rules`) and
    store it in ``model.config``; returns the sweep so it can be reported."""
    threshold, fraction, sweep = sweep_mask_rules(ModelScorer(model), scenes, thresholds=thresholds,
                                                  peak_fractions=peak_fractions, min_tile_recall=min_tile_recall)
    model.config = replace(model.config, cam_threshold=threshold, cam_peak_fraction=fraction)
    return {"cam_threshold": threshold, "cam_peak_fraction": fraction,
            "sweep": {f"{t}/{f}": v for (t, f), v in sweep.items()}}


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


def calibrate_mask_rules(model: SolarNet, scenes: Sequence[tuple[str, object]], *,
                         methods: Sequence[str] = ("gap", "gradcam", "feedback", "pseudo-seg"),
                         seg_floors: Sequence[float] = SEG_ATTENTION_FLOORS,
                         say: Callable[[str], None] = lambda line: None) -> dict:
    """Each other CAM method's mask rule on validation scenes, chosen like the branch's (best pixel
    IoU among rules reaching 90 % tile recall), so ``--cam-method X`` works without a threshold.
    The segmentation head's rule also sets its attention gate (``seg_attention_floor``, one of
    ``seg_floors``; see :func:`calibrate_seg_rule`)."""
    scenes = _with_truth_frames(scenes)
    rules = {}
    for method in methods:
        if method == "pseudo-seg":
            if model.seg_head is not None:
                rules[method] = calibrate_seg_rule(model, scenes, floors=seg_floors, say=say)
            continue
        threshold, fraction, sweep = sweep_mask_rules(ModelScorer(model, method=method), scenes,
                                                      thresholds=MASK_THRESHOLDS, peak_fractions=(None, 0.5, 0.7))
        rules[method] = [threshold, fraction]
        say(f"mask rule for {method}: CAM >= {threshold}, weak tiles >= {fraction} x peak "
            f"({sweep[(threshold, fraction)]})")
    model.config = replace(model.config, mask_rules=rules)
    return rules


def calibrate_seg_rule(model: SolarNet, scenes: Sequence[tuple[str, object]], *,
                       floors: Sequence[float] = SEG_ATTENTION_FLOORS, area_tie_iou: float = 0.01,
                       say: Callable[[str], None] = lambda line: None) -> list:
    """The segmentation head's mask rule and its blob gate's floor together (solarmap.model.seg), on
    validation scenes; sets ``seg_attention_floor`` and ``seg_blob_levels`` (the threshold chosen:
    the gate is exact there at the cost of one labelling pass) and returns [threshold, peak
    fraction] (the caller stores the rule).

    Why both: the gate and the threshold trade against each other (a stricter gate wants a lower
    threshold). Near-ties in pixel IoU go to the least total-area error (:func:`best_rule`): a
    0.05 step of the threshold moved version 9's PV01 validation area by 10 % at the same IoU.

    No weak-tile rule (peak fraction) for the head: it draws a blob on every tile the classifier
    calls positive, and PV01's mosaics hold too few false tiles to show that cost (a head chose
    ">= 0.5 x peak" there and drew 269 m² on the validation negative scene, against 90 m² for the
    same head without it; docs/real-imagery.md)."""
    scenes = _with_truth_frames(scenes)
    sweep = {}
    for floor in floors:
        model.config = replace(model.config, seg_attention_floor=float(floor), seg_blob_levels=SEG_MASK_THRESHOLDS)
        *_, part = sweep_mask_rules(ModelScorer(model, method="pseudo-seg"), scenes, thresholds=SEG_MASK_THRESHOLDS,
                                    peak_fractions=(None,))
        sweep.update({(float(floor), *key): metrics for key, metrics in part.items()})
    floor, threshold, fraction = best_rule(sweep, area_tie_iou=area_tie_iou)
    model.config = replace(model.config, seg_attention_floor=floor, seg_blob_levels=(threshold,))
    say(f"mask rule for pseudo-seg: head >= {threshold}, weak tiles >= {fraction} x peak, attention floor {floor} "
        f"({sweep[(floor, threshold, fraction)]})")
    return [threshold, fraction]
