"""scene -> tiles -> batches -> score maps -> polygons -> GeoPackage: the tool behind ``solarmap detect``.

The scoring step is a plug-in (:class:`Scorer`): anything that maps a batch of tiles to per-tile
probabilities and per-tile score maps. :class:`solarmap.cam.ModelScorer` is the CNN + CAM scorer;
:class:`SpectralBaseline` (no learning) exists so the geometry can be tested and benchmarked alone.

The model runs in the calling thread; reading runs in a background thread that keeps a batch
ready, so the scorer is not starved. Masks, polygons, seam merging and writing run between batches
on a CPU, and in their own thread on a GPU. Tiles are processed in row-major order; at a tile-row
boundary (the first, then about every 10 s) a resumable run records where it is (rows done, the
seam polygons still open, how many features the work file holds), so an interrupted run continues
there and ends with the same output as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import queue
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from solarmap import __version__
from solarmap.errors import OptionError, OutputError
from solarmap.io import (DEFAULT_BANDS, GeoPackageWriter, HeatmapWriter, SceneReader, TileImage,
                         check_output_path, parse_crs)
from solarmap.refine import ColourRefine, refine_mask
from solarmap.style import panels_qml
from solarmap.tiling import TileSpec, iter_tiles, tile_grid_shape
from solarmap.vectorize import SeamMerger, batch_core_pieces, panels_frame, upsample_scores

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
        probs = np.clip(maps.mean(axis=(1, 2)) * 50.0, 0.0, 1.0)
        return probs.astype(np.float32), maps


@dataclass(frozen=True)
class DetectConfig:
    """Everything that decides a detection result, recorded in the output's metadata."""

    tile_size_px: int = 299
    overlap_px: int = 32
    context_px: int = 0
    gsd_m: float | None = None
    src_crs: str | None = None  # CRS to assume for rasters that carry none
    bands: tuple[int, ...] = DEFAULT_BANDS
    batch_size: int = 16
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    mask_peak_fraction: float | None = None  # weak positive tiles: also mask >= this fraction of their peak
    min_area_m2: float = 1.0
    simplify_m: float = 0.0
    refine: ColourRefine | None = None  # outline masks by the model's panel colours (solarmap.refine)

    def __post_init__(self) -> None:
        self.tile_spec  # validates sizes
        if self.batch_size <= 0:
            raise OptionError(f"batch size must be positive, got {self.batch_size}")
        for name in ("score_threshold", "mask_threshold", "mask_peak_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise OptionError(f"{name.replace('_', ' ')} must be between 0 and 1, got {value}")
        if self.min_area_m2 < 0 or self.simplify_m < 0:
            raise OptionError("minimum area and simplification tolerance must not be negative")
        if self.src_crs is not None:
            parse_crs(self.src_crs)
        if self.gsd_m is not None and not self.gsd_m > 0:
            raise OptionError(f"GSD must be positive metres, got {self.gsd_m}")

    @property
    def tile_spec(self) -> TileSpec:
        return TileSpec(self.tile_size_px, self.overlap_px, self.context_px)

    @classmethod
    def for_model(cls, model_config, method: str = "branch", **overrides) -> "DetectConfig":
        """The settings a checkpoint was calibrated for (tile size, overlap, context, GSD, and the
        mask rule of CAM ``method``: each method's maps have their own scale, so each has its own
        rule where the checkpoint has one); ``overrides`` win."""
        threshold, fraction = model_config.cam_threshold, model_config.cam_peak_fraction
        if method != "branch" and method in model_config.mask_rules:
            threshold, fraction = model_config.mask_rules[method]
        refine = None  # calibrated on the branch CAM's masks
        if method == "branch" and model_config.colour_prior is not None and model_config.refine_rule:
            refine = ColourRefine(**model_config.refine_rule)
        settings = dict(tile_size_px=model_config.tile_size_px, overlap_px=model_config.overlap_px,
                        context_px=model_config.context_px,
                        gsd_m=model_config.gsd_m, score_threshold=model_config.decision_threshold,
                        mask_threshold=threshold, mask_peak_fraction=fraction, refine=refine)
        return cls(**{**settings, **overrides})


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


# ---------------------------------------------------------------------------------------------
# Background reading


class _ReaderFailed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterable, depth: int = 3, *, name: str = "solarmap-reader") -> Iterator:
    """Iterate ``items`` in a background thread, keeping up to ``depth`` ready (errors re-raised here).

    Stages chain: ``prefetch(f(x) for x in prefetch(...))`` runs each stage in its own thread.
    Closing the returned iterator stops the thread and closes ``items`` (and so any stage before it).
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ready.put(_ReaderFailed(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # an earlier stage's thread stops too
        ready.put(done)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is done:
                return
            if isinstance(item, _ReaderFailed):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # drain so the worker can see the stop flag
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass


class BackgroundConsumer:
    """Hands items to ``handle`` in one background thread, in order, at most ``depth`` waiting.

    The mirror of :func:`prefetch`: the caller produces, the thread consumes. An error in ``handle``
    is raised again in the caller by the next :meth:`put` or by :meth:`finish`; :meth:`abort` lets
    the item in hand finish and drops the rest, so the caller can clean up (nothing is handled
    after it returns).
    """

    def __init__(self, handle: Callable, depth: int = 4, *, name: str = "solarmap-consumer"):
        self._handle = handle
        self._waiting: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._end = object()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._waiting.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is self._end:
                return
            try:
                self._handle(item)
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller
                self._error = exc
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item) -> None:
        while True:
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise RuntimeError("the background consumer stopped")
            try:
                self._waiting.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait until every item is handled; raise the thread's error, if any."""
        self.put(self._end)
        self._thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        self._stop.set()
        self._thread.join()


class InlineConsumer:
    """:class:`BackgroundConsumer`'s interface, handling each item at once in the caller's thread."""

    def __init__(self, handle: Callable):
        self._handle = handle

    def put(self, item) -> None:
        self._handle(item)

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# One scene


@dataclass(frozen=True)
class _ReadBatch:
    """A batch of tiles as read, and the scorer's input: the pixels of its non-empty tiles."""

    images: list[TileImage]
    live: list[int]  # indices into ``images`` of the tiles that hold data
    pixels: np.ndarray | None  # (len(live), 3, size, size), None when every tile is empty

    @classmethod
    def of(cls, images: list[TileImage], block: np.ndarray | None = None) -> "_ReadBatch":
        """``block``: the array the images were read into, in order (their pixels are its rows);
        it is the scorer's input as is when every tile holds data, so the batch is never copied."""
        live = [i for i, image in enumerate(images) if not image.is_empty]
        if not live:
            return cls(images, live, None)
        if block is not None and len(live) == len(block):
            return cls(images, live, block)
        return cls(images, live, np.stack([images[i].pixels for i in live]))


@dataclass
class RunState:
    """Where a run is, at a tile-row boundary (what ``--resume`` restores)."""

    rows_done: int
    merger: dict
    next_id: int
    stats: DetectStats
    frame_rows: int  # features in the work file at this point


class SceneRun:
    """Runs the pipeline over one raster, handing finished panel frames to ``sink`` as they complete."""

    def __init__(self, path: str | Path, *, scorer: Scorer, config: DetectConfig,
                 progress: ProgressCallback | None = None, source_name: str | None = None):
        scorer_context = getattr(scorer, "context_px", 0)
        if scorer_context != config.context_px:
            raise OptionError(f"the scorer expects {scorer_context} px of context around tiles, the run reads "
                              f"{config.context_px} px")
        self.path = str(path)
        self.scorer = scorer
        self.config = config
        self.progress = progress
        self.source_name = source_name or Path(self.path).name
        self.colour_table = getattr(scorer, "colour_prior", None)
        if config.refine is not None and self.colour_table is None:
            raise OptionError("mask refinement needs a model with a colour prior "
                              "(solarmap train --stage colour-prior); run without --refine")

    def run(self, sink: Callable, *, heatmap: HeatmapWriter | None = None, state: RunState | None = None,
            checkpoint: Callable[[RunState], None] | None = None, checkpoint_interval_s: float = 10.0,
            chunk_polygons: int = 2000, rows: tuple[int, int] | None = None,
            pieces_only: bool = False) -> DetectStats:
        """Run over the raster (or only tile rows ``rows`` = [start, stop)).

        ``sink`` gets GeoDataFrames of finished panels; with ``pieces_only`` it gets lists of
        :class:`~solarmap.vectorize.Piece` in grid pixels instead, unfiltered, for a caller that
        merges them with pieces from other row ranges (see :mod:`solarmap.regional`).
        Finished panels go to ``sink``, and ``checkpoint`` records where the run is, at the first
        tile-row boundary and then at the first after each ``checkpoint_interval_s`` (every
        boundary: 0) or once ``chunk_polygons`` are waiting: fewer, larger writes than one per row.
        ``sink``, ``checkpoint`` and the progress callback are called in order from one thread: this
        one on a CPU, the post-processing thread on a GPU.
        """
        config, spec = self.config, self.config.tile_spec
        started = time.perf_counter()
        with SceneReader(self.path, bands=config.bands, gsd_m=config.gsd_m, src_crs=config.src_crs,
                         window_px=spec.window_px) as reader:
            grid = self.grid = reader.info.grid
            n_rows, cols = tile_grid_shape(grid, spec)
            first_row, stop_row = rows if rows is not None else (0, n_rows)
            if state is None:
                stats, merger = DetectStats(), SeamMerger((grid.height, grid.width))
                next_id, start_row = 1, first_row
                stats.tiles_total = (stop_row - first_row) * cols
            else:
                stats, merger = state.stats, SeamMerger.from_state(state.merger)
                next_id, start_row = state.next_id, state.rows_done
            elapsed_before = stats.seconds
            gsd_x, gsd_y = grid.ground_resolution_m()
            finished: list = []

            def flush() -> None:
                nonlocal next_id, finished
                if pieces_only:
                    sink(finished)
                    finished = []
                    return
                t0 = time.perf_counter()
                frame = panels_frame(finished, grid_transform=grid.transform, crs=grid.crs, source=self.source_name,
                                     min_area_m2=config.min_area_m2,
                                     simplify_px=config.simplify_m / ((gsd_x + gsd_y) / 2), first_id=next_id)
                stats.stage_seconds["vectorize"] += time.perf_counter() - t0
                next_id += len(frame)
                stats.polygons += len(frame)
                stats.area_m2 += float(frame["area_m2"].sum())
                finished = []
                t0 = time.perf_counter()
                sink(frame)
                stats.stage_seconds["write"] += time.perf_counter() - t0

            def read_batches() -> Iterator[_ReadBatch]:
                """Tiles in batches, the scorer's input already stacked (off the model's thread)."""
                batch: list[TileImage] = []
                block = None  # tiles are read straight into the batch's array (a new one per batch)
                for tile in iter_tiles(grid, spec):
                    if tile.tile_row < start_row:
                        continue
                    if tile.tile_row >= stop_row:
                        break
                    t0 = time.perf_counter()
                    if block is None:
                        shape = (len(config.bands), int(tile.window.height), int(tile.window.width))
                        block = np.empty((config.batch_size, *shape), dtype=np.float32)
                    batch.append(reader.read_tile(tile, out=block[len(batch)]))
                    full = len(batch) == config.batch_size
                    ready = _ReadBatch.of(batch, block) if full else None
                    stats.stage_seconds["read"] += time.perf_counter() - t0
                    if full:
                        yield ready  # not timed: waits here while the model is busy
                        batch, block = [], None
                if batch:
                    yield _ReadBatch.of(batch, block[:len(batch)])

            current_row, last_checkpoint = start_row, -math.inf  # the first row boundary checkpoints

            def vectorize_batch(scored: tuple[list[TileImage], list[int], np.ndarray, np.ndarray]) -> None:
                """Everything after the model for one batch, in tile order; checkpoints at row ends."""
                nonlocal current_row, last_checkpoint
                images, live, probs, maps = scored
                t0 = time.perf_counter()
                positive_indices, positives = [], []  # masks first, then one polygonizing pass
                for index, prob, raw_map in zip(live, probs, maps):
                    if float(prob) < config.score_threshold:
                        continue
                    image = images[index]
                    score_map = upsample_scores(raw_map, image.valid.shape)
                    if heatmap is not None:
                        heatmap.write(image.tile, score_map)
                    mask = (score_map >= self._mask_threshold(score_map)) & image.valid
                    if config.refine is not None:
                        mask = refine_mask(image.pixels, mask, image.valid, log_ratio=self.colour_table,
                                           rule=config.refine, region=image.tile.core_slices)
                    positive_indices.append(index)
                    positives.append((image.tile, mask, float(prob), score_map))
                pieces_of = dict(zip(positive_indices, batch_core_pieces(positives)))
                scored_tiles = set(live)
                for index, image in enumerate(images):
                    if image.tile.tile_row != current_row:  # a row is complete: a place to checkpoint
                        finished.extend(merger.close_row())
                        current_row = image.tile.tile_row
                        stats.stage_seconds["vectorize"] += time.perf_counter() - t0
                        due = time.perf_counter() - last_checkpoint >= checkpoint_interval_s
                        if due or len(finished) >= chunk_polygons:
                            flush()
                            stats.seconds = elapsed_before + time.perf_counter() - started
                            if checkpoint is not None:  # the resume journal: counted as writing
                                t0 = time.perf_counter()
                                checkpoint(RunState(rows_done=current_row, merger=merger.state(), next_id=next_id,
                                                    stats=stats, frame_rows=next_id - 1))
                                stats.stage_seconds["write"] += time.perf_counter() - t0
                            last_checkpoint = time.perf_counter()
                        t0 = time.perf_counter()
                    stats.tiles_read += 1
                    stats.tiles_skipped_nodata += index not in scored_tiles
                    stats.tiles_positive += index in pieces_of
                    finished.extend(merger.add(image.tile.core, pieces_of.get(index, [])))
                stats.stage_seconds["vectorize"] += time.perf_counter() - t0
                if len(finished) >= chunk_polygons:
                    flush()
                if self.progress is not None:
                    stats.seconds = elapsed_before + time.perf_counter() - started
                    self.progress(stats)

            # The model runs in this thread, reading one batch ahead in another. On a CPU everything
            # after the model runs here too, between batches: the model's threads use every core, and
            # measured on 2 cores (4000 px, scripts/bench_detect.py), post-processing in a thread beside
            # them slowed the model more than it overlapped (end-to-end 38.8 tiles/s at low priority vs
            # 41.1 in line); a low-priority reader also starves whenever other processes load the CPU.
            # On a GPU the model mostly waits for the device, so post-processing gets its own thread.
            on_gpu = getattr(getattr(self.scorer, "device", None), "type", "cpu") != "cpu"
            batches = prefetch(read_batches(), depth=2)
            after_model = (BackgroundConsumer(vectorize_batch, depth=4, name="solarmap-vectorize") if on_gpu
                           else InlineConsumer(vectorize_batch))
            try:
                with contextlib.closing(batches):
                    for read in batches:
                        probs, maps = np.zeros(0, np.float32), np.zeros((0, 1, 1), np.float32)
                        if read.live:
                            t0 = time.perf_counter()
                            probs, maps = self.scorer(read.pixels)
                            stats.stage_seconds["model"] += time.perf_counter() - t0
                        after_model.put((read.images, read.live, probs, maps))  # the stack is done with
                after_model.finish()
            except BaseException:
                after_model.abort()
                raise
            finished.extend(merger.finish())
            flush()
        stats.seconds = elapsed_before + time.perf_counter() - started
        return stats

    def _mask_threshold(self, score_map: np.ndarray) -> float:
        """The global mask threshold, lowered for a positive tile whose CAM never reaches it (a
        small or faint array) to ``mask_peak_fraction`` of the tile's own peak, so that every
        positive tile keeps its strongest response."""
        fraction, c = self.config.mask_peak_fraction, self.config.context_px
        if fraction is None:
            return self.config.mask_threshold
        tile_part = score_map[c: score_map.shape[0] - c, c: score_map.shape[1] - c] if c else score_map
        peak = float(tile_part.max()) if tile_part.size else 0.0
        return min(self.config.mask_threshold, fraction * peak) if peak > 0 else self.config.mask_threshold


# ---------------------------------------------------------------------------------------------
# Entry points


def detect_scene(path: str | Path, *, scorer: Scorer, config: DetectConfig = DetectConfig(),
                 progress: ProgressCallback | None = None):
    """Run the pipeline over one raster in memory; return (GeoDataFrame of panels, DetectStats)."""
    import pandas as pd

    frames: list = []
    stats = SceneRun(path, scorer=scorer, config=config, progress=progress).run(frames.append)
    non_empty = [f for f in frames if len(f)] or frames[-1:]
    frame = non_empty[0] if len(non_empty) == 1 else pd.concat(non_empty, ignore_index=True)
    return frame, stats


def run_metadata(*, config: DetectConfig, model_name: str, source: str, stats: DetectStats | None = None,
                 extra: dict | None = None) -> dict:
    """Key/value metadata stored in the GeoPackage so a result can be traced to how it was made."""
    meta = {
        "solarmap_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_name,
        "source": source,
        **{f"config_{k}": v for k, v in asdict(config).items()},
        **(extra or {}),
    }
    if stats is not None:
        meta.update({f"stats_{k}": v for k, v in stats.as_dict().items() if k != "stage_seconds"})
    return {k: str(v) for k, v in meta.items()}


def _journal_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def _run_key(path: str, scorer: Scorer, config: DetectConfig, heatmap: str | None) -> str:
    stat = os.stat(path) if os.path.exists(path) else None
    identity = {"source": os.path.abspath(path), "size": stat.st_size if stat else None,
                "mtime": stat.st_mtime_ns if stat else None, "scorer": scorer.name, "config": asdict(config),
                "heatmap": bool(heatmap)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def detect_to_file(path: str | Path, out: str | Path, *, scorer: Scorer, config: DetectConfig = DetectConfig(),
                   overwrite: bool = False, progress: ProgressCallback | None = None, resume: bool = False,
                   heatmap: str | Path | None = None, metadata: dict | None = None,
                   checkpoint_interval_s: float = 10.0) -> DetectStats:
    """The pipeline streamed into a GeoPackage at ``out`` (and optionally a heatmap GeoTIFF).

    Outputs are checked before any work and appear only when complete. Progress is journalled beside
    the output (``.NAME.partial/``) at a tile-row boundary every ``checkpoint_interval_s`` (an
    interrupted run loses at most about that much work); ``resume=True`` continues from there (the
    raster, model and settings must be the same), otherwise a stale journal is discarded.
    """
    out = check_output_path(out, overwrite=overwrite)
    if heatmap is not None:
        check_output_path(heatmap, overwrite=overwrite, suffixes=(".tif", ".tiff"), kind="the heatmap GeoTIFF")
    journal = _journal_dir(out)
    key = _run_key(str(path), scorer, config, str(heatmap) if heatmap else None)
    state = None
    if journal.exists():
        if resume:
            state = _load_journal(journal, key)
        else:
            log.info("discarding the journal of an earlier interrupted run: %s", journal)
            shutil.rmtree(journal)
    elif resume:
        log.info("nothing to resume at %s; starting a new run", journal)
    journal.mkdir(exist_ok=True)
    (journal / "key").write_text(key)

    run = SceneRun(path, scorer=scorer, config=config, progress=progress)
    writer = GeoPackageWriter(out, overwrite=overwrite, work_path=journal / "panels.gpkg",
                              resume_rows=state.frame_rows if state else None)
    heat_writer = None
    last_frame: list = []

    def sink(frame) -> None:
        if len(frame):
            writer.append(frame)
        last_frame[:] = [frame]

    def save_state(run_state: RunState) -> None:
        tmp = journal / "state.pkl.tmp"
        tmp.write_bytes(pickle.dumps(run_state))
        os.replace(tmp, journal / "state.pkl")

    try:
        if heatmap is not None:
            from solarmap.io import describe_scene

            grid = describe_scene(path, bands=config.bands, gsd_m=config.gsd_m, src_crs=config.src_crs).grid
            heat_writer = HeatmapWriter(heatmap, grid, overwrite=overwrite, work_path=journal / "heat.tif",
                                        resume=state is not None)
        stats = run.run(sink, heatmap=heat_writer, state=state, checkpoint=save_state,
                        checkpoint_interval_s=checkpoint_interval_s)
        t0 = time.perf_counter()
        writer.commit(empty_frame=last_frame[0].iloc[:0], style_qml=panels_qml(),
                      metadata=run_metadata(config=config, model_name=scorer.name, source=str(path), stats=stats,
                                            extra=metadata))
        if heat_writer is not None:
            heat_writer.finish()
        stats.stage_seconds["write"] += time.perf_counter() - t0
    finally:
        if heat_writer is not None:
            heat_writer.close()
    shutil.rmtree(journal, ignore_errors=True)
    return stats


def _load_journal(journal: Path, key: str) -> RunState | None:
    key_file, state_file = journal / "key", journal / "state.pkl"
    if not key_file.exists() or key_file.read_text() != key:
        raise OutputError(f"cannot resume: the interrupted run in {journal} used another raster, model or "
                          f"settings (run without --resume to start over)")
    if not state_file.exists():
        return None  # interrupted before the first row finished: start from the beginning
    return pickle.loads(state_file.read_bytes())


def detect(source, *, scorer: Scorer | None = None, config: DetectConfig | None = None, out: str | Path | None = None,
           overwrite: bool = False, progress: ProgressCallback | None = None, **scorer_options):
    """Detect panels in ``source`` (a raster path, or an xarray DataArray with ``.rio`` CRS/transform).

    Returns a GeoDataFrame of panel polygons in the source's CRS; with ``out`` also writes the
    GeoPackage. Without ``scorer`` the bundled model is used (``scorer_options`` go to
    :class:`solarmap.cam.ModelScorer`, e.g. ``method="gap"``, ``device=...``).
    """
    import tempfile

    if scorer is None:
        from solarmap import model as model_lib
        from solarmap.cam import ModelScorer, resolve_device

        model_path = scorer_options.pop("model_path", None)
        net = model_lib.load(model_path)
        device = resolve_device(str(scorer_options.pop("device", "auto")))
        if config is None:
            config = DetectConfig.for_model(net.config)
        scorer = ModelScorer(net, device=device, context_px=config.context_px, **scorer_options)
    config = config or DetectConfig()
    with tempfile.TemporaryDirectory(prefix="solarmap-") as tmp:
        path = source
        if hasattr(source, "rio"):  # xarray + rioxarray: spill to a GeoTIFF the tiler can window
            path = str(Path(tmp) / "input.tif")
            large = min(source.rio.height, source.rio.width) >= 512
            source.rio.to_raster(path, compress="deflate",
                                 **({"tiled": True, "blockxsize": 256, "blockysize": 256} if large else {}))
        frame, stats = detect_scene(path, scorer=scorer, config=config, progress=progress)
        if out is not None:
            from solarmap.io import write_geopackage

            write_geopackage(frame, out, overwrite=overwrite, style_qml=panels_qml(),
                             metadata=run_metadata(config=config, model_name=scorer.name, source=str(path),
                                                   stats=stats))
    return frame
