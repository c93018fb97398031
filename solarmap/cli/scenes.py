"""Commands about scenes: ``synth``, ``demo``, ``info`` and ``evaluate``."""

from __future__ import annotations

from pathlib import Path

import click

from solarmap.cli.detect import detect
from solarmap.cli.options import positive


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--size-px", default=1024, show_default=True, callback=positive,
              help="Width and height of the scene in pixels.")
@click.option("--gsd", "gsd_m", default=0.3, show_default=True, type=float, callback=positive,
              help="Ground sample distance in metres per pixel.")
@click.option("--seed", default=0, show_default=True, help="Random seed: each seed is a different town.")
@click.option("--epsg", type=int, default=None, help="Projected CRS of the scene (default: local UTM zone).")
@click.option("--overwrite", is_flag=True, help="Replace scene.tif / truth.gpkg if they exist.")
def synth(out_dir: str, size_px: int, gsd_m: float, seed: int, epsg: int | None, overwrite: bool) -> None:
    """Write a synthetic town: OUT_DIR/scene.tif (RGB GeoTIFF) and OUT_DIR/truth.gpkg (panel arrays)."""
    from solarmap.training.synth import SynthConfig, render_town, write_town

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


DEMO_DATA = Path(__file__).parent / "data"


@click.command()
@click.option("--out-dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo writes its files (replaced on each run).")
@click.option("--synthetic", is_flag=True, help="A synthetic town instead of the bundled real scene.")
@click.option("--seed", default=20261121, show_default=True, help="Seed of the synthetic town (never used in training).")
@click.option("--model", "model_path", type=click.Path(), default=None, help="Checkpoint (default: bundled model).")
def demo(out_dir: str, synthetic: bool, seed: int, model_path: str | None) -> None:
    """The main job on a bundled example: a real scene (16 PV01 UAV images, 0.1 m, CC BY 4.0) or a
    synthetic town -> detect -> evaluate against its truth."""
    import shutil

    from solarmap.model.checkpoint import DEFAULT_MODEL_PATH

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if synthetic:
        from solarmap.training.synth import SynthConfig, render_town, write_town

        town = render_town(SynthConfig(size_px=1024, seed=seed))
        scene, truth = write_town(town, out, overwrite=True)
        frame = town.truth_frame()
        click.echo(f"synthetic town: {scene} (1024 x 1024 px at 0.3 m, {town.crs})")
        click.echo(f"truth: {truth}: {len(frame)} panel arrays ({(frame['kind'] == 'roof').sum()} on roofs, "
                   f"{(frame['kind'] == 'ground').sum()} ground-mounted), {frame['area_m2'].sum():.1f} m²")
    else:
        import geopandas as gpd

        scene, truth = str(out / "scene.tif"), str(out / "truth.gpkg")
        shutil.copy(DEMO_DATA / "demo_pv01.tif", scene)
        shutil.copy(DEMO_DATA / "demo_pv01_truth.gpkg", truth)
        frame = gpd.read_file(truth, layer="panels")
        click.echo(f"real scene: {scene} (16 PV01 UAV images from Jiangsu, China, 1024 x 1024 px at 0.1 m; "
                   f"Jiang et al. 2021, CC BY 4.0; never used in training)")
        click.echo(f"truth: {truth}: {len(frame)} panel outlines, {frame.area.sum():.1f} m²")
    if model_path is None and not DEFAULT_MODEL_PATH.exists():
        click.echo("the bundled model is not in this installation yet: detection skipped (see README, Status)")
        return
    ctx = click.get_current_context()
    ctx.invoke(detect, rasters=(scene,), out_path=str(out / "panels.gpkg"), model_path=model_path,
               heatmap=str(out / "heat.tif"), overwrite=True, quiet=False, device="auto", batch_size=None,
               tile_size_px=None, overlap_px=None, gsd_m=None, bands=None, cam_method=None, cam_threshold=None,
               refine=None, score_threshold=None, min_area_m2=1.0, simplify_m=0.0, resume=False)
    click.echo("")
    ctx.invoke(evaluate, predicted=str(out / "panels.gpkg"), truth=truth, scene=scene, tile_size_px=299,
               min_panel_m2=2.0, as_json=False)
    click.echo(f"\nopen {scene}, {out / 'heat.tif'} and {out / 'panels.gpkg'} (panels and installations) in QGIS "
               f"to look at them")


@click.command()
@click.argument("raster", type=click.Path())
@click.option("--model", "model_path", default=None, type=click.Path(dir_okay=False),
              help="Read it as detect would with this model (default: the bundled model).")
@click.option("--tile-size", "tile_size_px", default=None, type=int, help="Tile size in pixels (default: the model's).")
@click.option("--overlap", "overlap_px", default=None, type=int, help="Tile overlap in pixels (default: the model's).")
@click.option("--gsd", "gsd_m", default=None, type=float, help="Resample to this GSD in metres (default: the model's).")
@click.option("--bands", default=None, help="Bands to use as R,G,B (1-based), e.g. 1,2,3.")
@click.option("--src-crs", default=None, help="CRS of a raster that carries none, e.g. EPSG:32611.")
def info(raster: str, model_path: str | None, tile_size_px: int | None, overlap_px: int | None, gsd_m: float | None,
         bands: str | None, src_crs: str | None) -> None:
    """Describe how `solarmap detect` would read RASTER: grid, GSD, value scale and tiling."""
    from solarmap.geo.raster import describe_scene, parse_bands
    from solarmap.geo.tiling import (
        GSD_VARIATION_WARNING,
        TileSpec,
        ground_variation_note,
        resampled_grid,
        tile_grid_shape,
    )

    scene = describe_scene(raster, bands=parse_bands(bands), src_crs=src_crs)  # a bad raster fails before the model
    model = None
    if None in (tile_size_px, overlap_px, gsd_m) or model_path:
        from solarmap.model import read_config

        model = read_config(model_path)
        tile_size_px = model.tile_size_px if tile_size_px is None else tile_size_px
        overlap_px = model.overlap_px if overlap_px is None else overlap_px
        gsd_m = model.gsd_m if gsd_m is None else gsd_m
    spec = TileSpec(tile_size_px, overlap_px)
    src = scene.source_grid
    grid = resampled_grid(src, gsd_m)  # what describe_scene(..., gsd_m=) gives, without opening the raster again
    rows, cols = tile_grid_shape(grid, spec)
    ground = src.ground_resolution()
    click.echo(f"raster: {raster}")
    click.echo(f"crs: {src.crs.to_string()}")
    click.echo(f"georeferencing: {scene.georeferencing}")
    click.echo(f"size: {src.width} x {src.height} px, {ground.describe()}, dtype {scene.dtype}, "
               f"values / {scene.scale:g} -> [0, 1]")
    if ground.variation > GSD_VARIATION_WARNING:
        click.echo(f"note: {ground_variation_note(ground)}")
    if grid != src:
        wx, wy = grid.ground_resolution_m()
        click.echo(f"working grid: {grid.width} x {grid.height} px at {wx:.3f} x {wy:.3f} m on the ground")
    click.echo(f"tiles: {rows} x {cols} = {rows * cols} of {tile_size_px} px (overlap {overlap_px} px); "
               f"nodata mask: {'yes' if scene.has_mask else 'no'}")
    if model is not None:  # what detect's summary will say, before a long run
        from solarmap.cli.detect import coarser_than_training_note

        note = coarser_than_training_note({raster: ground.mean_m}, model.gsd_m)
        if note:
            click.echo(f"note: {note}")


@click.command()
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
    from solarmap.geo.tiling import TileSpec

    TileSpec(tile_size_px, 0)
    result = run_evaluation(_read_panels(predicted), _read_panels(truth), scene, tile_size_px=tile_size_px,
                            min_panel_m2=min_panel_m2)
    click.echo(json.dumps(result.as_dict(), indent=1) if as_json else result.table())


def _read_panels(path: str):
    import geopandas as gpd

    from solarmap.cli.inventory import layer_names
    from solarmap.errors import InputError

    layers = layer_names(path, "polygons")
    try:
        return gpd.read_file(path, layer="panels" if "panels" in layers else layers[0])
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputError(f"cannot read polygons from {path} ({type(exc).__name__})") from None
