"""Regional runs: many rasters, cut into chunks of tile rows, on dask.distributed or in one process.

The work is a list of :class:`Chunk` s — plain values (a raster path, a range of tile rows, the
detection settings) — and a :class:`ScorerSpec` that a worker turns into a scorer once and keeps.
A chunk returns its panel pieces in the raster's grid pixels, unfiltered. Pieces that touch a
boundary between two chunks of the same raster are merged on the client exactly as the seam merger
merges them within one run (shared integer edges), so a regional result equals a single-process
one. Pieces that touch the edge of a raster are merged, in the output CRS, with pieces of other
rasters that touch them (mosaics whose files meet edge to edge).

Each finished chunk is written to a part file in the journal beside the output
(``.NAME.gpkg.partial/``); ``--resume`` skips chunks whose part exists, and a worker that dies
only loses the chunk it was running (dask reschedules it).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import shapely

from solarmap.errors import InputError, OptionError
from solarmap.pipeline import DetectConfig, SceneRun
from solarmap.tiling import TileSpec, axis_cores, axis_offsets, tile_grid_shape
from solarmap.vectorize import Piece, connected_groups, merge_pieces, panels_frame

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")


# ---------------------------------------------------------------------------------------------
# Inputs


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Rasters named by paths, directories (their rasters, sorted), globs, URLs or text files that
    list one raster per line (``#`` comments allowed). Order is kept; duplicates are dropped."""
    found: list[str] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if "://" in text or text.startswith("/vsi"):
            found.append(text)  # GDAL opens it (or says why not)
        elif path.is_dir():
            rasters = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in RASTER_SUFFIXES)
            if not rasters:
                raise InputError(f"no rasters ({', '.join(RASTER_SUFFIXES)}) in directory {text}")
            found.extend(rasters)
        elif path.suffix.lower() == ".txt" and path.is_file():
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            listed = [ln for ln in lines if ln and not ln.startswith("#")]
            if not listed:
                raise InputError(f"raster list {text} names no rasters")
            base = path.parent
            found.extend(ln if ("://" in ln or ln.startswith("/vsi") or os.path.isabs(ln)) else str(base / ln)
                         for ln in listed)
        elif any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise InputError(f"no files match {text}")
            found.extend(matches)
        elif path.exists():
            found.append(text)
        else:
            raise InputError(f"input raster not found: {text}")
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------------------------------------
# Plain-value work units


@dataclass(frozen=True)
class ScorerSpec:
    """How a worker builds its scorer: a model file (None = bundled), CAM method, device."""

    model_path: str | None = None
    method: str = "branch"
    device: str = "auto"
    context_px: int | None = None
    decision_threshold: float | None = None
    branch_levels: int | None = None

    def build(self):
        from solarmap import model as model_lib
        from solarmap.cam import ModelScorer, resolve_device

        net = model_lib.load(self.model_path)
        return ModelScorer(net, method=self.method, device=resolve_device(self.device), context_px=self.context_px,
                           decision_threshold=self.decision_threshold, branch_levels=self.branch_levels, name="bundled" if self.model_path is None else self.model_path)


_SCORERS: dict = {}  # per worker process: spec -> scorer, so each worker loads its model once


def _scorer_for(spec):
    if not isinstance(spec, ScorerSpec):
        return spec  # an already-built, picklable scorer (tests, baselines)
    if spec not in _SCORERS:
        _SCORERS[spec] = spec.build()
    return _SCORERS[spec]


@dataclass(frozen=True)
class Chunk:
    """Tile rows [row_start, row_stop) of one raster; boundary rows are grid pixel rows."""

    raster: str
    raster_index: int
    row_start: int
    row_stop: int
    tiles: int
    config: DetectConfig

    @property
    def key(self) -> str:
        identity = json.dumps([self.raster, self.row_start, self.row_stop, asdict(self.config)], default=str)
        return hashlib.sha256(identity.encode()).hexdigest()[:16]


@dataclass
class ChunkResult:
    chunk: Chunk
    pieces: list[Piece]
    grid_transform: object
    crs_wkt: str
    grid_shape: tuple[int, int]
    seam_rows: tuple[int, int | None]  # grid pixel rows of the chunk's top and bottom core edges (None: raster edge)
    tiles_positive: int
    seconds: float


def plan_chunks(rasters: Sequence[str], config: DetectConfig, *, rows_per_chunk: int = 8) -> list[Chunk]:
    """Cut every raster into chunks of ``rows_per_chunk`` tile rows (checks each raster first)."""
    from solarmap.io import describe_scene

    if rows_per_chunk < 1:
        raise OptionError(f"rows per chunk must be positive, got {rows_per_chunk}")
    chunks = []
    for index, raster in enumerate(rasters):
        grid = describe_scene(raster, bands=config.bands, gsd_m=config.gsd_m, src_crs=config.src_crs).grid
        n_rows, n_cols = tile_grid_shape(grid, config.tile_spec)
        for start in range(0, n_rows, rows_per_chunk):
            stop = min(n_rows, start + rows_per_chunk)
            chunks.append(Chunk(raster, index, start, stop, (stop - start) * n_cols, config))
    return chunks


def run_chunk(chunk: Chunk, scorer_spec) -> ChunkResult:
    """Worker side: detect on the chunk's tile rows; pieces in grid pixels, not yet filtered."""
    started = time.perf_counter()
    scorer = _scorer_for(scorer_spec)
    pieces: list[Piece] = []
    run = SceneRun(chunk.raster, scorer=scorer, config=chunk.config)
    stats = run.run(pieces.extend, rows=(chunk.row_start, chunk.row_stop), pieces_only=True)
    grid = run.grid
    spec: TileSpec = chunk.config.tile_spec
    cores = axis_cores(axis_offsets(grid.height, spec), grid.height, spec)
    top = cores[chunk.row_start][0]
    bottom = cores[chunk.row_stop - 1][1]
    return ChunkResult(chunk=chunk, pieces=pieces, grid_transform=grid.transform, crs_wkt=grid.crs.to_wkt(),
                       grid_shape=(grid.height, grid.width),
                       seam_rows=(top if top > 0 else None, bottom if bottom < grid.height else None),
                       tiles_positive=stats.tiles_positive, seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Merging chunk results


def merge_raster_chunks(results: Sequence[ChunkResult]) -> list[Piece]:
    """One raster's pieces with those that meet across chunk boundaries unioned (as SeamMerger does)."""
    seams = {r for res in results for r in res.seam_rows if r is not None}
    inner, on_seam = [], []
    for res in results:
        for piece in res.pieces:
            _, miny, _, maxy = piece.geometry.bounds
            (on_seam if (miny in seams or maxy in seams) else inner).append(piece)
    return inner + merge_pieces(on_seam)


def raster_frame(results: Sequence[ChunkResult], config: DetectConfig):
    """GeoDataFrame of one raster's panels (its CRS), after chunk merging, area filter, simplification."""
    from rasterio.crs import CRS

    from solarmap.tiling import ground_resolution_m

    first = results[0]
    crs = CRS.from_wkt(first.crs_wkt)
    pieces = merge_raster_chunks(results)
    gx, gy = ground_resolution_m(first.grid_transform, crs, *first.grid_shape)
    frame = panels_frame(pieces, grid_transform=first.grid_transform, crs=crs, source=Path(first.chunk.raster).name,
                         min_area_m2=0.0, simplify_px=0.0)
    height, width = first.grid_shape
    bounds = np.array([p.geometry.bounds for p in pieces]).reshape(-1, 4)
    on_edge = (bounds[:, 0] <= 0) | (bounds[:, 1] <= 0) | (bounds[:, 2] >= width) | (bounds[:, 3] >= height)
    frame["_on_edge"] = on_edge if len(frame) else np.zeros(0, bool)
    frame["_gsd_m"] = (gx + gy) / 2
    return frame


def merge_rasters(frames: Sequence, out_crs, config: DetectConfig):
    """All rasters' panels in ``out_crs``; pieces on raster edges that meet another raster's are unioned."""
    import geopandas as gpd
    import pandas as pd

    from solarmap.vectorize import centroids_lonlat, geodesic_area_m2

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
    from pyproj import CRS as ProjCRS

    pcrs = ProjCRS.from_user_input(crs)
    if pcrs.is_geographic:
        _, miny, _, maxy = frame.total_bounds
        return 111_320.0 * np.cos(np.radians((miny + maxy) / 2))
    return pcrs.axis_info[0].unit_conversion_factor if pcrs.axis_info else 1.0


def _merge_across_rasters(frame, out_crs):
    """Union edge pieces of different rasters that touch (within half a pixel after reprojection)."""
    import geopandas as gpd
    import pandas as pd

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
    polygons: int = 0
    area_m2: float = 0.0
    seconds: float = 0.0
    dashboard: str | None = None


def _client_for(scheduler: str):
    """``local[:N]`` starts a LocalCluster of N single-threaded worker processes; else an address."""
    from distributed import Client, LocalCluster

    if scheduler.startswith("local"):
        _, _, count = scheduler.partition(":")
        try:
            n_workers = int(count) if count else max(1, (os.cpu_count() or 2) // 2)
        except ValueError:
            raise OptionError(f"--scheduler {scheduler}: expected local or local:N") from None
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               host="127.0.0.1")
        return Client(cluster), cluster
    try:
        return Client(scheduler, timeout="20s"), None
    except (OSError, TimeoutError) as exc:
        raise OptionError(f"cannot reach the dask scheduler at {scheduler} ({exc})") from None


def detect_regional(inputs: Sequence[str], out: str | os.PathLike, *, scorer_spec, config: DetectConfig,
                    scheduler: str | None = None, out_crs: str | None = None, rows_per_chunk: int = 8,
                    overwrite: bool = False, resume: bool = False, metadata: dict | None = None,
                    progress: Callable[[RegionalStats], None] | None = None):
    """Detect over many rasters into one GeoPackage; returns (GeoDataFrame, RegionalStats)."""
    from solarmap.io import check_output_path, parse_crs, write_geopackage
    from solarmap.pipeline import run_metadata
    from solarmap.style import panels_qml

    out = check_output_path(out, overwrite=overwrite)
    rasters = expand_inputs(inputs)
    chunks = plan_chunks(rasters, config, rows_per_chunk=rows_per_chunk)
    stats = RegionalStats(rasters=len(rasters), chunks_total=len(chunks), tiles_total=sum(c.tiles for c in chunks))
    journal = out.with_name(f".{out.name}.partial")
    if journal.exists() and not resume:
        shutil.rmtree(journal)
    journal.mkdir(exist_ok=True)
    started = time.perf_counter()
    results: dict[str, ChunkResult] = {}
    for chunk in chunks:
        part = journal / f"chunk-{chunk.key}.pkl"
        if resume and part.exists():
            results[chunk.key] = pickle.loads(part.read_bytes())
            stats.chunks_done += 1
            stats.chunks_resumed += 1
            stats.tiles_done += chunk.tiles
    todo = [c for c in chunks if c.key not in results]

    def finished(result: ChunkResult) -> None:
        part = journal / f"chunk-{result.chunk.key}.pkl"
        tmp = part.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(result))
        os.replace(tmp, part)
        results[result.chunk.key] = result
        stats.chunks_done += 1
        stats.tiles_done += result.chunk.tiles
        stats.tiles_positive += result.tiles_positive
        stats.seconds = time.perf_counter() - started
        if progress is not None:
            progress(stats)

    if scheduler is None:
        for chunk in todo:
            finished(run_chunk(chunk, scorer_spec))
    else:
        from distributed import as_completed

        client, cluster = _client_for(scheduler)
        try:
            stats.dashboard = client.dashboard_link
            if progress is not None:
                progress(stats)
            futures = client.map(run_chunk, todo, scorer_spec=scorer_spec, key=[f"solarmap-chunk-{c.key}" for c in todo],
                                 retries=2)
            for future in as_completed(futures):
                finished(future.result())
        finally:
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
    write_geopackage(frame, out, overwrite=overwrite, style_qml=panels_qml(), metadata=meta)
    shutil.rmtree(journal, ignore_errors=True)
    stats.seconds = time.perf_counter() - started
    return frame, stats

