"""The outline network: shapes, the scorer's method, training views and loss, validation metrics,
and the masked sets (skipped where ../shared/data is absent)."""

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from solarmap import model as M
from solarmap.errors import ModelError
from solarmap.model.outline import FOOTPRINT, PANEL, OutlineNet, OutlineSpec
from solarmap.training.mask_data import MaskedImage
from solarmap.training.outline import OutlineViewConfig, evaluate_outline, outline_loss, outline_view

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SMALL = {"encoder": "tf_efficientnet_lite0", "decoder_channels": (16, 16, 8, 8, 8)}


def square_image(size=96, source="bolzano", **fields):
    """Grey ground with a dark 30 x 20 px array: pixels, and the array as panel and footprint truth."""
    pixels = np.full((3, size, size), 170, np.uint8)
    pixels[:, 40:70, 20:40] = np.array([20, 25, 60], np.uint8)[:, None, None]
    truth = np.zeros((size, size), np.float32)
    truth[40:70, 20:40] = 1
    return MaskedImage(pixels, truth, truth.copy(), source, f"{source}:x", f"{source}:g", **fields)


def test_the_outline_network_maps_windows_of_any_size_to_two_probabilities():
    torch.manual_seed(0)
    net = OutlineNet(OutlineSpec(**SMALL)).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 3, 64, 96)).shape == (2, 2, 64, 96)
        prob = net.probabilities(torch.rand(1, 3, 85, 70))  # padded to 96 x 96 and cropped back
    assert prob.shape == (1, 2, 85, 70) and float(prob.min()) >= 0 and float(prob.max()) <= 1
    with pytest.raises(ModelError, match="multiples of 32"):
        net(torch.rand(1, 3, 70, 64))


def test_the_scorer_outlines_with_the_networks_panel_output_and_round_trips(tmp_path):
    from solarmap.model.scorer import ModelScorer

    torch.manual_seed(0)
    net = M.SolarNet(tiny_config(backbone="efficientnet-lite0", context_px=32, decision_threshold=0.0,
                                 outline=SMALL, mask_rules={"outline": (0.4, None)})).eval()
    windows = np.random.default_rng(0).random((2, 3, 160, 160), dtype=np.float32)
    scorer = ModelScorer(net, method="outline")
    assert scorer.detect_settings()["mask_threshold"] == 0.4 and scorer.metadata()["cam_threshold_basis"] == "probability"
    _, maps = scorer(windows)
    with torch.no_grad():
        expected = net.outline.probabilities(torch.from_numpy(windows))[:, PANEL].numpy()
    assert maps.shape == (2, 160, 160)
    assert np.abs(maps - expected).max() <= 1e-4  # channels-last in the scorer: float32 rounding apart
    assert scorer.has_footprints and not ModelScorer(net, method="gap").has_footprints
    with torch.no_grad():
        footprint = net.outline.probabilities(torch.from_numpy(windows))[:, FOOTPRINT].numpy()
    assert np.abs(scorer.footprint_maps(windows) - footprint).max() <= 1e-4
    again = M.load(M.save(net, tmp_path / "outline.pt"))
    assert again.config.outline == net.config.outline
    assert np.abs(ModelScorer(again, method="outline")(windows)[1] - maps).max() <= 1e-4
    with pytest.raises(ModelError, match="no outline network"):
        ModelScorer(M.SolarNet(tiny_config(backbone="efficientnet-lite0")), method="outline")


def test_the_outline_method_falls_back_to_the_branch_cam_on_sure_tiles():
    """The outline method's fallback: a positive tile whose panel output never reaches the mask
    threshold gets the branch CAM (scaled so its threshold lands on the mask's); by default only on
    tiles at least the checkpoint's floor probable, never without a branch, off when refused."""
    from solarmap.errors import OptionError
    from solarmap.model.scorer import ModelScorer

    torch.manual_seed(0)
    config = tiny_config(backbone="efficientnet-lite0", context_px=32, decision_threshold=0.0, branch_levels=2,
                         cam_scale=1e-6, cam_threshold=0.5, outline=SMALL, mask_rules={"outline": (1.5, None)})
    net = M.SolarNet(config).eval()
    with torch.no_grad():
        net.backbone.classifier_weights.mul_(1e-3)  # tile probabilities away from 0 and 1, so floors tell them apart
    windows = np.random.default_rng(0).random((2, 3, 160, 160), dtype=np.float32)
    outline = ModelScorer(net, method="outline", cam_fallback=False)(windows)[1]
    fallen = ModelScorer(net, method="outline", cam_fallback_min_score=0.0)(windows)[1]  # every positive tile
    branch = ModelScorer(net, method="branch")(windows)[1]
    assert outline.max() <= 1.0  # a probability never reaches 1.5: every tile falls back when asked
    assert np.abs(fallen - branch * 3.0).max() <= 1e-4 * max(1.0, float(np.abs(branch).max()) * 3.0)
    assert ModelScorer(net, method="outline", cam_fallback=True).metadata()["cam_fallback"].startswith("branch CAM")
    assert ModelScorer(net, method="outline", cam_fallback=False).metadata()["cam_fallback"] == "none"
    by_default = ModelScorer(net, method="outline")
    assert by_default.cam_fallback and by_default.cam_fallback_min_score == config.outline_cam_fallback_min_score == 0.7
    assert by_default.metadata()["cam_fallback"].endswith("on tiles scoring >= 0.7")
    probs = by_default(windows)[0]
    floor = float(probs.mean())  # between the two tiles' probabilities: one falls back, one does not
    assert probs.min() < floor <= probs.max()
    floored = M.with_config(copy.deepcopy(net), outline_cam_fallback_min_score=floor)  # the same weights
    probs, fell = ModelScorer(floored, method="outline")(windows)
    for tile, prob in enumerate(probs):
        expected = fallen[tile] if prob >= floor else outline[tile]
        assert np.abs(fell[tile] - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    never = M.SolarNet(replace(config, outline_cam_fallback_min_score=None))
    assert not ModelScorer(never, method="outline").cam_fallback
    assert not ModelScorer(M.SolarNet(replace(config, branch_levels=0)), method="outline").cam_fallback
    with pytest.raises(OptionError, match="pseudo-seg and outline"):
        ModelScorer(net, method="gap", cam_fallback=True)
    with pytest.raises(ModelError, match="no trained CAM branch"):
        ModelScorer(M.SolarNet(replace(config, branch_levels=0)), method="outline", cam_fallback=True)


def test_a_view_keeps_pixels_and_truth_together():
    """Whatever the cut, scale, turn and look, the truth of a view lies on the dark array's pixels."""
    image = square_image()
    config = OutlineViewConfig(size_px=64, p_coarser=0, p_blur=0, p_jpeg=0, p_haze=0)
    for seed in range(8):
        pixels, targets = outline_view(image, np.random.default_rng(seed), config)
        assert pixels.shape == (3, 64, 64) and targets.shape == (2, 64, 64)
        inside, outside = targets[PANEL] > 0.9, targets[PANEL] < 0.1
        if inside.any():
            assert pixels[2][inside].mean() < pixels[2][outside].mean() - 0.2  # the array is darker


def test_small_chips_are_laid_out_with_others_of_their_set():
    chips = [square_image(size=64, source="bradbury") for _ in range(3)]
    pixels, targets = outline_view(chips[0], np.random.default_rng(1), OutlineViewConfig(size_px=128, scale=(0.7, 0.7)),
                                   chips)
    assert pixels.shape == (3, 128, 128)
    assert targets[PANEL].sum() > 1.5 * (30 * 20) * (128 / 183) ** 2  # more than one chip's array in view


def test_the_loss_ignores_unknown_pixels():
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    targets = torch.full((1, 2, 4, 4), float("nan"))
    targets[0, FOOTPRINT] = 1.0
    outline_loss(logits, targets).backward()
    assert logits.grad[0, PANEL].abs().sum() == 0 and logits.grad[0, FOOTPRINT].abs().sum() > 0


def test_validation_counts_iou_area_arrays_negatives_and_roofs():
    image = square_image()
    roof = np.zeros_like(image.panel)
    roof[0:10, 0:10] = 1
    image = replace(image, roof=roof)
    drawn = np.zeros((2, 96, 96), np.float32)
    drawn[:, 40:70, 20:30] = 0.9  # half the array
    drawn[:, 0:10, 0:5] = 0.9  # 50 px on a roof without panels
    negative = MaskedImage(np.zeros((3, 50, 50), np.uint8), np.zeros((50, 50), np.float32),
                           np.zeros((50, 50), np.float32), "oam", "oam:x", "oam:g")
    neg_drawn = np.zeros((2, 50, 50), np.float32)
    neg_drawn[:, :5, :5] = 0.9
    result = evaluate_outline([drawn, neg_drawn], [image, negative], thresholds=(0.5,))["0.5"]
    assert result["bolzano"]["panel_iou"] == pytest.approx(300 / 650, abs=1e-3)
    assert result["bolzano"]["panel_area"] == pytest.approx(350 / 600, abs=1e-3)
    assert result["bolzano"]["large_found"] == 1.0 and result["bolzano"]["roof_drawn"] == pytest.approx(50 / 600, abs=1e-3)
    assert result["oam"]["negative_drawn"] == pytest.approx(25 / 2500)


@pytest.mark.skipif(not (DATA / "nrel-train-masks").is_dir(), reason="../shared/data/nrel-train-masks is not here")
def test_nrel_panels_are_unknown_inside_its_footprints_and_its_farms_are_in_every_split():
    from solarmap.training.mask_data import NREL_FARM_COVER, load_masked_source

    images = load_masked_source("nrel", DATA, gsd_m=0.5)  # its own GSD: no resampling, fast
    for image in images[:5]:
        inside = image.footprint > 0
        assert np.isnan(image.panel[inside]).all() and (image.panel[~inside] == 0).all()
        assert image.pixels.shape[1:] == image.footprint.shape
    farms = {im.split for im in images if im.footprint.mean() >= NREL_FARM_COVER}
    assert farms == {"train", "val", "test"}


def test_attaching_an_outline_network_keeps_the_classifier_and_makes_it_the_default(tmp_path):
    from solarmap.model.scorer import build_scorer
    from solarmap.training.outline import attach_outline

    torch.manual_seed(0)
    base = M.SolarNet(tiny_config(backbone="efficientnet-lite0", branch_levels=1, decision_threshold=0.3)).eval()
    outline = OutlineNet(OutlineSpec(**SMALL)).eval()
    net = attach_outline(base, outline, threshold=0.35)
    assert net.config.default_cam_method == "outline" and net.config.decision_threshold == 0.3
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in base.state_dict().items())
    assert all(torch.equal(v, net.outline.state_dict()[k]) for k, v in outline.state_dict().items())
    scorer = build_scorer(M.load(M.save(net, tmp_path / "with-outline.pt")))
    assert scorer.method.value == "outline" and scorer.detect_settings()["mask_threshold"] == 0.35
