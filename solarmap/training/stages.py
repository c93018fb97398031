"""Greedy layerwise training: classifier, then branch level 1, then branch level 2.

Each stage trains only its own parameters; everything else is frozen (``requires_grad`` off and
batch-norm statistics fixed), so earlier stages are bit-identical afterwards. Because the backbone
is frozen during the branch stages, the features the branch reads are computed once per training
tile (and per rot90/flip variant) and cached: a branch epoch then costs only the branch convolutions.
Every stage checkpoints each epoch under its workdir, so rerunning it resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from solarmap.errors import InputError, OptionError
from solarmap.model.network import SolarNet
from solarmap.training.data import Sample, stack_samples

__all__ = ["STAGES", "Scores", "StageResult", "TrainConfig", "augment", "binary_scores", "dihedral",
           "predict_probabilities", "score_samples", "train_stage"]

log = logging.getLogger(__name__)

STAGES = ("classifier", "branch1", "branch2")  # in training order; the index is the branch level


@dataclass(frozen=True)
class Scores:
    precision: float
    recall: float
    f1: float
    accuracy: float
    n: int
    positives: int

    def line(self) -> str:
        return (f"precision {self.precision:.3f} recall {self.recall:.3f} F1 {self.f1:.3f} "
                f"accuracy {self.accuracy:.3f} (n={self.n}, positives={self.positives})")


def binary_scores(labels: np.ndarray, predicted: np.ndarray) -> Scores:
    labels, predicted = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
    tp = int((labels & predicted).sum())
    fp = int((~labels & predicted).sum())
    fn = int((labels & ~predicted).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return Scores(precision, recall, f1, float((labels == predicted).mean()) if len(labels) else 0.0,
                  len(labels), int(labels.sum()))


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 rot90/flip variants of (batch, c, h, w) images (k in 0..7)."""
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if k >= 4 else x


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random rot90/flip per batch plus mild per-image brightness/contrast jitter."""
    k = int(torch.randint(0, 8, (1,), generator=generator))
    x = dihedral(x, k)
    b = x.shape[0]
    gain = 1 + 0.15 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 2
    bias = 0.05 * (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 2
    return (x * gain + bias).clamp(0, 1)


@dataclass
class TrainConfig:
    stage: str
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    augmentations: int = 4  # cached dihedral variants per tile for branch stages
    warmup_fraction: float = 0.2  # one-cycle schedule: share of steps spent rising to ``lr``
    clip_grad_norm: float | None = 5.0
    threads: int | None = None
    run_name: str | None = None  # checkpoint name under the workdir (default: the stage), so a stage can run twice

    @property
    def name(self) -> str:
        return self.run_name or self.stage

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise OptionError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise OptionError("epochs, batch size and learning rate must be positive")


@dataclass
class StageResult:
    stage: str
    epochs_run: int
    best_epoch: int
    val: dict
    seconds: float
    history: list = field(default_factory=list)


ProgressFn = Callable[[str], None]


def freeze_all_but(model: SolarNet, trainable: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """Freeze every parameter, then unfreeze those of ``trainable``; returns the trainable ones."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def _class_weights(labels: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=2).float().clamp(min=1)
    return (counts.sum() / (2 * counts)).float()


@torch.inference_mode()
def predict_probabilities(model: SolarNet, pixels: torch.Tensor, *, batch_size: int = 64,
                          level: int | None = None) -> np.ndarray:
    """Positive-class probability of the main classifier (``level`` None) or a branch level's head."""
    model.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        features = model.branch_features(pixels[i: i + batch_size])
        logits = model.classify(model.top_features(features)) if level is None else model.branch_logits(features, level)
        out.append(torch.softmax(logits.float(), dim=1)[:, 1])
    return torch.cat(out).numpy() if out else np.zeros(0)


def train_stage(model: SolarNet, train: Sequence[Sample], val: Sequence[Sample], config: TrainConfig, *,
                workdir: str | Path, progress: ProgressFn = log.info) -> StageResult:
    """Train one greedy stage, checkpointing every epoch under ``workdir`` (resumes if interrupted).

    The weights of the epoch with the best validation F1 are kept in ``model`` at the end.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    level = STAGES.index(config.stage)
    if level > 0 and model.config.branch_levels < level - 1:
        raise OptionError(f"stage {config.stage} needs branch level {level - 1} trained first")
    x_train, y_train = stack_samples(train)
    x_val, y_val = stack_samples(val)
    if len(x_train) == 0:
        raise InputError("no training samples")
    if level == 0:
        params = freeze_all_but(model, [model.backbone])
        inputs = x_train
    else:
        params = freeze_all_but(model, [model.branch[level - 1], model.branch_heads[level - 1]])
        inputs = _cached_features(model, x_train, config, workdir, progress)
        y_train = y_train.repeat(config.augmentations)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(inputs) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch,
                                                    pct_start=config.warmup_fraction)
    weights = _class_weights(y_train)
    state_path = workdir / f"{config.name}.state.pt"
    start_epoch, best, history = 0, (-1.0, -1), []
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        if "torch_rng" in state:  # states written before it was saved
            torch.set_rng_state(state["torch_rng"])
        start_epoch, best, history = state["epoch"], tuple(state["best"]), state["history"]
        progress(f"{config.name}: resuming after epoch {start_epoch}")
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        _set_train_mode(model, level)
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size: (step + 1) * config.batch_size]
            if level == 0:
                logits = model(augment(inputs[idx], generator))
            else:
                logits = model.branch_logits(inputs[idx].float(), level)
            loss = F.cross_entropy(logits, y_train[idx], weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(idx)
        probs = predict_probabilities(model, x_val, level=level if level > 0 else None) if len(x_val) else np.zeros(0)
        scores = binary_scores(y_val.numpy(), probs >= 0.5)
        entry = {"epoch": epoch + 1, "loss": total_loss / len(inputs), "val": asdict(scores),
                 "seconds": time.perf_counter() - t0}
        history.append(entry)
        if scores.f1 > best[0]:
            best = (scores.f1, epoch + 1)
            torch.save(model.state_dict(), workdir / f"{config.name}.best.pt")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(), "epoch": epoch + 1, "best": best,
                    "history": history}, state_path)
        progress(f"{config.name} epoch {epoch + 1}/{config.epochs}: loss {entry['loss']:.4f}, "
                 f"val {scores.line()}, {entry['seconds']:.0f} s")
    best_state = workdir / f"{config.name}.best.pt"
    if best_state.exists():
        model.load_state_dict(torch.load(best_state, map_location="cpu", weights_only=True))
    model.eval()
    if level > 0:
        model.config = replace(model.config, branch_levels=level)
    best_val = next((h["val"] for h in history if h["epoch"] == best[1]), {})
    (workdir / f"{config.name}.history.json").write_text(json.dumps(history, indent=1))
    return StageResult(stage=config.stage, epochs_run=len(history), best_epoch=best[1], val=best_val,
                       seconds=time.perf_counter() - started, history=history)


def _set_train_mode(model: SolarNet, level: int) -> None:
    """Only the stage's own modules in train mode: frozen batch-norm statistics must not move."""
    model.eval()
    if level == 0:
        model.backbone.train()
    else:
        model.branch[level - 1].train()
        model.branch_heads[level - 1].train()


@torch.inference_mode()
def _cached_features(model: SolarNet, pixels: torch.Tensor, config: TrainConfig, workdir: Path,
                     progress: ProgressFn) -> torch.Tensor:
    """branch features (fp16) of every tile under ``augmentations`` dihedral variants, cached on disk.

    The cache is keyed by a digest of the frozen backbone weights and the inputs, so it is reused
    across the two branch stages and across resumed runs, and never reused after the backbone changed.
    """
    digest = _tensor_digest([pixels] + [p for p in model.backbone.state_dict().values()])
    path = workdir / f"features_{digest}_{config.augmentations}.pt"
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    model.eval()
    chunks = []
    t0 = time.perf_counter()
    for k in range(config.augmentations):
        for i in range(0, len(pixels), 64):
            chunks.append(model.branch_features(dihedral(pixels[i: i + 64], k)).half())
        progress(f"caching branch features: variant {k + 1}/{config.augmentations} "
                 f"({time.perf_counter() - t0:.0f} s)")
    features = torch.cat(chunks)
    torch.save(features, path)
    return features


def array_digest(*arrays: np.ndarray) -> bytes:
    """A collision-free cache key for arrays (tiles, a model's state): a digest of each one's dtype,
    shape and bytes. A 32-bit checksum would give two of 20,000 tiles one key about 5 % of the time,
    and a cache would then silently serve one the other's scores or features."""
    h = hashlib.blake2b(digest_size=16)
    for array in arrays:
        h.update(f"{array.dtype.str}{array.shape};".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.digest()


def _tensor_digest(tensors: Sequence[torch.Tensor]) -> str:
    """The name of a model state's cached features (:func:`array_digest` of its tensors)."""
    return array_digest(*(t.detach().cpu().numpy() for t in tensors)).hex()


def score_samples(model: SolarNet, samples: Sequence[Sample], *, threshold: float | None = None) -> Scores:
    """Precision/recall of the main classifier on labelled samples (default: the model's threshold)."""
    x, y = stack_samples(samples)
    cut = model.config.decision_threshold if threshold is None else threshold
    return binary_scores(y.numpy(), predict_probabilities(model, x) >= cut)
