"""Real training data: splits by group, views in every look, and the fine-tune loop on toy images."""

import numpy as np
import pytest

from solarmap.training.real_data import RealImage, assign_splits
from solarmap.training.views import ViewConfig, centre_view, random_view


def image(i, group, label=0, size=90, source="toy", mask=None):
    pixels = np.random.default_rng(i).integers(0, 255, (3, size, size), dtype=np.uint8)
    return RealImage(pixels, label, source, f"{source}:{i}", group, mask)


def test_splits_keep_groups_together_and_come_close_to_the_fractions():
    images = [image(i, f"g{i // 3}") for i in range(90)]  # 30 groups of 3
    split = assign_splits(images, val_fraction=0.25, test_fraction=0.25)
    by_group = {}
    for im in split:
        by_group.setdefault(im.group, set()).add(im.split)
    assert all(len(splits) == 1 for splits in by_group.values())
    counts = {s: sum(im.split == s for im in split) for s in ("train", "val", "test")}
    assert counts == {"train": 45, "val": 21, "test": 24} or abs(counts["test"] - 22.5) <= 3
    assert [im.split for im in assign_splits(images, val_fraction=0.25, test_fraction=0.25)] == \
        [im.split for im in split]  # deterministic


def test_views_have_the_training_size_any_look_and_keep_masks_aligned():
    rng = np.random.default_rng(0)
    pixels = np.zeros((3, 85, 85), np.uint8)
    pixels[:, 20:40, 30:60] = 200
    mask = np.zeros((85, 85), np.uint8)
    mask[20:40, 30:60] = 255
    config = ViewConfig(size_px=80, chip_px=(60, 70), p_coarser=0, p_blur=0, p_jpeg=0, brightness=0, contrast=0, saturation=0, hue=0,
                        gamma=(1, 1), noise=0)
    for _ in range(20):
        view, view_mask = random_view(pixels, rng, config, mask=mask)
        assert view.shape == (3, 80, 80) and view.dtype == np.float32 and 0 <= view.min() and view.max() <= 1
        bright, marked = view[0] > 0.4, view_mask > 127
        assert (bright == marked).mean() > 0.97  # the mask went through the same crop, flip and scale
    looks = [random_view(pixels, rng)[0] for _ in range(20)]  # the default config changes the look
    assert len({round(float(v.mean()), 3) for v in looks}) > 10
    assert centre_view(np.zeros((3, 60, 70), np.uint8), 96).shape == (3, 96, 96)


def test_finetune_learns_a_toy_panel_and_keeps_the_best_epoch(tmp_path):
    from conftest import tiny_config
    from solarmap.model import SolarNet
    from solarmap.training.finetune import (FinetuneConfig, by_source_and_label, finetune_classifier,
                                           predict_images, source_scores)

    def toy(i, label):
        pixels = np.random.default_rng(i).integers(90, 160, (3, 96, 96), dtype=np.uint8)
        if label:
            pixels[:, 30:60, 20:70] = np.array([20, 30, 70], np.uint8)[:, None, None]
        return RealImage(pixels, label, "pos" if label else "neg", str(i), str(i), split="train")

    train = by_source_and_label([toy(i, 1) for i in range(12)] + [toy(100 + i, 0) for i in range(12)])
    val = [toy(200 + i, i % 2) for i in range(8)]
    net = SolarNet(tiny_config(backbone="efficientnet-lite0", mean=(0.5,) * 3, std=(0.5,) * 3))
    config = FinetuneConfig(epochs=3, lr=2e-3, batch_size=8, per_source={"pos:1": 16, "neg:0": 16},
                            view=ViewConfig(size_px=64, p_jpeg=0), val_size_px=64)
    result = finetune_classifier(net, train, val, config, workdir=tmp_path, progress=lambda line: None)
    assert len(result["history"]) == 3 and 1 <= result["best_epoch"] <= 3
    scores = source_scores(val, predict_images(net, val, size_px=64), 0.5)
    assert set(scores) == {"pos", "neg"} and "recall" in scores["pos"] and "fpr" in scores["neg"]
    again = finetune_classifier(net, train, val, config, workdir=tmp_path, progress=lambda line: None)
    assert again["best_epoch"] == result["best_epoch"]  # finished: resumed, nothing retrained


def test_finetune_keeps_the_moving_average_of_the_weights(tmp_path):
    """What is validated and kept is the weights' moving average, not the last step's weights."""
    import torch
    from conftest import tiny_config
    from solarmap.model import SolarNet
    from solarmap.training.finetune import FinetuneConfig, by_source_and_label, finetune_classifier

    rng = np.random.default_rng(0)
    images = [RealImage(rng.integers(0, 255, (3, 64, 64), dtype=np.uint8), i % 2, "toy", str(i), str(i), split="train")
              for i in range(8)]
    kept = {}
    for decay in (None, 0.9):
        torch.manual_seed(0)
        net = SolarNet(tiny_config(backbone="efficientnet-lite0", mean=(0.5,) * 3, std=(0.5,) * 3))
        start = {k: v.clone() for k, v in net.state_dict().items()}
        config = FinetuneConfig(epochs=1, lr=1e-2, batch_size=4, per_source={"toy:1": 8, "toy:0": 8},
                                view=ViewConfig(size_px=64, p_jpeg=0), val_size_px=64, ema_decay=decay)
        finetune_classifier(net, by_source_and_label(images), images, config, workdir=tmp_path / str(decay),
                            progress=lambda line: None)
        last = torch.load(tmp_path / str(decay) / "finetune.state.pt", weights_only=False)["model"]
        kept[decay] = net.state_dict()
        name = "backbone.net.conv_stem.weight"
        moved_raw = (last[name] - start[name]).norm()
        moved_kept = (kept[decay][name] - start[name]).norm()
        if decay is None:
            assert torch.equal(kept[decay][name], last[name])
        else:  # 4 steps averaged with decay 0.9: the kept weights moved less far than the last step's
            assert 0 < moved_kept < 0.9 * moved_raw


def fake_pv01(root, names):
    """A PV01-like folder: 256 px RGB PNGs and masks with one rectangle of panel each."""
    from PIL import Image

    (root / "pv01-masks" / "images").mkdir(parents=True)
    (root / "pv01-masks" / "masks").mkdir(parents=True)
    for i, name in enumerate(names):
        rgb = np.full((256, 256, 3), 150, np.uint8)
        mask = np.zeros((256, 256), np.uint8)
        mask[40 + i: 100 + i, 50:150] = 1
        rgb[mask > 0] = (30, 40, 90)
        Image.fromarray(rgb).save(root / "pv01-masks" / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "pv01-masks" / "masks" / f"{name}.png")


def test_pv01_reads_at_the_models_gsd_and_mosaics_keep_the_truth(tmp_path):
    import geopandas as gpd

    from solarmap.geo.raster import describe_scene
    from solarmap.training.real_data import load_source, write_pv01_scenes

    names = [f"PV01_3251{i:02d}_120420{i}" for i in range(5)]
    fake_pv01(tmp_path, names)
    images = load_source("pv01", tmp_path, gsd_m=0.3)
    assert len(images) == 5 and all(im.pixels.shape == (3, 85, 85) and im.label == 1 for im in images)
    assert images[0].mask.max() == 255 and images[0].mask.shape == (85, 85)
    pairs = write_pv01_scenes(tmp_path, names, tmp_path / "scenes", per_side=2)
    assert len(pairs) == 2  # 4 images in the first mosaic, 1 in the second
    scene, truth = pairs[0]
    grid = describe_scene(scene).grid
    assert (grid.width, grid.height) == (512, 512) and grid.ground_resolution_m() == pytest.approx((0.1, 0.1), rel=1e-3)
    area = gpd.read_file(truth, layer="panels").area.sum()
    assert area == pytest.approx(4 * 60 * 100 * 0.01)  # four 6 x 10 m arrays
    coarse, same_truth = write_pv01_scenes(tmp_path, names, tmp_path / "scenes", per_side=2, gsd_m=0.5)[0]
    coarse_grid = describe_scene(coarse).grid
    assert coarse != scene and (coarse_grid.width, coarse_grid.height) == (102, 102)  # 51.2 m at ~0.5 m
    assert coarse_grid.ground_resolution_m() == pytest.approx((0.5, 0.5), rel=0.01)
    assert coarse_grid.bounds == pytest.approx(grid.bounds)  # the same ground, so the same truth
    assert gpd.read_file(same_truth, layer="panels").area.sum() == pytest.approx(area)


def test_the_decision_threshold_maximises_the_worst_source():
    from solarmap.training.real_recipe import choose_threshold

    images = [RealImage(np.zeros((3, 8, 8), np.uint8), label, source, str(i), str(i))
              for i, (label, source) in enumerate([(1, "a"), (1, "a"), (0, "a"), (0, "b"), (0, "b")])]
    probs = np.array([0.9, 0.4, 0.2, 0.35, 0.1])
    threshold, scores = choose_threshold(images, probs)
    assert 0.35 < threshold <= 0.4  # every positive found, every negative of both sources refused
    assert scores[threshold] == 1.0


@pytest.mark.parametrize("ious, chosen", [({0.2: 0.61, 0.1: 0.70, 0.05: 0.72, 0.0: 0.80}, 0.0),
                                           ({0.2: 0.75, 0.1: 0.75, 0.05: 0.70, 0.0: 0.60}, 0.2)])
def test_the_gate_floor_across_gsds_is_the_one_with_the_best_mean_iou_ties_keep_the_gate(monkeypatch, ious, chosen):
    from dataclasses import replace

    from conftest import tiny_config
    from solarmap.model import SolarNet
    from solarmap.training import real_recipe

    net = SolarNet(tiny_config(branch_levels=2, pseudo_seg=True))  # a head to gate
    net.config = replace(net.config, seg_attention_floor=0.2, seg_blob_levels=(0.6,))
    seen = []

    def sweep(scorer, configs, scenes, *, tile_size_px):  # what detecting the scenes under this floor measured
        seen.append((scorer.model.config.seg_attention_floor, tuple(scenes)))
        return {key: {"pixel_iou": ious[scorer.model.config.seg_attention_floor]} for key in configs}

    monkeypatch.setattr(real_recipe, "sweep_detect_configs", sweep)
    info = real_recipe.choose_gate_floor_across_gsds(net, [("a.tif", "a.gpkg"), ("a_0.5m.tif", "a.gpkg")],
                                                     say=lambda line: None)
    assert [floor for floor, _ in seen] == [0.2, 0.1, 0.05, 0.0]  # the calibrated floor and each one below it
    assert all(scenes == (("a.tif", "a.gpkg"), ("a_0.5m.tif", "a.gpkg")) for _, scenes in seen)  # every GSD
    assert info["floor"] == chosen and net.config.seg_attention_floor == chosen
    assert net.config.seg_blob_levels == (0.6,)  # the mask threshold is kept


def test_a_synthetic_supplement_decides_no_threshold():
    from solarmap.training.real_recipe import choose_threshold

    images = [RealImage(np.zeros((3, 8, 8), np.uint8), label, source, str(i), str(i))
              for i, (label, source) in enumerate([(1, "a"), (0, "a"), (1, "synthetic"), (0, "synthetic")])]
    probs = np.array([0.9, 0.2, 0.15, 0.95])  # the synthetic chips are scored backwards
    threshold, scores = choose_threshold(images, probs)
    assert 0.2 < threshold <= 0.9 and scores[threshold] == 1.0  # as if they were not there


def test_synthetic_chips_carry_masks_that_agree_with_their_labels(tmp_path):
    from solarmap.training.real_data import synthetic_images

    chips = synthetic_images(tmp_path, seeds=[5], split="train", gsd_m=0.3, chip_px=64, town_px=256)
    assert chips and all(im.pixels.shape == (3, 64, 64) and im.mask.shape == (64, 64) for im in chips)
    assert all((im.mask.sum() / 255 * 0.09 >= 2.0) == bool(im.label) for im in chips)
    assert {im.split for im in chips} == {"train"} and {im.group for im in chips} == {"synthetic:5"}


def test_the_heads_negative_views_come_from_negatives_of_each_other_source_and_are_all_background():
    from solarmap.training.real_recipe import seg_negative_windows

    images = ([image(i, "g", label=0, source="fresno") for i in range(5)]
              + [image(10 + i, "g", label=1, source="fresno") for i in range(5)]  # positives: never used
              + [image(20 + i, "g", label=0, source="ucmerced") for i in range(2)]
              + [image(30 + i, "g", label=0, source="pv01") for i in range(4)])  # the masks' own set: not here
    pixels, labels = seg_negative_windows(images, per_source=3, size_px=64)
    assert pixels.shape == (3 + 2, 3, 64, 64) and labels.shape == (5, 64, 64) and not labels.any()
    used = {float(v.float().mean()) for v in pixels}
    assert len(used) == 5  # each negative drawn once, not repeated
    none, nothing = seg_negative_windows(images[5:10], per_source=3, size_px=64)
    assert none.shape == (0, 3, 64, 64) and nothing.shape == (0, 64, 64)


def test_the_heads_pseudo_masked_views_come_from_bern_and_fresno_positives_labelled_by_the_network(monkeypatch):
    import torch
    from conftest import tiny_net

    from solarmap.training import real_recipe
    from solarmap.training.pseudoseg import IGNORE
    from solarmap.training.real_recipe import seg_pseudo_windows

    def square_cam(net, pixels):  # a random branch's CAM is mostly below zero: a known one instead
        cam = torch.zeros(pixels.shape[0], *pixels.shape[-2:])
        cam[:, 20:40, 20:40] = 1.0
        return cam

    monkeypatch.setattr(real_recipe, "class_attention", square_cam)
    net = tiny_net(branch_levels=2)
    images = ([image(i, "g", label=1, source="bern") for i in range(4)]
              + [image(10 + i, "g", label=1, source="fresno") for i in range(2)]
              + [image(20 + i, "g", label=0, source="fresno") for i in range(3)]  # negatives: never used
              + [image(30 + i, "g", label=1, source="pv01") for i in range(3)])  # masked elsewhere: not here
    pixels, labels = seg_pseudo_windows(net, images, per_source=3, size_px=80)
    assert pixels.shape == (3 + 2, 3, 80, 80) and labels.shape == (5, 80, 80) and labels.dtype == torch.uint8
    assert set(labels.unique().tolist()) <= {0, 1, IGNORE} and (labels == 1).any()
    assert not labels[:, :20].any() and not labels[:, 40:].any()  # no CAM: background; panel only inside it
    assert len({float(v.float().mean()) for v in pixels}) == 5  # each positive drawn once
    again = seg_pseudo_windows(net, images, per_source=3, size_px=80)
    assert torch.equal(again[0], pixels) and torch.equal(again[1], labels)  # deterministic
    none, nothing = seg_pseudo_windows(net, images[6:], per_source=3, size_px=80)
    assert none.shape == (0, 3, 80, 80) and nothing.shape == (0, 80, 80)


def test_hard_negative_views_are_those_the_head_draws_most_on_and_never_those_it_draws_nothing_on(monkeypatch):
    import torch

    from solarmap.training import real_recipe
    from solarmap.training.real_recipe import seg_hard_negative_windows

    def bright_is_panel(net, pixels, attention_floor=None):  # a stand-in head: panel where a view is bright
        assert attention_floor == 0.0  # mined without the gate, as the head alone draws
        return pixels.mean(dim=1)

    def negative(i, bright_rows, source="fresno", label=0):
        pixels = np.full((3, 90, 90), 10, np.uint8)
        pixels[:, :bright_rows] = 250
        return RealImage(pixels, label, source, f"{source}:{i}", "g", None)

    monkeypatch.setattr(real_recipe, "segment", bright_is_panel)
    images = [negative(0, 45), negative(1, 90), negative(2, 0), negative(3, 0),
              negative(4, 90, label=1),  # a positive: never a negative view
              negative(5, 90, source="pv01"),  # the masks' own set: not a negative source
              negative(6, 30, source="ucmerced"), negative(7, 0, source="ucmerced")]
    pixels, labels = seg_hard_negative_windows(torch.nn.Module(), images, per_source=5, size_px=64)
    assert pixels.shape == (3, 3, 64, 64) and labels.shape == (3, 64, 64) and not labels.any()
    shares = [float((v.mean(dim=0) >= 0.5).float().mean()) for v in pixels]
    assert shares[0] > 0.9 and 0.3 < shares[1] < 0.7 and 0.1 < shares[2] < 0.5  # fresno most first, then ucmerced
    one, _ = seg_hard_negative_windows(torch.nn.Module(), images, per_source=1, size_px=64)
    assert one.shape[0] == 2 and torch.equal(one[0], pixels[0])


def test_cam_made_labels_are_tightened_where_the_head_sees_the_array_and_kept_where_it_misses_it():
    import torch

    from solarmap.training.pseudoseg import IGNORE
    from solarmap.training.real_recipe import relabel_by_head

    labels = torch.zeros((3, 40, 40), dtype=torch.uint8)
    labels[:, 10:30, 10:30] = 1  # a CAM blob, twice the array's side
    labels[:, 8:10, :] = IGNORE
    labels[2] = 0  # a view with no panel label at all
    head = torch.zeros((3, 40, 40))
    head[0, 15:25, 15:25] = 0.9  # the head sees the array, tighter than the blob
    head[0, 10:15, 10:30] = 0.3  # unsure on part of the blob's rim
    head[0, 0:5, 0:5] = 0.9  # and draws outside the blob, where the label says background
    head[1, 10:12, 10:12] = 0.9  # a head that barely touches view 1's array: 4 of 400 pixels
    tightened = relabel_by_head(labels, head)
    inner = torch.zeros((40, 40), dtype=torch.bool)
    inner[15:25, 15:25] = True
    assert bool((tightened[0][inner] == 1).all()) and int((tightened[0] == 1).sum()) == 100
    assert bool((tightened[0, 10:15, 10:30] == IGNORE).all())  # unsure where the head is unsure
    assert bool((tightened[0, 25:30, 10:30] == 0).all())  # the blob's rim the head rejects: background
    assert bool((tightened[0, 0:5, 0:5] == 0).all()) and bool((tightened[0, 8:10] == IGNORE).all())
    assert torch.equal(tightened[1], labels[1]) and torch.equal(tightened[2], labels[2])  # missed / nothing: as before


def test_a_released_model_keeps_its_network_and_branch_and_loses_its_head_and_calibration(tmp_path):
    """--over-model: the recipe's later steps start from the released weights (as saved, fp16) with the
    config the recipe had before them, so the head's pseudo masks read an uncalibrated CAM as in a full run."""
    import torch

    from conftest import tiny_net
    from solarmap.model import load, save
    from solarmap.training.real_recipe import released_network

    net = tiny_net(branch_levels=2, pseudo_seg=True, cam_scale=3.5, cam_shifts={"branch": (2.0, -1.0)},
                   decision_threshold=0.35, seg_attention_floor=0.2, default_cam_method="pseudo-seg",
                   mask_rules={"pseudo-seg": (0.6, None)}, provenance={"script": "x"})
    released = load(save(net, tmp_path / "released.pt.xz", half=True))
    assert released.seg_head is not None
    kept = released_network(released)
    assert kept.seg_head is None and kept.config.branch_levels == 2
    assert kept.config.train_tile_px == 80 and kept.config.branch_channels == (16, 16)
    assert (kept.config.cam_scale, kept.config.cam_shifts, kept.config.decision_threshold) == (1.0, {}, 0.5)
    assert (kept.config.pseudo_seg, kept.config.mask_rules, kept.config.provenance) == (False, {}, {})
    for name, value in net.state_dict().items():
        if not name.startswith("seg_head.") and value.is_floating_point():
            assert torch.equal(kept.state_dict()[name], value.half().float()), name
    with pytest.raises(ValueError, match="no trained CAM branch"):
        released_network(tiny_net())


def test_mined_hard_negatives_are_training_negatives_the_model_scores_high(monkeypatch, tmp_path):
    """Only training negatives at or above the score; a network trained with them gets them as a group
    of their own, and anything else offered as one is refused."""
    from types import SimpleNamespace

    from solarmap.training import real_recipe
    from solarmap.training.real_recipe import HARD_NEGATIVE_GROUP, mine_hard_negatives, train_network

    def brightness(model, images, size_px):  # a stand-in classifier: the brighter, the surer
        assert size_px == 96
        return np.array([im.pixels.mean() / 255 for im in images])

    def image(i, value, label=0, split="train"):
        return RealImage(np.full((3, 40, 40), value, np.uint8), label, "ucmerced", str(i), str(i), split=split)

    monkeypatch.setattr(real_recipe, "predict_images", brightness)
    images = [image(0, 250), image(1, 51), image(2, 50), image(3, 10),
              image(4, 250, label=1),  # a positive
              image(5, 250, split="val")]  # not training data
    hard = mine_hard_negatives(object(), images, min_score=0.2)
    assert [im.key for im in hard] == ["0", "1"]
    seen = {}

    def finetune(net, groups, val, config, *, workdir, progress):
        seen.update(groups)
        raise StopIteration  # the groups are what this test is about

    monkeypatch.setattr(real_recipe, "finetune_classifier", finetune)
    net = SimpleNamespace(config=SimpleNamespace(train_tile_px=96))
    with pytest.raises(StopIteration):
        train_network(net, images, workdir=tmp_path, say=print, hard_negatives=hard)
    assert [im.key for im in seen[HARD_NEGATIVE_GROUP]] == ["0", "1"] and len(seen["ucmerced:0"]) == 4
    with pytest.raises(ValueError, match="training negatives"):
        train_network(net, images, workdir=tmp_path, say=print, hard_negatives=[images[4]])
