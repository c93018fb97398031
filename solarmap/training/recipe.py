"""The training recipe, shared by ``solarmap train`` and the real recipe (``training.real_recipe``): greedy stages
that resume where they stopped, then every calibration on validation data.

A stage that has finished under the workdir (``NAME.done.json`` + ``NAME.final.pt``) is not trained
again, so an interrupted recipe continues where it stopped; within a stage, epochs resume too
(:func:`solarmap.training.stages.train_stage`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from solarmap.errors import InputError, OptionError
from solarmap.model.network import SolarNet
from solarmap.training.calibrate import (
    calibrate,
    calibrate_cam_scales,
    calibrate_cam_shifts,
    calibrate_cam_threshold,
    calibrate_mask_rules,
    calibrate_refine_rule,
    fit_colour_prior,
)
from solarmap.training.data import (
    Sample,
    positive_windows,
    scene_samples,
    stack_samples,
)
from solarmap.training.pseudoseg import train_pseudo_seg
from solarmap.training.stages import STAGES, TrainConfig, train_stage

__all__ = ["DEFAULT_PLAN", "StagePlan", "cached_seg_head", "calibrate_model", "plan_for", "run_stages",
           "train_seg_head"]

Say = Callable[[str], None]


@dataclass(frozen=True)
class StagePlan:
    """One greedy stage run: ``name`` names its checkpoints (a stage may run twice under two names)."""

    name: str
    stage: str
    epochs: int
    lr: float
    batch_size: int = 32
    extra_data: bool = False  # also train on the recipe's extra samples
    keep_if_better: bool = False  # kept only if its validation F1 beats the stage's previous run


DEFAULT_PLAN = (
    # lr 2e-3 diverged from scratch (training loss rose above chance after the warm-up); 6e-4 with clipping
    StagePlan("classifier", "classifier", epochs=24, lr=6e-4),
    # a second, shorter cycle at a lower rate with more data (the first was still improving at its last epoch)
    StagePlan("classifier-2", "classifier", epochs=8, lr=2e-4, extra_data=True, keep_if_better=True),
    StagePlan("branch1", "branch1", epochs=12, lr=1e-3, batch_size=64),
    StagePlan("branch2", "branch2", epochs=5, lr=1e-3, batch_size=64),  # branch1 converged in a few epochs
)


def plan_for(stages: Sequence[str], *, epochs: int | None = None, lr: float | None = None,
             batch_size: int | None = None) -> tuple[StagePlan, ...]:
    """The default plan's runs of ``stages`` (first cycles only), with the given values on top."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise OptionError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    plan = [p for p in DEFAULT_PLAN if p.stage in stages and not p.extra_data]
    changes = {k: v for k, v in dict(epochs=epochs, lr=lr, batch_size=batch_size).items() if v is not None}
    return tuple(replace(p, **changes) for p in plan)


def run_stages(net: SolarNet, plan: Sequence[StagePlan], train: Sequence[Sample], val: Sequence[Sample], *,
               workdir: str | Path, say: Say, extra_train: Callable[[], list[Sample]] | None = None) -> dict:
    """Train ``plan`` in order (finished runs are loaded, not retrained); returns each run's result."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    extra: list[Sample] | None = None
    for step in plan:
        done, final = workdir / f"{step.name}.done.json", workdir / f"{step.name}.final.pt"
        if done.exists():
            net.load_state_dict(torch.load(final, map_location="cpu", weights_only=True))
            results[step.name] = json.loads(done.read_text())
            say(f"{step.name}: already done (best epoch {results[step.name]['best_epoch']}), skipping")
        else:
            data = list(train)
            if step.extra_data and extra_train is not None:
                extra = extra_train() if extra is None else extra
                data += extra
            result = train_stage(net, data, val, TrainConfig(stage=step.stage, run_name=step.name, epochs=step.epochs,
                                                             lr=step.lr, batch_size=step.batch_size),
                                 workdir=workdir, progress=say)
            torch.save(net.state_dict(), final)
            results[step.name] = {k: v for k, v in asdict(result).items() if k != "history"}
            done.write_text(json.dumps(results[step.name], indent=1))
            say(f"{step.name}: done in {result.seconds / 60:.1f} min, best epoch {result.best_epoch}: {result.val}")
        if step.stage != "classifier":
            net.config = replace(net.config, branch_levels=STAGES.index(step.stage))
        previous = next((p for p in reversed(plan[:plan.index(step)]) if p.stage == step.stage), None)
        if step.keep_if_better and previous is not None and previous.name in results:
            f1, before = results[step.name]["val"].get("f1", 0), results[previous.name]["val"].get("f1", 0)
            if f1 <= before:  # decided on validation F1 only, before later stages read its features
                net.load_state_dict(torch.load(workdir / f"{previous.name}.final.pt", map_location="cpu",
                                               weights_only=True))
                results[step.name]["kept"] = False
                say(f"{step.name}: validation F1 {f1:.3f} is not above {previous.name}'s {before:.3f}; "
                    f"continuing from {previous.name}")
    return results


def cached_seg_head(net: SolarNet, workdir: str | Path, name: str, train: Callable[[], dict], say: Say) -> dict:
    """A segmentation head trained by ``train()`` once, kept under ``workdir`` as ``name`` and reused
    (like a finished stage) when the recipe runs again."""
    done, weights = Path(workdir) / f"{name}.done.json", Path(workdir) / f"{name}.final.pt"
    if done.exists():
        net.seg_head = net.new_seg_head()
        net.seg_head.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        net.seg_head.eval()
        net.config = replace(net.config, pseudo_seg=True)
        say(f"{name}: already done, reusing its head")
        return json.loads(done.read_text())
    info = {k: v for k, v in train().items() if k != "loss"}
    Path(workdir).mkdir(parents=True, exist_ok=True)
    torch.save(net.seg_head.state_dict(), weights)
    done.write_text(json.dumps(info, indent=1))
    say(f"{name}: head trained on {info['windows']} windows in {info['seconds'] / 60:.1f} min")
    return info


def train_seg_head(net: SolarNet, scenes: Sequence[tuple[str, str]], *, workdir: str | Path, say: Say,
                   **options) -> dict:
    """The segmentation head (``--cam-method pseudo-seg``) on pseudo masks of the positive windows of
    ``scenes`` (image-level labels only); kept under ``workdir`` and reused."""
    def train() -> dict:
        windows = positive_windows(scenes, model=net.config)
        if not windows:
            raise OptionError("no tile with panels in the given scenes: nothing to learn pseudo masks from")
        return train_pseudo_seg(net, stack_samples(windows)[0], progress=say, **options)

    return cached_seg_head(net, workdir, "pseudo_seg", train, say)


def calibrate_model(net: SolarNet, *, train: Sequence[Sample], val: Sequence[Sample],
                    val_scenes: Sequence[tuple[str, str]] = (), seg_scenes: Sequence[tuple[str, str]] = (),
                    workdir: str | Path, say: Say) -> dict:
    """Everything besides the weights, on validation data only: the inference geometry, the decision
    threshold and CAM scales (``val`` tiles); with validation scenes (whole rasters with truth) also
    the CAM offsets, the branch's mask rule, every other method's mask rule and the colour
    refinement rule; the segmentation head on ``seg_scenes``; the colour prior from ``train``."""
    # run at the size the weights were trained at: an Inception classifier trained on 101 px tiles
    # saturates on 299 px tiles (measured: every validation tile, negatives included, scored 1.0)
    net.config = replace(net.config, tile_size_px=net.config.train_tile_px, **net.backbone.inference_geometry)
    info: dict = {}
    if val:
        info.update(calibrate(net, val))
        say(f"calibrated on validation data: {info}")
    branch = net.config.branch_levels > 0
    if val_scenes and branch:
        windows = [w for scene, truth in val_scenes
                   for w in scene_samples(scene, truth, model=net.config, context_px=net.config.context_px)]
        info["cam_shifts"] = calibrate_cam_shifts(net, windows)
        say(f"CAM offsets measured on validation windows (flip consistency, no pixel truth): {info['cam_shifts']}")
        info["cam_scales"] = calibrate_cam_scales(net, windows)
        say(f"CAM scales (median peak on positive validation windows, as detection reads them): {info['cam_scales']}")
        cam_rule = calibrate_cam_threshold(net, val_scenes)
        info.update({k: v for k, v in cam_rule.items() if k != "sweep"})
        say(f"CAM threshold from validation scenes: {cam_rule}")
    if seg_scenes and branch:
        info["pseudo_seg"] = train_seg_head(net, seg_scenes, workdir=workdir, say=say)
    if val_scenes and branch:
        t0 = time.perf_counter()
        info["mask_rules"] = calibrate_mask_rules(net, val_scenes, say=say)
        say(f"mask rules of the other CAM methods in {time.perf_counter() - t0:.0f} s")
    try:
        info["colour_prior"] = fit_colour_prior(net, train)  # the classifier's training tiles, image-level labels
        say(f"colour prior (for --refine): {info['colour_prior']}")
    except InputError:
        say("no colour prior: the training tiles need both labels")
    if val_scenes and branch and net.config.colour_prior is not None:
        refine = calibrate_refine_rule(net, val_scenes)
        rule = info["refine_rule"] = refine["refine_rule"]  # {} where no refinement beats none
        key = "/".join(str(rule[k]) for k in ("grow_px", "min_log_ratio", "smooth_px")) if rule else "none"
        say(f"refinement rule from validation scenes {rule or 'none'} ({refine['sweep'][key]}; "
            f"without refinement {refine['sweep']['none']})")
    return info
