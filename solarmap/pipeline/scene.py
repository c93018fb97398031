"""One raster through the pipeline: tiles -> batches -> scorer -> masks -> polygons, streamed.

Three parts, each in its own place:

* :func:`read_batches` reads tiles in row-major order into batch arrays (in a background thread
  that keeps a batch ready, so the scorer is not starved);
* :meth:`SceneRun.run` runs the scorer on each batch, in the calling thread;
* :class:`PostProcessor` does everything after the model: masks, refinement, polygons, seam
  merging, handing finished panels to a sink, and recording where the run is at tile-row
  boundaries (the first, then about every 10 s) so an interrupted run continues there and ends with
  the same output. On a CPU it runs between batches; on a GPU in its own thread.

Timings are kept apart from the logic: each part adds its seconds to one stage of
:class:`~solarmap.pipeline.config.DetectStats` through :func:`timed`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from solarmap.errors import OptionError
from solarmap.faults import fault_point
from solarmap.geo.output import HeatmapWriter
from solarmap.geo.raster import SceneReader, TileImage
from solarmap.geo.refine import refine_mask
from solarmap.geo.tiling import Grid, TileSpec, iter_tiles, tile_grid_shape
from solarmap.geo.vectorize import (
    SeamMerger,
    batch_core_pieces,
    panels_frame,
    upsample_scores,
)
from solarmap.pipeline.config import DetectConfig, DetectStats, ProgressCallback, Scorer
from solarmap.pipeline.threads import BackgroundConsumer, InlineConsumer, prefetch

__all__ = ["PostProcessor", "RunState", "SceneRun", "read_batches", "timed"]


@contextlib.contextmanager
def timed(stats: DetectStats, stage: str):
    """Add the block's wall time to ``stats.stage_seconds[stage]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stats.stage_seconds[stage] += time.perf_counter() - t0


@dataclass(frozen=True)
class ReadBatch:
    """A batch of tiles as read, and the scorer's input: the pixels of its non-empty tiles."""

    images: list[TileImage]
    live: list[int]  # indices into ``images`` of the tiles that hold data
    pixels: np.ndarray | None  # (len(live), 3, size, size), None when every tile is empty

    @classmethod
    def of(cls, images: list[TileImage], block: np.ndarray | None = None) -> "ReadBatch":
        """``block``: the array the images were read into, in order (their pixels are its rows);
        it is the scorer's input as is when every tile holds data, so the batch is never copied."""
        live = [i for i, image in enumerate(images) if not image.is_empty]
        if not live:
            return cls(images, live, None)
        if block is not None and len(live) == len(block):
            return cls(images, live, block)
        return cls(images, live, np.stack([images[i].pixels for i in live]))


@dataclass(frozen=True)
class ScoredBatch:
    images: list[TileImage]
    live: list[int]
    probs: np.ndarray
    maps: np.ndarray


@dataclass
class RunState:
    """Where a run is, at a tile-row boundary (what ``--resume`` restores)."""

    rows_done: int
    merger: dict
    next_id: int
    stats: DetectStats
    frame_rows: int  # features in the work file at this point


def read_batches(reader: SceneReader, spec: TileSpec, *, rows: tuple[int, int], batch_size: int,
                 stats: DetectStats) -> Iterator[ReadBatch]:
    """Tiles of tile rows [start, stop) in batches, each read straight into its batch's array, cut
    from one read of each tile row's strip (:meth:`SceneReader.read_tiles`)."""
    start_row, stop_row = rows
    tiles = []
    for tile in iter_tiles(reader.info.grid, spec):
        if tile.tile_row < start_row:
            continue
        if tile.tile_row >= stop_row:
            break
        tiles.append(tile)
        if len(tiles) == batch_size:
            yield _read_batch(reader, tiles, stats)  # waits here while the model is busy
            tiles = []
    if tiles:
        yield _read_batch(reader, tiles, stats)


def _read_batch(reader: SceneReader, tiles: list, stats: DetectStats) -> ReadBatch:
    with timed(stats, "read"):
        window = tiles[0].window
        block = np.empty((len(tiles), len(reader.info.bands), int(window.height), int(window.width)),
                         dtype=np.float32)
        return ReadBatch.of(reader.read_tiles(tiles, block), block)


class PostProcessor:
    """Everything after the model, batch by batch in tile order: masks, polygons, seams, output.

    ``sink`` gets GeoDataFrames of finished panels (with ``pieces_only``: lists of
    :class:`~solarmap.geo.vectorize.Piece` in grid pixels, unfiltered, for a caller that merges them
    with pieces of other row ranges). ``checkpoint`` records a :class:`RunState` at the first
    tile-row boundary, then at the first after each ``checkpoint_interval_s`` (0: every boundary)
    or once ``chunk_polygons`` are waiting: fewer, larger writes than one per row.
    """

    def __init__(self, config: DetectConfig, grid: Grid, *, source_name: str, sink: Callable,
                 stats: DetectStats, merger: SeamMerger, next_id: int, start_row: int,
                 colour_table: np.ndarray | None = None, heatmap: HeatmapWriter | None = None,
                 checkpoint: Callable[[RunState], None] | None = None, checkpoint_interval_s: float = 10.0,
                 chunk_polygons: int = 2000, pieces_only: bool = False,
                 progress: ProgressCallback | None = None, clock: Callable[[], float] = lambda: 0.0):
        self.config, self.grid, self.source_name, self.sink = config, grid, source_name, sink
        self.stats, self.merger, self.next_id, self.current_row = stats, merger, next_id, start_row
        self.colour_table, self.heatmap, self.checkpoint = colour_table, heatmap, checkpoint
        self.checkpoint_interval_s, self.chunk_polygons = checkpoint_interval_s, chunk_polygons
        self.pieces_only, self.progress, self.clock = pieces_only, progress, clock
        self.finished: list = []
        self.last_checkpoint = -math.inf  # the first row boundary checkpoints
        gsd_x, gsd_y = grid.ground_resolution_m()
        self.simplify_px = config.simplify_m / ((gsd_x + gsd_y) / 2)

    def __call__(self, scored: ScoredBatch) -> None:
        """One batch: masks of its positive tiles, one polygonizing pass, then tile by tile into the
        seam merger (checkpointing where a tile row ends)."""
        stats = self.stats
        with timed(stats, "vectorize"):
            pieces_of = self._pieces(scored)
        scored_tiles = set(scored.live)
        for index, image in enumerate(scored.images):
            if image.tile.tile_row != self.current_row:
                self._end_row(image.tile.tile_row)
            with timed(stats, "vectorize"):
                stats.tiles_read += 1
                stats.tiles_skipped_nodata += index not in scored_tiles
                stats.tiles_positive += index in pieces_of
                stats.tiles_positive_unoutlined += index in pieces_of and not pieces_of[index]
                self.finished.extend(self.merger.add(image.tile.core, pieces_of.get(index, [])))
        if len(self.finished) >= self.chunk_polygons:
            self.flush()
        if self.progress is not None:
            stats.seconds = self.clock()
            self.progress(stats)

    def _pieces(self, scored: ScoredBatch) -> dict[int, list]:
        """Pieces (in grid pixels, cut to each tile's core) of the batch's positive tiles, by index."""
        indices, masks = [], []
        for index, prob, raw_map in zip(scored.live, scored.probs, scored.maps):
            if float(prob) < self.config.score_threshold:
                continue
            image = scored.images[index]
            score_map = upsample_scores(raw_map, image.valid.shape)
            if self.heatmap is not None:
                self.heatmap.write(image.tile, score_map)
            mask = (score_map >= self._mask_threshold(score_map)) & image.valid
            if self.config.refine is not None:
                mask = refine_mask(image.pixels, mask, image.valid, log_ratio=self.colour_table,
                                   rule=self.config.refine, region=image.tile.core_slices)
            indices.append(index)
            masks.append((image.tile, mask, float(prob), score_map))
        return dict(zip(indices, batch_core_pieces(masks)))

    def _mask_threshold(self, score_map: np.ndarray) -> float:
        """The global mask threshold, lowered for a positive tile whose map never reaches it (a small
        or faint array) to ``mask_peak_fraction`` of the tile's own peak, so that every positive
        tile keeps its strongest response."""
        fraction, c = self.config.mask_peak_fraction, self.config.context_px
        if fraction is None:
            return self.config.mask_threshold
        tile_part = score_map[c: score_map.shape[0] - c, c: score_map.shape[1] - c] if c else score_map
        peak = float(tile_part.max()) if tile_part.size else 0.0
        return min(self.config.mask_threshold, fraction * peak) if peak > 0 else self.config.mask_threshold

    def _end_row(self, next_row: int) -> None:
        """A tile row is complete: close its seams, and checkpoint if one is due."""
        with timed(self.stats, "vectorize"):
            self.finished.extend(self.merger.close_row())
        self.current_row = next_row
        due = time.perf_counter() - self.last_checkpoint >= self.checkpoint_interval_s
        if due or len(self.finished) >= self.chunk_polygons:
            self.flush()
            self.stats.seconds = self.clock()
            if self.checkpoint is not None:  # the resume journal: counted as writing
                with timed(self.stats, "write"):
                    self.checkpoint(RunState(rows_done=self.current_row, merger=self.merger.state(),
                                             next_id=self.next_id, stats=self.stats, frame_rows=self.next_id - 1))
            self.last_checkpoint = time.perf_counter()

    def flush(self) -> None:
        """Hand the finished panels to the sink (filtered, simplified and numbered unless pieces_only)."""
        finished, self.finished = self.finished, []
        if self.pieces_only:
            self.sink(finished)
            return
        with timed(self.stats, "vectorize"):
            frame = panels_frame(finished, grid_transform=self.grid.transform, crs=self.grid.crs,
                                 source=self.source_name, min_area_m2=self.config.min_area_m2,
                                 simplify_px=self.simplify_px, first_id=self.next_id)
        self.next_id += len(frame)
        self.stats.polygons += len(frame)
        self.stats.area_m2 += float(frame["area_m2"].sum())
        with timed(self.stats, "write"):
            self.sink(frame)

    def finish(self) -> None:
        """The last row is done: every open polygon is final."""
        self.finished.extend(self.merger.finish())
        self.flush()


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
        """Run over the raster (or only tile rows ``rows`` = [start, stop)); see :class:`PostProcessor`
        for ``sink``, ``checkpoint`` and ``pieces_only``. ``sink``, ``checkpoint`` and the progress
        callback are called in order from one thread: this one on a CPU, the post-processing thread
        on a GPU."""
        config, spec = self.config, self.config.tile_spec
        started = time.perf_counter()
        with SceneReader(self.path, bands=config.bands, gsd_m=config.gsd_m, src_crs=config.src_crs,
                         window_px=spec.window_px) as reader:
            grid = reader.info.grid
            n_rows, cols = tile_grid_shape(grid, spec)
            first_row, stop_row = rows if rows is not None else (0, n_rows)
            if state is None:
                stats, merger, next_id, start_row = DetectStats(), SeamMerger((grid.height, grid.width)), 1, first_row
                stats.tiles_total = (stop_row - first_row) * cols
            else:
                stats, merger = state.stats, SeamMerger.from_state(state.merger)
                stats.tiles_resumed = stats.tiles_read
                next_id, start_row = state.next_id, state.rows_done
            elapsed_before = stats.seconds
            post = PostProcessor(config, grid, source_name=self.source_name, sink=sink, stats=stats, merger=merger,
                                 next_id=next_id, start_row=start_row, colour_table=self.colour_table,
                                 heatmap=heatmap, checkpoint=checkpoint, checkpoint_interval_s=checkpoint_interval_s,
                                 chunk_polygons=chunk_polygons, pieces_only=pieces_only, progress=self.progress,
                                 clock=lambda: elapsed_before + time.perf_counter() - started)
            batches = read_batches(reader, spec, rows=(start_row, stop_row), batch_size=config.batch_size,
                                   stats=stats)
            self._score_all(batches, post, stats)
            post.finish()
        stats.seconds = elapsed_before + time.perf_counter() - started
        return stats

    def _score_all(self, batches: Iterator[ReadBatch], post: PostProcessor, stats: DetectStats) -> None:
        """The scorer in this thread, reading one batch ahead in another, post-processing behind.

        On a CPU post-processing runs here too, between batches: the model's threads use every core,
        and measured on 2 cores (4000 px, scripts/bench_detect.py), post-processing in a thread beside
        them slowed the model more than it overlapped (end-to-end 38.8 tiles/s at low priority vs 41.1
        in line). On a GPU the model mostly waits for the device, so post-processing gets its own thread.
        """
        on_gpu = getattr(getattr(self.scorer, "device", None), "type", "cpu") != "cpu"
        after_model = BackgroundConsumer(post, depth=4, name="solarmap-vectorize") if on_gpu else InlineConsumer(post)
        ahead = prefetch(batches, depth=2)
        try:
            with contextlib.closing(ahead):
                for read in ahead:
                    probs, maps = np.zeros(0, np.float32), np.zeros((0, 1, 1), np.float32)
                    if read.live:
                        with timed(stats, "model"):
                            probs, maps = self.scorer(read.pixels)
                    fault_point("batch")
                    after_model.put(ScoredBatch(read.images, read.live, probs, maps))
            after_model.finish()
        except BaseException:
            after_model.abort()
            raise
