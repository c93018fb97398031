"""CAM alignment: where map cells sit on the input, and measuring a CAM's offset from images alone."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import assert_close_on_scale, tiny_config

from solarmap import model as M
from solarmap.model.align import align_to_window
from solarmap.model.scorer import ModelScorer
from solarmap.training.calibrate import estimate_cam_shift


@pytest.mark.parametrize("layer", ["Mixed_5d", "Mixed_6e", "Mixed_7c"])
def test_layer_geometry_matches_the_network(layer):
    """The receptive-field centre of a middle cell (gradient centroid) is where the table says."""
    torch.manual_seed(0)
    net = M.SolarNet(tiny_config()).eval()
    stride, first = net.backbone.layer_geometry(layer)
    captured = {}
    handle = net.backbone.layer(layer).register_forward_hook(lambda m, i, o: captured.update(out=o))
    x = torch.rand(1, 3, 203, 203, requires_grad=True)
    net(x)
    handle.remove()
    feats = captured["out"]
    k = feats.shape[-1] // 2
    (grad,) = torch.autograd.grad(feats[0, :, k, k].sum(), x)
    weight = grad.abs().sum(dim=(0, 1))
    rows = weight.sum(dim=1)
    centroid = float((rows * torch.arange(203)).sum() / rows.sum())
    assert centroid == pytest.approx(stride * k + first, abs=1.5)


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "efficientnet-lite2"])
def test_efficientnet_geometry_is_the_middle_of_each_cells_receptive_field(backbone):
    """With "same" padding a cell's receptive field is an interval of input pixels whose middle is the
    cell's centre; on a 1536 px tall input the middle row's field fits inside the image, so it is exact
    (a narrow strip: rows do not depend on the columns)."""
    torch.manual_seed(0)
    net = M.SolarNet(tiny_config(backbone=backbone)).eval()
    layers = ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "conv_head"]
    captured = {}
    handles = [net.backbone.layer(name).register_forward_hook(lambda m, i, o, name=name: captured.update({name: o}))
               for name in layers]
    height = 1536
    x = torch.rand(1, 3, height, 64, requires_grad=True)
    net(x)
    for handle in handles:
        handle.remove()
    for name in layers:
        stride, first = net.backbone.layer_geometry(name)
        k = captured[name].shape[-2] // 2
        (grad,) = torch.autograd.grad(captured[name][0, :, k, :].sum(), x, retain_graph=True)
        rows = grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
        assert 0 < int(rows.min()) and int(rows.max()) < height - 1, name  # not clipped by the image
        assert (int(rows.min()) + int(rows.max())) / 2 == stride * k + first, name


def test_alignment_puts_cell_centres_on_their_pixels_and_shifts():
    cam = torch.zeros(1, 10, 10)
    cam[0, 4, 6] = 1.0
    out = align_to_window(cam, (101, 101), (8, 13))
    assert out.shape == (1, 101, 101)
    assert np.unravel_index(int(out[0].argmax()), (101, 101)) == (8 * 4 + 13, 8 * 6 + 13)
    moved = align_to_window(cam, (101, 101), (8, 13), shift_px=(10, -3))
    assert np.unravel_index(int(moved[0].argmax()), (101, 101)) == (8 * 4 + 13 + 10, 8 * 6 + 13 - 3)
    flat = align_to_window(torch.ones(2, 10, 10), (101, 101), (8, 13))
    assert torch.allclose(flat, torch.ones(2, 101, 101))  # weights sum to one, edges clamp


def displaced_maps(offset_px):
    """A fake CAM: brightness moved ``offset_px`` rows (network frame), sampled at 8k+13 cells."""

    def raw(x):
        bright = x.mean(dim=1)
        moved = torch.roll(bright, shifts=offset_px, dims=1)
        return moved[:, 13::8, 13::8]

    return raw


def test_offset_is_measured_from_flips_without_truth():
    rng = np.random.default_rng(0)
    x = torch.zeros(24, 3, 181, 181)
    for img in x:
        r, c = rng.integers(50, 120, size=2)
        img[:, r:r + 12, c:c + 20] = 1.0
    dy, dx = estimate_cam_shift(displaced_maps(-24), x, (8, 13))
    assert dy == pytest.approx(24, abs=4) and dx == pytest.approx(0, abs=4)
    dy, dx = estimate_cam_shift(displaced_maps(0), x, (8, 13))
    assert dy == pytest.approx(0, abs=4)


def test_scorer_classifies_the_tile_and_maps_the_whole_window():
    torch.manual_seed(0)
    net = M.SolarNet(replace(tiny_config(), branch_levels=2, context_px=20,
                             cam_shifts={"branch": [6.0, 0.0]})).eval()
    window = np.random.default_rng(1).random((2, 3, 136, 136), dtype=np.float32)
    tile_only = window[:, :, 20:-20, 20:-20].copy()
    with_context = ModelScorer(net, decision_threshold=0.0)
    probs, maps = with_context(window)
    assert maps.shape == (2, 136, 136)
    plain_probs, plain_maps = ModelScorer(net, decision_threshold=0.0, context_px=0)(tile_only)
    assert probs == pytest.approx(plain_probs, abs=1e-4)  # the classifier saw only the tile (a slice: other kernels)
    assert plain_maps.shape == (2, 96, 96)
    none = ModelScorer(net, decision_threshold=1.1)(window)[1]
    assert not none.any()  # no CAM work for negative tiles


def test_feedback_saliency_is_a_pixel_map_and_leaves_the_model_untouched():
    from solarmap.model.cam import feedback_saliency

    torch.manual_seed(0)
    net = M.SolarNet(tiny_config()).eval()
    x = torch.rand(2, 3, 96, 96)
    with torch.inference_mode():
        before = net(x)
    maps = feedback_saliency(net, x, steps=3)
    assert maps.shape == (2, 96, 96)
    assert torch.isfinite(maps).all() and (maps >= 0).all() and maps.amax() > 0
    with torch.inference_mode():
        assert torch.equal(net(x), before)  # gates were hooks, now removed
    scorer = ModelScorer(net, method="feedback", decision_threshold=0.0, feedback_steps=2)
    probs, normalised = scorer(x.numpy())
    assert normalised.shape == (2, 96, 96)
    assert normalised.max(axis=(1, 2)) == pytest.approx([1.0, 1.0])  # basis: the tile's own maximum


def test_branch_levels_choose_the_cam_depth_and_their_own_offset():
    torch.manual_seed(0)
    net = M.SolarNet(replace(tiny_config(), branch_levels=2,
                             cam_shifts={"branch": [4.0, 0.0], "branch1": [8.0, 0.0]})).eval()
    assert ModelScorer(net).shift_px == (4.0, 0.0)
    assert ModelScorer(net, branch_levels=1).shift_px == (8.0, 0.0)
    x = torch.rand(1, 3, 96, 96)
    with torch.inference_mode():
        features = net.branch_features(x)
        # the scorer holds its network channels-last: other kernels, the same maps up to float32 rounding
        assert_close_on_scale(ModelScorer(net, branch_levels=1).raw_maps(x), net.branch_cam(features, levels=1))
    from solarmap.errors import OptionError

    with pytest.raises(OptionError, match="trained branch level"):
        ModelScorer(replace_levels(net, 1), branch_levels=2)


def replace_levels(net, levels):
    net.config = replace(net.config, branch_levels=levels)
    return net


def test_scorer_defaults_come_from_the_checkpoint():
    net = M.SolarNet(replace(tiny_config(), decision_threshold=0.37, context_px=12)).train()
    scorer = ModelScorer(net, method="gap")
    assert scorer.decision_threshold == 0.37 and scorer.context_px == 12
    assert not scorer.model.training  # inference mode for batch norm and dropout
    from solarmap.errors import ModelError

    with pytest.raises(ModelError, match="no trained CAM branch"):
        ModelScorer(net, method="branch")


def test_cam_scales_are_measured_on_windows_as_detection_reads_them():
    from solarmap.training.calibrate import calibrate_cam_scales
    from solarmap.training.data import Sample

    torch.manual_seed(0)
    net = M.SolarNet(replace(tiny_config(), branch_levels=2)).eval()
    with torch.no_grad():  # positive class weights >= 0: maps of ReLU features are then >= 0, as when trained
        net.branch_heads[1].weight.abs_()
        net.backbone.fc.weight.abs_()
    rng = np.random.default_rng(0)
    windows = [Sample(pixels=rng.random((3, 96, 96), dtype=np.float32), label=label, source="t", key=str(i))
               for i, label in enumerate([1, 1, 1, 0])]
    scales = calibrate_cam_scales(net, windows)
    assert net.config.cam_scale == scales["branch"] and net.config.gap_cam_scale == scales["gap"]
    normalised = ModelScorer(net, decision_threshold=0.0)(np.stack([w.pixels for w in windows[:3]]))[1]
    assert float(np.median(normalised.max(axis=(1, 2)))) == pytest.approx(1.0, rel=1e-4)  # a typical peak maps to 1


def test_grad_cam_works_on_a_frozen_model():
    from solarmap.model.cam import grad_cam

    torch.manual_seed(0)
    net = M.SolarNet(tiny_config()).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    maps = grad_cam(net, torch.rand(1, 3, 96, 96), layer="Mixed_6e")
    assert maps.shape == (1, 4, 4) and torch.isfinite(maps).all()  # Mixed_6e at 96 px


@pytest.mark.parametrize("method", ["branch", "gap", "gradcam", "feedback", "pseudo-seg"])
def test_every_method_runs_on_the_efficientnet_backbone(method):
    """The backbone seam: each CAM method makes window-sized, finite maps on EfficientNet-Lite0 too."""
    from solarmap.model.network import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig.for_backbone("efficientnet-lite0", branch_levels=2, pseudo_seg=True, context_px=32,
                                      decision_threshold=0.0, cam_scale=1e-6)  # pseudo-seg: attention open
    net = M.SolarNet(config).eval()
    windows = np.random.default_rng(0).random((2, 3, 160, 160), dtype=np.float32)
    probs, maps = ModelScorer(net, method=method, feedback_steps=2)(windows)
    assert probs.shape == (2,) and maps.shape == (2, 160, 160)
    assert np.isfinite(maps).all() and maps.any()


def test_pseudo_seg_falls_back_to_the_branch_cam_where_the_head_draws_nothing():
    """--cam-fallback: a positive tile whose head map stays below its threshold gets the branch CAM,
    scaled so the CAM's own threshold lands on the head's; tiles the head draws on keep its map."""
    from solarmap.errors import OptionError
    from solarmap.model.network import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig.for_backbone("efficientnet-lite0", branch_levels=2, pseudo_seg=True, context_px=32,
                                      decision_threshold=0.0, cam_scale=1e-6, cam_threshold=0.5,
                                      seg_attention_floor=0.0)
    windows = np.random.default_rng(0).random((2, 3, 160, 160), dtype=np.float32)

    def maps(method, seg_threshold=0.6, **options):
        net = M.SolarNet(replace(config, mask_rules={"pseudo-seg": (seg_threshold, None)}))
        net.load_state_dict(base.state_dict())
        return ModelScorer(net.eval(), method=method, **options)(windows)[1]

    base = M.SolarNet(config)
    branch = maps("branch")
    # the head never reaches 1.5 (a probability): every tile falls back, to the CAM x 1.5 / 0.5
    assert_close_on_scale(maps("pseudo-seg", 1.5, cam_fallback=True), branch * 3.0)  # another batch: float32 rounding
    # the head reaches 0 everywhere: no tile falls back
    head = maps("pseudo-seg", 0.0)
    assert np.array_equal(maps("pseudo-seg", 0.0, cam_fallback=True), head)
    assert not np.allclose(head, branch * 3.0)
    # a score floor: only positive tiles at least that probable fall back, the others keep the head's map
    with torch.no_grad():
        base.backbone.net.classifier.weight.mul_(1e-3)  # a random classifier is sure of everything
    net = M.SolarNet(replace(config, mask_rules={"pseudo-seg": (1.5, None)}))
    net.load_state_dict(base.state_dict())
    probs = ModelScorer(net.eval(), method="pseudo-seg")(windows)[0]
    assert probs[0] != probs[1]
    floor, sure = float(probs.mean()), int(probs.argmax())
    floored = maps("pseudo-seg", 1.5, cam_fallback=True, cam_fallback_min_score=floor)
    assert_close_on_scale(floored[sure], branch[sure] * 3.0)
    assert np.array_equal(floored[1 - sure], maps("pseudo-seg", 1.5)[1 - sure])
    # off unless asked for or the checkpoint says so; refused for other methods
    assert np.array_equal(maps("pseudo-seg", 1.5), maps("pseudo-seg", 1.5, cam_fallback=False))
    on = M.SolarNet(replace(config, seg_cam_fallback=True))
    assert ModelScorer(on, method="pseudo-seg").cam_fallback and not ModelScorer(on, method="branch").cam_fallback
    assert ModelScorer(M.SolarNet(replace(config, seg_cam_fallback_min_score=0.7)),
                       method="pseudo-seg").cam_fallback_min_score == 0.7  # the checkpoint's floor unless told
    assert ModelScorer(base, method="pseudo-seg", cam_fallback_min_score=0.9).cam_fallback  # a floor asks for it
    with pytest.raises(OptionError, match="--cam-fallback"):
        ModelScorer(base, method="branch", cam_fallback_min_score=0.9)
    with pytest.raises(OptionError, match="--cam-fallback"):
        ModelScorer(on, method="branch", cam_fallback=True)
    # at one branch level the fallback is that level's CAM, at that level's measured offset
    config = replace(config, cam_shifts={"branch": (0.0, 0.0), "branch1": (8.0, -8.0)})
    base = M.SolarNet(config)
    one_level = maps("branch", branch_levels=1)
    assert not np.allclose(one_level, maps("branch"))
    assert_close_on_scale(maps("pseudo-seg", 1.5, cam_fallback=True, branch_levels=1), one_level * 3.0)
