import json

import numpy as np
import pytest
import torch
from dataclasses import replace

from conftest import tiny_config, write_tif
from solarmap import model as M
from solarmap.errors import InputError, OptionError
from solarmap.training.calibrate import best_rule
from solarmap.training.data import Sample, fit_tile, load_chips, scene_samples, split_samples
from solarmap.training.stages import TrainConfig, binary_scores, dihedral, train_stage


def toy_samples(n, size=80, seed=0):
    """Positives have a dark blue square; negatives don't (a learnable toy problem)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        pixels = rng.uniform(0.4, 0.7, (3, size, size)).astype(np.float32)
        label = i % 2
        if label:
            r, c = rng.integers(0, size - 20, 2)
            pixels[:, r:r + 20, c:c + 20] = np.array([0.05, 0.07, 0.2], np.float32)[:, None, None]
        samples.append(Sample(pixels=pixels, label=label, source="toy", key=f"toy:{seed}:{i}"))
    return samples


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_identical(before, module):
    after = module.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


@pytest.fixture
def net():
    torch.manual_seed(0)
    return M.SolarNet(tiny_config())


def test_branch_stages_leave_everything_else_bit_identical(net, tmp_path):
    train, val = toy_samples(12), toy_samples(6, seed=1)
    cfg = dict(epochs=1, batch_size=6, augmentations=2)
    train_stage(net, train, val, TrainConfig(stage="classifier", **cfg), workdir=tmp_path, progress=lambda s: None)
    backbone = snapshot(net.backbone)
    untouched_level2 = snapshot(net.branch[1])
    result = train_stage(net, train, val, TrainConfig(stage="branch1", lr=1e-2, **cfg), workdir=tmp_path,
                         progress=lambda s: None)
    assert result.epochs_run == 1 and net.config.branch_levels == 1
    assert_identical(backbone, net.backbone)  # weights *and* batch-norm running statistics
    assert_identical(untouched_level2, net.branch[1])
    level1 = snapshot(net.branch[0])
    level1_head = snapshot(net.branch_heads[0])
    before_level2 = snapshot(net.branch[1])
    train_stage(net, train, val, TrainConfig(stage="branch2", lr=1e-2, **cfg), workdir=tmp_path, progress=lambda s: None)
    assert net.config.branch_levels == 2
    assert_identical(backbone, net.backbone)
    assert_identical(level1, net.branch[0])
    assert_identical(level1_head, net.branch_heads[0])
    changed = net.branch[1].state_dict()
    assert not torch.equal(before_level2["weight"], changed["weight"])  # the new level did learn


def test_branch2_needs_branch1(net, tmp_path):
    with pytest.raises(OptionError, match="branch level 1 trained first"):
        train_stage(net, toy_samples(4), [], TrainConfig(stage="branch2", epochs=1), workdir=tmp_path)


class Interrupt(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    train, val = toy_samples(8), toy_samples(4, seed=1)
    cfg = TrainConfig(stage="branch1", epochs=3, batch_size=4, augmentations=2, lr=1e-2)

    def fresh():
        torch.manual_seed(0)
        return M.SolarNet(tiny_config())

    straight = fresh()
    train_stage(straight, train, val, cfg, workdir=tmp_path / "a", progress=lambda s: None)

    def stop_after_first_epoch(line):
        if "epoch 1/3" in line:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_stage(fresh(), train, val, cfg, workdir=tmp_path / "b", progress=stop_after_first_epoch)
    lines = []
    resumed = fresh()
    train_stage(resumed, train, val, cfg, workdir=tmp_path / "b", progress=lines.append)
    assert lines[0] == "branch1: resuming after epoch 1"
    assert [line.split(":")[0] for line in lines[1:] if "epoch" in line] == ["branch1 epoch 2/3", "branch1 epoch 3/3"]
    history = json.loads((tmp_path / "b" / "branch1.history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert torch.equal(straight.branch[0].weight, resumed.branch[0].weight)
    assert torch.equal(straight.branch_heads[0].weight, resumed.branch_heads[0].weight)


def test_a_named_run_of_a_finished_stage_trains_again_under_its_own_checkpoints(tmp_path):
    """A second cycle of a stage (the default model's ``classifier-2``) must not resume the first
    cycle's finished state, nor overwrite its checkpoints."""
    train, val = toy_samples(8), toy_samples(4, seed=1)
    torch.manual_seed(0)
    net = M.SolarNet(tiny_config())
    first = TrainConfig(stage="branch1", epochs=2, batch_size=4, augmentations=2, lr=1e-2)
    train_stage(net, train, val, first, workdir=tmp_path, progress=lambda s: None)
    first_best = (tmp_path / "branch1.best.pt").read_bytes()
    after_first = net.branch[0].weight.clone()
    lines = []
    second = replace(first, epochs=1, run_name="branch1-again")
    result = train_stage(net, train, val, second, workdir=tmp_path, progress=lines.append)
    assert [line.split(":")[0] for line in lines] == ["branch1-again epoch 1/1"]
    assert result.stage == "branch1" and result.epochs_run == 1
    assert (tmp_path / "branch1-again.state.pt").exists() and (tmp_path / "branch1-again.history.json").exists()
    assert (tmp_path / "branch1.best.pt").read_bytes() == first_best
    assert not torch.equal(net.branch[0].weight, after_first)


def test_stage_names_are_checked():
    with pytest.raises(OptionError, match="stage must be one of"):
        TrainConfig(stage="everything")


def test_binary_scores():
    s = binary_scores(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1]))
    assert (s.precision, s.recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))


def test_dihedral_variants_are_distinct_and_invertible():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    variants = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(variants) == 8


def test_fit_tile_crops_and_pads():
    assert fit_tile(np.zeros((3, 120, 90), np.float32), 101).shape == (3, 101, 101)


def test_split_is_deterministic_and_disjoint():
    samples = toy_samples(200)
    a = split_samples(samples, val_fraction=0.15, test_fraction=0.2)
    b = split_samples(list(reversed(samples)), val_fraction=0.15, test_fraction=0.2)
    assert [sorted(s.key for s in part) for part in a] == [sorted(s.key for s in part) for part in b]
    keys = [set(s.key for s in part) for part in a]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert 20 < len(a[2]) < 60


def test_load_chips_from_folder_resamples_to_model_gsd(tmp_path):
    (tmp_path / "chips").mkdir()
    for i in range(3):
        write_tif(tmp_path / "chips" / f"{i}.tif", np.full((3, 50, 50), 100, np.uint8), crs=None)
    (tmp_path / "labels.csv").write_text("id,label\n0,1\n1,0\n2,1\n")
    cfg = replace(tiny_config(), gsd_m=0.3, train_tile_px=80)
    samples = load_chips(tmp_path, chip_gsd_m=0.6, model=cfg)  # 50 px at 0.6 m -> 100 px at 0.3 m -> crop 80
    assert [s.label for s in samples] == [1, 0, 1]
    assert samples[0].pixels.shape == (3, 80, 80)
    assert samples[0].pixels.mean() == pytest.approx(100 / 255, abs=1e-3)
    with pytest.raises(InputError, match="labels.csv"):
        load_chips(tmp_path / "chips", chip_gsd_m=0.3, model=cfg)


def test_scene_samples_are_labelled_from_truth_polygons(tmp_path):
    from solarmap.training.synth import SynthConfig, render_town, write_town

    town = render_town(SynthConfig(size_px=240, seed=3, supersample=2, panel_house_fraction=1.0))
    scene, truth = write_town(town, tmp_path)
    cfg = replace(tiny_config(), train_tile_px=80)
    samples = scene_samples(scene, truth, model=cfg)
    assert 0 < len(samples) <= 9
    assert {s.label for s in samples} <= {0, 1}
    if town.arrays:
        assert any(s.label == 1 for s in samples)
    # the truth rasterized once for the scene labels each tile as rasterizing it tile by tile would
    import geopandas as gpd
    from pathlib import Path

    from affine import Affine
    from rasterio.features import rasterize

    from solarmap.geo.raster import SceneReader
    from solarmap.geo.tiling import TileSpec, iter_tiles

    frame = gpd.read_file(truth, layer="panels")
    with SceneReader(scene, gsd_m=cfg.gsd_m) as reader:
        grid = reader.info.grid
        spec = TileSpec(40, 10, 12)
        windows = scene_samples(scene, truth, model=replace(cfg, train_tile_px=40), stride_px=30, context_px=12)
        expected = {}
        for tile in iter_tiles(grid, spec):
            if tile.valid.width < spec.window_px or tile.valid.height < spec.window_px:
                continue
            core = tile.transform @ Affine.translation(12, 12)
            pixels = rasterize([(g, 1) for g in frame.to_crs(grid.crs.to_wkt()).geometry], out_shape=(40, 40),
                               transform=core).sum()
            expected[f"{Path(scene).parent.name}:{tile.tile_row}:{tile.tile_col}"] = pixels
    gx, gy = grid.ground_resolution_m()
    for window in windows:
        assert window.label == int(expected[window.key] * gx * gy >= 2.0), window.key
    assert any(w.label for w in windows)


def test_best_rule_prefers_recall_then_iou_and_breaks_near_ties_on_area_bias():
    def row(iou, recall, area):
        return {"pixel_iou": iou, "tile_recall": recall, "total_area_error": area}

    sweep = {"loose": row(0.865, 1.00, +0.064), "tight": row(0.860, 0.99, +0.014),
             "tighter": row(0.850, 0.99, -0.013), "misses": row(0.900, 0.80, 0.0)}
    assert best_rule(sweep) == "loose"  # "misses" has the best IoU but finds too few tiles
    assert best_rule(sweep, area_tie_iou=0.01) == "tight"  # within 0.01 of the best, least area bias
    assert best_rule(sweep, area_tie_iou=0.001) == "loose"  # no near tie: IoU decides
    assert best_rule(sweep, min_tile_recall=0.5) == "misses"


def test_the_head_rule_and_its_attention_gate_are_chosen_together(monkeypatch):
    """Each gate is swept with every threshold (the two trade against each other), the joint best is
    kept, and the gate lands in the config; the sweeps here stand in for detection on scenes."""
    from solarmap.training import calibrate as C

    def fake_sweep(scorer, scenes, *, thresholds, peak_fractions, min_tile_recall=0.9):
        assert scorer.model.config.seg_blob_levels == tuple(thresholds)  # exact at every threshold swept
        assert tuple(peak_fractions) == (None,)  # no weak-tile blob on every positive tile
        floor = scorer.model.config.seg_attention_floor
        table = {(t, None): {"pixel_iou": 0.7 - abs(t - (0.85 if floor == 0 else 0.8)) - floor, "tile_recall": 1.0,
                             "total_area_error": 0.5 - t} for t in thresholds}
        return None, None, table

    monkeypatch.setattr(C, "sweep_mask_rules", fake_sweep)
    monkeypatch.setattr(C, "ModelScorer", lambda model, method: type("S", (), {"model": model})())
    net = M.SolarNet(replace(tiny_config(), branch_levels=2))
    assert net.config.seg_attention_floor == 0.1 and net.config.seg_blob_levels == ()  # as before calibration
    assert C.calibrate_seg_rule(net, [], floors=(0.1, 0.0, 0.05), area_tie_iou=None) == [0.85, None]
    assert net.config.seg_attention_floor == 0.0 and net.config.seg_blob_levels == (0.85,)
    assert C.calibrate_seg_rule(net, [], floors=(0.1,), area_tie_iou=None) == [0.8, None]
    assert net.config.seg_attention_floor == 0.1


def test_cache_keys_tell_apart_what_a_checksum_would_not():
    """Cached tile scores and branch features are keyed by a cryptographic digest of dtype, shape and
    bytes: the same bytes in another shape, or one changed pixel, get another key."""
    from solarmap.training.calibrate import array_digest
    from solarmap.training.stages import _tensor_digest

    tile = np.random.default_rng(0).random((3, 8, 8), dtype=np.float32)
    assert array_digest(tile) == array_digest(tile.copy())
    assert array_digest(tile) != array_digest(tile.reshape(3, 4, 16))
    changed = tile.copy()
    changed[0, 0, 0] += 1e-3
    assert array_digest(changed) != array_digest(tile) and len(array_digest(tile)) == 16
    weights = torch.from_numpy(tile)
    assert _tensor_digest([weights]) != _tensor_digest([weights.reshape(3, 64)]) == _tensor_digest([weights.reshape(3, 64)])
