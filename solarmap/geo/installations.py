"""Panels grouped into installations: a farm's rows with the gaps between them, one roof's arrays.

Panels (module pixels) and installations are different truths. An inventory counts installations
(and their capacity from the module area); a land-use map needs their footprints, which cover the
gaps between a farm's rows. Panels closer than ``join_m`` belong to one installation; its footprint
is the union of its panels closed by ``join_m`` (grown by half of it, merged, shrunk back): the
gaps between rows fill, the outline keeps its corners, and two roofs across a street stay apart
when the street is wider than ``join_m``.

Distances need metres: the work is done in a local UTM zone of the panels' centroid (any CRS in,
the same CRS out), areas are geodesic (:func:`solarmap.geo.vectorize.geodesic_area_m2`).
"""

from __future__ import annotations

import numpy as np
import shapely

from solarmap.geo.vectorize import centroids_lonlat, connected_groups, geodesic_area_m2

__all__ = ["DEFAULT_JOIN_M", "INSTALLATION_COLUMNS", "KWP_PER_M2", "group_installations", "metric_crs"]

DEFAULT_JOIN_M = 8.0  # chosen on NREL validation footprints (docs/real-imagery.md, "The outline network")
# rated kWp per m² of module area drawn by the bundled model: total registered kWp / total drawn area over
# the Bern plants of the training and validation blocks, a plant's area being that of the installations
# within 2 m of its register point (scripts/capacity_register.py; model card, Capacity)
KWP_PER_M2 = 0.206
INSTALLATION_COLUMNS = ("id", "panel_area_m2", "footprint_area_m2", "capacity_kwp", "n_panels", "kind", "score",
                        "centroid_lon", "centroid_lat", "source")


def metric_crs(frame):
    """A CRS in metres for measuring distances between ``frame``'s shapes: its own where it is
    projected in metres (web mercator's are not ground metres), else the local UTM zone."""
    crs = frame.crs
    if crs is not None and crs.is_projected and crs.axis_info[0].unit_name in ("metre", "meter") \
            and not crs.equals("EPSG:3857"):
        return crs
    return frame.estimate_utm_crs()


def group_installations(panels, *, join_m: float = DEFAULT_JOIN_M, footprints=None):
    """Installations (a GeoDataFrame in ``panels``' CRS) from a panels GeoDataFrame with ``area_m2``,
    ``score`` and ``source``, one row per group of panels closer than ``join_m`` to each other.

    Columns: ``id`` (1, 2, ... by the group's first panel), ``panel_area_m2`` (the sum of its panels'
    areas), ``footprint_area_m2`` (geodesic), ``capacity_kwp`` (module area x ``KWP_PER_M2``: from
    the modules, never the footprint, whose gaps hold none), ``n_panels``, ``kind`` (``unknown``: the model does not
    yet tell rooftop from ground-mounted), ``score`` (its panels' highest), centroid and ``source``.
    Panels of different sources (rasters) are never joined.

    ``footprints``: (source, polygon in ``panels``' CRS) pairs, the outline network's footprint
    regions (:mod:`solarmap.pipeline.footprints`): panels of one source that touch the same region
    belong to one installation however far apart, and its footprint takes in the regions its
    panels touch (a farm's gaps wider than ``join_m``, faint edge rows)."""
    import geopandas as gpd

    if panels.crs is None:
        raise ValueError("panels without a CRS cannot be grouped in metres")
    if not len(panels):
        empty = gpd.GeoDataFrame({name: [] for name in INSTALLATION_COLUMNS}, geometry=[], crs=panels.crs)
        return empty.astype({"id": "int64", "n_panels": "int64", "panel_area_m2": "float64",
                             "footprint_area_m2": "float64", "capacity_kwp": "float64", "score": "float64", "centroid_lon": "float64",
                             "centroid_lat": "float64"})
    metric = metric_crs(panels)
    geoms = panels.geometry.to_crs(metric).to_numpy()
    half = join_m / 2.0
    grown = shapely.buffer(geoms, half, quad_segs=4) if half > 0 else geoms
    tree = shapely.STRtree(grown)
    left, right = tree.query(grown, predicate="intersects")
    sources = panels["source"].to_numpy()
    same = (left < right) & (sources[left] == sources[right])
    pairs = list(zip(left[same].tolist(), right[same].tolist()))
    regions_of: dict[int, list[int]] = {}
    regions = np.empty(0, dtype=object)
    if footprints:
        region_sources = np.array([source for source, _ in footprints], dtype=object)
        regions = gpd.GeoSeries([shape for _, shape in footprints], crs=panels.crs).to_crs(metric).to_numpy()
        panel_at, region_at = shapely.STRtree(regions).query(geoms, predicate="intersects")
        keep = region_sources[region_at] == sources[panel_at]
        first_panel: dict[int, int] = {}  # each region links its panels through the first one it met
        for panel, region in zip(panel_at[keep].tolist(), region_at[keep].tolist()):
            regions_of.setdefault(panel, []).append(region)
            pairs.append((first_panel.setdefault(region, panel), panel))
    groups = connected_groups(len(geoms), pairs)
    groups.sort(key=min)
    footprints = []
    for members in groups:
        union = shapely.union_all(grown[members])
        footprint = shapely.buffer(union, -half, quad_segs=4) if half > 0 else union
        touched = sorted({region for member in members for region in regions_of.get(member, [])})
        # never smaller than its own panels
        footprints.append(shapely.union_all([footprint, *geoms[members], *regions[touched]]))
    areas, scores = panels["area_m2"].to_numpy(float), panels["score"].to_numpy(float)
    panel_area = np.array([areas[members].sum() for members in groups])
    out_geoms = gpd.GeoSeries(footprints, crs=metric).to_crs(panels.crs).to_numpy()
    lon, lat = centroids_lonlat(out_geoms, panels.crs)
    columns = {"id": np.arange(1, len(groups) + 1, dtype=np.int64), "panel_area_m2": panel_area,
               "footprint_area_m2": geodesic_area_m2(out_geoms, panels.crs), "capacity_kwp": panel_area * KWP_PER_M2,
               "n_panels": np.array([len(members) for members in groups], dtype=np.int64),
               "kind": np.array(["unknown"] * len(groups), dtype=object),
               "score": np.array([scores[members].max() for members in groups]), "centroid_lon": lon,
               "centroid_lat": lat, "source": np.array([sources[members[0]] for members in groups], dtype=object)}
    return gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(out_geoms, crs=panels.crs), crs=panels.crs)
