"""``solarmap summarize`` and ``solarmap compare``: from a detection's GeoPackage to totals per region
and to the change between two dates (thin commands over :mod:`solarmap.geo.inventory`)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["compare", "layer_names", "summarize"]


def layer_names(path: str, what: str) -> list[str]:
    """The layers of a vector file; one clear line (reading ``what``) where it cannot be read."""
    import pyogrio

    from solarmap.errors import InputError

    try:
        return [name for name, _ in pyogrio.list_layers(path)]
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise InputError(f"cannot read {what} from {path} ({type(exc).__name__})") from None


def read_detection(path: str):
    """A detection's installations (its ``installations`` layer, else its ``panels`` grouped)."""
    import geopandas as gpd

    from solarmap.errors import InputError
    from solarmap.geo.inventory import installations_of

    layers = layer_names(path, "panels")
    layer = next((name for name in ("installations", "panels") if name in layers), None)
    if layer is None:
        raise InputError(f"{path} has no panels or installations layer (it has: {', '.join(layers) or 'none'}); "
                         f"give a GeoPackage written by solarmap detect")
    frame = gpd.read_file(path, layer=layer)
    if frame.crs is None:
        raise InputError(f"{path}: layer {layer} has no CRS")
    return installations_of(frame)


def read_regions(path: str, layer: str | None):
    import geopandas as gpd

    from solarmap.errors import InputError

    layers = layer_names(path, "regions")
    if layer is not None and layer not in layers:
        raise InputError(f"{path} has no layer {layer!r} (it has: {', '.join(layers)})")
    return gpd.read_file(path, layer=layer or layers[0])


def write_table(frame, out: Path, *, overwrite: bool, layer: str, style_qml: str | None = None,
                metadata: dict | None = None) -> None:
    """``frame`` to a GeoPackage layer (styled) or, for ``.csv``, its attributes; atomically."""
    from solarmap.geo.output import atomic_path, write_geopackage

    if out.suffix.lower() == ".csv":
        with atomic_path(out, overwrite=overwrite) as tmp:
            frame.drop(columns=frame.geometry.name).to_csv(tmp, index=False)
    else:
        write_geopackage(frame, out, layer=layer, overwrite=overwrite, style_qml=style_qml, metadata=metadata)


@click.command()
@click.argument("detection", type=click.Path(exists=True, dir_okay=False))
@click.option("--by", "regions_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Regions (any OGR file, any CRS): one row of totals each.")
@click.option("--layer", default=None, help="The regions' layer (default: the first).")
@click.option("--field", default=None, help="The regions' field to keep as their name (default: all fields).")
@click.option("--grid", "grid_m", type=float, default=None, help="Square cells of this many metres instead of --by.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="A GeoPackage (styled by capacity) or a .csv table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw a choropleth of capacity per km² to this PNG.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def summarize(detection, regions_path, layer, field, grid_m, out_path, plot_path, overwrite) -> None:
    """Installations, panel area and capacity per region of a DETECTION (a GeoPackage from detect),
    each installation counted once, in the region holding its representative point."""
    from solarmap.geo.inventory import regular_grid, summarize as summarize_regions
    from solarmap.geo.output import check_output_path
    from solarmap.geo.style import summary_qml

    if (regions_path is None) == (grid_m is None):
        raise click.UsageError("give regions with --by REGIONS or a grid with --grid METRES (one of them)")
    out = check_output_path(out_path, overwrite=overwrite, suffixes=(".gpkg", ".csv"), kind="the summary")
    if plot_path:
        check_output_path(plot_path, overwrite=overwrite, suffixes=(".png",), kind="a PNG map")
    installations = read_detection(detection)
    if grid_m is not None:
        if not len(installations):
            from solarmap.errors import InputError

            raise InputError(f"{detection} holds no installations: a grid over them has no extent (give --by regions)")
        regions = regular_grid(installations, grid_m)
    else:
        regions = read_regions(regions_path, layer)
    summary, uncounted = summarize_regions(installations, regions, field=field)
    write_table(summary, out, overwrite=overwrite, layer="summary", style_qml=summary_qml(),
                metadata={"detection": detection, "regions": regions_path or f"grid of {grid_m:g} m",
                          "rule": "each installation in the region holding its representative point"})
    if plot_path:
        plot_choropleth(summary, Path(plot_path), overwrite=overwrite, title=f"{Path(detection).name}: capacity",
                        installations=installations)
    total = summary["installations"].sum()
    click.echo(f"{len(summary)} regions: {total} installations, {summary['panel_area_m2'].sum():.0f} m² of panels, "
               f"{summary['capacity_kwp'].sum():.1f} kWp"
               + (f"; {uncounted} installations outside every region" if uncounted else ""), err=True)
    click.echo(f"wrote {out}" + (f" and {plot_path}" if plot_path else ""))


def plot_choropleth(summary, out: Path, *, overwrite: bool, title: str, installations=None) -> None:
    """Capacity per km² per region as a PNG (800 x 800 px): a colour scale, a legend, a scale bar and
    the installations as dots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from solarmap.errors import OptionError

        raise OptionError("--plot needs matplotlib: pip install 'solarmap[plot]'") from None
    import numpy as np

    from solarmap.geo.output import atomic_path

    metric = summary.to_crs(summary.estimate_utm_crs())
    fig, ax = plt.subplots(figsize=(8, 8), dpi=100)
    metric.plot(column="capacity_kwp_per_km2", ax=ax, cmap="YlOrRd", edgecolor="0.4", linewidth=0.4, legend=True,
                legend_kwds={"label": "capacity, kWp per km²", "shrink": 0.6})
    if installations is not None and len(installations):
        points = installations.geometry.representative_point().to_crs(metric.crs)
        points.plot(ax=ax, color="black", markersize=3)
    x0, y0, x1, y1 = metric.total_bounds
    span = x1 - x0
    length = 10 ** np.floor(np.log10(max(span / 4, 1e-9)))
    length *= 5 if span / 4 >= 5 * length else 2 if span / 4 >= 2 * length else 1
    ax.plot([x0, x0 + length], [y0 - 0.03 * (y1 - y0)] * 2, color="black", linewidth=3)
    ax.text(x0 + length / 2, y0 - 0.05 * (y1 - y0), f"{length:g} m" if length < 1000 else f"{length / 1000:g} km",
            ha="center", va="top")
    ax.set_title(title)
    ax.set_axis_off()
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.95)
    with atomic_path(out, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


@click.command()
@click.argument("before", type=click.Path(exists=True, dir_okay=False))
@click.argument("after", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="A GeoPackage of changes (or a .csv table).")
@click.option("--tolerance", "tolerance_m", type=click.FloatRange(min=0), default=3.0, show_default=True,
              help="Installations closer than this many metres at the two dates are the same one (misregistration).")
@click.option("--change", "change_fraction", type=click.FloatRange(min=0), default=0.2, show_default=True,
              help="Panel area changed by more than this fraction: grown or shrunk.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def compare(before, after, out_path, tolerance_m, change_fraction, overwrite) -> None:
    """What changed between two detections of the same area, BEFORE and AFTER: one row per
    installation, new, removed, grown, shrunk or unchanged, with its area and capacity at both dates."""
    from solarmap.geo.inventory import compare as compare_detections
    from solarmap.geo.output import check_output_path
    from solarmap.geo.style import changes_qml

    out = check_output_path(out_path, overwrite=overwrite, suffixes=(".gpkg", ".csv"), kind="the changes")
    first, second = read_detection(before), read_detection(after)
    changes, summary = compare_detections(first, second, tolerance_m=tolerance_m, change_fraction=change_fraction)
    write_table(changes, out, overwrite=overwrite, layer="changes", style_qml=changes_qml(),
                metadata={"before": before, "after": after, "tolerance_m": tolerance_m,
                          "change_fraction": change_fraction})
    click.echo(summary.line(), err=True)
    click.echo(f"wrote {out}")

