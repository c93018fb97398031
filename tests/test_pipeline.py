import pickle

import numpy as np
import pytest
import rasterio

import geopandas as gpd
from conftest import BandOneScorer, rectangle_raster, tiny_config
from solarmap.errors import OutputError
from solarmap.pipeline import DetectConfig, detect_to_file
from solarmap.pipeline.threads import BackgroundConsumer, prefetch

CONFIG = DetectConfig(tile_size_px=16, overlap_px=4, batch_size=3, min_area_m2=0.0)


@pytest.fixture
def scene(geotiff):
    array = rectangle_raster(60, 60, (2, 2, 8, 30))
    for rect in [(20, 5, 26, 40), (30, 30, 50, 36), (52, 1, 58, 58), (14, 44, 34, 58)]:
        r0, c0, r1, c1 = rect
        array[:, r0:r1, c0:c1] = 1.0
    return geotiff(array)


class Stop(Exception):
    pass


def read(path):
    return gpd.read_file(path, layer="panels").sort_values("id").reset_index(drop=True)


def stop_at_call(n):
    """A progress callback that interrupts the run (raises Stop) at its ``n``-th call."""
    calls = {"n": 0}

    def stop(stats):
        calls["n"] += 1
        if calls["n"] == n:
            raise Stop

    return stop


def test_records_and_outputs_are_flushed_and_a_damaged_record_falls_back_to_the_one_before(scene, tmp_path,
                                                                                          monkeypatch):
    """Power loss: every record, its directory and the finished GeoPackage are fsync'ed around the
    renames --resume relies on; a record that still comes back truncated is read as the one before
    it, and the run continues from there to the same output."""
    import os

    reference = tmp_path / "reference.gpkg"
    detect_to_file(scene, reference, scorer=BandOneScorer(), config=CONFIG)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    out = tmp_path / "panels.gpkg"
    with pytest.raises(Stop):  # batches of 3 tiles: the 9th is past the third tile row
        detect_to_file(scene, out, scorer=BandOneScorer(), config=CONFIG, progress=stop_at_call(9),
                       checkpoint_interval_s=0)
    journal = tmp_path / ".panels.gpkg.partial"
    assert str(journal / "state.pkl.tmp") in synced and str(journal) in synced  # the record, then its directory
    state, before = journal / "state.pkl", pickle.loads((journal / "state.pkl.prev").read_bytes())
    assert pickle.loads(state.read_bytes()).rows_done > before.rows_done >= 1
    state.write_bytes(state.read_bytes()[:7])  # what a power cut can leave of an unflushed rename
    synced.clear()
    stats = detect_to_file(scene, out, scorer=BandOneScorer(), config=CONFIG, resume=True)
    assert stats.tiles_resumed == before.rows_done * 5  # continued from the record before the damaged one
    assert str(journal / "panels.gpkg") in synced and str(tmp_path) in synced  # the output, then its directory
    a, b = read(reference), read(out)
    assert len(a) == len(b) and all(x.equals(y) for x, y in zip(a.geometry, b.geometry))


def test_interrupted_run_resumes_to_the_same_output(scene, tmp_path, monkeypatch):
    from solarmap.geo.raster import SceneReader

    reference = tmp_path / "reference.gpkg"
    detect_to_file(scene, reference, scorer=BandOneScorer(), config=CONFIG)
    out = tmp_path / "panels.gpkg"
    with pytest.raises(Stop):  # journalled at every row boundary; batches of 3 tiles: the 6th is past the second row
        detect_to_file(scene, out, scorer=BandOneScorer(), config=CONFIG, progress=stop_at_call(6), heatmap=tmp_path / "h.tif",
                       checkpoint_interval_s=0)
    assert not out.exists() and not (tmp_path / "h.tif").exists()  # nothing half-written at the outputs
    assert (tmp_path / ".panels.gpkg.partial" / "state.pkl").exists()
    rows_done = pickle.loads((tmp_path / ".panels.gpkg.partial" / "state.pkl").read_bytes()).rows_done
    reads = []
    real_read = SceneReader.read_tiles
    monkeypatch.setattr(SceneReader, "read_tiles", lambda self, tiles, out: reads.extend(tiles) or real_read(self, tiles, out))
    stats = detect_to_file(scene, out, scorer=BandOneScorer(), config=CONFIG, resume=True, heatmap=tmp_path / "h.tif")
    assert stats.tiles_read == stats.tiles_total == 25
    # the rows recorded are not read again: the reader is asked only for the others
    assert rows_done >= 2 and stats.tiles_resumed == rows_done * 5
    assert sorted({t.tile_row for t in reads}) == list(range(rows_done, 5)) and len(reads) == 25 - rows_done * 5
    a, b = read(reference), read(out)
    assert list(a.id) == list(b.id) == list(range(1, len(a) + 1))
    assert a.area_m2.tolist() == pytest.approx(b.area_m2.tolist())
    assert all(x.equals(y) for x, y in zip(a.geometry, b.geometry))
    assert not (tmp_path / ".panels.gpkg.partial").exists()  # journal removed on success


def test_checkpoints_at_the_first_row_boundary_then_every_interval(scene):
    from solarmap.pipeline import SceneRun

    def journal(interval):
        states, frames = [], []
        SceneRun(scene, scorer=BandOneScorer(), config=CONFIG).run(
            frames.append, checkpoint=states.append, checkpoint_interval_s=interval)
        return [s.rows_done for s in states], frames

    every_row, frames_every_row = journal(0)
    assert every_row == [1, 2, 3, 4]  # 5 tile rows: a checkpoint at each boundary
    first_only, frames_first_only = journal(3600)
    assert first_only == [1]  # then only at the end, in one write
    assert len(frames_first_only) < len(frames_every_row)
    ids = lambda frames: [i for f in frames for i in f["id"]]  # noqa: E731
    assert ids(frames_first_only) == ids(frames_every_row)


def test_resume_with_other_settings_is_refused(scene, tmp_path):
    out = tmp_path / "panels.gpkg"

    def stop(stats):
        raise Stop

    with pytest.raises(Stop):
        detect_to_file(scene, out, scorer=BandOneScorer(), config=CONFIG, progress=stop)
    other = DetectConfig(tile_size_px=20, overlap_px=4, min_area_m2=0.0)
    with pytest.raises(OutputError, match="cannot resume"):
        detect_to_file(scene, out, scorer=BandOneScorer(), config=other, resume=True)
    # without --resume the stale journal is discarded and the run starts over
    detect_to_file(scene, out, scorer=BandOneScorer(), config=other)
    assert len(read(out)) == 5


def test_heatmap_is_georeferenced_tiled_with_overviews(scene, tmp_path):
    heat = tmp_path / "heat.tif"
    detect_to_file(scene, tmp_path / "p.gpkg", scorer=BandOneScorer(), config=CONFIG, heatmap=heat)
    with rasterio.open(scene) as src, rasterio.open(heat) as h:
        assert h.crs == src.crs and h.transform == src.transform
        assert h.overviews(1) and h.profile["compress"] == "deflate"
        values = h.read(1)
        truth = src.read(1)
    assert (values[truth == 1] == 100).all() and (values[truth == 0] == 0).all()


def test_all_nodata_raster_gives_an_empty_geopackage(geotiff, tmp_path):
    path = geotiff(np.zeros((3, 40, 40), np.uint8), nodata=0)
    out = tmp_path / "empty.gpkg"
    stats = detect_to_file(path, out, scorer=BandOneScorer(), config=CONFIG)
    assert stats.tiles_skipped_nodata == stats.tiles_total == 9
    frame = read(out)
    assert len(frame) == 0 and frame.crs.to_epsg() == 32611


def test_positive_tiles_with_nothing_outlined_in_them_are_counted(geotiff):
    from solarmap.pipeline import SceneRun

    class CallsEveryTile(BandOneScorer):  # every tile positive; the map (band 1) marks only the rectangle
        context_px = 4

        def __call__(self, pixels):
            return np.ones(len(pixels), np.float32), super().__call__(pixels)[1]

    array = np.full((3, 48, 48), 0.2, np.float32)
    array[:, 18:30, 18:30] = 1.0  # in the middle tile's core, and in its neighbours' context only
    config = DetectConfig(tile_size_px=16, overlap_px=0, batch_size=4, min_area_m2=0.0, context_px=4)
    stats = SceneRun(geotiff(array), scorer=CallsEveryTile(), config=config).run(lambda frame: None)
    assert stats.tiles_positive == 9 and stats.tiles_positive_unoutlined == 8  # the context alone outlines nothing


def test_batches_with_nodata_tiles_score_only_the_tiles_with_data(geotiff):
    from solarmap.geo.raster import SceneReader
    from solarmap.pipeline import SceneRun
    from solarmap.geo.tiling import iter_tiles

    array = np.full((3, 48, 48), 0.3, np.float32)
    array[:, :16, :] = np.nan  # the first tile row holds no data
    array[:, 30:40, 5:12] = 1.0
    path = geotiff(array, nodata=np.nan)
    seen = []

    class Recording(BandOneScorer):
        def __call__(self, pixels):
            seen.append(pixels.copy())
            return super().__call__(pixels)

    config = DetectConfig(tile_size_px=16, overlap_px=0, batch_size=4, min_area_m2=0.0)  # 9 tiles: 4, 4, 1
    frames = []
    stats = SceneRun(path, scorer=Recording(), config=config).run(frames.append)
    assert stats.tiles_skipped_nodata == 3 and stats.tiles_positive == 2
    assert [len(b) for b in seen] == [1, 4, 1]  # empty tiles never reach the scorer
    with SceneReader(path) as reader:
        live = [reader.read_tile(t).pixels for t in iter_tiles(reader.info.grid, config.tile_spec)][3:]
    assert np.array_equal(np.concatenate(seen), np.stack(live))
    assert sum(len(f) for f in frames) == 1


def test_reader_errors_reach_the_caller():
    def broken():
        yield 1
        raise RuntimeError("disk gone")

    got = []
    with pytest.raises(RuntimeError, match="disk gone"):
        for item in prefetch(broken()):
            got.append(item)
    assert got == [1]


def test_closing_chained_stages_stops_every_thread():
    import threading
    import time

    produced = []

    def source():
        for i in range(10_000):
            produced.append(i)
            yield i

    def doubled(items):
        try:
            for item in items:
                yield 2 * item
        finally:
            items.close()

    outer = prefetch(doubled(prefetch(source(), depth=2, name="test-stage-1")), depth=1, name="test-stage-2")
    assert next(outer) == 0
    outer.close()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("test-stage") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name.startswith("test-stage") for t in threading.enumerate())
    assert len(produced) < 100  # nothing ran on after the consumer left


def test_background_consumer_handles_items_in_order_and_its_errors_reach_the_caller():
    seen = []
    consumer = BackgroundConsumer(seen.append, depth=2)
    for i in range(50):
        consumer.put(i)
    consumer.finish()
    assert seen == list(range(50))

    def fragile(item):
        if item == 3:
            raise KeyError("bad item")

    consumer = BackgroundConsumer(fragile, depth=1)
    with pytest.raises(KeyError, match="bad item"):
        for i in range(100):  # put() reports the failure once the thread has seen item 3
            consumer.put(i)
    with pytest.raises(KeyError, match="bad item"):  # and so does finish()
        consumer.finish()


def test_aborting_a_background_consumer_drops_what_is_waiting():
    import threading

    handled, release = [], threading.Event()

    def slow(item):
        release.wait(5)
        handled.append(item)

    consumer = BackgroundConsumer(slow, depth=10, name="test-consumer")
    for i in range(5):
        consumer.put(i)
    threading.Timer(0.2, release.set).start()  # the item in hand finishes after abort() was called
    consumer.abort()
    assert handled == [0] or handled == []  # at most the item in hand when abort was called
    assert not any(t.name == "test-consumer" for t in threading.enumerate())


class _Device:
    def __init__(self, type_):
        self.type = type_


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # "cuda": post-processing in its own thread (no GPU needed)
def test_post_processing_in_line_or_in_its_own_thread_gives_the_same_output_and_errors_reach_the_caller(
        scene, tmp_path, device):
    class OnDevice(BandOneScorer):
        def __init__(self, fail_at=None):
            self.device, self.calls, self.fail_at = _Device(device), 0, fail_at

        def __call__(self, pixels):
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("model blew up")
            return super().__call__(pixels)

    reference = tmp_path / "reference.gpkg"
    detect_to_file(scene, reference, scorer=BandOneScorer(), config=CONFIG)
    out = tmp_path / "p.gpkg"
    detect_to_file(scene, out, scorer=OnDevice(), config=CONFIG)
    a, b = read(reference), read(out)
    assert len(a) == len(b) > 0 and a.geometry.geom_equals(b.geometry).all()
    broken = tmp_path / "broken.gpkg"
    with pytest.raises(RuntimeError, match="model blew up"):
        detect_to_file(scene, broken, scorer=OnDevice(fail_at=3), config=CONFIG)
    assert not broken.exists()
    import threading

    assert not any(t.name.startswith("solarmap-") for t in threading.enumerate())  # no thread left running


def test_python_api_accepts_a_dataarray_with_crs_and_transform(geotiff, tmp_path, monkeypatch):
    rioxarray = pytest.importorskip("rioxarray")
    from solarmap.pipeline import detect

    path = geotiff(rectangle_raster(40, 40, (10, 10, 20, 30)))
    array = rioxarray.open_rasterio(path).load()
    seen = []
    frame = detect(array, scorer=BandOneScorer(), config=CONFIG, progress=seen.append)
    assert len(frame) == 1 and frame.crs.to_epsg() == 32611
    assert frame.area_m2.iloc[0] == pytest.approx(10 * 20 * 0.25, rel=1e-3)
    assert seen and seen[-1].tiles_read == seen[-1].tiles_total
    assert frame.source.tolist() == ["array"]  # an unnamed array: not a temporary file's name
    named = detect(array.rename("ortho_2024"), scorer=BandOneScorer(), config=CONFIG, out=tmp_path / "named.gpkg")
    assert named.source.tolist() == ["ortho_2024"]
    assert gpd.read_file(tmp_path / "named.gpkg", layer="panels").source.tolist() == ["ortho_2024"]
    import uuid

    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))  # the in-memory raster's name, known
    given = detect(array, scorer=BandOneScorer(), config=CONFIG, source_name="county-2024.tif")
    assert given.source.tolist() == ["county-2024.tif"]
    with pytest.raises(rasterio.errors.RasterioIOError):  # nothing left in GDAL's memory
        rasterio.open(f"/vsimem/solarmap-{uuid.UUID(int=7).hex}.tif")


class WeakTileScorer:
    """Every tile positive; the map is band 1 (so a faint object stays below a global threshold)."""

    name = "weak"

    def __call__(self, pixels):
        return np.ones(len(pixels), np.float32), pixels[:, 0].astype(np.float32)


def test_peak_fraction_keeps_the_strongest_response_of_a_faint_positive_tile(tmp_path, geotiff):
    from solarmap.pipeline import detect_scene

    array = rectangle_raster(64, 64, (10, 10, 30, 40), value=0.3)  # faint: peak 0.3 < threshold 0.5
    array[:, 20:25, 20:25] = 0.2  # a dimmer hole, below 0.5 x peak
    scene = geotiff(array)
    base = DetectConfig(tile_size_px=64, overlap_px=0, mask_threshold=0.5, min_area_m2=0)
    plain, _ = detect_scene(scene, scorer=WeakTileScorer(), config=base)
    assert len(plain) == 0
    from dataclasses import replace

    kept, _ = detect_scene(scene, scorer=WeakTileScorer(), config=replace(base, mask_peak_fraction=0.8))
    assert len(kept) == 1
    assert kept.geometry.iloc[0].area == pytest.approx((20 * 30 - 25) * 0.25)  # 0.5 m pixels, hole excluded
    strong = geotiff(rectangle_raster(64, 64, (10, 10, 30, 40), value=0.9))
    both, _ = detect_scene(strong, scorer=WeakTileScorer(), config=replace(base, mask_peak_fraction=0.99))
    assert both.geometry.iloc[0].area == pytest.approx(20 * 30 * 0.25)  # strong tiles: the global threshold rules


def test_each_cam_method_gets_its_own_calibrated_mask_rule(tmp_path):
    from dataclasses import replace

    from solarmap import model as M
    from solarmap.model.scorer import ModelScorer

    config = replace(tiny_config(), branch_levels=1, cam_threshold=0.8, cam_peak_fraction=0.5,
                     mask_rules={"feedback": [0.4, None], "gap": [0.9, 0.7]})
    net = M.load(M.save(M.SolarNet(config), tmp_path / "m.pt"))  # the rules survive a checkpoint

    def rule(method="branch", **overrides):
        settings = DetectConfig.for_scorer(ModelScorer(net, method=method), **overrides)
        return settings.mask_threshold, settings.mask_peak_fraction

    assert rule() == (0.8, 0.5)
    assert rule("feedback") == (0.4, None)
    assert rule("gap") == (0.9, 0.7)
    assert rule("gradcam") == (0.8, 0.5)  # no rule of its own
    assert rule("feedback", mask_threshold=0.6) == (0.6, None)


@pytest.fixture(scope="module")
def every_method_model(tmp_path_factory):
    """A tiny random model that can run every CAM method: two branch levels, a segmentation head, a
    colour prior with a refinement rule, and a mask rule of its own for some methods."""
    from solarmap import model as M

    rng = np.random.default_rng(0)
    config = tiny_config(branch_levels=2, pseudo_seg=True, decision_threshold=0.0, cam_threshold=1.0,
                         cam_scale=0.03, gap_cam_scale=5.9e-8,  # about the peaks of these random weights
                         colour_prior=tuple(float(v) for v in rng.normal(0, 1, 16 ** 3)),
                         refine_rule={"grow_px": 24, "min_log_ratio": 0.0, "smooth_px": 1},
                         mask_rules={"gap": [1.0, None], "gradcam": [0.5, 0.5], "feedback": [0.4, None],
                                     "pseudo-seg": [0.99, 0.95]})
    path = tmp_path_factory.mktemp("model") / "every.pt"
    import torch

    torch.manual_seed(3)
    return str(M.save(M.SolarNet(config), path))


@pytest.mark.parametrize("method", ["branch", "gap", "gradcam", "feedback", "pseudo-seg"])
def test_python_api_gives_what_the_cli_gives_for_every_method(method, tmp_path, geotiff, every_method_model):
    """pipeline.detect(..., method=m) and `solarmap detect --cam-method m` build the scorer and the
    settings the same way (the method's own mask rule, refinement only where it is the default)."""
    from click.testing import CliRunner

    from solarmap.cli import main
    from solarmap.pipeline import detect

    pixels = np.random.default_rng(1).integers(0, 255, (3, 180, 180)).astype(np.uint8)
    raster = geotiff(pixels, transform=rasterio.Affine(0.3, 0, 500_000, 0, -0.3, 4_000_000))
    out = tmp_path / "cli.gpkg"
    result = CliRunner().invoke(main, ["detect", raster, "--out", str(out), "--model", every_method_model,
                                       "--cam-method", method, "--quiet"])
    assert result.exit_code == 0, result.output
    from_cli = read(out)
    from_api = detect(raster, model=every_method_model, method=method).sort_values("id").reset_index(drop=True)
    assert len(from_cli) > 0 and len(from_api) == len(from_cli)
    assert all(a.equals_exact(b, 0) for a, b in zip(from_api.geometry, from_cli.geometry))
    columns = ["id", "area_m2", "score", "cam_peak"]
    assert from_api[columns].to_numpy() == pytest.approx(from_cli[columns].to_numpy())


def seam_scene(tmp_path, config):
    """Dark-blue arrays for SpectralBaseline (every tile scored: score_threshold just above 0) at 0.3 m: a 6 x 6 px (3.24 m²) array centred on a point
    where four tile cores meet (each piece 0.81 m²), one of 2 x 2 px (0.36 m²) alone, and a tilted
    30 x 10 m array with a staircase outline."""
    from conftest import UTM_ORIGIN, write_tif
    from solarmap.geo.tiling import axis_cores, axis_offsets

    size = 400
    seam = axis_cores(axis_offsets(size, config.tile_spec), size, config.tile_spec)[1][1]  # first core edge
    image = np.full((3, size, size), 150, np.uint8)
    blue = np.array([10, 15, 45], np.uint8)[:, None]
    image[:, seam - 3: seam + 3, seam - 3: seam + 3] = blue[:, :, None]
    image[:, 10:12, 300:302] = blue[:, :, None]
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    u = (cols - 250) * np.cos(0.5) + (rows - 250) * np.sin(0.5)  # a rectangle turned by 0.5 rad
    v = -(cols - 250) * np.sin(0.5) + (rows - 250) * np.cos(0.5)
    image[:, (np.abs(u) <= 50) & (np.abs(v) <= 50 / 3)] = blue
    from affine import Affine
    return write_tif(tmp_path / "seams.tif", image, transform=Affine(0.3, 0, UTM_ORIGIN[0], 0, -0.3, UTM_ORIGIN[1])), seam


def test_the_default_area_filter_runs_after_seams_are_merged(tmp_path):
    from solarmap.pipeline import SpectralBaseline, detect_scene
    from solarmap.pipeline.regional import detect_regional

    config = DetectConfig(tile_size_px=64, overlap_px=8, batch_size=4, score_threshold=1e-6)
    assert config.min_area_m2 == 1.0  # the CLI's --min-area default too
    raster, seam = seam_scene(tmp_path, config)
    frame, _ = detect_scene(raster, scorer=SpectralBaseline(), config=config)
    unfiltered, _ = detect_scene(raster, scorer=SpectralBaseline(), config=DetectConfig(
        tile_size_px=64, overlap_px=8, batch_size=4, score_threshold=1e-6, min_area_m2=0.0))
    assert sorted(np.round(unfiltered.area_m2, 2))[:1] == [0.36]  # the lone small array is there unfiltered
    assert len(frame) == 2 == len(unfiltered) - 1  # ... and filtered; the seam-cut array is kept whole
    assert sorted(np.round(frame.area_m2, 2))[0] == 3.24
    regional, _ = detect_regional([raster], tmp_path / "r.gpkg", scorer_spec=SpectralBaseline(), config=config,
                                  rows_per_chunk=1)  # the same when the seam is between two chunks
    assert sorted(np.round(regional.area_m2, 2)) == sorted(np.round(frame.area_m2, 2))


def test_simplify_drops_staircase_vertices_and_keeps_the_area(tmp_path):
    from solarmap.pipeline import SpectralBaseline, detect_scene

    raster, _ = seam_scene(tmp_path, DetectConfig(tile_size_px=64, overlap_px=8))
    outlines = {}
    for tolerance in (0.0, 0.3):
        frame, _ = detect_scene(raster, scorer=SpectralBaseline(), config=DetectConfig(
            tile_size_px=64, overlap_px=8, batch_size=4, simplify_m=tolerance))
        outlines[tolerance] = frame.loc[frame.area_m2.idxmax()]
    pixel, simple = outlines[0.0], outlines[0.3]
    assert pixel.area_m2 == pytest.approx(300, rel=0.02)  # the 30 x 10 m array
    vertices = [len(row.geometry.exterior.coords) for row in (pixel, simple)]
    assert vertices[1] < vertices[0] / 5, vertices
    assert simple.area_m2 == pytest.approx(pixel.area_m2, rel=0.01)
