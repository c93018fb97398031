"""The ``solarmap`` command line: thin click commands over the library's tools.

Heavy imports happen inside the commands so ``--help`` stays fast. Errors solarmap raises on
purpose become one line on stderr and exit 1 (click's usage errors exit 2); ``-v`` shows tracebacks.
"""

from __future__ import annotations

import logging
import sys

import click

from solarmap import __version__
from solarmap.errors import SolarmapError


class _Group(click.Group):
    """Turns SolarmapError and click's usage errors into a one-line message unless verbose."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "solarmap"
            click.echo(f"solarmap: error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("solarmap: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SolarmapError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.echo(f"solarmap: error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("solarmap: interrupted; no output was written (detect: rerun with --resume to continue)",
                       err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="solarmap")
@click.option("-v", "--verbose", is_flag=True, help="Show debug logging and full tracebacks.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Find solar panels in georeferenced aerial imagery and map them as polygons with areas."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter("must be positive")
    return value


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--size-px", default=1024, show_default=True, callback=_positive,
              help="Width and height of the scene in pixels.")
@click.option("--gsd", "gsd_m", default=0.3, show_default=True, type=float, callback=_positive,
              help="Ground sample distance in metres per pixel.")
@click.option("--seed", default=0, show_default=True, help="Random seed: each seed is a different town.")
@click.option("--epsg", type=int, default=None, help="Projected CRS of the scene (default: local UTM zone).")
@click.option("--overwrite", is_flag=True, help="Replace scene.tif / truth.gpkg if they exist.")
def synth(out_dir: str, size_px: int, gsd_m: float, seed: int, epsg: int | None, overwrite: bool) -> None:
    """Write a synthetic town: OUT_DIR/scene.tif (RGB GeoTIFF) and OUT_DIR/truth.gpkg (panel arrays)."""
    from solarmap.synth import SynthConfig, render_town, write_town

    _check_synth_outputs(out_dir, overwrite)
    town = render_town(SynthConfig(size_px=size_px, gsd_m=gsd_m, seed=seed, epsg=epsg))
    scene, truth = write_town(town, out_dir, overwrite=overwrite)
    total = town.truth_frame()["area_m2"].sum()
    click.echo(f"wrote {scene} ({size_px} x {size_px} px at {gsd_m} m, {town.crs})")
    click.echo(f"wrote {truth} ({len(town.arrays)} panel arrays, {total:.1f} m² of panels)")


def _check_synth_outputs(out_dir: str, overwrite: bool) -> None:
    from pathlib import Path

    from solarmap.errors import OutputError

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory")
    if not overwrite:
        for name in ("scene.tif", "truth.gpkg"):
            if (out / name).exists():
                raise OutputError(f"output exists: {out / name} (use --overwrite to replace it)")


@main.command()
@click.option("--out-dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo writes its files (replaced on each run).")
@click.option("--seed", default=20261121, show_default=True, help="Seed of the demo town (never used in training).")
@click.option("--model", "model_path", type=click.Path(), default=None, help="Checkpoint (default: bundled model).")
def demo(out_dir: str, seed: int, model_path: str | None) -> None:
    """The main job on a bundled example: a synthetic town -> detect -> evaluate against its truth."""
    from pathlib import Path

    from solarmap import model as model_lib
    from solarmap.synth import SynthConfig, render_town, write_town

    out = Path(out_dir)
    town = render_town(SynthConfig(size_px=1024, seed=seed))
    scene, truth = write_town(town, out, overwrite=True)
    frame = town.truth_frame()
    click.echo(f"synthetic town: {scene} (1024 x 1024 px at 0.3 m, {town.crs})")
    click.echo(f"truth: {truth}: {len(frame)} panel arrays ({(frame['kind'] == 'roof').sum()} on roofs, "
               f"{(frame['kind'] == 'ground').sum()} ground-mounted), {frame['area_m2'].sum():.1f} m²")
    if model_path is None and not model_lib.DEFAULT_MODEL_PATH.exists():
        click.echo("the bundled model is not in this installation yet: detection skipped (see README, Status)")
        return
    ctx = click.get_current_context()
    ctx.invoke(detect, rasters=(scene,), out_path=str(out / "panels.gpkg"), model_path=model_path,
               heatmap=str(out / "heat.tif"), overwrite=True, quiet=False, device="auto", batch_size=None,
               tile_size_px=None, overlap_px=None, gsd_m=None, bands=None, cam_method="branch", cam_threshold=None,
               refine=None, score_threshold=None, min_area_m2=1.0, simplify_m=0.0, resume=False)
    click.echo("")
    ctx.invoke(evaluate, predicted=str(out / "panels.gpkg"), truth=truth, scene=scene, tile_size_px=299,
               min_panel_m2=2.0, as_json=False)
    click.echo(f"\nopen {out / 'scene.tif'}, {out / 'heat.tif'} and {out / 'panels.gpkg'} in QGIS to look at them")


@main.command()
@click.argument("raster", type=click.Path())
@click.option("--tile-size", "tile_size_px", default=299, show_default=True, type=int, help="Tile size in pixels.")
@click.option("--overlap", "overlap_px", default=32, show_default=True, type=int, help="Tile overlap in pixels.")
@click.option("--gsd", "gsd_m", default=None, type=float, help="Resample to this GSD in metres first.")
@click.option("--bands", default=None, help="Bands to use as R,G,B (1-based), e.g. 1,2,3.")
@click.option("--src-crs", default=None, help="CRS of a raster that carries none, e.g. EPSG:32611.")
def info(raster: str, tile_size_px: int, overlap_px: int, gsd_m: float | None, bands: str | None,
         src_crs: str | None) -> None:
    """Describe how solarmap would read RASTER: grid, GSD, value scale and tiling."""
    from solarmap.io import describe_scene, parse_bands
    from solarmap.tiling import TileSpec, tile_grid_shape

    spec = TileSpec(tile_size_px, overlap_px)
    scene = describe_scene(raster, bands=parse_bands(bands), gsd_m=gsd_m, src_crs=src_crs)
    src, grid = scene.source_grid, scene.grid
    rows, cols = tile_grid_shape(grid, spec)
    gx, gy = src.ground_resolution_m()
    click.echo(f"raster: {raster}")
    click.echo(f"crs: {src.crs.to_string()}")
    click.echo(f"size: {src.width} x {src.height} px, pixel {gx:.3f} x {gy:.3f} m, dtype {scene.dtype}, "
               f"values / {scene.scale:g} -> [0, 1]")
    if grid != src:
        wx, wy = grid.ground_resolution_m()
        click.echo(f"working grid: {grid.width} x {grid.height} px at {wx:.3f} x {wy:.3f} m")
    click.echo(f"tiles: {rows} x {cols} = {rows * cols} of {tile_size_px} px (overlap {overlap_px} px); "
               f"nodata mask: {'yes' if scene.has_mask else 'no'}")


def _unit_interval(ctx, param, value):
    if value is not None and not 0.0 <= value <= 1.0:
        raise click.BadParameter("must be between 0 and 1")
    return value


@main.command()
@click.option("--stage", type=click.Choice(["classifier", "branch1", "branch2", "all", "pseudo-seg", "classifier-top",
                                           "colour-prior"]),
              default="all", show_default=True,
              help="Greedy stage(s) to train; branch stages need a --model with the previous stage. classifier-top: "
                   "fine-tune the classifier above Mixed_5d of a --model (its CAM branch is untouched). Every stage "
                   "also learns the panel colours of mask refinement (--refine); colour-prior does only that.")
@click.option("--chips", "chip_sources", multiple=True, type=click.Path(exists=True),
              help="Labelled chips: a folder with labels.csv + chips/ID.tif, or a CSV of path,label. Repeatable.")
@click.option("--chips-gsd", type=float, default=0.3, show_default=True, callback=_positive,
              help="Ground sample distance of the chips in metres.")
@click.option("--scene", "scenes", multiple=True, type=click.Path(exists=True),
              help="Georeferenced scene with truth: give SCENE.tif here and its --truth in the same order.")
@click.option("--truth", "truths", multiple=True, type=click.Path(exists=True), help="Truth polygons for each --scene.")
@click.option("--synthetic", type=int, default=0, show_default=True, help="Also render this many synthetic towns.")
@click.option("--model", "model_path", type=click.Path(), default=None, help="Checkpoint to start from.")
@click.option("--init", "init", type=click.Choice(["scratch", "imagenet"]), default="scratch", show_default=True,
              help="Backbone initialisation for a new model.")
@click.option("--init-weights", type=click.Path(exists=True), default=None,
              help="ImageNet Inception-v3 weights file (else the torch hub cache is searched; nothing is downloaded).")
@click.option("--workdir", type=click.Path(file_okay=False), default="solarmap-train", show_default=True,
              help="Checkpoints for resuming, feature caches, rendered towns.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Where to write the model.")
@click.option("--epochs", type=int, default=None, callback=_positive, help="Epochs per stage (default: 20 / 10).")
@click.option("--lr", type=float, default=None, callback=_positive, help="Learning rate (default 2e-3 / 1e-3).")
@click.option("--batch-size", type=int, default=32, show_default=True, callback=_positive)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def train(stage, chip_sources, chips_gsd, scenes, truths, synthetic, model_path, init, init_weights, workdir,
          out_path, epochs, lr, batch_size, seed, overwrite) -> None:
    """Train the classifier and the greedy CAM branch on image-level labels."""
    from pathlib import Path

    import torch

    from solarmap import model as model_lib
    from solarmap import train as train_lib
    from solarmap.errors import InputError, OptionError, OutputError

    if Path(out_path).exists() and not overwrite:
        raise OutputError(f"output exists: {out_path} (use --overwrite to replace it)")
    if len(scenes) != len(truths):
        raise OptionError("give one --truth for each --scene")
    if not (chip_sources or scenes or synthetic):
        raise OptionError("no training data: give --chips, --scene/--truth or --synthetic N")
    if stage in ("classifier-top", "colour-prior") and not model_path:
        raise OptionError(f"{stage} works on a trained model: give --model FILE")
    torch.manual_seed(seed)
    if stage == "pseudo-seg":
        _train_pseudo_seg(model_lib.load(model_path), scenes, truths, synthetic, workdir, out_path, epochs, lr,
                          batch_size, seed)
        return
    if model_path:
        net = model_lib.load(model_path)
    else:
        net = model_lib.SolarNet(model_lib.ModelConfig())
        if init == "imagenet":
            model_lib.init_from_imagenet(net, init_weights)
    config = net.config
    samples = []
    for source in chip_sources:
        samples += train_lib.load_chips(source, chip_gsd_m=chips_gsd, model=config)
    for scene, truth in zip(scenes, truths):
        samples += train_lib.scene_samples(scene, truth, model=config)
    if synthetic:
        samples += train_lib.synthetic_samples(Path(workdir) / "towns", seeds=range(1, synthetic + 1), size_px=1024,
                                               model=config)
    train_set, val_set, test_set = train_lib.split_samples(samples, val_fraction=0.15, test_fraction=0.2)
    click.echo(f"samples: {len(train_set)} train, {len(val_set)} validation, {len(test_set)} held out", err=True)
    stages = {"all": train_lib.STAGES, "colour-prior": ()}.get(stage, (stage,))
    for name in stages:
        defaults = {"classifier": {"epochs": 20, "lr": 2e-3},
                    "classifier-top": {"epochs": 4, "lr": 1e-4}}.get(name, {"epochs": 10, "lr": 1e-3})
        cfg = train_lib.TrainConfig(stage=name, epochs=epochs or defaults["epochs"], lr=lr or defaults["lr"],
                                    batch_size=batch_size, seed=seed)
        result = train_lib.train_stage(net, train_set, val_set, cfg, workdir=workdir,
                                       progress=lambda line: click.echo(line, err=True))
        val = result.val
        click.echo(f"{name}: best epoch {result.best_epoch}: validation precision {val.get('precision', 0):.3f} "
                   f"recall {val.get('recall', 0):.3f} F1 {val.get('f1', 0):.3f}")
    if val_set and stages:
        click.echo(f"calibrated on validation data: {train_lib.calibrate(net, val_set)}", err=True)
    if test_set and stages:
        click.echo(f"held-out: {train_lib.score_samples(net, test_set).line()}")
    try:
        click.echo(f"colour prior (for --refine): {train_lib.fit_colour_prior(net, train_set)}", err=True)
    except InputError:
        if not stages:
            raise
        click.echo("no colour prior: the training tiles need both labels", err=True)
    model_lib.with_config(net, provenance={**net.config.provenance, "train_args": {
        "stage": stage, "chips": list(chip_sources), "scenes": list(scenes), "synthetic": synthetic, "seed": seed}})
    model_lib.save(net, out_path)
    click.echo(f"wrote {out_path} (branch levels: {net.config.branch_levels})")


def _train_pseudo_seg(net, scenes, truths, synthetic, workdir, out_path, epochs, lr, batch_size, seed) -> None:
    """The pseudo-seg head on the positive windows (tile + context) of georeferenced scenes."""
    from pathlib import Path

    from solarmap import model as model_lib
    from solarmap import train as train_lib
    from solarmap.errors import OptionError
    from solarmap.pseudoseg import train_pseudo_seg

    if net.config.branch_levels < 1:
        raise OptionError("pseudo-seg needs a model with a trained CAM branch (--model FILE, default: bundled)")
    pairs = list(zip(scenes, truths))
    if synthetic:
        train_lib.synthetic_samples(Path(workdir) / "towns", seeds=range(1, synthetic + 1), size_px=1024,
                                    model=net.config)
        pairs += [(str(Path(workdir) / "towns" / f"town_{s}" / "scene.tif"),
                   str(Path(workdir) / "towns" / f"town_{s}" / "truth.gpkg")) for s in range(1, synthetic + 1)]
    if not pairs:
        raise OptionError("pseudo-seg trains on georeferenced scenes: give --scene/--truth or --synthetic N")
    windows = train_lib.positive_windows(pairs, model=net.config)
    if not windows:
        raise OptionError("no tile with panels in the given scenes: nothing to learn pseudo masks from")
    x, _ = train_lib.stack_samples(windows)
    info = train_pseudo_seg(net, x, epochs=epochs or 6, batch_size=batch_size, lr=lr or 2e-3, seed=seed,
                            progress=lambda line: click.echo(line, err=True))
    model_lib.with_config(net, provenance={**net.config.provenance, "pseudo_seg": {
        k: v for k, v in info.items() if k != "loss"}})
    model_lib.save(net, out_path)
    click.echo(f"wrote {out_path} (pseudo-seg head on {info['windows']} positive windows, "
               f"{info['seconds']:.0f} s; use --cam-method pseudo-seg)")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--gsd", "gsd_m", type=float, required=True, callback=_positive,
              help="Ground sample distance of the images in metres (they are resampled to the model's).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="CSV to write.")
@click.option("--model", "model_path", type=click.Path(), default=None, help="Checkpoint (default: bundled model).")
@click.option("--threshold", type=float, default=None, callback=_unit_interval,
              help="Decision threshold on the probability (default: the model's calibrated one).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def classify(images, gsd_m, out_path, model_path, threshold, overwrite) -> None:
    """Score image chips (any size, georeferenced or not): path,probability,label per image."""
    import csv

    import numpy as np
    import torch

    from solarmap import model as model_lib
    from solarmap.io import atomic_path, check_output_path
    from solarmap.train import _resample_to, read_image

    check_output_path(out_path, overwrite=overwrite, suffixes=(".csv",))
    net = model_lib.load(model_path)
    cut = net.config.decision_threshold if threshold is None else threshold
    rows = []
    for path in images:
        pixels = _resample_to(read_image(path), gsd_m / net.config.gsd_m)
        pad_h, pad_w = max(0, 75 - pixels.shape[1]), max(0, 75 - pixels.shape[2])  # Inception's minimum input
        if pad_h or pad_w:
            pixels = np.pad(pixels, ((0, 0), (0, pad_h), (0, pad_w)), mode="edge")
        prob, _ = net.predict(torch.from_numpy(np.ascontiguousarray(pixels))[None], with_cam=False)
        rows.append((path, float(prob[0]), int(float(prob[0]) >= cut)))
    with atomic_path(out_path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "probability", "label"])
            for path, prob, label in rows:
                writer.writerow([path, f"{prob:.6f}", label])
    positives = sum(r[2] for r in rows)
    click.echo(f"wrote {out_path}: {len(rows)} images, {positives} with panels (threshold {cut:.2f})")


class _Progress:
    """Progress on stderr: tiles done / total, tiles per second, ETA, panels found."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def __call__(self, stats) -> None:
        import time

        now = time.monotonic()
        if self.quiet or (now - self.last < (0.5 if self.tty else 10.0) and stats.tiles_read < stats.tiles_total):
            return
        self.last = now
        rate = stats.tiles_read / stats.seconds if stats.seconds else 0.0
        eta = (stats.tiles_total - stats.tiles_read) / rate if rate else float("nan")
        line = (f"tiles {stats.tiles_read}/{stats.tiles_total} ({100 * stats.tiles_read / max(stats.tiles_total, 1):.0f} %), "
                f"{rate:.1f} tiles/s, ETA {eta:.0f} s, panels {stats.polygons}")
        click.echo(("\r" + line + "   ") if self.tty else line, err=True, nl=not self.tty)

    def done(self) -> None:
        if self.tty and not self.quiet:
            click.echo("", err=True)


def _sigterm_as_interrupt() -> None:
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


class _RegionalProgress:
    """Progress of a regional run: chunks and tiles done across the cluster."""

    def __init__(self, quiet: bool):
        self.quiet, self.last, self.shown_dashboard = quiet, 0.0, False

    def __call__(self, stats) -> None:
        import time

        if self.quiet:
            return
        if stats.dashboard and not self.shown_dashboard:
            click.echo(f"dask dashboard: {stats.dashboard}", err=True)
            self.shown_dashboard = True
        now = time.monotonic()
        if now - self.last < 2.0 and stats.chunks_done < stats.chunks_total:
            return
        self.last = now
        rate = stats.tiles_done / stats.seconds if stats.seconds else 0.0
        click.echo(f"chunks {stats.chunks_done}/{stats.chunks_total}, tiles {stats.tiles_done}/{stats.tiles_total}, "
                   f"{rate:.1f} tiles/s", err=True)


@main.command()
@click.argument("rasters", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="GeoPackage to write.")
@click.option("--scheduler", default=None,
              help="Run on dask: tcp://HOST:8786 (an existing cluster) or local[:N] (N local worker processes).")
@click.option("--out-crs", default=None, help="CRS of the output for several rasters (default: the first raster's).")
@click.option("--rows-per-chunk", default=8, show_default=True, type=int, callback=_positive,
              help="Tile rows per task in regional runs.")
@click.option("--model", "model_path", type=click.Path(), default=None, help="Checkpoint (default: bundled model).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=None, callback=_positive, help="Tiles per batch (default 16 CPU, 64 GPU).")
@click.option("--tile-size", "tile_size_px", type=int, default=None, help="Tile size in px (default: the model's).")
@click.option("--overlap", "overlap_px", type=int, default=None, help="Tile overlap in px (default: the model's).")
@click.option("--gsd", "gsd_m", type=float, default=None, help="Resample to this GSD in metres (default: the model's).")
@click.option("--bands", default=None, help="Bands to use as R,G,B (1-based), e.g. 1,2,3.")
@click.option("--src-crs", default=None, help="CRS of a raster that carries none, e.g. EPSG:32611.")
@click.option("--branch-levels", type=click.IntRange(1, 2), default=None,
              help="Branch CAM from this many branch levels (default: all the model has).")
@click.option("--cam-method", type=click.Choice(["branch", "gap", "gradcam", "feedback", "pseudo-seg"]),
              default="branch",
              show_default=True,
              help="Localization: greedy branch CAM, the classifier's GAP CAM, Grad-CAM, feedback saliency, or "
                   "the pseudo-seg head (a model trained with --stage pseudo-seg).")
@click.option("--cam-threshold", type=float, default=None, callback=_unit_interval,
              help="Mask threshold on the normalised CAM (CAM / the model's calibrated scale; Grad-CAM, feedback: / tile max). "
                   "Default: the model's calibrated rule for the --cam-method.")
@click.option("--refine/--no-refine", default=None,
              help="Outline masks by the model's learnt panel colours near the CAM (default: on for the branch "
                   "CAM when the model has a colour prior, as the bundled one does).")
@click.option("--score-threshold", type=float, default=None, callback=_unit_interval,
              help="Tile probability above which a tile is positive (default: the model's calibrated one).")
@click.option("--min-area", "min_area_m2", type=float, default=1.0, show_default=True, help="Drop polygons below this many m².")
@click.option("--simplify", "simplify_m", type=float, default=0.0, show_default=True,
              help="Simplify outlines with this tolerance in metres (0: keep pixel outlines).")
@click.option("--heatmap", type=click.Path(dir_okay=False), default=None, help="Also write the stitched CAM as a GeoTIFF.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run with the same inputs and settings.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def detect(rasters, out_path, scheduler, out_crs, rows_per_chunk, model_path, device, batch_size, tile_size_px, overlap_px, gsd_m, bands, src_crs, branch_levels, cam_method,
           cam_threshold, refine, score_threshold, min_area_m2, simplify_m, heatmap, resume, overwrite, quiet) -> None:
    """Find solar panels in RASTERS and write their polygons (with areas in m²) to one GeoPackage.

    RASTERS: raster files, directories, globs, URLs GDAL opens, or .txt files listing rasters. Several
    rasters (or --scheduler) make a regional run, chunked over dask when --scheduler is given.
    """
    from solarmap.io import check_output_path, describe_scene, parse_bands

    check_output_path(out_path, overwrite=overwrite)
    from solarmap.regional import expand_inputs

    expanded = expand_inputs(rasters)
    single = scheduler is None and list(rasters) == expanded  # one raster named as itself
    if heatmap and not single:
        raise click.UsageError("--heatmap works with a single raster")
    raster = expanded[0]
    if heatmap:
        check_output_path(heatmap, overwrite=overwrite, suffixes=(".tif", ".tiff"), kind="the heatmap GeoTIFF")
    band_tuple = parse_bands(bands)
    describe_scene(raster, bands=band_tuple, src_crs=src_crs)  # fail fast on a bad raster, before loading the model

    from dataclasses import replace

    from solarmap import model as model_lib
    from solarmap.cam import CamMethod, ModelScorer, check_tile_size, resolve_device
    from solarmap.errors import ModelError
    from solarmap.pipeline import DetectConfig, detect_to_file
    from solarmap.refine import ColourRefine

    net = model_lib.load(model_path)
    torch_device = resolve_device(device)
    method = CamMethod(cam_method)
    given = dict(tile_size_px=tile_size_px, overlap_px=overlap_px, gsd_m=gsd_m, score_threshold=score_threshold,
                 mask_threshold=cam_threshold)
    config = DetectConfig.for_model(
        net.config, method=method.value, bands=band_tuple, src_crs=src_crs, batch_size=batch_size or (64 if torch_device.type == "cuda" else 16),
        min_area_m2=min_area_m2, simplify_m=simplify_m, **{k: v for k, v in given.items() if v is not None})
    if refine is False:
        config = replace(config, refine=None)
    elif refine and config.refine is None:
        if net.config.colour_prior is None:
            raise ModelError("--refine: this model has no colour prior (solarmap train --stage colour-prior adds one)")
        config = replace(config, refine=ColourRefine(**net.config.refine_rule))
    check_tile_size(config.tile_size_px)
    scorer = ModelScorer(net, method=method, device=torch_device, decision_threshold=config.score_threshold,
                         context_px=config.context_px, branch_levels=branch_levels,
                         name=f"{'bundled' if model_path is None else model_path}")
    _sigterm_as_interrupt()
    if not single:
        from solarmap.regional import ScorerSpec, detect_regional

        spec = ScorerSpec(model_path=model_path, method=method.value, device=device, context_px=config.context_px,
                          decision_threshold=config.score_threshold, branch_levels=branch_levels)
        _, rstats = detect_regional(expanded, out_path, scorer_spec=spec, config=config, scheduler=scheduler,
                                    out_crs=out_crs, rows_per_chunk=rows_per_chunk, overwrite=overwrite, resume=resume,
                                    metadata={"cam_method": method.value}, progress=_RegionalProgress(quiet))
        if not quiet:
            click.echo(f"rasters: {rstats.rasters}, chunks: {rstats.chunks_done} ({rstats.chunks_resumed} resumed), "
                       f"tiles: {rstats.tiles_total}", err=True)
            click.echo(f"panels: {rstats.polygons} polygons, {rstats.area_m2:.1f} m² in total; "
                       f"time {rstats.seconds:.1f} s", err=True)
        click.echo(f"wrote {out_path}")
        return
    progress = _Progress(quiet)
    stats = detect_to_file(raster, out_path, scorer=scorer, config=config, overwrite=overwrite, resume=resume,
                           heatmap=heatmap, progress=progress,
                           metadata={"cam_method": method.value, "device": str(torch_device),
                                     "model_gsd_m": net.config.gsd_m, "cam_threshold_basis": "CAM / cam_scale"
                                     if method in (CamMethod.BRANCH, CamMethod.GAP) else
                                     "probability" if method is CamMethod.PSEUDO_SEG else f"{method.value} / tile max",
                                     "branch_levels": branch_levels or net.config.branch_levels})
    progress.done()
    if not quiet:
        st = stats.stage_seconds
        click.echo(f"tiles: {stats.tiles_read} read, {stats.tiles_skipped_nodata} skipped as nodata, "
                   f"{stats.tiles_positive} positive", err=True)
        click.echo(f"panels: {stats.polygons} polygons, {stats.area_m2:.1f} m² in total", err=True)
        click.echo(f"time: {stats.seconds:.1f} s (read {st['read']:.1f}, model {st['model']:.1f}, "
                   f"vectorize {st['vectorize']:.1f}, write {st['write']:.1f})", err=True)
    click.echo(f"wrote {out_path}" + (f" and {heatmap}" if heatmap else ""))


@main.command()
@click.argument("predicted", type=click.Path(exists=True))
@click.option("--truth", required=True, type=click.Path(exists=True), help="Truth polygons (GeoPackage or any OGR file).")
@click.option("--scene", required=True, type=click.Path(exists=True), help="The raster the prediction was made on.")
@click.option("--tile-size", "tile_size_px", type=int, default=299, show_default=True, help="Tile grid for tile metrics.")
@click.option("--min-panel", "min_panel_m2", type=float, default=2.0, show_default=True,
              help="m² of panel that makes a tile positive.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(predicted, truth, scene, tile_size_px, min_panel_m2, as_json) -> None:
    """Compare PREDICTED panel polygons with --truth on --scene (tile, box, pixel, object and area metrics)."""
    import json

    from solarmap.evaluate import evaluate as run_evaluation
    from solarmap.tiling import TileSpec

    TileSpec(tile_size_px, 0)
    result = run_evaluation(_read_panels(predicted), _read_panels(truth), scene, tile_size_px=tile_size_px,
                            min_panel_m2=min_panel_m2)
    click.echo(json.dumps(result.as_dict(), indent=1) if as_json else result.table())


def _read_panels(path: str):
    import geopandas as gpd
    import pyogrio

    from solarmap.errors import InputError

    try:
        layers = [name for name, _ in pyogrio.list_layers(path)]
        return gpd.read_file(path, layer="panels" if "panels" in layers else layers[0])
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputError(f"cannot read polygons from {path} ({type(exc).__name__})") from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
