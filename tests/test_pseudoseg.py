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


@pytest.mark.parametrize("reads_branch", [False, True])
def test_head_trains_only_itself_round_trips_and_segments(tmp_path, tiny, reads_branch):
    tiny.config = replace(tiny.config, seg_reads_branch=reads_branch)
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
