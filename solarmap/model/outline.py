"""The outline network (``--cam-method outline``): a U-Net decoder over an ImageNet encoder's
stride-2 ... 32 stages, trained on real pixel masks, that draws what the classifier found.

Two outputs per pixel, because the masked sets label two different truths:

* ``panel``: module pixels (PV01, Bradbury and Bolzano label these): the ``panels`` layer;
* ``footprint``: the whole installation, a farm's rows *with the gaps between them* (NREL's masks;
  on a roof the arrays themselves): what an installation covers on the ground.

The classifier keeps gating tiles: the outline network runs only on windows the classifier calls
positive, so its threshold can be bolder than a network that must also keep a county's negatives
empty. Its encoder is its own (not the classifier's fine-tuned backbone): the masks teach it edges
and texture the image-level labels never asked the classifier for, and a separate encoder leaves
the classifier's calibrated decisions untouched. It costs a second encoder pass on positive tiles
only, which are a few percent of a county.

The architecture comes from ``segmentation-models-pytorch`` (its U-Net over timm encoders), so a
checkpoint stores only weights and the few numbers below; inference needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from solarmap.errors import ModelError

__all__ = ["FOOTPRINT", "OUTPUTS", "PANEL", "OutlineNet", "OutlineSpec"]

PANEL, FOOTPRINT = 0, 1
OUTPUTS = ("panel", "footprint")


@dataclass(frozen=True)
class OutlineSpec:
    """What builds an outline network: a timm encoder (smp's ``tu-`` names) and decoder widths."""

    encoder: str = "tf_efficientnet_lite0"  # timm name; its ImageNet weights come from solarmap.training.pretrained
    decoder_channels: tuple[int, ...] = (96, 64, 48, 32, 16)  # stride 16, 8, 4, 2, 1

    @classmethod
    def from_config(cls, values: dict | None) -> "OutlineSpec | None":
        if not values:
            return None
        return cls(encoder=values["encoder"], decoder_channels=tuple(values["decoder_channels"]))


class OutlineNet(nn.Module):
    """Logits (batch, 2, H, W) for [0, 1] RGB windows whose sides are multiples of 32: panel, footprint.

    Inputs are standardised to [-1, 1] (the EfficientNet-Lite encoders' ImageNet scale)."""

    def __init__(self, spec: OutlineSpec = OutlineSpec()):
        super().__init__()
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            raise ModelError("this model's outline network needs segmentation-models-pytorch "
                             "(pip install segmentation-models-pytorch)") from None
        self.spec = spec
        self.net = smp.Unet(encoder_name=f"tu-{spec.encoder}", encoder_weights=None, in_channels=3,
                            classes=len(OUTPUTS), decoder_channels=spec.decoder_channels)

    @property
    def encoder_model(self) -> nn.Module:
        """The timm feature extractor inside the encoder (what ImageNet weights are copied into)."""
        return self.net.encoder.model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        if height % 32 or width % 32:
            raise ModelError(f"the outline network reads windows whose sides are multiples of 32, not {height} x {width}")
        return self.net(pixels * 2.0 - 1.0)

    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """Panel and footprint probabilities (batch, 2, H, W) for windows of any size (reflect-padded
        to a multiple of 32 and cropped back)."""
        height, width = pixels.shape[-2:]
        pad_h, pad_w = -height % 32, -width % 32
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            pixels = nn.functional.pad(pixels, (0, pad_w, 0, pad_h), mode=mode)
        return torch.sigmoid(self(pixels).float())[..., :height, :width]
