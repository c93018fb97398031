"""From panels to an inventory: totals per region, change between two dates, their commands."""

import geopandas as gpd
import numpy as np
import pytest
import shapely
from click.testing import CliRunner

from solarmap.cli import main
from solarmap.geo.installations import KWP_PER_M2, group_installations
from solarmap.geo.inventory import compare, summarize
from solarmap.geo.output import write_geopackage

UTM = "EPSG:32611"
X0, Y0 = 500_000.0, 4_000_000.0


def town_panels(count=30, seed=0):
    """``count`` roof arrays of 10-60 m² scattered over 400 x 400 m, 25 m apart at least."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(16 * 16, count, replace=False)
    rows, cols = divmod(cells, 16)
    x, y = X0 + cols * 25 + rng.uniform(0, 8, count), Y0 + rows * 25 + rng.uniform(0, 8, count)
    w, h = rng.uniform(3, 8, count), rng.uniform(3, 7.5, count)
    geoms = shapely.box(x, y, x + w, y + h)
    return gpd.GeoDataFrame({"id": np.arange(1, count + 1), "area_m2": shapely.area(geoms), "score": 0.9,
                             "source": "a.tif"}, geometry=geoms, crs=UTM)


def test_every_installation_and_its_kwp_is_counted_once_over_regions_that_split_them():
    installations = group_installations(town_panels())
    # four regions whose borders cross installations, given in another CRS (degrees)
    quads = [shapely.box(X0 - 50 + dx, Y0 - 50 + dy, X0 - 50 + dx + 253.3, Y0 - 50 + dy + 251.7)
             for dx in (0, 253.3) for dy in (0, 251.7)]
    crossed = sum(any(q.boundary.intersects(g) for q in quads) for g in installations.geometry)
    assert crossed > 0  # the split is real
    regions = gpd.GeoDataFrame({"name": list("abcd"), "other": 1}, geometry=quads, crs=UTM).to_crs("EPSG:4326")
    summary, uncounted = summarize(installations, regions, field="name")
    assert uncounted == 0 and list(summary.columns[:1]) == ["name"] and "other" not in summary.columns
    assert summary["installations"].sum() == len(installations)
    assert summary["capacity_kwp"].sum() == pytest.approx(installations["panel_area_m2"].sum() * KWP_PER_M2)
    assert summary["panel_area_m2"].sum() == pytest.approx(installations["panel_area_m2"].sum())
    assert summary["region_area_km2"].to_numpy() == pytest.approx([253.3 * 251.7 / 1e6] * 4, rel=0.01)  # geodesic
    empty = gpd.GeoDataFrame({"name": ["far"]}, geometry=[shapely.box(X0 + 5000, Y0, X0 + 5100, Y0 + 100)], crs=UTM)
    with_empty, _ = summarize(installations, gpd.pd.concat([regions.to_crs(UTM), empty]), field="name")
    far = with_empty.set_index("name").loc["far"]
    assert far.installations == 0 and far.capacity_kwp == 0 and far.capacity_kwp_per_km2 == 0  # kept, with zeros


def test_compare_with_itself_shifted_removed_and_added():
    panels = town_panels()
    before = group_installations(panels)
    shifted = group_installations(panels.set_geometry(panels.geometry.translate(2.0, -1.0)))
    changes, summary = compare(before, shifted)
    assert set(changes["change"]) == {"unchanged"} and len(changes) == len(before)  # 2 m of misregistration
    fewer = group_installations(panels.iloc[5:])
    changes, summary = compare(before, fewer)
    assert summary.counts["removed"] == 5 and summary.counts["unchanged"] == len(before) - 5
    assert summary.kwp_removed == pytest.approx(panels.area_m2.iloc[:5].sum() * KWP_PER_M2)
    changes, summary = compare(fewer, before)
    assert summary.counts["new"] == 5 and summary.counts["removed"] == 0
    assert summary.line().endswith(f"{summary.kwp_added:.1f} kWp added, 0.0 kWp removed")  # never "-0.0"
    grown_panels = panels.copy()
    grown_panels.loc[0, "geometry"] = shapely.box(*panels.geometry.iloc[0].bounds[:2],
                                                   panels.geometry.iloc[0].bounds[2] + 6, panels.geometry.iloc[0].bounds[3])
    grown_panels["area_m2"] = grown_panels.area
    changes, summary = compare(before, group_installations(grown_panels))
    assert summary.counts["grown"] == 1 and "grown" in summary.line()
    in_degrees = compare(before.to_crs("EPSG:4326"), shifted)[0]  # two CRSs: handled, not refused
    assert set(in_degrees["change"]) == {"unchanged"} and in_degrees.crs == "EPSG:4326"


def test_summarize_and_compare_commands(tmp_path):
    panels = town_panels()
    detection = tmp_path / "panels.gpkg"
    write_geopackage(panels, detection)  # panels only: grouped on the fly
    regions = tmp_path / "regions.gpkg"
    halves = gpd.GeoDataFrame({"district": ["west", "east"]}, crs=UTM,
                              geometry=[shapely.box(X0 - 10, Y0 - 10, X0 + 200, Y0 + 410),
                                        shapely.box(X0 + 200, Y0 - 10, X0 + 410, Y0 + 410)])
    write_geopackage(halves, regions, layer="districts")
    out, plot = tmp_path / "summary.gpkg", tmp_path / "map.png"
    runner = CliRunner()
    result = runner.invoke(main, ["summarize", str(detection), "--by", str(regions), "--field", "district",
                                  "--out", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    summary = gpd.read_file(out, layer="summary")
    assert summary["installations"].sum() == 30 and list(summary["district"]) == ["west", "east"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(plot) as image:
        assert image.size == (800, 800)
    csv = runner.invoke(main, ["summarize", str(detection), "--grid", "100", "--out", str(tmp_path / "grid.csv")])
    assert csv.exit_code == 0, csv.output
    table = gpd.pd.read_csv(tmp_path / "grid.csv")
    assert table["installations"].sum() == 30 and "cell" in table.columns
    later = tmp_path / "later.gpkg"
    write_geopackage(panels.iloc[3:], later)
    changed = runner.invoke(main, ["compare", str(detection), str(later), "--out", str(tmp_path / "changes.gpkg")])
    assert changed.exit_code == 0 and "3 removed" in changed.output, changed.output
    assert (gpd.read_file(tmp_path / "changes.gpkg", layer="changes")["change"] == "removed").sum() == 3


@pytest.mark.parametrize("args, message", [
    (["--by", "{regions}", "--layer", "nope"], "has no layer 'nope'"),
    (["--by", "{regions}", "--field", "nope"], "have no field 'nope'"),
    (["--by", "{no_crs}"], "have no CRS"),
    (["--grid", "0"], "positive number of metres"),
    ([], "--by REGIONS or a grid"),
])
def test_summarize_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    panels = town_panels(5)
    detection = tmp_path / "panels.gpkg"
    write_geopackage(panels, detection)
    regions = tmp_path / "regions.gpkg"
    write_geopackage(gpd.GeoDataFrame({"name": ["a"]}, geometry=[shapely.box(X0, Y0, X0 + 400, Y0 + 400)], crs=UTM),
                     regions, layer="districts")
    no_crs = tmp_path / "no_crs.gpkg"
    write_geopackage(gpd.GeoDataFrame({"name": ["a"]}, geometry=[shapely.box(0, 0, 1, 1)]), no_crs)
    args = [a.format(regions=regions, no_crs=no_crs) for a in args]
    result = CliRunner().invoke(main, ["summarize", str(detection), *args, "--out", str(tmp_path / "s.gpkg")])
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "s.gpkg").exists()


def test_a_file_without_panels_is_refused_in_one_line(tmp_path):
    other = tmp_path / "roads.gpkg"
    write_geopackage(gpd.GeoDataFrame({"name": ["a"]}, geometry=[shapely.box(0, 0, 1, 1)], crs=UTM), other,
                     layer="roads")
    result = CliRunner().invoke(main, ["compare", str(other), str(other), "--out", str(tmp_path / "c.gpkg")])
    assert result.exit_code == 1 and "no panels or installations layer" in result.output
    assert not (tmp_path / "c.gpkg").exists()
