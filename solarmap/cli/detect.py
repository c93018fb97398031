"""``solarmap detect``: the main job, over one raster or many, with progress on stderr."""

from __future__ import annotations

import click

from solarmap.cli.options import positive, scheduler_option, unit_interval

COARSER_THAN_TRAINING = 1.4  # the top of the recipe's GSD jitter (training.views.ViewConfig.scale)


def _sigterm_as_interrupt() -> None:
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _unoutlined_note(count: int, scorer) -> str:
    """What the summary says of positive tiles with nothing drawn in them: either a false call the outline
    stage rejected or an array it misses (the pseudo-seg head, taught outlines by one UAV set, draws nothing
    on many residential arrays), so the user knows where to look and what to try."""
    from solarmap.model.scorer import FALLBACK_METHODS  # after a run: torch is loaded already

    if not count:
        return ""
    hint = ""
    if scorer.method in FALLBACK_METHODS:
        if not scorer.cam_fallback:
            hint = "; --cam-fallback outlines them roughly"
        elif scorer.cam_fallback_min_score > scorer.decision_threshold:
            hint = (f"; the fallback outlines only tiles scoring at least {scorer.cam_fallback_min_score:g}: "
                    f"--cam-fallback-min-score 0 outlines the others roughly")
    return f" ({count} with nothing outlined: a false call or an array the outline stage misses{hint})"


class _RegionalProgress:
    """A regional run's progress: the dashboard's address once, then tiles across the cluster."""

    def __init__(self, quiet: bool):
        from solarmap.cli.progress import Progress

        self.quiet, self.shown_dashboard = quiet, False
        self.bar = Progress(quiet)

    def __call__(self, stats) -> None:
        if stats.dashboard and not self.shown_dashboard and not self.quiet:
            click.echo(f"dask dashboard: {stats.dashboard}", err=True)
            self.shown_dashboard = True
        self.bar.show(stats.tiles_done, stats.tiles_total, chunks=f"{stats.chunks_done}/{stats.chunks_total}")

    def close(self) -> None:
        self.bar.close()


@click.command()
@click.argument("rasters", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="GeoPackage to write.")
@click.option("--scheduler", default=None, callback=scheduler_option,
              help="Run on dask: tcp://HOST:8786 (an existing cluster) or local[:N] (N local worker processes).")
@click.option("--out-crs", default=None, help="CRS of the output for several rasters (default: the first raster's).")
@click.option("--rows-per-chunk", default=8, show_default=True, type=int, callback=positive,
              help="Tile rows per task in regional runs.")
@click.option("--model", "model_path", type=click.Path(), default=None, help="Checkpoint (default: bundled model).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=None, callback=positive, help="Tiles per batch (default 16 CPU, 64 GPU).")
@click.option("--tile-size", "tile_size_px", type=int, default=None, help="Tile size in px (default: the model's).")
@click.option("--overlap", "overlap_px", type=int, default=None, help="Tile overlap in px (default: the model's).")
@click.option("--gsd", "gsd_m", type=float, default=None, help="Resample to this GSD in metres (default: the model's).")
@click.option("--bands", default=None, help="Bands to use as R,G,B (1-based), e.g. 1,2,3.")
@click.option("--src-crs", default=None, help="CRS of a raster that carries none, e.g. EPSG:32611.")
@click.option("--branch-levels", type=click.IntRange(1, 2), default=None,
              help="Branch CAM from this many branch levels (default: all the model has).")
@click.option("--cam-method", type=click.Choice(["branch", "gap", "gradcam", "feedback", "pseudo-seg", "outline"]),
              default=None,
              help="Localization: greedy branch CAM, the classifier's GAP CAM, Grad-CAM, feedback saliency, or "
                   "the segmentation head (pseudo-seg), the outline network (outline). Default: the model's, chosen on its "
                   "validation data.")
@click.option("--cam-threshold", type=float, default=None, callback=unit_interval,
              help="Mask threshold on the normalised CAM (CAM / the model's calibrated scale; Grad-CAM, feedback: / tile max). "
                   "Default: the model's calibrated rule for the --cam-method.")
@click.option("--refine/--no-refine", default=None,
              help="Outline masks by the model's learnt panel colours near the CAM (default: on for the branch "
                   "CAM when the model has a colour prior, as the bundled one does).")
@click.option("--cam-fallback/--no-cam-fallback", default=None,
              help="pseudo-seg, outline: where the head or outline network draws nothing on a positive tile, "
                   "outline the branch CAM instead (default: the model's; the bundled model's on tiles scoring at "
                   "least 0.7, where it finds more arrays at little more area on roofs without panels).")
@click.option("--cam-fallback-min-score", type=float, default=None, callback=unit_interval,
              help="The fallback only on tiles scoring at least this (default: the model's; 0: every positive tile).")
@click.option("--score-threshold", type=float, default=None, callback=unit_interval,
              help="Tile probability above which a tile is positive (default: the model's calibrated one).")
@click.option("--min-area", "min_area_m2", type=float, default=1.0, show_default=True, help="Drop polygons below this many m².")
@click.option("--simplify", "simplify_m", type=float, default=0.0, show_default=True,
              help="Simplify outlines with this tolerance in metres (0: keep pixel outlines).")
@click.option("--join", "join_m", type=click.FloatRange(min=0), default=None,
              help="Panels closer than this many metres form one installation (the installations layer; "
                   "default: 8, chosen on solar farms' footprints).")
@click.option("--heatmap", type=click.Path(dir_okay=False), default=None, help="Also write the stitched CAM as a GeoTIFF.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run with the same inputs and settings.")
@click.option("--checkpoint-every", "checkpoint_s", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds between records of a single raster's progress, i.e. the most work an interruption "
                   "loses (0: at every tile row). Regional runs record every chunk.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def detect(rasters, out_path, scheduler, out_crs, rows_per_chunk, model_path, device, batch_size, tile_size_px, overlap_px, gsd_m, bands, src_crs, branch_levels, cam_method,
           cam_threshold, refine, cam_fallback, cam_fallback_min_score, score_threshold, min_area_m2, simplify_m, join_m, heatmap, resume, checkpoint_s, overwrite, quiet) -> None:
    """Find solar panels in RASTERS and write their polygons (with areas in m²) to one GeoPackage.

    RASTERS: raster files, directories, globs, URLs GDAL opens, or .txt files listing rasters. Several
    rasters (or --scheduler) make a regional run, chunked over dask when --scheduler is given.
    """
    from solarmap.geo.output import check_output_path
    from solarmap.geo.raster import describe_scene, expand_inputs, parse_bands
    from solarmap.geo.tiling import GSD_VARIATION_WARNING, ground_variation_note
    from solarmap.pipeline.journal import Journal

    # a run killed while renaming its finished outputs into place may have put some there already
    finishing = resume and Journal(out_path).is_finished()
    check_output_path(out_path, overwrite=overwrite or finishing)
    expanded = expand_inputs(rasters)
    single = scheduler is None and len(expanded) == 1 and list(rasters) == expanded  # one raster named as itself
    if heatmap and not single:
        raise click.UsageError("--heatmap works with a single raster")
    raster = expanded[0]
    if heatmap:
        check_output_path(heatmap, overwrite=overwrite or finishing, suffixes=(".tif", ".tiff"),
                          kind="the heatmap GeoTIFF")
    band_tuple = parse_bands(bands)
    scene = describe_scene(raster, bands=band_tuple, src_crs=src_crs)  # fail fast, before loading the model
    ground = scene.source_grid.ground_resolution()
    if single and ground.variation > GSD_VARIATION_WARNING:
        click.echo(f"solarmap: warning: {raster}: {ground_variation_note(ground)}", err=True)

    from solarmap.errors import OptionError, SolarmapError
    from solarmap.model.scorer import ScorerSpec
    from solarmap.pipeline import DetectConfig

    spec = ScorerSpec(model_path=model_path, method=cam_method, device=device, decision_threshold=score_threshold,
                      branch_levels=branch_levels, refine=refine, cam_fallback=cam_fallback,
                      cam_fallback_min_score=cam_fallback_min_score)
    scorer = spec.build()
    given = dict(tile_size_px=tile_size_px, overlap_px=overlap_px, gsd_m=gsd_m, mask_threshold=cam_threshold,
                 join_m=join_m)
    config = DetectConfig.for_scorer(
        scorer, bands=band_tuple, src_crs=src_crs, batch_size=batch_size or (64 if scorer.device.type == "cuda" else 16),
        min_area_m2=min_area_m2, simplify_m=simplify_m, **{k: v for k, v in given.items() if v is not None})
    if config.tile_size_px < scorer.model.min_input_px:
        raise OptionError(f"tile size {config.tile_size_px} px is too small for {scorer.model.backbone.display_name} "
                          f"(needs at least {scorer.model.min_input_px} px)")
    _sigterm_as_interrupt()
    kept = Journal(out_path).path
    try:
        source_gsd_m = _run(single, expanded, raster, out_path, spec, scorer, config, scheduler, out_crs,
                            rows_per_chunk, overwrite, resume, heatmap, quiet, checkpoint_s)
    except KeyboardInterrupt:
        click.echo(f"solarmap: interrupted; no output was written; the work done is kept in {kept} "
                   f"(rerun with --resume to continue)", err=True)
        click.get_current_context().exit(130)
    except SolarmapError as exc:
        if kept.exists():  # failed mid-run: say what is left behind, and why
            raise type(exc)(f"{exc}; the work done is kept in {kept} (rerun with --resume to continue)") from None
        raise
    # after the summary, with the output written (an error stays one line); not progress: --quiet keeps it
    note = coarser_than_training_note({raster: ground.mean_m} if single else source_gsd_m or {},
                                      scorer.model.config.gsd_m)
    if note:
        click.echo(f"solarmap: note: {note}", err=True)


def coarser_than_training_note(source_gsd_m: dict[str, float], model_gsd_m: float) -> str | None:
    """What to say when rasters' pixels are coarser than any the model learnt from (None: nothing):
    at NAIP's 0.6 m the bundled model still finds large arrays but misses or leaves unoutlined most
    residential ones (README, Limits), and a user should know before trusting an inventory's totals.
    ``source_gsd_m``: raster -> its pixel size on the ground (m), as the run or ``info`` read it."""
    limit = COARSER_THAN_TRAINING * model_gsd_m
    coarse = [(raster, gsd_m) for raster, gsd_m in source_gsd_m.items() if gsd_m > limit]
    if not coarse:
        return None
    (path, gsd_m), training = coarse[0], f"the model's training imagery ({model_gsd_m:g} m, seen at up to {limit:.2g} m)"
    which = (f"{path}: {gsd_m:.2f} m pixels, coarser than {training}" if len(source_gsd_m) == 1 else
             f"{len(coarse)} of {len(source_gsd_m)} rasters have pixels coarser than {training}, e.g. {path}: "
             f"{gsd_m:.2f} m")
    return f"{which}; small and residential arrays are often missed or not outlined there (README, Limits)"


def _run(single, expanded, raster, out_path, spec, scorer, config, scheduler, out_crs, rows_per_chunk, overwrite,
         resume, heatmap, quiet, checkpoint_s) -> dict[str, float] | None:
    """The run itself, once every option is checked; a regional run returns each raster's pixel size
    on the ground as it planned them (None: a single raster, described already)."""
    from solarmap.pipeline import detect_to_file

    if not single:
        from solarmap.pipeline.regional import detect_regional

        progress = _RegionalProgress(quiet)
        try:
            _, rstats = detect_regional(expanded, out_path, scorer_spec=spec, config=config, scheduler=scheduler,
                                        out_crs=out_crs, rows_per_chunk=rows_per_chunk, overwrite=overwrite,
                                        resume=resume, metadata={"cam_method": scorer.method.value}, progress=progress)
        finally:
            progress.close()
        if not quiet:
            click.echo(f"rasters: {rstats.rasters}, chunks: {rstats.chunks_done} ({rstats.chunks_resumed} resumed), "
                       f"tiles: {rstats.tiles_total}, {rstats.tiles_positive} positive"
                       f"{_unoutlined_note(rstats.tiles_positive_unoutlined, scorer)}", err=True)
            click.echo(f"panels: {rstats.polygons} polygons, {rstats.area_m2:.1f} m² in total, in "
                       f"{rstats.installations} installations; time {rstats.seconds:.1f} s", err=True)
        click.echo(f"wrote {out_path}")
        return getattr(rstats, "source_gsd_m", None)  # None from a run finished by an older solarmap
    from solarmap.cli.progress import Progress

    bar = Progress(quiet)
    try:
        stats = detect_to_file(raster, out_path, scorer=scorer, config=config, overwrite=overwrite, resume=resume,
                               heatmap=heatmap, metadata=scorer.metadata(), checkpoint_interval_s=checkpoint_s,
                               progress=lambda s: bar.show(s.tiles_read, s.tiles_total, panels=s.polygons))
    finally:
        bar.close()
    if not quiet:
        st = stats.stage_seconds
        resumed = (f" ({stats.tiles_resumed} done before the interruption, {stats.tiles_read - stats.tiles_resumed} "
                   f"now)" if resume else "")
        click.echo(f"tiles: {stats.tiles_read} read{resumed}, {stats.tiles_skipped_nodata} skipped as nodata, "
                   f"{stats.tiles_positive} positive{_unoutlined_note(stats.tiles_positive_unoutlined, scorer)}",
                   err=True)
        click.echo(f"panels: {stats.polygons} polygons, {stats.area_m2:.1f} m² in total, in {stats.installations} "
                   f"installations", err=True)
        click.echo(f"time: {stats.seconds:.1f} s (read {st['read']:.1f}, model {st['model']:.1f}, "
                   f"vectorize {st['vectorize']:.1f}, write {st['write']:.1f})", err=True)
    click.echo(f"wrote {out_path}" + (f" and {heatmap}" if heatmap else ""))
    return None
