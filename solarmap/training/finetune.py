"""Fine-tuning a pretrained classifier on real images from many places, shown in every look.

Each epoch draws a fixed number of views per source (so the 5,147 Bern positives do not drown the
400 Fresno ones, and every negative set is seen every epoch), each a :func:`random_view`. Validation
scores every source separately on deterministic centre views: recall where a source has positives,
false-positive rate where it has negatives; the epoch kept is the one with the best *worst* real
source (a model that is good on average but has learnt one source's look fails somewhere).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from solarmap.model.network import SolarNet
from solarmap.training.real_data import RealImage
from solarmap.training.views import ViewConfig, centre_view, random_view

__all__ = ["SUPPLEMENTS", "FinetuneConfig", "by_source_and_label", "finetune_classifier", "predict_images", "source_scores"]


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 8
    lr: float = 5e-4
    weight_decay: float = 1e-4
    batch_size: int = 32
    # views per epoch of each source's positives (":1") and negatives (":0"): Fresno's two classes
    # equally often, so its look says nothing about the label
    per_source: dict = field(default_factory=lambda: {"fresno:1": 600, "fresno:0": 600, "bern:1": 700, "pv01:1": 150,
                                                      "ucmerced:0": 700, "oam:0": 350})
    view: ViewConfig = ViewConfig()
    val_size_px: int = 96
    seed: int = 0
    # validate and keep an exponential moving average of the weights (and BN statistics) over about
    # 1 / (1 - decay) steps, not the last step's: with a few hundred validation chips per source,
    # single epochs swung (Fresno false-positive rate 0.008 -> 0.144 -> 0.048 on consecutive epochs)
    # and the epoch kept was partly chosen by that noise. None: the raw weights.
    ema_decay: float | None = 0.99


def _draw(images: Sequence[RealImage], count: int, rng: np.random.Generator) -> list[RealImage]:
    """``count`` images, each at most once until all have been drawn (then again)."""
    out: list[RealImage] = []
    while len(out) < count and images:
        order = rng.permutation(len(images))[: count - len(out)]
        out += [images[i] for i in order]
    return out


@torch.inference_mode()
def predict_images(model: SolarNet, images: Sequence[RealImage], *, size_px: int, batch_size: int = 64) -> np.ndarray:
    """Tile probability of each image's centre view."""
    model.eval()
    probs = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.stack([centre_view(im.pixels, size_px) for im in images[i: i + batch_size]]))
        probs.append(torch.softmax(model(x).float(), dim=1)[:, 1])
    return torch.cat(probs).numpy() if probs else np.zeros(0)


def source_scores(images: Sequence[RealImage], probs: np.ndarray, threshold: float) -> dict:
    """Per source: recall on its positives and false-positive rate on its negatives."""
    scores = {}
    for source in sorted({im.source for im in images}):
        idx = [i for i, im in enumerate(images) if im.source == source]
        labels = np.array([images[i].label for i in idx])
        called = probs[idx] >= threshold
        row = {"n": len(idx)}
        if labels.any():
            row["recall"] = float(called[labels == 1].mean())
        if (~labels.astype(bool)).any():
            row["fpr"] = float(called[labels == 0].mean())
        scores[source] = row
    return scores


# sources that add examples but decide nothing: a synthetic town is not what users run the model on,
# and counting it would let the renderer's look choose the epoch and the threshold
SUPPLEMENTS = frozenset({"synthetic"})


def worst_source(scores: dict, *, ignore: frozenset = SUPPLEMENTS) -> float:
    """The lowest per-source accuracy part (recall, or 1 - false-positive rate) over the real sources."""
    parts = [v for source, row in scores.items() if source not in ignore
             for v in (row.get("recall"), 1 - row["fpr"] if "fpr" in row else None) if v is not None]
    return min(parts) if parts else 0.0


def by_source_and_label(images: Sequence[RealImage]) -> dict[str, list[RealImage]]:
    """Images keyed "source:label", as ``FinetuneConfig.per_source`` counts them."""
    groups: dict[str, list[RealImage]] = {}
    for image in images:
        groups.setdefault(f"{image.source}:{image.label}", []).append(image)
    return groups


def finetune_classifier(model: SolarNet, train: dict[str, list[RealImage]], val: Sequence[RealImage],
                        config: FinetuneConfig, *, workdir: str | Path,
                        progress: Callable[[str], None] = print) -> dict:
    """Fine-tune the whole classifier (backbone + head) on views of ``train`` ("source:label" -> images),
    checkpointing every epoch under ``workdir`` (rerunning resumes); keeps the best epoch's weights
    (their moving average, see ``FinetuneConfig.ema_decay``)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    per_epoch = sum(n for s, n in config.per_source.items() if train.get(s))
    steps = math.ceil(per_epoch / config.batch_size)
    params = [p for p in model.backbone.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.epochs * steps,
                                                    pct_start=0.15)
    averaged = None
    if config.ema_decay is not None:
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    judged = averaged.module if averaged is not None else model  # the weights validated and kept
    state_path, best_path = workdir / "finetune.state.pt", workdir / "finetune.best.pt"
    start, best, history = 0, (-1.0, 0), []
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        if averaged is not None and state.get("averaged") is not None:
            averaged.load_state_dict(state["averaged"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        start, best, history = state["epoch"], tuple(state["best"]), state["history"]
        progress(f"finetune: resuming after epoch {start}")
    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        drawn = [im for source, n in config.per_source.items() for im in _draw(train.get(source, []), n, rng)]
        order = rng.permutation(len(drawn))
        model.eval()
        model.backbone.train()
        total = 0.0
        for step in range(steps):
            batch = [drawn[i] for i in order[step * config.batch_size: (step + 1) * config.batch_size]]
            if not batch:
                break
            x = torch.from_numpy(np.stack([random_view(im.pixels, rng, config.view)[0] for im in batch]))
            y = torch.tensor([im.label for im in batch])
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(model)
            total += float(loss.detach()) * len(batch)
        probs = predict_images(judged, val, size_px=config.val_size_px)
        scores = source_scores(val, probs, 0.5)
        worst = worst_source(scores)
        entry = {"epoch": epoch + 1, "loss": total / max(len(drawn), 1), "val": scores, "worst": worst,
                 "seconds": time.perf_counter() - t0}
        history.append(entry)
        if worst > best[0]:
            best = (worst, epoch + 1)
            torch.save(judged.state_dict(), best_path)
        torch.save({"model": model.state_dict(), "averaged": averaged.state_dict() if averaged is not None else None,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng, "epoch": epoch + 1, "best": best,
                    "history": history}, state_path)
        progress(f"finetune epoch {epoch + 1}/{config.epochs}: loss {entry['loss']:.4f}, worst source {worst:.3f}, "
                 f"{json.dumps(scores)}, {entry['seconds']:.0f} s")
    if best_path.exists():
        model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True))
    model.eval()
    (workdir / "finetune.history.json").write_text(json.dumps(history, indent=1))
    return {"best_epoch": best[1], "worst_source": best[0], "history": history, "config": asdict(config)}
