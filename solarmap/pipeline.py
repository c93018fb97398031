"""scene -> tiles -> batches -> score maps -> polygons -> GeoPackage: the tool behind the CLI.

The scoring step is a plug-in (:class:`Scorer`): anything that maps a batch of tiles to a
per-tile probability and a per-tile score map. The CNN + CAM scorer lives with the model; a
:class:`SpectralBaseline` (no learning, dark-bluish pixels) exists so the geometry pipeline can be
tested and benchmarked on its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from solarmap import __version__
from solarmap.errors import OptionError
from solarmap.io import DEFAULT_BANDS, GeoPackageWriter, SceneReader, TileImage, check_output_path
from solarmap.style import panels_qml
from solarmap.tiling import TileSpec, iter_tiles, tile_grid_shape
from solarmap.vectorize import SeamMerger, core_pieces, panels_frame, upsample_scores

log = logging.getLogger(__name__)


class Scorer(Protocol):
    """Scores a batch of tiles: float32 (batch, 3, size, size) in [0, 1] -> (probabilities, maps).

    ``maps`` is (batch, h, w) at any resolution (e.g. 35 x 35 CAMs); it is resized to the tile and
    compared with the mask threshold, so it must already be on the scale that threshold expects.
    """

    name: str

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class SpectralBaseline:
    """Not a detector: marks dark, bluish pixels. For testing and benchmarking the geometry only.

    The map is 1 where brightness < ``max_value`` and blue exceeds red by ``min_blue_excess``; the
    tile probability is the fraction of such pixels, scaled so 1 % of the tile gives 0.5.
    """

    name: str = "spectral-baseline"
    max_value: float = 0.25
    min_blue_excess: float = 0.03

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        red, blue = pixels[:, 0], pixels[:, 2]
        value = pixels.max(axis=1)
        maps = ((value < self.max_value) & (blue - red > self.min_blue_excess)).astype(np.float32)
        fraction = maps.mean(axis=(1, 2))
        probs = np.clip(fraction * 50.0, 0.0, 1.0)
        return probs.astype(np.float32), maps


@dataclass(frozen=True)
class DetectConfig:
    """Everything that decides a detection result, recorded in the output's metadata."""

    tile_size_px: int = 299
    overlap_px: int = 32
    gsd_m: float | None = None
    bands: tuple[int, ...] = DEFAULT_BANDS
    batch_size: int = 16
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    min_area_m2: float = 1.0
    simplify_m: float = 0.0

    def __post_init__(self) -> None:
        TileSpec(self.tile_size_px, self.overlap_px)  # validates sizes
        if self.batch_size <= 0:
            raise OptionError(f"batch size must be positive, got {self.batch_size}")
        for name in ("score_threshold", "mask_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise OptionError(f"{name.replace('_', ' ')} must be between 0 and 1, got {value}")
        if self.min_area_m2 < 0 or self.simplify_m < 0:
            raise OptionError("minimum area and simplification tolerance must not be negative")

    @property
    def tile_spec(self) -> TileSpec:
        return TileSpec(self.tile_size_px, self.overlap_px)


@dataclass
class DetectStats:
    """What happened in a run: counts and seconds per stage."""

    tiles_total: int = 0
    tiles_read: int = 0
    tiles_skipped_nodata: int = 0
    tiles_positive: int = 0
    polygons: int = 0
    area_m2: float = 0.0
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=lambda: {"read": 0.0, "model": 0.0, "vectorize": 0.0,
                                                         "write": 0.0})

    def as_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[DetectStats], None]


def _batches(images: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in images:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


CHUNK_POLYGONS = 2000


def iter_panel_frames(path: str | Path, *, scorer: Scorer, config: DetectConfig, stats: DetectStats,
                      progress: ProgressCallback | None = None, chunk_polygons: int = CHUNK_POLYGONS):
    """Run the pipeline over one raster, yielding GeoDataFrames of finished panels as they complete.

    Tiles are read, scored and vectorized in row-major order; memory is bounded by one batch of
    tiles, the polygons along one row of tile seams and one chunk of finished polygons. The last
    frame yielded may be empty; ids continue across frames. ``stats`` is filled in as it goes.
    """
    started = time.perf_counter()
    spec = config.tile_spec
    with SceneReader(path, bands=config.bands, gsd_m=config.gsd_m) as reader:
        grid = reader.info.grid
        rows, cols = tile_grid_shape(grid, spec)
        stats.tiles_total = rows * cols
        merger = SeamMerger((grid.height, grid.width))
        gsd_x, gsd_y = grid.ground_resolution_m()
        next_id = 1

        def to_frame(pieces):
            nonlocal next_id
            t0 = time.perf_counter()
            frame = panels_frame(pieces, grid_transform=grid.transform, crs=grid.crs,
                                 source=Path(str(path)).name, min_area_m2=config.min_area_m2,
                                 simplify_px=config.simplify_m / ((gsd_x + gsd_y) / 2), first_id=next_id)
            next_id += len(frame)
            stats.polygons += len(frame)
            stats.area_m2 += float(frame["area_m2"].sum())
            stats.stage_seconds["vectorize"] += time.perf_counter() - t0
            return frame

        def read_all() -> Iterator[TileImage]:
            for tile in iter_tiles(grid, spec):
                t0 = time.perf_counter()
                image = reader.read_tile(tile)
                stats.stage_seconds["read"] += time.perf_counter() - t0
                yield image

        finished = []
        for batch in _batches(read_all(), config.batch_size):
            finished.extend(_process_batch(batch, scorer, config, merger, stats))
            if len(finished) >= chunk_polygons:
                yield to_frame(finished)
                finished = []
            if progress is not None:
                stats.seconds = time.perf_counter() - started
                progress(stats)
        finished.extend(merger.finish())
        yield to_frame(finished)
    stats.seconds = time.perf_counter() - started


def detect_scene(path: str | Path, *, scorer: Scorer, config: DetectConfig = DetectConfig(),
                 progress: ProgressCallback | None = None):
    """Run the pipeline over one raster; return (GeoDataFrame of panels, DetectStats)."""
    import pandas as pd

    stats = DetectStats()
    frames = list(iter_panel_frames(path, scorer=scorer, config=config, stats=stats, progress=progress))
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return frame, stats


def _process_batch(batch: Sequence[TileImage], scorer: Scorer, config: DetectConfig,
                   merger: SeamMerger, stats: DetectStats) -> list:
    finished = []
    live = [img for img in batch if not img.is_empty]
    stats.tiles_read += len(batch)
    stats.tiles_skipped_nodata += len(batch) - len(live)
    probs: dict[tuple[int, int], float] = {}
    maps: dict[tuple[int, int], np.ndarray] = {}
    if live:
        t0 = time.perf_counter()
        batch_probs, batch_maps = scorer(np.stack([img.pixels for img in live]))
        stats.stage_seconds["model"] += time.perf_counter() - t0
        for img, p, m in zip(live, batch_probs, batch_maps):
            probs[img.tile.key], maps[img.tile.key] = float(p), m
    t0 = time.perf_counter()
    for img in batch:
        pieces = []
        prob = probs.get(img.tile.key)
        if prob is not None and prob >= config.score_threshold:
            stats.tiles_positive += 1
            size = img.valid.shape
            score_map = upsample_scores(maps[img.tile.key], size)
            mask = (score_map >= config.mask_threshold) & img.valid
            pieces = core_pieces(img.tile, mask, score=prob, cam_map=score_map)
        finished.extend(merger.add(img.tile.core, pieces))
    stats.stage_seconds["vectorize"] += time.perf_counter() - t0
    return finished


def run_metadata(*, config: DetectConfig, model_name: str, source: str, stats: DetectStats | None = None) -> dict:
    """Key/value metadata stored in the GeoPackage so a result can be traced to how it was made."""
    meta = {
        "solarmap_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_name,
        "source": source,
        **{f"config_{k}": v for k, v in asdict(config).items()},
    }
    if stats is not None:
        meta.update({f"stats_{k}": v for k, v in stats.as_dict().items() if k != "stage_seconds"})
    return {k: str(v) for k, v in meta.items()}


def detect_to_file(path: str | Path, out: str | Path, *, scorer: Scorer, config: DetectConfig = DetectConfig(),
                   overwrite: bool = False, progress: ProgressCallback | None = None) -> DetectStats:
    """The pipeline streamed into a GeoPackage at ``out`` (checked before work starts, written atomically)."""
    check_output_path(out, overwrite=overwrite)
    stats = DetectStats()
    with GeoPackageWriter(out, layer="panels", overwrite=overwrite) as writer:
        last = None
        for frame in iter_panel_frames(path, scorer=scorer, config=config, stats=stats, progress=progress):
            t0 = time.perf_counter()
            if len(frame):
                writer.append(frame)
            last = frame
            stats.stage_seconds["write"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        writer.commit(empty_frame=last.iloc[:0], style_qml=panels_qml(),
                      metadata=run_metadata(config=config, model_name=scorer.name, source=str(path), stats=stats))
        stats.stage_seconds["write"] += time.perf_counter() - t0
    return stats
