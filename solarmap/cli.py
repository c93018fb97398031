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
    """Turns SolarmapError (and unexpected errors) into a one-line message unless verbose."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SolarmapError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.echo(f"solarmap: error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("solarmap: interrupted; no output was written", err=True)
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
              help="Where the demo writes its files.")
@click.option("--seed", default=20261121, show_default=True, help="Seed of the demo town.")
def demo(out_dir: str, seed: int) -> None:
    """Generate a synthetic town with known panels (the detector's demo input)."""
    from solarmap.synth import SynthConfig, render_town, write_town

    town = render_town(SynthConfig(size_px=1024, seed=seed))
    scene, truth = write_town(town, out_dir, overwrite=True)
    frame = town.truth_frame()
    click.echo(f"synthetic town: {scene}")
    click.echo(f"truth: {truth}: {len(frame)} panel arrays "
               f"({(frame['kind'] == 'roof').sum()} on roofs, {(frame['kind'] == 'ground').sum()} ground-mounted), "
               f"{frame['area_m2'].sum():.1f} m² in total")
    click.echo("open both in QGIS; detection on this scene arrives with the bundled model.")


@main.command()
@click.argument("raster", type=click.Path())
@click.option("--tile-size", "tile_size_px", default=299, show_default=True, type=int, help="Tile size in pixels.")
@click.option("--overlap", "overlap_px", default=32, show_default=True, type=int, help="Tile overlap in pixels.")
@click.option("--gsd", "gsd_m", default=None, type=float, help="Resample to this GSD in metres first.")
@click.option("--bands", default=None, help="Bands to use as R,G,B (1-based), e.g. 1,2,3.")
def info(raster: str, tile_size_px: int, overlap_px: int, gsd_m: float | None, bands: str | None) -> None:
    """Describe how solarmap would read RASTER: grid, GSD, value scale and tiling."""
    from solarmap.io import describe_scene, parse_bands
    from solarmap.tiling import TileSpec, tile_grid_shape

    spec = TileSpec(tile_size_px, overlap_px)
    scene = describe_scene(raster, bands=parse_bands(bands), gsd_m=gsd_m)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
