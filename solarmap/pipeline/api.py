"""The entry points over one raster: in memory (:func:`detect_scene`, :func:`detect`) or streamed
into a GeoPackage with a resume journal (:func:`detect_to_file`)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from solarmap import __version__
from solarmap.geo.output import GeoPackageWriter, HeatmapWriter, check_output_path
from solarmap.geo.raster import describe_scene
from solarmap.geo.style import installations_qml, panels_qml
from solarmap.pipeline.config import DetectConfig, DetectStats, ProgressCallback, Scorer
from solarmap.pipeline.footprints import installations_with_footprints
from solarmap.pipeline.journal import Journal, run_key
from solarmap.pipeline.scene import SceneRun

__all__ = ["add_installations", "detect", "detect_scene", "detect_to_file", "run_metadata"]

log = logging.getLogger(__name__)


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


def detect_to_file(path: str | Path, out: str | Path, *, scorer: Scorer, config: DetectConfig = DetectConfig(),
                   overwrite: bool = False, progress: ProgressCallback | None = None, resume: bool = False,
                   heatmap: str | Path | None = None, metadata: dict | None = None,
                   checkpoint_interval_s: float = 10.0) -> DetectStats:
    """The pipeline streamed into a GeoPackage at ``out`` (and optionally a heatmap GeoTIFF).

    Outputs are checked before any work and appear only when complete. Progress is journalled beside
    the output (:class:`~solarmap.pipeline.journal.Journal`) at a tile-row boundary every
    ``checkpoint_interval_s`` (an interrupted run loses at most about that much work); ``resume=True``
    continues from there (the raster, model and settings must be the same; ``stats.tiles_resumed``
    says how many tiles were done before), otherwise a stale journal is discarded.
    """
    journal = Journal(out)
    key = run_key([str(path)], scorer_name=scorer.name, config=config, heatmap=bool(heatmap))
    outputs = [(journal.file("panels.gpkg"), Path(out))] + ([(journal.file("heat.tif"), Path(heatmap))] if heatmap else [])
    finished = journal.resume_finished(key, outputs) if resume else None
    if finished is not None:  # killed while putting its outputs in place: nothing else was left to do
        finished.tiles_resumed = finished.tiles_read
        return finished
    out = check_output_path(out, overwrite=overwrite)
    if heatmap is not None:
        check_output_path(heatmap, overwrite=overwrite, suffixes=(".tif", ".tiff"), kind="the heatmap GeoTIFF")
    resuming = journal.open(key, resume=resume)
    state = journal.read("state.pkl") if resuming else None

    run = SceneRun(path, scorer=scorer, config=config, progress=progress)
    writer = GeoPackageWriter(out, overwrite=overwrite, work_path=journal.file("panels.gpkg"),
                              resume_rows=state.frame_rows if state else None)
    heat_writer = None
    last_frame: list = []

    def sink(frame) -> None:
        if len(frame):
            writer.append(frame)
        last_frame[:] = [frame]

    try:
        if heatmap is not None:
            grid = describe_scene(path, bands=config.bands, gsd_m=config.gsd_m, src_crs=config.src_crs).grid
            heat_writer = HeatmapWriter(heatmap, grid, overwrite=overwrite, work_path=journal.file("heat.tif"),
                                        resume=state is not None)
        stats = run.run(sink, heatmap=heat_writer, state=state, checkpoint=lambda s: journal.record("state.pkl", s),
                        checkpoint_interval_s=checkpoint_interval_s)
        t0 = time.perf_counter()
        writer.finish(empty_frame=last_frame[0].iloc[:0], style_qml=panels_qml(),
                      metadata=run_metadata(config=config, model_name=scorer.name, source=str(path), stats=stats,
                                            extra=metadata))
        panels = read_panels(writer.work_path)
        installations = installations_with_footprints(panels, sources=[(run.source_name, path)], scorer=scorer,
                                                      config=config)
        stats.installations = add_installations(writer, installations, config)
        if heat_writer is not None:
            heat_writer.complete()
        for _, target in outputs:  # an output that appeared meanwhile is not replaced unasked
            check_output_path(target, overwrite=overwrite, suffixes=(target.suffix.lower(),))
        stats.stage_seconds["write"] += time.perf_counter() - t0
    finally:
        if heat_writer is not None:
            heat_writer.close()
    journal.finish(stats, outputs)
    return stats


def detect(source, *, scorer: Scorer | None = None, config: DetectConfig | None = None, out: str | Path | None = None,
           overwrite: bool = False, progress: ProgressCallback | None = None, model: str | Path | None = None,
           method: str | None = None, device: str = "auto", cam_fallback: bool | None = None,
           cam_fallback_min_score: float | None = None, source_name: str | None = None, **overrides):
    """Detect panels in ``source`` (a raster path, or an xarray DataArray with ``.rio`` CRS/transform).

    Returns a GeoDataFrame of panel polygons in the source's CRS; with ``out`` also writes the
    GeoPackage (panels and installations). Without ``scorer``, the checkpoint ``model`` (default: the
    bundled one) scores with CAM ``method`` (default: the model's) on ``device``, exactly as
    ``solarmap detect --cam-method METHOD [--cam-fallback] [--cam-fallback-min-score S]`` does. Without
    ``config`` the scorer's calibrated settings are used, with ``overrides`` (DetectConfig fields,
    e.g. ``min_area_m2=0``) on top.

    A DataArray is read from memory (GDAL's ``/vsimem``, no temporary file on disk); its panels'
    ``source`` is ``source_name``, else the array's ``name``, else ``"array"``.

    .. versionchanged:: 0.1
       A DataArray's panels name it, not a temporary ``input.tif``.
    """
    if scorer is None:
        from solarmap.model.scorer import build_scorer

        scorer = build_scorer(model, method=method, device=device, cam_fallback=cam_fallback,
                              cam_fallback_min_score=cam_fallback_min_score)
    if config is None:
        config = DetectConfig.for_scorer(scorer, **overrides)
    path, name, in_memory = source, source_name or str(source), None
    if hasattr(source, "rio"):  # xarray + rioxarray: an in-memory GeoTIFF the tiler can window
        import uuid

        name = source_name or (str(source.name) if source.name is not None else "array")
        in_memory = path = f"/vsimem/solarmap-{uuid.uuid4().hex}.tif"
        large = min(source.rio.height, source.rio.width) >= 512
        source.rio.to_raster(path, **({"tiled": True, "blockxsize": 256, "blockysize": 256} if large else {}))
    renamed = in_memory is not None or bool(source_name)
    try:
        frame, stats = detect_scene(path, scorer=scorer, config=config, progress=progress)
        if renamed:
            frame["source"] = name
        installations = None
        if out is not None:  # before an in-memory raster goes: the footprint output reads it again
            installations = installations_with_footprints(
                frame, sources=[(name if renamed else Path(str(path)).name, path)], scorer=scorer, config=config)
    finally:
        if in_memory is not None:
            import rasterio.shutil

            rasterio.shutil.delete(in_memory)
    if out is not None:
        with GeoPackageWriter(out, overwrite=overwrite) as writer:
            writer.append(frame)
            writer.finish(empty_frame=frame.iloc[:0], style_qml=panels_qml(),
                          metadata=run_metadata(config=config, model_name=scorer.name, source=name, stats=stats))
            add_installations(writer, installations, config)
            writer.publish()
    return frame


def read_panels(path: str | Path):
    """The panels layer of a GeoPackage (finished or a run's work file)."""
    import geopandas as gpd

    return gpd.read_file(path, layer="panels")


def add_installations(writer: GeoPackageWriter, installations, config: DetectConfig) -> int:
    """The installations layer (:func:`solarmap.pipeline.footprints.installations_with_footprints`)
    into ``writer``'s finished work file, styled; returns how many there are."""
    writer.add_layer(installations, layer="installations", style_qml=installations_qml(),
                     style_description="Installation footprints graduated by area",
                     metadata={"join_m": config.join_m,
                               "rule": "panels closer than join_m, closed by join_m, joined and widened by the "
                                       "outline network's footprint regions they touch (outline method)"})
    return len(installations)

