
import pytest
import torch
from conftest import assert_close_on_scale, tiny_config

from solarmap import model as M
from solarmap.errors import ModelError
from solarmap.training.pretrained import init_from_imagenet


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    from dataclasses import replace

    return M.SolarNet(replace(tiny_config(), branch_levels=2)).eval()


def test_exposes_backbone_and_branch_in_order(tiny):
    from torchvision.models import Inception3

    assert isinstance(tiny.backbone, Inception3)
    assert [c.in_channels for c in tiny.branch] == [288, 16]
    assert tiny.backbone.fc.out_features == 2


def test_full_size_branch_matches_the_design():
    net = M.SolarNet(M.ModelConfig())
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in net.branch] == [(288, 512, (3, 3)), (512, 512, (3, 3))]


def test_cam_is_35x35_at_299_px_and_on_the_classifier_scale(tiny):
    x = torch.rand(2, 3, 299, 299)
    with torch.inference_mode():
        features = tiny.branch_features(x)
        assert features.shape == (2, 288, 35, 35)
        cam = tiny.branch_cam(features)
        assert cam.shape == (2, 35, 35)
        # raw scale: averaging the CAM and adding the bias gives the branch head's positive logit
        logits = tiny.branch_logits(features, 2)
        head = tiny.branch_heads[1]
        # two orders of summation (pool then weigh, weigh then pool): equal up to float32 rounding
        assert_close_on_scale(cam.mean(dim=(1, 2)) + head.bias[1], logits[:, 1])
        level1 = tiny.branch_cam(features, levels=1)
        assert level1.shape == (2, 35, 35)
        gap = tiny.gap_cam(tiny.top_features(features))
        assert gap.shape == (2, 8, 8)


def test_cam_is_not_normalised_per_tile(tiny):
    x = torch.rand(1, 3, 96, 96)
    with torch.inference_mode():
        features = tiny.branch_features(x)
        # scaling the last layer's positive weights scales the CAM: no hidden min-max step
        head = tiny.branch_heads[1]
        before = tiny.branch_cam(features).clone()
        head.weight[1] *= 3
        after = tiny.branch_cam(features)
        head.weight[1] /= 3
    assert_close_on_scale(after, 3 * before)  # scaled weights, not a scaled sum: float32 rounding


def test_predict_returns_probabilities_and_cams(tiny):
    probs, cam = tiny.predict(torch.rand(3, 3, 96, 96))
    assert probs.shape == (3,) and ((probs >= 0) & (probs <= 1)).all()
    assert cam.shape[0] == 3


@pytest.mark.parametrize("name, half", [("m.pt", False), ("m.pt.xz", True)])
def test_checkpoint_round_trip(tmp_path, tiny, name, half):
    path = M.save(M.with_config(tiny, decision_threshold=0.42, provenance={"data": "x"}), tmp_path / name, half=half,
                  preset=0)
    back = M.load(path)
    assert back.config == tiny.config
    assert not back.training
    x = torch.rand(2, 3, 96, 96)
    p1, c1 = tiny.predict(x)
    p2, c2 = back.predict(x)
    tol = 1e-2 if half else 1e-6
    assert torch.allclose(p1, p2, atol=tol) and torch.allclose(c1, c2, atol=tol * max(1.0, float(c1.abs().max())))
    if half:
        assert open(path, "rb").read(6) == b"\xfd7zXZ\x00"


def test_missing_corrupt_and_foreign_checkpoints(tmp_path, tiny):
    with pytest.raises(ModelError, match="not found"):
        M.load(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError, match="corrupt"):
        M.load(corrupt)
    truncated = tmp_path / "trunc.pt"
    M.save(tiny, truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ModelError, match="corrupt"):
        M.load(truncated)
    foreign = tmp_path / "resnet.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "architecture": "resnet18"}, foreign)
    with pytest.raises(ModelError, match="not a solarmap model"):
        M.load(foreign)
    plain = tmp_path / "plain.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, plain)
    with pytest.raises(ModelError, match="not a solarmap model"):
        M.load(plain)


def test_mismatched_weights_are_refused(tmp_path, tiny):
    path = M.save(tiny, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["branch_channels"] = [32, 32]  # config says one shape, weights another
    torch.save(payload, path)
    with pytest.raises(ModelError, match="does not fit"):
        M.load(path)


def test_imagenet_init_without_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelError, match="--init-weights"):
        init_from_imagenet(M.SolarNet(tiny_config()))


def test_imagenet_init_from_a_local_file(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(1)
    reference = inception_v3(weights=None, aux_logits=True, init_weights=False)  # ImageNet layout, 1000 classes
    weights = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(reference.state_dict(), weights)
    net = init_from_imagenet(M.SolarNet(tiny_config()), weights)
    assert torch.equal(net.backbone.Mixed_5d.branch1x1.conv.weight, reference.Mixed_5d.branch1x1.conv.weight)
    assert net.backbone.fc.out_features == 2


def _with_random_norm_statistics(net):
    """Batch norms as training leaves them (a fresh network's are the identity, which folds trivially)."""
    generator = torch.Generator().manual_seed(1)
    for norm in net.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            n = norm.num_features
            norm.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
            norm.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            if norm.affine:
                norm.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
                norm.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)
    return net


@pytest.mark.parametrize("backbone,method", [("efficientnet-lite0", "outline"), ("inception-v3", "branch")])
def test_the_built_scorer_folds_batch_norms_in_a_copy_with_the_same_outputs(backbone, method):
    import numpy as np

    from solarmap.model.scorer import ModelScorer, build_scorer

    torch.manual_seed(0)
    outline = {"encoder": "tf_efficientnet_lite0", "decoder_channels": (16, 16, 8, 8, 8)} if method == "outline" else None
    net = _with_random_norm_statistics(M.SolarNet(tiny_config(
        backbone=backbone, context_px=32, decision_threshold=0.0, outline=outline, branch_levels=1,
        mask_rules={method: (0.4, None)})).eval())
    norms_before = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    windows = np.random.default_rng(0).random((3, 3, 160, 160), dtype=np.float32)
    probs, maps = ModelScorer(net, method=method)(windows)
    folded = build_scorer(net, method=method, device="cpu")
    folded_probs, folded_maps = folded(windows)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules()) == 0
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == norms_before > 0  # untouched
    assert np.abs(folded_probs - probs).max() <= 1e-4
    assert_close_on_scale(folded_maps, maps, rel=1e-4)
    assert float(np.abs(maps).max()) > 0  # the maps compared are not all zero
