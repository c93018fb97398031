"""Training the outline network (:mod:`solarmap.model.outline`) on real pixel truth.

Views: every image in every look, as for the classifier (:mod:`solarmap.training.views`): a
random square at a jittered scale (GSD x 0.7-1.4), turned and mirrored, seen at a coarser GSD and
back (up to 2.5 x: 0.3 m imagery as 0.6-0.75 m NAIP would show it, upsampled again as detection
does), blurred, JPEG-compressed, hazy, noisy, colours moved. Small chips (Bradbury 64 px, PV01 85 px
at 0.3 m) are laid out as mosaics of chips of their own set and split, so a view has context
around it the way a window of a scene has, instead of mirrored copies of one array. Views of images
with panels are centred on a panel pixel half the time: most of a 128 m Bolzano image is roofs and
orchards.

Loss: binary cross-entropy plus soft Dice, per output, on the pixels whose truth is known (NREL's
panel output only outside its footprints). Weights are averaged (EMA) and the average is what is
validated and kept, every epoch checkpointed under the working directory, so rerunning resumes.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from solarmap.model.outline import FOOTPRINT, PANEL, OutlineNet
from solarmap.training.mask_data import MaskedImage
from solarmap.training.views import ViewConfig, _photometric

__all__ = ["OutlineTrainConfig", "OutlineViewConfig", "attach_outline", "evaluate_outline", "outline_loss",
           "outline_view", "predict_images", "train_outline"]


@dataclass(frozen=True)
class OutlineViewConfig:
    size_px: int = 128
    scale: tuple[float, float] = (0.7, 1.4)  # GSD jitter, log-uniform
    coarser: tuple[float, float] = (1.0, 2.5)  # down by this and back up: coarser imagery resampled to 0.3 m
    p_coarser: float = 0.5
    p_blur: float = 0.3
    p_jpeg: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 95)
    p_haze: float = 0.2
    haze: tuple[float, float] = (0.05, 0.35)
    p_on_panel: float = 0.5  # images with panels: the view centred on a panel pixel this often
    photometric: ViewConfig = ViewConfig()


def _stack(image: MaskedImage) -> np.ndarray:
    """Pixels in [0, 1] and the two targets as one float32 (5, h, w) array, cut and resized together."""
    return np.concatenate([image.pixels.astype(np.float32) / 255.0, image.panel[None], image.footprint[None]])


def _mosaic(images: Sequence[MaskedImage], rng: np.random.Generator, side_px: int) -> np.ndarray:
    """Chips of one set laid out edge to edge until the square is at least ``side_px`` wide."""
    cell = max(max(im.pixels.shape[1:]) for im in images)
    count = math.ceil(side_px / cell)
    canvas = np.zeros((5, count * cell, count * cell), np.float32)
    for r in range(count):
        for c in range(count):
            stack = _stack(images[int(rng.integers(len(images)))])
            k = int(rng.integers(0, 4))
            stack = np.rot90(stack, k, axes=(1, 2))
            h, w = stack.shape[1:]
            stack = np.pad(stack, ((0, 0), (0, cell - h), (0, cell - w)), mode="edge")
            canvas[:, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = stack
    return canvas


def _resize(stack: np.ndarray, size_px: int) -> np.ndarray:
    """(c, h, w) -> (c, size, size): area average when shrinking, bilinear when enlarging."""
    t = torch.from_numpy(np.ascontiguousarray(stack))[None]
    if stack.shape[1] > size_px:
        out = F.interpolate(t, size=(size_px, size_px), mode="area")
    else:
        out = F.interpolate(t, size=(size_px, size_px), mode="bilinear", align_corners=False)
    return out[0].numpy()


def outline_view(image: MaskedImage, rng: np.random.Generator, config: OutlineViewConfig = OutlineViewConfig(),
                 same_set: Sequence[MaskedImage] = ()) -> tuple[np.ndarray, np.ndarray]:
    """A random view: float32 pixels (3, size, size) in [0, 1] and targets (2, size, size) (NaN: unknown).

    ``same_set``: images of the same set and split to lay out around a chip smaller than the view."""
    scale = math.exp(rng.uniform(math.log(config.scale[0]), math.log(config.scale[1])))
    crop = max(16, round(config.size_px / scale))
    if min(image.pixels.shape[1:]) < crop:
        stack = _mosaic([image, *same_set] if same_set else [image], rng, crop)
    else:
        stack = _stack(image)
    _, h, w = stack.shape
    crop = min(crop, h, w)
    if image.has_panels and rng.random() < config.p_on_panel:
        rows, cols = np.nonzero(np.nan_to_num(stack[4]) > 0.5)
        if len(rows):
            k = int(rng.integers(len(rows)))
            top = int(np.clip(rows[k] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, h - crop))
            left = int(np.clip(cols[k] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, w - crop))
        else:
            top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    else:
        top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    stack = _resize(stack[:, top:top + crop, left:left + crop], config.size_px)
    k = int(rng.integers(0, 8))
    stack = np.rot90(stack, k % 4, axes=(1, 2))
    if k >= 4:
        stack = stack[:, :, ::-1]
    pixels, targets = _look(np.ascontiguousarray(stack[:3]), rng, config), np.ascontiguousarray(stack[3:])
    return pixels, targets


def _look(x: np.ndarray, rng: np.random.Generator, config: OutlineViewConfig) -> np.ndarray:
    """A source's look on float (3, s, s) pixels: coarser GSD and back, blur, JPEG, haze, colours, noise."""
    from PIL import Image

    size = x.shape[1]
    if rng.random() < config.p_coarser:
        small = max(8, round(size / rng.uniform(*config.coarser)))
        x = _resize(_resize(x, small), size)
    if rng.random() < config.p_blur:
        sigma = rng.uniform(0.3, 1.2)
        x = ndimage.gaussian_filter(x, sigma=(0, sigma, sigma))
    if rng.random() < config.p_jpeg:
        buffer = io.BytesIO()
        rgb = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="JPEG",
                                                         quality=int(rng.integers(*config.jpeg_quality)))
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            x = np.asarray(decoded.convert("RGB")).transpose(2, 0, 1).astype(np.float32) / 255.0
    if rng.random() < config.p_haze:
        amount = rng.uniform(*config.haze)
        x = x * (1 - amount) + amount * rng.uniform(0.7, 0.95)
    return _photometric(np.clip(x, 0, 1).astype(np.float32), rng, config.photometric)


def outline_loss(logits: torch.Tensor, targets: torch.Tensor, weights: tuple[float, float] = (1.0, 0.5)) -> torch.Tensor:
    """BCE + soft Dice per output over the known pixels (targets NaN elsewhere); ``weights`` per output."""
    total = logits.new_zeros(())
    for channel, weight in enumerate(weights):
        target = targets[:, channel]
        known = ~torch.isnan(target)
        if not known.any():
            continue
        logit, truth = logits[:, channel][known], target[known]
        bce = F.binary_cross_entropy_with_logits(logit, truth)
        prob = torch.sigmoid(logit)
        dice = 1 - (2 * (prob * truth).sum() + 1) / (prob.sum() + truth.sum() + 1)
        total = total + weight * (bce + dice)
    return total


@dataclass(frozen=True)
class OutlineTrainConfig:
    epochs: int = 12
    views_per_epoch: dict = field(default_factory=lambda: {
        "pv01": 250, "bradbury": 400, "bolzano": 450, "nrel": 350, "ucmerced": 150, "oam": 100, "fresno": 100})
    batch_size: int = 16
    lr: float = 1e-3
    encoder_lr: float = 3e-4
    weight_decay: float = 1e-4
    ema_decay: float = 0.99
    seed: int = 0
    view: OutlineViewConfig = OutlineViewConfig()


def _epoch_views(train: list[MaskedImage], config: OutlineTrainConfig, rng: np.random.Generator):
    """(image, same-set images) pairs for one epoch, in a random order: a fixed number per source."""
    by_source: dict[str, list[MaskedImage]] = {}
    for image in train:
        by_source.setdefault(image.source, []).append(image)
    order = []
    for source, count in config.views_per_epoch.items():
        images = by_source.get(source, [])
        if images:
            order += [(images[int(i)], images) for i in rng.integers(0, len(images), count)]
    rng.shuffle(order)
    return order


def train_outline(net: OutlineNet, train: list[MaskedImage], *, workdir: str | Path,
                  config: OutlineTrainConfig = OutlineTrainConfig(),
                  validate: Callable[[OutlineNet, int], dict] | None = None,
                  log: Callable[[str], None] = print) -> list[dict]:
    """Train ``net`` in place; returns the history (one dict per epoch, with ``validate``'s result).

    Every epoch writes ``outline-last.pt`` (weights, EMA, optimiser, history) and the EMA weights
    of that epoch as ``outline-epoch-N.pt`` under ``workdir``: rerunning continues after the last
    finished epoch. At the end ``net`` holds the last epoch's EMA weights."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    encoder = [p for name, p in net.named_parameters() if name.startswith("net.encoder.")]
    rest = [p for name, p in net.named_parameters() if not name.startswith("net.encoder.")]
    optimiser = torch.optim.AdamW([{"params": encoder, "lr": config.encoder_lr}, {"params": rest, "lr": config.lr}],
                                  weight_decay=config.weight_decay)
    ema = {k: v.detach().clone() for k, v in net.state_dict().items()}
    steps_per_epoch = math.ceil(sum(config.views_per_epoch.values()) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    history: list[dict] = []
    last = workdir / "outline-last.pt"
    if last.exists():
        saved = torch.load(last, map_location="cpu", weights_only=False)
        net.load_state_dict(saved["weights"])
        ema = saved["ema"]
        optimiser.load_state_dict(saved["optimiser"])
        history = saved["history"]
        log(f"outline: resuming after epoch {len(history)}")
    base_lrs = [group["lr"] for group in optimiser.param_groups]
    for epoch in range(len(history) + 1, config.epochs + 1):
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 1000 + epoch)
        views = _epoch_views(train, config, rng)
        net.train()
        t0, losses = time.perf_counter(), []
        for step, start in enumerate(range(0, len(views), config.batch_size)):
            done = (epoch - 1) * steps_per_epoch + step
            for group, base in zip(optimiser.param_groups, base_lrs):  # cosine decay with a short warm-up
                warm = min(1.0, (done + 1) / 50)
                group["lr"] = base * warm * 0.5 * (1 + math.cos(math.pi * done / total_steps))
            batch = [outline_view(image, rng, config.view, same) for image, same in views[start:start + config.batch_size]]
            pixels = torch.from_numpy(np.stack([b[0] for b in batch]))
            targets = torch.from_numpy(np.stack([b[1] for b in batch]))
            loss = outline_loss(net(pixels), targets)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(config.ema_decay).add_(v.detach(), alpha=1 - config.ema_decay)
                    else:
                        ema[k].copy_(v)
        record = {"epoch": epoch, "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - t0, 1)}
        weights = {k: v.clone() for k, v in net.state_dict().items()}
        net.load_state_dict(ema)
        net.eval()
        torch.save(ema, workdir / f"outline-epoch-{epoch}.pt")
        if validate is not None:
            record["val"] = validate(net, epoch)
        history.append(record)
        tmp = workdir / ".outline-last.pt.tmp"
        torch.save({"weights": weights, "ema": ema, "optimiser": optimiser.state_dict(), "history": history}, tmp)
        tmp.replace(last)
        (workdir / "outline-history.json").write_text(json.dumps(history, indent=1))
        log(f"outline epoch {epoch}/{config.epochs}: loss {record['loss']:.4f} ({record['seconds']:.0f} s)"
            + (f" val {json.dumps(record['val'])}" if "val" in record else ""))
        net.load_state_dict(weights)
    net.load_state_dict(ema)
    return history


# -- validation ---------------------------------------------------------------------------------

@torch.no_grad()
def predict_images(net: OutlineNet, images: Sequence[MaskedImage]) -> list[np.ndarray]:
    """Panel and footprint probabilities (2, h, w) of whole images, each in one pass."""
    net.eval()
    out = []
    for image in images:
        x = torch.from_numpy(image.pixels.astype(np.float32) / 255.0)[None]
        out.append(net.probabilities(x)[0].numpy())
    return out


def _truth_arrays(image: MaskedImage) -> tuple[np.ndarray, np.ndarray]:
    """The image's truth arrays (NREL: footprints, else modules) as 8-connected labels and the size
    of each in pixels: what arrays found are counted on, whatever the threshold."""
    truth = np.nan_to_num(image.footprint if image.source == "nrel" else image.panel) >= 0.5
    labels, count = ndimage.label(truth, structure=np.ones((3, 3)))
    return labels, np.bincount(labels.ravel(), minlength=count + 1)[1:]


def evaluate_outline(probabilities: Sequence[np.ndarray], images: Sequence[MaskedImage], *,
                     thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7), gsd_m: float = 0.3) -> dict:
    """Per source and threshold: pixel IoU and area drawn / true on each output where the truth is
    known (pixels pooled over the source's images), arrays found (small under 20 m², large), share
    of pixels drawn on images without panels, and on Bolzano the area drawn on roofs without panels
    as a fraction of the panel area."""
    small_px = 20.0 / gsd_m ** 2
    arrays = [_truth_arrays(image) for image in images]
    results: dict = {}
    for t in thresholds:
        per: dict = {}
        for prob, image, (labels, sizes) in zip(probabilities, images, arrays):
            s = per.setdefault(image.source, {"inter": [0.0, 0.0], "union": [0.0, 0.0], "drawn": [0.0, 0.0],
                                              "true": [0.0, 0.0], "arrays": [0, 0, 0, 0], "neg_px": 0,
                                              "neg_drawn": 0, "roof_drawn": 0.0})
            for channel, truth_map in ((PANEL, image.panel), (FOOTPRINT, image.footprint)):
                known = ~np.isnan(truth_map)
                truth = truth_map[known] >= 0.5
                drawn = prob[channel][known] >= t
                s["inter"][channel] += float((truth & drawn).sum())
                s["union"][channel] += float((truth | drawn).sum())
                s["drawn"][channel] += float(drawn.sum())
                s["true"][channel] += float(truth.sum())
            drawn = prob[FOOTPRINT if image.source == "nrel" else PANEL] >= t
            if len(sizes):
                hits = np.bincount(labels.ravel(), weights=drawn.ravel(), minlength=len(sizes) + 1)[1:]
                found, small = hits >= 0.2 * sizes, sizes < small_px  # a fifth of the array drawn
                counts = (small.sum(), (found & small).sum(), (~small).sum(), (found & ~small).sum())
                s["arrays"] = [total + int(n) for total, n in zip(s["arrays"], counts)]
            else:
                s["neg_px"] += drawn.size
                s["neg_drawn"] += int(drawn.sum())
            if image.roof is not None:
                s["roof_drawn"] += float((drawn & (image.roof >= 0.5)).sum())
        summary = {}
        for source, s in per.items():
            row = {}
            for channel, name in ((PANEL, "panel"), (FOOTPRINT, "footprint")):
                if s["true"][channel]:
                    row[f"{name}_iou"] = round(s["inter"][channel] / max(s["union"][channel], 1), 3)
                    row[f"{name}_area"] = round(s["drawn"][channel] / s["true"][channel], 3)
            a, f, A, F_ = s["arrays"]
            if a:
                row["small_found"] = round(f / a, 3)
            if A:
                row["large_found"] = round(F_ / A, 3)
            if s["neg_px"]:
                row["negative_drawn"] = round(s["neg_drawn"] / s["neg_px"], 5)
            if source == "bolzano" and s["true"][PANEL]:
                row["roof_drawn"] = round(s["roof_drawn"] / s["true"][PANEL], 3)
            summary[source] = row
        results[f"{t:g}"] = summary
    return results


def attach_outline(model, outline: OutlineNet, *, threshold: float, make_default: bool = True):
    """``model`` (a SolarNet: its classifier keeps gating tiles) with ``outline`` as its outline
    network, its mask threshold ``threshold`` and, with ``make_default``, ``outline`` as the method
    ``detect`` uses unless told."""
    from dataclasses import replace

    from solarmap.model.network import SolarNet

    spec = {"encoder": outline.spec.encoder, "decoder_channels": tuple(outline.spec.decoder_channels)}
    config = replace(model.config, outline=spec, mask_rules={**model.config.mask_rules, "outline": (threshold, None)},
                     default_cam_method="outline" if make_default else model.config.default_cam_method)
    net = SolarNet(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("outline.")}
    state.update({f"outline.{k}": v for k, v in outline.state_dict().items()})
    net.load_state_dict(state)
    return net.eval()
