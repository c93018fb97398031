"""Training data: labelled tiles at the model's GSD, from chips, georeferenced scenes with truth
polygons, and synthetic towns; deterministic splits.

Image-level labels only. Chips (not georeferenced) come with their GSD and are resampled to the
model's, as detection resamples rasters; a scene tile is positive when it holds at least
``min_panel_m2`` of panel, negative when it holds none, and left out in between.
"""

from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import geopandas as gpd
import numpy as np
import torch
from rasterio.features import rasterize

from solarmap.errors import InputError
from solarmap.geo.raster import SceneReader, read_image
from solarmap.geo.tiling import TileSpec, iter_tiles
from solarmap.model.network import ModelConfig
from solarmap.model.scorer import fit_square, resample
from solarmap.training.synth import SynthConfig, render_town, write_town

__all__ = ["Sample", "fit_tile", "load_chips", "positive_windows", "scene_samples", "split_samples",
           "stack_samples", "synthetic_samples", "town_paths"]


@dataclass(frozen=True)
class Sample:
    """One training tile: float32 (3, size, size) in [0, 1], its label and where it came from."""

    pixels: np.ndarray
    label: int
    source: str
    key: str


def fit_tile(pixels: np.ndarray, size_px: int) -> np.ndarray:
    """Centre-crop or reflect-pad (3, h, w) to float32 (3, size, size)."""
    return np.ascontiguousarray(fit_square(pixels, size_px, edge_mode="edge"), dtype=np.float32)


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
        pixels = fit_tile(resample(read_image(path), factor), model.train_tile_px)
        samples.append(Sample(pixels=pixels, label=int(label > 0), source=source.name, key=f"{source.name}:{key}"))
    return samples


def scene_samples(scene: str | Path, truth: str | Path, *, model: ModelConfig, min_panel_m2: float = 2.0,
                  stride_px: int | None = None, context_px: int = 0) -> list[Sample]:
    """Tiles of a georeferenced scene at the model's GSD, labelled from truth polygons.

    With ``context_px`` each sample is the tile's window (tile + context on every side); the label
    still says whether the tile in the middle holds panels.
    """
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
        shapes = [(g, 1) for g in truth_frame.geometry if g is not None and not g.is_empty]
        # the truth rasterized once on the scene's grid, each tile's panel pixels a slice of it (one
        # rasterize per tile costs ~40 ms with 5,000 polygons: half an hour on a 20k px scene)
        truth_mask = rasterize(shapes, out_shape=(grid.height, grid.width), transform=grid.transform,
                               dtype=np.uint8) if shapes else None
        for tile in iter_tiles(grid, spec):
            if tile.valid.width < spec.window_px or tile.valid.height < spec.window_px:
                continue  # only whole windows for training
            image = reader.read_tile(tile)
            if image.is_empty:
                continue
            row, col = int(tile.window.row_off) + context_px, int(tile.window.col_off) + context_px
            panel_px = int(truth_mask[row: row + size, col: col + size].sum()) if truth_mask is not None else 0
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


def town_paths(out_dir: str | Path, *, seeds: Sequence[int], size_px: int = 1024,
               gsd_m: float = 0.3) -> list[tuple[str, str]]:
    """(scene.tif, truth.gpkg) of synthetic towns ``out_dir/town_SEED``, rendered where missing."""
    pairs = []
    for seed in seeds:
        town_dir = Path(out_dir) / f"town_{seed}"
        if not (town_dir / "truth.gpkg").exists():
            write_town(render_town(SynthConfig(size_px=size_px, gsd_m=gsd_m, seed=seed)), town_dir, overwrite=True)
        pairs.append((str(town_dir / "scene.tif"), str(town_dir / "truth.gpkg")))
    return pairs


def synthetic_samples(out_dir: str | Path, *, seeds: Sequence[int], size_px: int, model: ModelConfig,
                      min_panel_m2: float = 2.0) -> list[Sample]:
    """Render (or reuse) synthetic towns under ``out_dir`` and cut them into labelled tiles."""
    return [sample for scene, truth in town_paths(out_dir, seeds=seeds, size_px=size_px, gsd_m=model.gsd_m)
            for sample in scene_samples(scene, truth, model=model, min_panel_m2=min_panel_m2)]


def split_of(key: str, *, val_fraction: float, test_fraction: float) -> str:
    """'train', 'val' or 'test' from a hash of ``key`` (stable as data grow)."""
    u = (zlib.crc32(key.encode()) % 10_000) / 10_000
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def split_samples(samples: Sequence[Sample], *, val_fraction: float, test_fraction: float
                  ) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Deterministic train/val/test split by a hash of each sample's key (stable as data grow)."""
    parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for s in samples:
        parts[split_of(s.key, val_fraction=val_fraction, test_fraction=test_fraction)].append(s)
    return parts["train"], parts["val"], parts["test"]


def stack_samples(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (n, 3, size, size) and labels (n,) as tensors."""
    if not samples:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long)
    return (torch.from_numpy(np.stack([s.pixels for s in samples])),
            torch.tensor([s.label for s in samples], dtype=torch.long))
