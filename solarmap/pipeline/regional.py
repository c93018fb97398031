"""Regional runs: many rasters, cut into chunks of tile rows, on dask.distributed or in one process.

The work is a list of :class:`Chunk` s — plain values (a raster path, a range of tile rows, the
detection settings, the raster's grid) — and a scorer spec (:class:`solarmap.model.scorer.ScorerSpec`)
that a worker turns into a scorer once and keeps.
A chunk returns its panel pieces in the raster's grid pixels, unfiltered. Pieces that touch a
boundary between two chunks of the same raster are merged on the client exactly as the seam merger
merges them within one run (shared integer edges), so a regional result equals a single-process
one. Pieces that touch the edge of a raster are merged, in the output CRS, with pieces of other
rasters that touch them (mosaics whose files meet edge to edge).

Each finished chunk is recorded in the journal beside the output (:mod:`solarmap.pipeline.journal`),
and the GeoPackage is written inside it before it is renamed into place; ``--resume`` skips chunks
recorded there (``RegionalStats.chunks_resumed``), and a worker that dies only loses the chunk it was
running (dask reschedules it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine
from pyproj import CRS as ProjCRS
from rasterio.crs import CRS

from solarmap.errors import OptionError
from solarmap.faults import fault_point
from solarmap.geo.output import GeoPackageWriter, check_output_path
from solarmap.geo.raster import describe_scene, expand_inputs, parse_crs
from solarmap.geo.style import panels_qml
from solarmap.geo.tiling import (
    GSD_VARIATION_WARNING,
    axis_cores,
    axis_offsets,
    ground_resolution_m,
    ground_variation_note,
    tile_grid_shape,
)
from solarmap.geo.vectorize import (
    Piece,
    centroids_lonlat,
    connected_groups,
    geodesic_area_m2,
    merge_pieces,
    panels_frame,
)
from solarmap.pipeline.api import add_installations, run_metadata
from solarmap.pipeline.footprints import installations_with_footprints
from solarmap.pipeline.config import DetectConfig
from solarmap.pipeline.journal import Journal, run_key
from solarmap.pipeline.scene import SceneRun

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Plain-value work units


_SCORERS: dict = {}  # per worker process: spec -> scorer, so each worker loads its model once


def _scorer_for(spec):
    """The worker's scorer for ``spec``: a value with ``build()`` (solarmap.model.scorer.ScorerSpec)
    is built once per worker; anything else is an already-built, picklable scorer (baselines, tests)."""
    if not hasattr(spec, "build"):
        return spec
    if spec not in _SCORERS:
        _SCORERS[spec] = spec.build()
    return _SCORERS[spec]


@dataclass(frozen=True)
class Chunk:
    """Tile rows [row_start, row_stop) of one raster, with what its results are placed by: the
    raster's working grid and the grid pixel rows of the chunk's top and bottom core edges."""

    raster: str
    raster_index: int
    row_start: int
    row_stop: int
    tiles: int
    config: DetectConfig
    grid_transform: Affine
    crs_wkt: str
    grid_shape: tuple[int, int]
    seam_rows: tuple[int | None, int | None]  # None: the raster's edge
    source_gsd_m: float = 0.0  # the raster's own pixel size on the ground (m, mean of x and y)

    @property
    def key(self) -> str:
        identity = json.dumps([self.raster, self.row_start, self.row_stop, asdict(self.config)], default=str)
        return hashlib.sha256(identity.encode()).hexdigest()[:16]


@dataclass
class ChunkResult:
    chunk: Chunk
    pieces: list[Piece]  # in grid pixels, not yet filtered
    tiles_positive: int
    seconds: float
    tiles_positive_unoutlined: int = 0


def plan_chunks(rasters: Sequence[str], config: DetectConfig, *, rows_per_chunk: int = 8) -> list[Chunk]:
    """Cut every raster into chunks of ``rows_per_chunk`` tile rows (checks each raster first)."""
    if rows_per_chunk < 1:
        raise OptionError(f"rows per chunk must be positive, got {rows_per_chunk}")
    chunks = []
    for index, raster in enumerate(rasters):
        scene = describe_scene(raster, bands=config.bands, gsd_m=config.gsd_m, src_crs=config.src_crs)
        grid, ground = scene.grid, scene.source_grid.ground_resolution()
        if ground.variation > GSD_VARIATION_WARNING:
            log.warning("%s: %s", raster, ground_variation_note(ground))
        n_rows, n_cols = tile_grid_shape(grid, config.tile_spec)
        cores = axis_cores(axis_offsets(grid.height, config.tile_spec), grid.height, config.tile_spec)
        for start in range(0, n_rows, rows_per_chunk):
            stop = min(n_rows, start + rows_per_chunk)
            top, bottom = cores[start][0], cores[stop - 1][1]
            chunks.append(Chunk(raster, index, start, stop, (stop - start) * n_cols, config,
                                grid_transform=grid.transform, crs_wkt=grid.crs.to_wkt(),
                                grid_shape=(grid.height, grid.width),
                                seam_rows=(top if top > 0 else None, bottom if bottom < grid.height else None),
                                source_gsd_m=ground.mean_m))
    return chunks


def run_chunk(chunk: Chunk, scorer_spec) -> ChunkResult:
    """Worker side: detect on the chunk's tile rows; pieces in grid pixels, not yet filtered."""
    started = time.perf_counter()
    scorer = _scorer_for(scorer_spec)
    pieces: list[Piece] = []
    run = SceneRun(chunk.raster, scorer=scorer, config=chunk.config)
    stats = run.run(pieces.extend, rows=(chunk.row_start, chunk.row_stop), pieces_only=True)
    return ChunkResult(chunk=chunk, pieces=pieces, tiles_positive=stats.tiles_positive,
                       tiles_positive_unoutlined=stats.tiles_positive_unoutlined,
                       seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Merging chunk results


def merge_raster_chunks(results: Sequence[ChunkResult]) -> list[Piece]:
    """One raster's pieces with those that meet across chunk boundaries unioned (as SeamMerger does)."""
    seams = {r for res in results for r in res.chunk.seam_rows if r is not None}
    inner, on_seam = [], []
    for res in results:
        for piece in res.pieces:
            _, miny, _, maxy = piece.geometry.bounds
            (on_seam if (miny in seams or maxy in seams) else inner).append(piece)
    return inner + merge_pieces(on_seam)


def raster_frame(results: Sequence[ChunkResult], config: DetectConfig):
    """GeoDataFrame of one raster's panels (its CRS), after chunk merging, area filter, simplification."""
    first = results[0].chunk
    crs = CRS.from_wkt(first.crs_wkt)
    pieces = merge_raster_chunks(results)
    gx, gy = ground_resolution_m(first.grid_transform, crs, *first.grid_shape)
    frame = panels_frame(pieces, grid_transform=first.grid_transform, crs=crs, source=Path(first.raster).name,
                         min_area_m2=0.0, simplify_px=0.0)
    height, width = first.grid_shape
    bounds = np.array([p.geometry.bounds for p in pieces]).reshape(-1, 4)
    on_edge = (bounds[:, 0] <= 0) | (bounds[:, 1] <= 0) | (bounds[:, 2] >= width) | (bounds[:, 3] >= height)
    frame["_on_edge"] = on_edge if len(frame) else np.zeros(0, bool)
    frame["_gsd_m"] = (gx + gy) / 2
    return frame


def merge_rasters(frames: Sequence, out_crs, config: DetectConfig):
    """All rasters' panels in ``out_crs``; pieces on raster edges that meet another raster's are unioned."""
    frames = [f.to_crs(out_crs) for f in frames if len(f)]
    if not frames:
        return None
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    frame = gpd.GeoDataFrame(frame, geometry="geometry", crs=out_crs)
    if len(frames) > 1:
        frame = _merge_across_rasters(frame, out_crs)
    frame = frame.drop(columns=["_on_edge", "_gsd_m"])
    geoms = frame.geometry.to_numpy()
    if config.simplify_m > 0:
        tolerance = config.simplify_m / _metres_per_unit(out_crs, frame)
        geoms = shapely.simplify(geoms, tolerance, preserve_topology=True)
    frame = frame.set_geometry(gpd.GeoSeries(geoms, crs=out_crs))
    frame["area_m2"] = geodesic_area_m2(geoms, frame.crs)
    lon, lat = centroids_lonlat(geoms, frame.crs)
    frame["centroid_lon"], frame["centroid_lat"] = lon, lat
    frame = frame[frame["area_m2"] >= config.min_area_m2].reset_index(drop=True)
    frame["id"] = np.arange(1, len(frame) + 1, dtype=np.int64)
    return frame


def _metres_per_unit(crs, frame) -> float:
    pcrs = ProjCRS.from_user_input(crs)
    if pcrs.is_geographic:
        _, miny, _, maxy = frame.total_bounds
        return 111_320.0 * np.cos(np.radians((miny + maxy) / 2))
    return pcrs.axis_info[0].unit_conversion_factor if pcrs.axis_info else 1.0


def _merge_across_rasters(frame, out_crs):
    """Union edge pieces of different rasters that touch (within half a pixel after reprojection)."""
    edge = frame[frame["_on_edge"]]
    if len(edge) < 2:
        return frame
    tolerance = 0.5 * float(edge["_gsd_m"].max()) / _metres_per_unit(out_crs, edge)
    geoms = edge.geometry.to_numpy()
    tree = shapely.STRtree(geoms)
    left, right = tree.query(geoms, predicate="dwithin", distance=tolerance)
    sources = edge["source"].to_numpy()
    pairs = ((a, b) for a, b in zip(left, right) if sources[a] != sources[b])
    rows = []
    for members in connected_groups(len(edge), pairs):
        part = edge.iloc[members]
        if len(members) == 1:
            rows.append(part)
            continue
        joined = shapely.union_all(shapely.buffer(part.geometry.to_numpy(), tolerance, join_style="mitre"))
        joined = shapely.buffer(joined, -tolerance, join_style="mitre")
        row = part.iloc[[0]].copy()
        row["score"] = part["score"].max()
        row["cam_peak"] = part["cam_peak"].max()
        row["source"] = "+".join(sorted(set(part["source"])))
        row = row.set_geometry(gpd.GeoSeries([joined], index=row.index, crs=out_crs))
        rows.append(row)
    merged = pd.concat([frame[~frame["_on_edge"]], *rows], ignore_index=True)
    return gpd.GeoDataFrame(merged, geometry="geometry", crs=out_crs)


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class RegionalStats:
    rasters: int = 0
    chunks_total: int = 0
    chunks_done: int = 0
    chunks_resumed: int = 0
    tiles_total: int = 0
    tiles_done: int = 0
    tiles_positive: int = 0
    tiles_positive_unoutlined: int = 0
    polygons: int = 0
    area_m2: float = 0.0
    installations: int = 0
    seconds: float = 0.0
    dashboard: str | None = None
    # each raster's pixel size on the ground (m, mean of x and y), as planned: what a caller compares
    # with the model's training GSD without opening every raster again
    source_gsd_m: dict[str, float] = field(default_factory=dict)


def local_workers(scheduler: str) -> int | None:
    """The number of local worker processes ``local[:N]`` asks for (None: an address of a running
    scheduler). ``local`` alone is one per two cores."""
    if not scheduler.startswith("local"):
        if not scheduler.strip():
            raise OptionError("--scheduler: expected local, local:N or a scheduler address such as tcp://HOST:8786")
        return None
    name, _, count = scheduler.partition(":")
    try:
        n_workers = int(count) if count else max(1, (os.cpu_count() or 2) // 2)
    except ValueError:
        n_workers = 0
    if name != "local" or n_workers < 1:
        raise OptionError(f"--scheduler {scheduler}: expected local or local:N with N >= 1 worker processes")
    return n_workers


def _client_for(scheduler: str):
    """``local[:N]`` starts a LocalCluster of N single-threaded worker processes; else an address."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise OptionError("--scheduler runs on dask, which is not installed: pip install 'solarmap[dask]'") from None

    n_workers = local_workers(scheduler)
    if n_workers is not None:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               host="127.0.0.1")
        return Client(cluster), cluster
    try:
        return Client(scheduler, timeout="10s"), None
    except (OSError, TimeoutError, ValueError) as exc:
        raise OptionError(f"cannot reach the dask scheduler at {scheduler} ({exc})") from None


def _run_chunks(chunks: Sequence[Chunk], journal: Journal, key: str, *, resume: bool, scorer_spec, client,
                stats: RegionalStats, progress, started: float) -> dict[str, ChunkResult]:
    """Every chunk's result, by chunk key: from the journal when resuming, else run here or on ``client``
    (each recorded in the journal as it finishes; ``stats.seconds`` counts from ``started``)."""
    resuming = journal.open(key, resume=resume)
    results: dict[str, ChunkResult] = {}

    def done(result: ChunkResult) -> None:  # a chunk's result counted, whether resumed or run now
        results[result.chunk.key] = result
        stats.chunks_done += 1
        stats.tiles_done += result.chunk.tiles
        stats.tiles_positive += result.tiles_positive
        stats.tiles_positive_unoutlined += result.tiles_positive_unoutlined

    for chunk in chunks if resuming else ():
        part = journal.read(f"chunk-{chunk.key}.pkl")
        if part is not None:
            done(part)
            stats.chunks_resumed += 1
    todo = [c for c in chunks if c.key not in results]

    def finished(result: ChunkResult) -> None:
        journal.record(f"chunk-{result.chunk.key}.pkl", result)
        fault_point("chunk")
        done(result)
        stats.seconds = time.perf_counter() - started
        if progress is not None:
            progress(stats)

    if client is None:
        for chunk in todo:
            finished(run_chunk(chunk, scorer_spec))
        return results
    from distributed import as_completed

    stats.dashboard = client.dashboard_link
    if progress is not None:
        progress(stats)
    futures = client.map(run_chunk, todo, scorer_spec=scorer_spec, key=[f"solarmap-chunk-{c.key}" for c in todo],
                         retries=2)
    for future in as_completed(futures):
        finished(future.result())
    return results


def detect_regional(inputs: Sequence[str], out: str | os.PathLike, *, scorer_spec, config: DetectConfig,
                    scheduler: str | None = None, out_crs: str | None = None, rows_per_chunk: int = 8,
                    overwrite: bool = False, resume: bool = False, metadata: dict | None = None,
                    progress: Callable[[RegionalStats], None] | None = None):
    """Detect over many rasters into one GeoPackage; returns (GeoDataFrame, RegionalStats)."""
    rasters = expand_inputs(inputs)
    journal = Journal(out)
    scorer_name = repr(scorer_spec) if is_dataclass(scorer_spec) else type(scorer_spec).__name__  # no addresses
    key = run_key(rasters, scorer_name=scorer_name, config=config, rows_per_chunk=rows_per_chunk)
    outputs = [(journal.file("panels.gpkg"), Path(out))]
    finished_run = journal.resume_finished(key, outputs) if resume else None
    if finished_run is not None:  # killed while putting its output in place: nothing else was left to do
        finished_run.chunks_resumed = finished_run.chunks_total
        return gpd.read_file(out, layer="panels"), finished_run
    out = check_output_path(out, overwrite=overwrite)
    chunks = plan_chunks(rasters, config, rows_per_chunk=rows_per_chunk)
    stats = RegionalStats(rasters=len(rasters), chunks_total=len(chunks), tiles_total=sum(c.tiles for c in chunks),
                          source_gsd_m={chunk.raster: chunk.source_gsd_m for chunk in chunks})
    started = time.perf_counter()
    # the cluster first: a scheduler that cannot be reached leaves no journal behind
    client, cluster = _client_for(scheduler) if scheduler is not None else (None, None)
    try:
        results = _run_chunks(chunks, journal, key, resume=resume, scorer_spec=scorer_spec, client=client,
                              stats=stats, progress=progress, started=started)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    by_raster: dict[int, list[ChunkResult]] = {}
    for chunk in chunks:
        by_raster.setdefault(chunk.raster_index, []).append(results[chunk.key])
    frames = [raster_frame(by_raster[i], config) for i in sorted(by_raster)]
    target = parse_crs(out_crs) if out_crs else None
    crs = target.to_wkt() if target is not None else frames[0].crs
    frame = merge_rasters(frames, crs, config)
    if frame is None:
        frame = frames[0].drop(columns=["_on_edge", "_gsd_m"]).iloc[:0].to_crs(crs)
    stats.polygons = len(frame)
    stats.area_m2 = float(frame["area_m2"].sum())
    meta = run_metadata(config=config, model_name=str(getattr(scorer_spec, "model_path", None) or "bundled"),
                        source=";".join(rasters), extra={**(metadata or {}), "rasters": len(rasters),
                                                          "chunks": len(chunks), "scheduler": scheduler or "none"})
    writer = GeoPackageWriter(out, overwrite=overwrite, work_path=outputs[0][0])
    if len(frame):
        writer.append(frame)
    writer.finish(empty_frame=frame.iloc[:0], style_qml=panels_qml(), metadata=meta)
    # in this process, raster by raster: the footprint output reads the tiles around their panels again
    installations = installations_with_footprints(frame, sources=[(Path(r).name, r) for r in rasters],
                                                  scorer=_scorer_for(scorer_spec) if len(frame) else None, config=config)
    stats.installations = add_installations(writer, installations, config)
    check_output_path(out, overwrite=overwrite)  # an output that appeared meanwhile is not replaced unasked
    stats.seconds = time.perf_counter() - started
    journal.finish(stats, outputs)
    return frame, stats

