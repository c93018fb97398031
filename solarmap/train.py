"""Greedy layerwise training: classifier, then branch level 1, then branch level 2.

Each stage trains only its own parameters; everything else is frozen (``requires_grad`` off and
batch-norm statistics fixed), so earlier stages are bit-identical afterwards. Because the backbone
is frozen during the branch stages, its ``Mixed_5d`` features are computed once per training tile
(and per rot90/flip variant) and cached: a branch epoch then costs only the branch convolutions.

Image-level labels only. Sources: folders/CSVs of labelled chips (not georeferenced; their GSD is
given) and georeferenced scenes with truth polygons (a tile is positive when it holds at least
``min_panel_m2`` of panel, negative when it holds none, and left out in between).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from solarmap.errors import InputError, ModelError, OptionError
from solarmap.model import ModelConfig, SolarNet

log = logging.getLogger(__name__)

STAGES = ("classifier", "branch1", "branch2")
# optional, after the branch: fine-tune the classifier above Mixed_5d (Mixed_6a..fc) on cached
# Mixed_5d features; the branch reads Mixed_5d, so its CAM is untouched
EXTRA_STAGES = ("classifier-top",)
TOP = -1  # train_stage's level for "classifier-top" (0 is the classifier, 1 and 2 the branch levels)
# CAM thresholds every mask-rule sweep tries (branch calibration, per-method rules, comparisons)
MASK_THRESHOLDS = tuple(np.round(np.arange(0.3, 0.95, 0.1), 2))


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Sample:
    """One training tile: float32 (3, size, size) in [0, 1], its label and where it came from."""

    pixels: np.ndarray
    label: int
    source: str
    key: str


def _resample_to(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Resize (3, h, w) by ``factor`` (area average when shrinking, bilinear when enlarging)."""
    if abs(factor - 1.0) < 1e-6:
        return pixels
    t = torch.from_numpy(pixels)[None]
    size = (max(1, round(pixels.shape[1] * factor)), max(1, round(pixels.shape[2] * factor)))
    mode = "area" if factor < 1 else "bilinear"
    out = F.interpolate(t, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return out[0].numpy()


def fit_tile(pixels: np.ndarray, size_px: int) -> np.ndarray:
    """Centre-crop or reflect-pad (3, h, w) to (3, size, size)."""
    _, h, w = pixels.shape
    if h > size_px:
        top = (h - size_px) // 2
        pixels = pixels[:, top: top + size_px]
    if w > size_px:
        left = (w - size_px) // 2
        pixels = pixels[:, :, left: left + size_px]
    _, h, w = pixels.shape
    if h < size_px or w < size_px:
        ph, pw = size_px - h, size_px - w
        mode = "reflect" if ph < h and pw < w else "edge"
        pixels = np.pad(pixels, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode=mode)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """Any raster image (georeferenced or not) as float32 (3, h, w) in [0, 1]."""
    import rasterio

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            src = rasterio.open(path)
        with src:
            if src.count < 3:
                raise InputError(f"{path} has {src.count} band(s); RGB images are needed")
            data = src.read([1, 2, 3])
    except rasterio.errors.RasterioIOError:
        raise InputError(f"cannot read image {path}") from None
    scale = 255.0 if data.dtype == np.uint8 else max(float(np.percentile(data, 99.8)), 1.0)
    return np.clip(data.astype(np.float32) / scale, 0, 1)


def load_chips(source: str | Path, *, chip_gsd_m: float, model: ModelConfig) -> list[Sample]:
    """Labelled chips: a folder with ``labels.csv`` (id,label) and ``chips/ID.tif``, or a CSV of path,label."""
    source = Path(source)
    rows: list[tuple[Path, int, str]] = []
    if source.is_dir():
        table = source / "labels.csv"
        if not table.exists():
            raise InputError(f"{source} has no labels.csv (expected columns id,label and chips/ID.tif)")
        with open(table, newline="") as fh:
            for row in csv.DictReader(fh):
                rows.append((source / "chips" / f"{row['id']}.tif", int(row["label"]), row["id"]))
    elif source.suffix.lower() == ".csv":
        with open(source, newline="") as fh:
            for row in csv.DictReader(fh):
                path = Path(row["path"])
                rows.append((path if path.is_absolute() else source.parent / path, int(row["label"]), row["path"]))
    else:
        raise InputError(f"chip source must be a folder with labels.csv or a CSV file: {source}")
    factor = chip_gsd_m / model.gsd_m
    samples = []
    for path, label, key in rows:
        pixels = fit_tile(_resample_to(read_image(path), factor), model.train_tile_px)
        samples.append(Sample(pixels=pixels, label=int(label > 0), source=source.name, key=f"{source.name}:{key}"))
    return samples


def scene_samples(scene: str | Path, truth: str | Path, *, model: ModelConfig, min_panel_m2: float = 2.0,
                  stride_px: int | None = None, context_px: int = 0) -> list[Sample]:
    """Tiles of a georeferenced scene at the model's GSD, labelled from truth polygons.

    With ``context_px`` each sample is the tile's window (tile + context on every side); the label
    still says whether the tile in the middle holds panels.
    """
    import geopandas as gpd
    from affine import Affine
    from rasterio.features import rasterize

    from solarmap.io import SceneReader
    from solarmap.tiling import TileSpec, iter_tiles

    size = model.train_tile_px
    spec = TileSpec(size, size - (stride_px or size), context_px)
    truth_frame = gpd.read_file(truth, layer="panels")
    samples = []
    with SceneReader(scene, gsd_m=model.gsd_m) as reader:
        grid = reader.info.grid
        if truth_frame.crs is not None and not truth_frame.crs.equals(grid.crs.to_wkt()):
            truth_frame = truth_frame.to_crs(grid.crs.to_wkt())
        gx, gy = grid.ground_resolution_m()
        pixel_m2 = gx * gy
        shapes = [(g, 1) for g in truth_frame.geometry if g is not None]
        for tile in iter_tiles(grid, spec):
            if tile.valid.width < spec.window_px or tile.valid.height < spec.window_px:
                continue  # only whole windows for training
            image = reader.read_tile(tile)
            if image.is_empty:
                continue
            centre = tile.transform @ Affine.translation(context_px, context_px)
            panel_px = rasterize(shapes, out_shape=(size, size), transform=centre).sum() if shapes else 0
            panel_m2 = panel_px * pixel_m2
            if 0 < panel_m2 < min_panel_m2:
                continue  # ambiguous: a sliver of an array
            samples.append(Sample(pixels=image.pixels, label=int(panel_m2 > 0), source=Path(scene).parent.name,
                                  key=f"{Path(scene).parent.name}:{tile.tile_row}:{tile.tile_col}"))
    return samples


def positive_windows(pairs: Sequence[tuple[str | Path, str | Path]], *, model: ModelConfig) -> list[Sample]:
    """The windows (tile + the model's context) of (scene, truth) pairs whose tile holds panels:
    what the pseudo-seg head and the CAM calibrations learn or measure on."""
    return [w for scene, truth in pairs
            for w in scene_samples(scene, truth, model=model, context_px=model.context_px) if w.label]


def synthetic_samples(out_dir: str | Path, *, seeds: Sequence[int], size_px: int, model: ModelConfig,
                      min_panel_m2: float = 2.0) -> list[Sample]:
    """Render (or reuse) synthetic towns under ``out_dir`` and cut them into labelled tiles."""
    from solarmap.synth import SynthConfig, render_town, write_town

    samples = []
    for seed in seeds:
        town_dir = Path(out_dir) / f"town_{seed}"
        if not (town_dir / "truth.gpkg").exists():
            write_town(render_town(SynthConfig(size_px=size_px, gsd_m=model.gsd_m, seed=seed)), town_dir,
                       overwrite=True)
        samples += scene_samples(town_dir / "scene.tif", town_dir / "truth.gpkg", model=model,
                                 min_panel_m2=min_panel_m2)
    return samples


def split_samples(samples: Sequence[Sample], *, val_fraction: float, test_fraction: float
                  ) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Deterministic train/val/test split by a hash of each sample's key (stable as data grow)."""
    train, val, test = [], [], []
    for s in samples:
        u = (zlib.crc32(s.key.encode()) % 10_000) / 10_000
        (test if u < test_fraction else val if u < test_fraction + val_fraction else train).append(s)
    return train, val, test


# ---------------------------------------------------------------------------------------------
# Metrics, augmentation


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


# ---------------------------------------------------------------------------------------------
# Training


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
        if self.stage not in STAGES + EXTRA_STAGES:
            raise OptionError(f"stage must be one of {', '.join(STAGES + EXTRA_STAGES)}, got {self.stage!r}")
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


def stack_samples(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (n, 3, size, size) and labels (n,) as tensors."""
    if not samples:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long)
    return (torch.from_numpy(np.stack([s.pixels for s in samples])),
            torch.tensor([s.label for s in samples], dtype=torch.long))


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
        f5d = model.mixed_5d(pixels[i: i + batch_size])
        logits = model.classify_7c(model.mixed_7c(f5d)) if level is None else model.branch_logits(f5d, level)
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
    level = {"classifier": 0, "branch1": 1, "branch2": 2, "classifier-top": TOP}[config.stage]
    if level > 0 and model.config.branch_levels < level - 1:
        raise OptionError(f"stage {config.stage} needs branch level {level - 1} trained first")
    x_train, y_train = stack_samples(train)
    x_val, y_val = stack_samples(val)
    if len(x_train) == 0:
        raise InputError("no training samples")
    if level == 0:
        params = freeze_all_but(model, [model.backbone])
        inputs = x_train
    elif level == TOP:
        params = freeze_all_but(model, _top_modules(model))
        inputs = _cached_features(model, x_train, config, workdir, progress)
        y_train = y_train.repeat(config.augmentations)
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
            elif level == TOP:
                logits = model.classify_7c(model.mixed_7c(inputs[idx].float()))
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


def _top_modules(model: SolarNet) -> list[torch.nn.Module]:
    """The classifier above Mixed_5d: what "classifier-top" trains."""
    b = model.backbone
    return [b.Mixed_6a, b.Mixed_6b, b.Mixed_6c, b.Mixed_6d, b.Mixed_6e, b.Mixed_7a, b.Mixed_7b, b.Mixed_7c, b.fc]


def _set_train_mode(model: SolarNet, level: int) -> None:
    """Only the stage's own modules in train mode: frozen batch-norm statistics must not move."""
    model.eval()
    if level == 0:
        model.backbone.train()
    elif level == TOP:
        for module in _top_modules(model):
            module.train()
    else:
        model.branch[level - 1].train()
        model.branch_heads[level - 1].train()


@torch.inference_mode()
def _cached_features(model: SolarNet, pixels: torch.Tensor, config: TrainConfig, workdir: Path,
                     progress: ProgressFn) -> torch.Tensor:
    """Mixed_5d features (fp16) of every tile under ``augmentations`` dihedral variants, cached on disk.

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
            chunks.append(model.mixed_5d(dihedral(pixels[i: i + 64], k)).half())
        progress(f"caching Mixed_5d features: variant {k + 1}/{config.augmentations} "
                 f"({time.perf_counter() - t0:.0f} s)")
    features = torch.cat(chunks)
    torch.save(features, path)
    return features


def _tensor_digest(tensors: Sequence[torch.Tensor]) -> str:
    h = 0
    for t in tensors:
        h = zlib.crc32(t.detach().contiguous().cpu().numpy().tobytes(), h)
    return f"{h:08x}"


def score_samples(model: SolarNet, samples: Sequence[Sample], *, threshold: float | None = None) -> Scores:
    """Precision/recall of the main classifier on labelled samples (default: the model's threshold)."""
    x, y = stack_samples(samples)
    cut = model.config.decision_threshold if threshold is None else threshold
    return binary_scores(y.numpy(), predict_probabilities(model, x) >= cut)


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
        f5d = model.mixed_5d(positives[i: i + 64])
        if model.config.branch_levels:
            branch_peaks.append(model.branch_cam(f5d).flatten(1).max(dim=1).values)
        gap_peaks.append(model.gap_cam(model.mixed_7c(f5d)).flatten(1).max(dim=1).values)
    changes = {"decision_threshold": decision}
    if branch_peaks:
        changes["cam_scale"] = max(float(torch.cat(branch_peaks).median()), 1e-6)
    if gap_peaks:
        changes["gap_cam_scale"] = max(float(torch.cat(gap_peaks).median()), 1e-6)
    model.config = replace(model.config, **changes)
    return changes


def calibrate_cam_shifts(model: SolarNet, windows: Sequence[Sample], *, max_windows: int = 128) -> dict:
    """Measure each CAM method's response offset on positive windows (tiles with context; image-level
    labels only, see :func:`solarmap.cam.estimate_cam_shift`) and store the corrections in
    ``model.config.cam_shifts``."""
    from solarmap.cam import CamMethod, ModelScorer, estimate_cam_shift

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
    from solarmap.cam import ModelScorer, align_to_window

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
        keys = [zlib.crc32(p.tobytes()) for p in pixels]
        todo = [i for i, k in enumerate(keys) if k not in self._memo]
        if todo:
            probs, maps = self.scorer(pixels[todo])
            for i, p, m in zip(todo, probs, maps):
                self._memo[keys[i]] = (p, m)
        return (np.array([self._memo[k][0] for k in keys]), np.stack([self._memo[k][1] for k in keys]))


def sweep_detect_configs(scorer, configs: dict, scenes: Sequence[tuple[str, object]], *,
                         tile_size_px: int) -> dict:
    """Detect on validation scenes (scene, truth path or frame) under every config of ``configs``
    (key -> DetectConfig), the network run once per tile; mean metrics per key."""
    import geopandas as gpd

    from solarmap.evaluate import evaluate
    from solarmap.pipeline import detect_scene

    cached = _CachingScorer(scorer)
    truths = [gpd.read_file(truth, layer="panels") if isinstance(truth, (str, Path)) else truth
              for _, truth in scenes]
    sweep = {}
    for key, config in configs.items():
        results = [evaluate(detect_scene(scene, scorer=cached, config=config)[0], truth, scene,
                            tile_size_px=tile_size_px) for (scene, _), truth in zip(scenes, truths)]
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


def sweep_mask_rules(scorer, model_config: ModelConfig, scenes: Sequence[tuple[str, object]], *,
                     thresholds: Sequence[float], peak_fractions: Sequence[float | None],
                     min_tile_recall: float = 0.9) -> tuple[float, float | None, dict]:
    """Every mask rule (CAM threshold, peak fraction for weak tiles) on validation scenes, and the
    best one (:func:`best_rule`). Returns (threshold, fraction, sweep)."""
    from solarmap.pipeline import DetectConfig

    method = getattr(getattr(scorer, "method", None), "value", "branch")  # as `detect --cam-method` would run
    configs = {(float(t), f): DetectConfig.for_model(model_config, method=method, mask_threshold=float(t),
                                                     mask_peak_fraction=f)
               for t in thresholds for f in peak_fractions}
    sweep = sweep_detect_configs(scorer, configs, scenes, tile_size_px=model_config.tile_size_px)
    threshold, fraction = best_rule(sweep, min_tile_recall=min_tile_recall)
    return threshold, fraction, sweep


def fit_colour_prior(model: SolarNet, samples: Sequence[Sample]) -> dict:
    """Learn the panel-colour table of mask refinement (solarmap.refine) from labelled training
    tiles and store it in ``model.config``; image-level labels are all it needs."""
    from solarmap.refine import colour_histograms, colour_log_ratio

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
    from solarmap.cam import ModelScorer
    from solarmap.pipeline import DetectConfig
    from solarmap.refine import ColourRefine

    if model.config.colour_prior is None:
        raise ModelError("calibrating the refinement needs the model's colour prior first")
    rules = {(g, m, s): ColourRefine(grow_px=g, min_log_ratio=m, smooth_px=s)
             for g in grows_px for m in min_log_ratios for s in smooths_px}
    configs = {None: DetectConfig.for_model(model.config, refine=None),
               **{key: DetectConfig.for_model(model.config, refine=rule) for key, rule in rules.items()}}
    sweep = sweep_detect_configs(ModelScorer(model), configs, scenes, tile_size_px=model.config.tile_size_px)
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
    from solarmap.cam import ModelScorer

    threshold, fraction, sweep = sweep_mask_rules(ModelScorer(model), model.config, scenes, thresholds=thresholds,
                                                  peak_fractions=peak_fractions, min_tile_recall=min_tile_recall)
    model.config = replace(model.config, cam_threshold=threshold, cam_peak_fraction=fraction)
    return {"cam_threshold": threshold, "cam_peak_fraction": fraction,
            "sweep": {f"{t}/{f}": v for (t, f), v in sweep.items()}}
