"""The pseudo-ground-truth route on tiny inputs: masks from CAM + saliency, a head trained on them."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import tiny_config
from solarmap import model as M
from solarmap.model.seg import segment
from solarmap.training.pseudoseg import IGNORE, erasing_saliency, pseudo_masks, train_pseudo_seg


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return M.SolarNet(replace(tiny_config(), branch_levels=2, cam_scale=1.0)).eval()


def test_pseudo_masks_use_two_thresholds_and_ignore_the_unsure_middle():
    cam = torch.tensor([[[1.0, 0.8, 0.5, 0.3, 0.0]]])
    saliency = torch.tensor([[[1.0, 1.0, 1.0, 1.0, 1.0]]])
    labels = pseudo_masks(cam, saliency, high=0.7, low=0.4)
    assert labels.tolist() == [[[1, 1, IGNORE, 0, 0]]]
    low_saliency = pseudo_masks(cam, torch.tensor([[[1.0, 0.1, 1.0, 1.0, 1.0]]]), high=0.7, low=0.4)
    assert low_saliency[0, 0, 1] == 0  # background where the saliency is low, whatever the CAM


def test_erasing_saliency_is_in_unit_range_and_covers_more_each_round(tiny):
    x = torch.rand(2, 3, 96, 96)
    one = erasing_saliency(tiny, x, rounds=1)
    three = erasing_saliency(tiny, x, rounds=3)
    assert one.shape == (2, 96, 96) and float(one.min()) >= 0 and float(one.max()) <= 1
    assert (three >= one - 1e-6).all()  # pixel-wise maximum over rounds


@pytest.mark.parametrize("reads_branch, reads_context", [(False, False), (True, False), (True, True)])
def test_head_trains_only_itself_round_trips_and_segments(tmp_path, tiny, reads_branch, reads_context):
    tiny.config = replace(tiny.config, seg_reads_branch=reads_branch, seg_reads_context=reads_context)
    x = torch.rand(6, 3, 96, 96)
    x[:, :, 30:50, 30:70] = torch.tensor([0.05, 0.07, 0.2])[:, None, None]
    frozen = {k: v.clone() for k, v in tiny.state_dict().items()}
    info = train_pseudo_seg(tiny, x, epochs=2, batch_size=3)
    assert len(info["loss"]) == 2 and np.isfinite(info["loss"]).all()
    assert all(torch.equal(frozen[k], v) for k, v in tiny.state_dict().items() if k in frozen)  # rest frozen
    prob = segment(tiny, x[:2], scales=(0.75, 1.0))
    assert prob.shape == (2, 96, 96) and float(prob.min()) >= 0 and float(prob.max()) <= 1
    path = M.save(tiny, tmp_path / "seg.pt")
    again = M.load(path)
    assert again.config.pseudo_seg and torch.allclose(segment(again, x[:2], scales=(0.75, 1.0)), prob, atol=1e-5)
    assert (again.seg_head.branch_in is not None) == reads_branch
    assert (again.seg_head.context_in is not None) == reads_context and again.config.seg_reads_context == reads_context


def test_a_head_that_reads_the_branch_uses_its_maps(tiny):
    from solarmap.errors import ModelError

    tiny.config = replace(tiny.config, seg_reads_branch=True)
    train_pseudo_seg(tiny, torch.rand(3, 3, 96, 96), epochs=1, batch_size=3)
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        stem, maps = tiny.stem_features(x), tiny.branch_maps(tiny.branch_features(x))
        assert not torch.allclose(tiny.seg_head(x, stem, maps), tiny.seg_head(x, stem, maps * 0 + 1))
        with pytest.raises(ModelError, match="reads the CAM branch"):
            tiny.seg_head(x, stem)


@pytest.mark.parametrize("backbone", ["inception-v3", "efficientnet-lite0", "efficientnet-lite2"])
def test_a_head_that_reads_context_uses_the_backbones_stride_16_stage(backbone):
    from solarmap.errors import ModelError

    torch.manual_seed(0)
    net = M.SolarNet(tiny_config(backbone=backbone, branch_levels=2, seg_reads_branch=True, seg_reads_context=True))
    train_pseudo_seg(net, torch.rand(3, 3, 96, 96), epochs=1, batch_size=3)
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        features = net.branch_features(x)
        stem, maps, context = net.stem_features(x), net.branch_maps(features), net.backbone.context_features(features)
        assert context.shape[1] == net.backbone.context_channels and context.shape[-1] < maps.shape[-1]
        assert torch.allclose(net.seg_head(x, stem, maps, context), net.seg_logits(x))
        assert not torch.allclose(net.seg_head(x, stem, maps, context), net.seg_head(x, stem, maps, context * 0 + 1))
        with pytest.raises(ModelError, match="reads the backbone's context stage"):
            net.seg_head(x, stem, maps)


def test_pseudo_seg_without_a_head_is_a_clear_error():
    from solarmap.model.scorer import ModelScorer
    from solarmap.errors import ModelError

    net = M.SolarNet(replace(tiny_config(), branch_levels=2))
    with pytest.raises(ModelError, match="no pseudo-seg head"):
        ModelScorer(net, method="pseudo-seg")


def test_pseudo_masks_given_by_the_caller_are_what_the_head_learns(tiny):
    """Masks from elsewhere (e.g. colour-refined CAM masks) replace CAM x saliency: the head learns
    to score the labelled rectangle above the background."""
    x = torch.rand(6, 3, 96, 96) * 0.3 + 0.5
    x[:, :, 30:50, 10:40] = torch.tensor([0.05, 0.07, 0.2])[:, None, None]
    masks = torch.zeros(6, 96, 96, dtype=torch.uint8)
    masks[:, 30:50, 10:40] = 1
    info = train_pseudo_seg(tiny, x, masks=masks, epochs=3, batch_size=3, seed=2)
    assert info["pseudo_label_fractions"]["panel"] == pytest.approx(20 * 30 / 96 ** 2)
    with torch.no_grad():
        logits = tiny.seg_head(x[:1], tiny.stem_features(x[:1]))[0]
    assert float(logits[34:46, 14:36].mean()) > float(logits[60:90, 50:90].mean()) + 1.0


def test_the_attention_gate_follows_the_checkpoint_and_zero_turns_it_off(tmp_path, tiny, monkeypatch):
    """A checkpoint's calibrated gate (``seg_attention_floor``, ``seg_blob_levels``) is what
    ``segment`` applies; with floor 0 the head's own probability is kept everywhere. (The tiny
    network's CAM is flat, so the class attention here is a given ramp.)"""
    from solarmap.model import seg

    train_pseudo_seg(tiny, torch.rand(3, 3, 96, 96), epochs=1, batch_size=3)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        head = torch.sigmoid(tiny.seg_logits(x))
    attention = torch.linspace(0, 1, 96).expand(2, 96, 96)  # left to right
    monkeypatch.setattr(seg, "class_attention", lambda model, pixels, features=None: attention)

    def segment_saved(name, **config):
        tiny.config = replace(tiny.config, **config)
        return segment(M.load(M.save(tiny, tmp_path / name)), x)

    by_pixel = segment_saved("pixel.pt", seg_attention_floor=0.5, seg_blob_levels=())
    assert torch.allclose(by_pixel, head * (attention >= 0.5), atol=1e-5)
    assert (by_pixel[..., :40] == 0).all() and (by_pixel[..., 60:] > 0).all()
    by_blob = segment_saved("blob.pt", seg_attention_floor=0.5, seg_blob_levels=(0.4, 0.55))
    expected = seg.gate_blobs(head.numpy(), (attention >= 0.5).numpy(), (0.4, 0.55))
    assert np.allclose(by_blob.numpy(), expected, atol=1e-6)
    assert torch.allclose(segment_saved("open.pt", seg_attention_floor=0.0), head, atol=1e-5)
    assert torch.allclose(segment(tiny, x, attention_floor=0.5), by_blob, atol=1e-5)  # a caller may still choose


def test_the_blob_gate_keeps_supported_blobs_whole_at_every_level():
    from solarmap.model.seg import gate_blobs

    prob = np.zeros((2, 20, 30), np.float32)
    prob[0, 5:15, 2:12] = 0.86  # an array whose CAM covers only one corner
    prob[0, 8:12, 5:9] = 0.97  # its brighter middle, itself unsupported
    prob[0, 5:15, 18:28] = 0.88  # a roof the head likes and the CAM does not see
    prob[0, 0:2, :] = 0.2  # below the lowest level
    prob[1] = prob[0]  # the same picture in the next window, its CAM elsewhere
    support = np.zeros_like(prob, bool)
    support[0, 5, 2] = support[0, 0, 0] = True
    support[1, 14, 27] = True
    gated = gate_blobs(prob, support)
    for level in (0.3, 0.5, 0.85):
        assert (gated[0, 5:15, 2:12] >= level).all() and not (gated[0, 5:15, 18:28] >= level).any()
        assert (gated[1, 5:15, 18:28] >= level).all() and not (gated[1, 5:15, 2:12] >= level).any()
    assert not (gated >= 0.9).any()  # at 0.9 and 0.95 only the unsupported middle was left
    assert gated[0, 5, 2] == pytest.approx(0.86) and gated[0, 10, 6] == pytest.approx(0.85)  # its highest level
    assert gated[0, 0, 0] == pytest.approx(0.2) and gated[0, 1, 5] == 0  # pixel by pixel below the grid
    for level in (0.5, 0.85, 0.9):  # one level (what detection runs) gives that level's mask as the grid does
        assert np.array_equal(gate_blobs(prob, support, (level,)) >= level, gated >= level)


def test_the_gate_is_written_out_in_words_for_the_run_metadata():
    from solarmap.model.scorer import seg_gate_text

    config = tiny_config()
    assert seg_gate_text(config) == "branch CAM >= 0.1 of its scale, pixel by pixel"  # checkpoints before version 10
    assert seg_gate_text(replace(config, seg_attention_floor=0.2, seg_blob_levels=(0.85,))) == \
        "branch CAM >= 0.2 of its scale, whole blobs at 0.85"
    assert seg_gate_text(replace(config, seg_attention_floor=0.0, seg_blob_levels=(0.85,))) == "none"
