"""Regional runs: inputs, chunk merging, and dask.distributed equal to one process (even when a worker dies)."""

import os
import signal
import sys
import time
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine

from conftest import UTM_ORIGIN, write_tif
from solarmap.errors import InputError
from solarmap.pipeline import DetectConfig, SpectralBaseline, detect_scene
from solarmap.geo.raster import expand_inputs
from solarmap.pipeline.regional import detect_regional

CONFIG = DetectConfig(tile_size_px=64, overlap_px=8, batch_size=4, min_area_m2=0.0)


def town_like(height=300, width=260, seed=0):
    """Grey ground with dark-blue rectangles (what SpectralBaseline marks), some across seams."""
    rng = np.random.default_rng(seed)
    image = np.full((3, height, width), 150, np.uint8)
    for _ in range(14):
        r, c = rng.integers(0, height - 30), rng.integers(0, width - 40)
        h, w = rng.integers(6, 30), rng.integers(6, 40)
        image[:, r:r + h, c:c + w] = np.array([10, 15, 45], np.uint8)[:, None, None]
    return image


def same_polygons(a, b):
    assert len(a) == len(b)
    assert a.area_m2.sum() == pytest.approx(b.area_m2.sum(), rel=1e-9)
    ua, ub = shapely.union_all(a.geometry.to_numpy()), shapely.union_all(b.geometry.to_numpy())
    assert shapely.symmetric_difference(ua, ub).area == pytest.approx(0.0, abs=1e-6)
    assert sorted(np.round(a.area_m2, 6)) == sorted(np.round(b.area_m2, 6))


def test_inputs_from_directories_globs_and_lists(tmp_path):
    for name in ("b.tif", "a.tif"):
        write_tif(tmp_path / name, np.zeros((3, 8, 8), np.uint8))
    (tmp_path / "notes.md").write_text("x")
    listing = tmp_path / "list.txt"
    listing.write_text("# two rasters\nb.tif\n\na.tif\n")
    assert expand_inputs([str(tmp_path)]) == [str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]
    assert expand_inputs([str(tmp_path / "*.tif")]) == [str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]
    assert expand_inputs([str(listing)]) == [str(tmp_path / "b.tif"), str(tmp_path / "a.tif")]
    assert expand_inputs(["/vsicurl/https://example.org/x.tif"]) == ["/vsicurl/https://example.org/x.tif"]
    (tmp_path / "empty").mkdir()
    for bad, message in (([str(tmp_path / "empty")], "no rasters"), ([str(tmp_path / "nope.tif")], "not found"),
                         ([str(tmp_path / "*.jp2")], "no files match")):
        with pytest.raises(InputError, match=message):
            expand_inputs(bad)


def test_chunks_merge_exactly_like_one_run(tmp_path):
    raster = write_tif(tmp_path / "scene.tif", town_like())
    single, _ = detect_scene(raster, scorer=SpectralBaseline(), config=CONFIG)
    for rows_per_chunk in (1, 2, 100):
        regional, stats = detect_regional([raster], tmp_path / f"r{rows_per_chunk}.gpkg", scorer_spec=SpectralBaseline(),
                                          config=CONFIG, rows_per_chunk=rows_per_chunk)
        same_polygons(regional, single)
        assert stats.chunks_total == -(-6 // rows_per_chunk)  # 300 px -> 6 tile rows of stride 56
        same_polygons(gpd.read_file(tmp_path / f"r{rows_per_chunk}.gpkg"), single)


def test_adjacent_rasters_merge_into_one_output_in_any_crs(tmp_path):
    image = town_like(seed=3)
    whole = write_tif(tmp_path / "whole.tif", image)
    left = write_tif(tmp_path / "left.tif", image[:, :, :130])
    right = write_tif(tmp_path / "right.tif", image[:, :, 130:],
                      transform=Affine(0.5, 0, UTM_ORIGIN[0] + 65, 0, -0.5, UTM_ORIGIN[1]))
    single, _ = detect_scene(whole, scorer=SpectralBaseline(), config=CONFIG)
    both, stats = detect_regional([left, right], tmp_path / "both.gpkg", scorer_spec=SpectralBaseline(), config=CONFIG)
    assert stats.rasters == 2
    assert stats.source_gsd_m == {left: pytest.approx(0.5, rel=1e-3), right: pytest.approx(0.5, rel=1e-3)}  # as planned
    assert len(both) == len(single)  # arrays cut by the file boundary come out whole
    assert both.area_m2.sum() == pytest.approx(single.area_m2.sum(), rel=1e-6)
    in_4326, _ = detect_regional([left, right], tmp_path / "ll.gpkg", scorer_spec=SpectralBaseline(), config=CONFIG,
                                 out_crs="EPSG:4326")
    assert in_4326.crs.to_epsg() == 4326
    assert len(in_4326) == len(single)
    assert in_4326.area_m2.sum() == pytest.approx(single.area_m2.sum(), rel=1e-3)


def test_resume_skips_finished_chunks(tmp_path, monkeypatch):
    import solarmap.pipeline.regional as regional

    raster = write_tif(tmp_path / "scene.tif", town_like(seed=5))
    out = tmp_path / "r.gpkg"
    calls = {"n": 0}
    real = regional.run_chunk

    def dies_on_third(chunk, spec):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(chunk, spec)

    monkeypatch.setattr(regional, "run_chunk", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        detect_regional([raster], out, scorer_spec=SpectralBaseline(), config=CONFIG, rows_per_chunk=1)
    assert not out.exists() and len(list((tmp_path / ".r.gpkg.partial").glob("chunk-*.pkl"))) == 2
    ran = []
    monkeypatch.setattr(regional, "run_chunk", lambda chunk, spec: ran.append(chunk.row_start) or real(chunk, spec))
    resumed, stats = detect_regional([raster], out, scorer_spec=SpectralBaseline(), config=CONFIG, rows_per_chunk=1,
                                     resume=True)
    assert stats.chunks_resumed == 2 and ran == [2, 3, 4, 5]  # only the chunks not recorded are run again
    single, single_stats = detect_scene(raster, scorer=SpectralBaseline(), config=CONFIG)
    same_polygons(resumed, single)
    assert single_stats.tiles_positive > 0  # resumed chunks' tiles counted too
    assert (stats.tiles_positive, stats.tiles_positive_unoutlined) == (single_stats.tiles_positive,
                                                                       single_stats.tiles_positive_unoutlined)
    assert not (tmp_path / ".r.gpkg.partial").exists()


@dataclass(frozen=True)
class SlowBaseline(SpectralBaseline):
    """The baseline, slowed down so a worker can be killed while chunks are still running."""

    delay_s: float = 0.15

    def __call__(self, pixels):
        time.sleep(self.delay_s)
        return super().__call__(pixels)


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0") as local:
        yield local


def test_two_local_workers_give_the_single_process_result(tmp_path, cluster):
    rasters = [write_tif(tmp_path / f"s{i}.tif", town_like(seed=10 + i)) for i in range(2)]
    alone, _ = detect_regional(rasters, tmp_path / "alone.gpkg", scorer_spec=SpectralBaseline(), config=CONFIG,
                               rows_per_chunk=1)
    spread, stats = detect_regional(rasters, tmp_path / "spread.gpkg", scorer_spec=SpectralBaseline(), config=CONFIG,
                                    rows_per_chunk=1, scheduler=cluster.scheduler_address)
    assert stats.chunks_done == stats.chunks_total == 12
    same_polygons(spread, alone)


def test_a_worker_killed_mid_run_loses_nothing(tmp_path, cluster):
    from distributed import Client

    raster = write_tif(tmp_path / "s.tif", town_like(height=500, seed=21))
    expected, _ = detect_scene(raster, scorer=SpectralBaseline(), config=CONFIG)
    with Client(cluster.scheduler_address) as client:
        pids = list(client.run(os.getpid).values())
    killed = []

    def kill_one_worker_after_first_chunk(stats):
        if stats.chunks_done >= 1 and not killed:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    result, stats = detect_regional([raster], tmp_path / "k.gpkg", scorer_spec=SlowBaseline(), config=CONFIG,
                                    rows_per_chunk=1, scheduler=cluster.scheduler_address,
                                    progress=kill_one_worker_after_first_chunk)
    assert killed and stats.chunks_done == stats.chunks_total
    same_polygons(result, expected)


def test_cli_takes_a_directory_of_rasters_into_one_geopackage(tmp_path):
    from click.testing import CliRunner

    from solarmap.cli import main

    from conftest import tiny_net
    from solarmap import model as M

    model = M.save(tiny_net(), tmp_path / "tiny.pt")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for i in range(2):
        write_tif(tiles / f"t{i}.tif", town_like(height=120, width=120, seed=30 + i))
    out = tmp_path / "region.gpkg"
    result = CliRunner().invoke(main, ["detect", str(tiles), "--out", str(out), "--model", str(model),
                                       "--cam-method", "gap", "--score-threshold", "0", "--gsd", "0.5"])
    assert result.exit_code == 0, result.output
    assert "rasters: 2" in result.output and out.exists()
    from solarmap.geo.output import read_layer_metadata

    assert read_layer_metadata(out)["rasters"] == "2"
    with_heatmap = CliRunner().invoke(main, ["detect", str(tiles), "--out", str(tmp_path / "h.gpkg"), "--model",
                                             str(model), "--heatmap", str(tmp_path / "h.tif")])
    assert with_heatmap.exit_code == 2 and "--heatmap works with a single raster" in with_heatmap.output


def render(path, crs, transform, shape, arrays, arrays_crs):
    """A raster in ``crs`` whose pixels are dark blue where their centre lies in one of ``arrays``
    (polygons in ``arrays_crs``): one ground scene drawn in any projection."""
    from pyproj import Transformer

    height, width = shape
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    xs, ys = transform * (cols, rows)
    ax, ay = Transformer.from_crs(crs, arrays_crs, always_xy=True).transform(xs, ys)
    inside = np.zeros(shape, bool)
    for polygon in arrays:
        inside |= shapely.contains_xy(polygon, ax, ay)
    image = np.full((3, height, width), 150, np.uint8)
    image[:, inside] = np.array([10, 15, 45], np.uint8)[:, None]
    return write_tif(path, image, transform=transform, crs=crs)


def to_4326(geometry, crs):
    from pyproj import Transformer

    return shapely.transform(geometry, Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform,
                             interleaved=False)


def test_rasters_in_two_utm_zones_and_web_mercator_merge_into_one_crs(tmp_path):
    """Three rasters: UTM 11N ending on its central meridian (117° W), web mercator starting there
    (one array crosses the seam), and UTM 12N far to the east. Each at 0.3 m on the ground; the
    output in EPSG:4326 holds every array once, whole, with its true area."""
    from pyproj import Transformer

    x0, y0 = UTM_ORIGIN  # x = 500 000 m is 117° W exactly in zone 11
    box = shapely.box
    west_arrays = [box(x0 - 60, y0 - 20, x0 - 45, y0 - 12), box(x0 - 30, y0 - 60, x0 - 20, y0 - 40),
                   box(x0 - 11, y0 - 40, x0 + 13, y0 - 32)]  # the last one crosses into the mercator raster
    east_arrays = [box(x0 + 25, y0 - 55, x0 + 40, y0 - 47)]  # also given in zone 11 coordinates
    far_arrays = [box(x0 - 50, y0 - 30, x0 - 35, y0 - 18), box(x0 - 20, y0 - 65, x0 - 8, y0 - 57)]  # zone 12
    west = render(tmp_path / "utm11.tif", "EPSG:32611", Affine(0.3, 0, x0 - 72, 0, -0.3, y0), (240, 240),
                  west_arrays + east_arrays, "EPSG:32611")
    mx, my = Transformer.from_crs("EPSG:32611", "EPSG:3857", always_xy=True).transform(x0, y0)
    lat = Transformer.from_crs("EPSG:32611", "EPSG:4326", always_xy=True).transform(x0, y0)[1]
    step = 0.3 / np.cos(np.radians(lat))  # web mercator units per 0.3 m on the ground
    east = render(tmp_path / "mercator.tif", "EPSG:3857", Affine(step, 0, mx, 0, -step, my), (240, 200),
                  west_arrays + east_arrays, "EPSG:32611")
    far = render(tmp_path / "utm12.tif", "EPSG:32612", Affine(0.3, 0, x0 - 72, 0, -0.3, y0), (240, 240),
                 far_arrays, "EPSG:32612")
    config = DetectConfig(tile_size_px=64, overlap_px=8, batch_size=4, min_area_m2=1.0, gsd_m=0.3)
    result, stats = detect_regional([west, east, far], tmp_path / "region.gpkg", scorer_spec=SpectralBaseline(),
                                    config=config, out_crs="EPSG:4326", rows_per_chunk=2)
    assert stats.rasters == 3 and result.crs.to_epsg() == 4326
    truth = [(zone, a) for zone, arrays in (("EPSG:32611", west_arrays + east_arrays), ("EPSG:32612", far_arrays))
             for a in arrays]
    assert len(result) == len(truth)  # the array across the seam is one polygon, not two
    for zone, array in truth:
        in_4326 = to_4326(array, zone)
        hits = result[result.intersects(in_4326)]
        assert len(hits) == 1
        assert hits.area_m2.iloc[0] == pytest.approx(array.area, rel=0.04)  # 0.3 m pixels on a >= 120 m² array
    crossing = result[result.intersects(to_4326(west_arrays[2], "EPSG:32611"))]
    assert crossing.source.iloc[0] == "mercator.tif+utm11.tif"


@pytest.mark.parametrize("scheduler, exit_code, message", [
    ("local:0", 2, "expected local or local:N with N >= 1 worker processes"),
    ("local:two", 2, "expected local or local:N with N >= 1 worker processes"),
    ("tcp://127.0.0.1:9", 1, "cannot reach the dask scheduler at tcp://127.0.0.1:9"),  # nothing listens there
])
def test_a_bad_scheduler_is_one_line_and_leaves_nothing(tmp_path, tiny_model_file, scheduler, exit_code, message):
    from click.testing import CliRunner

    from solarmap.cli import main

    raster = write_tif(tmp_path / "t.tif", town_like(height=120, width=120))
    out = tmp_path / "region.gpkg"
    result = CliRunner().invoke(main, ["detect", str(raster), "--out", str(out), "--model", tiny_model_file,
                                       "--scheduler", scheduler, "--cam-method", "gap"])
    assert result.exit_code == exit_code and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == ["t.tif"]


def test_a_scheduler_without_dask_installed_says_how_to_get_it(tmp_path, tiny_model_file, monkeypatch):
    """distributed is an extra (solarmap[dask]): without it --scheduler is one clear line, nothing written."""
    import sys

    from click.testing import CliRunner

    from solarmap.cli import main

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed: importing it fails
    raster = write_tif(tmp_path / "t.tif", town_like(height=120, width=120))
    result = CliRunner().invoke(main, ["detect", str(raster), "--out", str(tmp_path / "r.gpkg"), "--model",
                                       tiny_model_file, "--scheduler", "local:1", "--cam-method", "gap"])
    assert result.exit_code == 1 and "pip install 'solarmap[dask]'" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and sorted(os.listdir(tmp_path)) == ["t.tif"]
