"""From panels to an inventory: totals per region and change between two dates.

:func:`summarize` counts installations per region (or per cell of a regular grid): how many,
their panel area and capacity, and the same per km² of the region. Each installation is counted
once, in the region that holds its representative point (a point inside its footprint), so totals
over regions that tile an area add up to the whole even where a region's edge cuts an installation;
one whose point falls outside every region is counted in none (the result says how many).

:func:`compare` matches the installations of two detections of the same area at two dates. Two
orthophoto flights are a few metres apart at best (misregistration), so installations closer than
``tolerance_m`` are the same one; what matches across the dates (several panels merged at one date
and split at the other included) is one row. Its panel area before and after says whether it was
``grown``, ``shrunk`` or ``unchanged`` (within ``change_fraction``); the rest are ``new`` or
``removed``.

Areas are geodesic; inputs in any CRS (two detections in two CRSs are compared in the first's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

from solarmap.errors import InputError
from solarmap.geo.installations import KWP_PER_M2, group_installations, metric_crs
from solarmap.geo.vectorize import connected_groups, geodesic_area_m2

__all__ = ["CHANGES", "ChangeSummary", "compare", "installations_of", "regular_grid", "summarize"]

CHANGES = ("new", "removed", "grown", "shrunk", "unchanged")
CHANGE_COLUMNS = ("change", "n_before", "n_after", "panel_area_m2_before", "panel_area_m2_after", "capacity_kwp_before",
                  "capacity_kwp_after")
SUMMARY_COLUMNS = ("installations", "panel_area_m2", "capacity_kwp", "installations_per_km2", "panel_area_m2_per_km2",
                   "capacity_kwp_per_km2", "region_area_km2")


def installations_of(frame):
    """Installations from a detection's layer: the ``installations`` layer as it is, or ``panels``
    grouped (:func:`~solarmap.geo.installations.group_installations`), with ``capacity_kwp``."""
    if "panel_area_m2" not in frame.columns:
        if "area_m2" not in frame.columns:
            raise InputError("the layer has neither panels (area_m2) nor installations (panel_area_m2)")
        frame = group_installations(frame)
    if "capacity_kwp" not in frame.columns:
        frame = frame.assign(capacity_kwp=frame["panel_area_m2"] * KWP_PER_M2)
    return frame


def regular_grid(frame, cell_m: float, crs=None):
    """Square cells of ``cell_m`` metres (in the local UTM zone of ``frame``, or ``crs`` if in metres)
    covering ``frame``'s extent, as a GeoDataFrame with ``cell`` ids ("row_col")."""
    import geopandas as gpd

    if cell_m <= 0:
        raise InputError(f"grid cells must be a positive number of metres, got {cell_m:g}")
    metric = crs or frame.estimate_utm_crs()
    x0, y0, x1, y1 = frame.to_crs(metric).total_bounds
    x0, y0 = np.floor(x0 / cell_m) * cell_m, np.floor(y0 / cell_m) * cell_m
    cols, rows = max(1, int(np.ceil((x1 - x0) / cell_m))), max(1, int(np.ceil((y1 - y0) / cell_m)))
    if rows * cols > 1_000_000:
        raise InputError(f"a {cell_m:g} m grid over these installations has {rows * cols:,} cells; choose larger cells")
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    cells = shapely.box(x0 + c * cell_m, y0 + r * cell_m, x0 + (c + 1) * cell_m, y0 + (r + 1) * cell_m)
    return gpd.GeoDataFrame({"cell": [f"{a}_{b}" for a, b in zip(r, c)]}, geometry=cells, crs=metric)


def summarize(installations, regions, *, field: str | None = None):
    """One row per region (``regions``' geometry and ``field`` or all its attributes) with
    ``installations``, ``panel_area_m2``, ``capacity_kwp``, their densities per km² and the region's
    geodesic ``region_area_km2``; regions without any keep zeros. Returns (summary, uncounted):
    how many installations fell in no region."""
    if regions.crs is None:
        raise InputError("the regions have no CRS; assign one first (e.g. ogr2ogr -a_srs EPSG:xxxx)")
    if not len(regions):
        raise InputError("the regions layer is empty")
    if field is not None and field not in regions.columns:
        raise InputError(f"the regions have no field {field!r} (they have: {', '.join(map(str, regions.columns.drop('geometry')))})")
    installations = installations_of(installations)
    kept = [field] if field else [c for c in regions.columns if c != regions.geometry.name]
    summary = regions[[*kept, regions.geometry.name]].copy().reset_index(drop=True)
    points = installations.geometry.representative_point()
    points = points.to_crs(regions.crs) if installations.crs is not None else points.set_crs(regions.crs)
    tree = shapely.STRtree(summary.geometry.to_numpy())
    point_index, region_index = tree.query(points.to_numpy(), predicate="intersects")
    # a point on a shared border: the first region that holds it
    first = np.unique(point_index, return_index=True)[1]
    point_index, region_index = point_index[first], region_index[first]
    n = len(summary)
    counts = np.bincount(region_index, minlength=n)
    area = np.bincount(region_index, weights=installations["panel_area_m2"].to_numpy(float)[point_index], minlength=n)
    kwp = np.bincount(region_index, weights=installations["capacity_kwp"].to_numpy(float)[point_index], minlength=n)
    km2 = geodesic_area_m2(summary.geometry.to_numpy(), summary.crs) / 1e6
    with np.errstate(divide="ignore", invalid="ignore"):
        per = lambda v: np.where(km2 > 0, v / km2, 0.0)  # noqa: E731
        columns = dict(installations=counts.astype(np.int64), panel_area_m2=area, capacity_kwp=kwp,
                       installations_per_km2=per(counts), panel_area_m2_per_km2=per(area), capacity_kwp_per_km2=per(kwp),
                       region_area_km2=km2)
    for name in SUMMARY_COLUMNS:
        summary[name] = columns[name]
    return summary, int(len(installations) - len(point_index))


@dataclass(frozen=True)
class ChangeSummary:
    """Counts and capacity of each kind of change."""

    counts: dict
    kwp_added: float  # new installations' capacity plus what grown ones gained
    kwp_removed: float

    def line(self) -> str:
        parts = ", ".join(f"{self.counts.get(kind, 0)} {kind}" for kind in CHANGES)
        # + 0.0: a sum over nothing negated is -0.0, which would print as "-0.0"
        return f"installations: {parts}; {self.kwp_added + 0.0:.1f} kWp added, {self.kwp_removed + 0.0:.1f} kWp removed"


def compare(before, after, *, tolerance_m: float = 3.0, change_fraction: float = 0.2):
    """Installations of two dates matched (see the module docstring): a GeoDataFrame in ``before``'s
    CRS, one row per installation or group matched across the dates, with ``change``, ``n_before``,
    ``n_after``, ``panel_area_m2_before``/``_after`` and ``capacity_kwp_before``/``_after``, and its
    footprint at the later date where it still exists; and a :class:`ChangeSummary`."""
    import geopandas as gpd

    before, after = installations_of(before), installations_of(after)
    if before.crs is None or after.crs is None:
        raise InputError("both detections need a CRS")
    crs = before.crs
    after = after.to_crs(crs) if not after.crs.equals(crs) else after
    metric = metric_crs(before if len(before) else after) if len(before) + len(after) else crs
    a = before.geometry.to_crs(metric).to_numpy()
    b = after.geometry.to_crs(metric).to_numpy()
    pairs = []
    if len(a) and len(b):
        ia, ib = shapely.STRtree(b).query(a, predicate="dwithin", distance=tolerance_m)
        pairs = list(zip(ia.tolist(), (ib + len(a)).tolist()))
    groups = connected_groups(len(a) + len(b), pairs)
    area_a, area_b = before["panel_area_m2"].to_numpy(float), after["panel_area_m2"].to_numpy(float)
    kwp_a, kwp_b = before["capacity_kwp"].to_numpy(float), after["capacity_kwp"].to_numpy(float)
    rows, geoms = [], []
    for members in groups:
        ma = [m for m in members if m < len(a)]
        mb = [m - len(a) for m in members if m >= len(a)]
        before_m2, after_m2 = float(area_a[ma].sum()), float(area_b[mb].sum())
        if not mb:
            change = "removed"
        elif not ma:
            change = "new"
        elif after_m2 > before_m2 * (1 + change_fraction):
            change = "grown"
        elif after_m2 < before_m2 * (1 - change_fraction):
            change = "shrunk"
        else:
            change = "unchanged"
        rows.append(dict(change=change, n_before=len(ma), n_after=len(mb), panel_area_m2_before=before_m2,
                         panel_area_m2_after=after_m2, capacity_kwp_before=float(kwp_a[ma].sum()),
                         capacity_kwp_after=float(kwp_b[mb].sum())))
        geoms.append(shapely.union_all(b[mb] if mb else a[ma]))
    frame = gpd.GeoDataFrame(rows, columns=list(CHANGE_COLUMNS), geometry=gpd.GeoSeries(geoms, crs=metric),
                             crs=metric).to_crs(crs)
    frame.insert(0, "id", np.arange(1, len(frame) + 1, dtype=np.int64))
    counts = {kind: int((frame["change"] == kind).sum()) for kind in CHANGES}
    gained = frame["capacity_kwp_after"] - frame["capacity_kwp_before"]
    added = float(gained[frame["change"].isin(["new", "grown"])].sum())
    removed = float(-gained[frame["change"].isin(["removed", "shrunk"])].sum())
    return frame, ChangeSummary(counts, added, removed)
