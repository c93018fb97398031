"""Panels grouped into installations: a farm's rows become one footprint, neighbours stay apart."""

import geopandas as gpd
import numpy as np
import pytest
import shapely

from solarmap.geo.installations import INSTALLATION_COLUMNS, group_installations

UTM = "EPSG:32611"


def panels(geoms, crs=UTM, sources=None):
    geoms = list(geoms)
    frame = gpd.GeoDataFrame({"id": np.arange(1, len(geoms) + 1), "area_m2": [g.area for g in geoms],
                              "score": np.linspace(0.6, 0.9, len(geoms)) if geoms else [],
                              "source": sources or ["a.tif"] * len(geoms)}, geometry=geoms, crs=UTM)
    return frame.to_crs(crs)


def farm(x0=500_000.0, y0=4_000_000.0, rows=6, row_m=2.0, gap_m=3.0, length_m=40.0):
    return [shapely.box(x0, y0 + k * (row_m + gap_m), x0 + length_m, y0 + k * (row_m + gap_m) + row_m)
            for k in range(rows)]


def test_a_farms_rows_become_one_footprint_with_its_gaps():
    rows = farm()
    result = group_installations(panels(rows), join_m=4.0)
    assert list(result.columns) == [*INSTALLATION_COLUMNS, "geometry"]
    assert len(result) == 1
    one = result.iloc[0]
    assert one.n_panels == 6 and one.panel_area_m2 == pytest.approx(6 * 80)
    hull = shapely.box(500_000, 4_000_000, 500_040, 4_000_000 + 5 * 5 + 2)  # the rows and the gaps between them
    assert shapely.symmetric_difference(one.geometry, hull).area < 0.02 * hull.area
    assert one.footprint_area_m2 == pytest.approx(hull.area, rel=0.03)  # geodesic, near the UTM central meridian
    assert one.score == pytest.approx(0.9) and one.kind == "unknown"


def test_neighbours_further_apart_than_the_join_distance_stay_apart():
    roof_a = shapely.box(500_000, 4_000_000, 500_008, 4_000_004)
    roof_b = shapely.box(500_018, 4_000_000, 500_026, 4_000_004)  # 10 m away, across a street
    result = group_installations(panels([roof_a, roof_b]), join_m=4.0)
    assert len(result) == 2 and result.n_panels.tolist() == [1, 1]
    assert result.footprint_area_m2.to_numpy() == pytest.approx([32, 32], rel=0.01)  # closing keeps a box a box
    assert len(group_installations(panels([roof_a, roof_b]), join_m=12.0)) == 1


def test_rasters_are_never_joined_and_any_crs_gives_the_same_groups():
    rows = farm()
    two_rasters = group_installations(panels(rows, sources=["a.tif"] * 3 + ["b.tif"] * 3), join_m=4.0)
    assert sorted(two_rasters.n_panels) == [3, 3] and set(two_rasters.source) == {"a.tif", "b.tif"}
    in_degrees = group_installations(panels(rows, crs="EPSG:4326"), join_m=4.0)
    in_utm = group_installations(panels(rows), join_m=4.0)
    assert in_degrees.crs == "EPSG:4326" and len(in_degrees) == 1
    assert in_degrees.footprint_area_m2.iloc[0] == pytest.approx(in_utm.footprint_area_m2.iloc[0], rel=0.01)


def test_no_panels_give_an_empty_layer_with_the_columns():
    result = group_installations(panels([]))
    assert len(result) == 0 and list(result.columns) == [*INSTALLATION_COLUMNS, "geometry"]
