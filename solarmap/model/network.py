"""The network: a tile classifier behind one backbone seam, a greedily trained CAM branch, an
optional segmentation head.

The backbone is split where the branch attaches: :meth:`SolarNet.branch_features` (Inception-v3:
``Mixed_5d``, 288 channels, 35 x 35 for a 299 px tile), :meth:`SolarNet.top_features` (``Mixed_7c``)
and :meth:`SolarNet.classify`. A backbone class says how to split it, which layer names the
gradient-based CAM methods may hook, and where the cells of its feature maps sit on the input; a
second architecture is one more class in :data:`BACKBONES`.

The branch has up to two levels, each a 3x3 convolution + ReLU. While a level is trained it ends in
global average pooling and its own 2-class linear layer; everything else is frozen (see
:mod:`solarmap.training.stages`). The class activation map is the positive-class weights of the
deepest trained level's linear layer applied to that level's feature maps, on the raw
(unnormalised) scale. The main classifier is untouched by the branch, so classification quality
does not depend on the localization branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import Inception3

from solarmap.errors import ModelError
from solarmap.model.outline import OutlineNet, OutlineSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """What a checkpoint needs to be used correctly; stored inside it."""

    backbone: str = "inception-v3"  # a key of BACKBONES
    branch_at: str = ""  # backbone layer the CAM branch reads ("": the backbone's default)
    tile_size_px: int = 299  # inference tile size (a model runs best at the size it was trained at)
    overlap_px: int = 32  # inference tile overlap
    context_px: int = 0  # pixels around each tile the CAM sees (the classifier sees the tile only)
    train_tile_px: int = 101  # tile size the weights were trained at
    gsd_m: float = 0.3  # ground sample distance the model was trained at
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    branch_channels: tuple[int, int] = (512, 512)
    branch_levels: int = 0  # how many branch levels are trained (0, 1 or 2)
    decision_threshold: float = 0.5  # on the tile probability
    cam_threshold: float = 0.5  # on the CAM divided by cam_scale
    cam_peak_fraction: float | None = None  # tiles whose CAM stays below cam_threshold: fraction of their peak
    cam_scale: float = 1.0  # raw branch-CAM value that maps to 1.0 (median peak on positive validation tiles)
    gap_cam_scale: float = 1.0  # the same for the main classifier's GAP CAM
    cam_shifts: dict = field(default_factory=dict)  # method -> (rows, cols) px to move its maps by
    pseudo_seg: bool = False  # has a segmentation head (solarmap.model.seg)
    seg_reads_branch: bool = False  # the segmentation head also reads the CAM branch's maps (not only RGB + stem)
    seg_reads_context: bool = False  # ... and the backbone's stride-16 stage (what surface a pixel lies on)
    seg_attention_floor: float = 0.1  # the head's gate: branch CAM / cam_scale it needs (0: no gate; calibrated)
    seg_blob_levels: tuple[float, ...] = ()  # the gate keeps or drops whole blobs at these levels (): pixel by pixel)
    seg_cam_fallback: bool = False  # a positive tile the head draws nothing on takes the branch CAM's mask instead
    seg_cam_fallback_min_score: float = 0.0  # ... only where the tile is at least this probable (0: every positive)
    outline: dict = field(default_factory=dict)  # an outline network (solarmap.model.outline.OutlineSpec fields), {}: none
    outline_gate: float | None = None  # the outline method outlines tiles at least this probable (None: decision_threshold)
    # The outline method falls back to the branch CAM on tiles at least this probable that its network leaves
    # empty (None: only when asked). Checkpoints written before the field take 0.7: chosen on version 14's
    # validation with a raster's edges mirrored (docs/real-imagery.md, "The fallback's floor"); models
    # without a CAM branch ignore it.
    outline_cam_fallback_min_score: float | None = 0.7
    default_cam_method: str = "branch"  # the outline method `detect` uses unless told (chosen on validation)
    mask_rules: dict = field(default_factory=dict)  # other CAM methods: method -> (threshold, peak fraction)
    colour_prior: tuple[float, ...] | None = None  # panel-colour log ratios (solarmap.geo.refine), bins³ entries
    refine_rule: dict = field(default_factory=dict)  # solarmap.geo.refine.ColourRefine fields, calibrated
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @classmethod
    def for_backbone(cls, backbone: str, **changes) -> "ModelConfig":
        """A new model's config: the backbone's own defaults (input scaling, tile size, branch width)."""
        if backbone not in BACKBONES:
            raise ModelError(f"unknown backbone {backbone!r} (this solarmap knows {', '.join(BACKBONES)})")
        return cls(**{"backbone": backbone, **BACKBONES[backbone].config_defaults, **changes})


class InceptionV3(Inception3):
    """torchvision's Inception-v3 (2 classes, no auxiliary head), split at ``Mixed_5d``.

    A subclass rather than a wrapper, so checkpoint keys stay ``backbone.Mixed_5d...``.
    """

    name = "inception-v3"
    display_name = "Inception-v3"
    min_input_px = 75  # the unpadded stem and the reductions need at least this
    branch_channels_in = 288  # Mixed_5d
    stem_channels = 64  # Conv2d_2b_3x3, stride 2
    context_channels = 768  # Mixed_6e, stride 16
    default_gradcam_layer = "Mixed_6e"
    # Feedback gates: the hidden ReLU outputs of these blocks (concatenations of ReLU outputs)
    feedback_layers = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                       "Mixed_6e")
    # (stride, first cell centre) in input pixels, by layer name prefix: the stem is unpadded, so
    # cell k of Mixed_5d is centred on pixel 8k + 13, not on 8k + 3.5
    _geometry = {"Mixed_5": (8, 13), "Mixed_6": (16, 21), "Mixed_7": (32, 37)}
    branch_layer, top_layer = "Mixed_5d", "Mixed_7c"
    config_defaults: dict = {}
    # at inference: the CAM sees 40 px around each tile (its responses sat ~35 px off the panels)
    inference_geometry = dict(overlap_px=24, context_px=40)

    def __init__(self, config: "ModelConfig") -> None:
        super().__init__(num_classes=2, aux_logits=False, transform_input=False, init_weights=False)
        if config.branch_at not in ("", self.branch_layer):
            raise ModelError(f"Inception-v3's branch reads {self.branch_layer}, not {config.branch_at!r}")

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))

    def branch_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool1(self.stem(x))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        return self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))

    def context_features(self, branch_features: torch.Tensor) -> torch.Tensor:
        x = self.Mixed_6a(branch_features)
        return self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))

    def top_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.context_features(x))))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    @property
    def classifier_weights(self) -> torch.Tensor:
        return self.fc.weight

    def layer(self, name: str) -> nn.Module | None:
        return getattr(self, name, None) if name.startswith(("Conv2d", "Mixed")) else None

    def layer_geometry(self, name: str) -> tuple[int, int] | None:
        return next((g for prefix, g in self._geometry.items() if name.startswith(prefix)), None)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``: TensorFlow "same" padding, inputs in
    [-1, 1]), 2 classes, split after one of its stages for the branch.

    The branch reads ``blocks.2`` (40 channels, stride 8) by default or ``blocks.4`` (112 channels,
    stride 16). ImageNet weights come from :mod:`solarmap.training.pretrained` at training time;
    inference needs only the checkpoint.
    """

    name = "efficientnet-lite0"
    display_name = "EfficientNet-Lite0"
    timm_name = "tf_efficientnet_lite0"
    min_input_px = 32  # stride 32
    stem_channels = 32
    context_channels = 112  # blocks.4, stride 16
    default_gradcam_layer = "blocks.5"
    feedback_layers = ("blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5")
    top_layer = "conv_head"
    # inputs in [-1, 1]; 96 px tiles (+ 32 px of context: 160 px windows, a multiple of 32); a narrow branch
    config_defaults = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), train_tile_px=96, tile_size_px=96,
                           overlap_px=16, context_px=32, branch_channels=(128, 128))
    inference_geometry = dict(overlap_px=16, context_px=32)
    _branch_points = {"blocks.2": 40, "blocks.4": 112}  # layer -> channels
    # (stride, first cell centre) in input pixels for inputs whose size is a multiple of 32: "same"
    # padding pads the bottom and right more, so every stride-2 layer centres output k on input 2k + 1,
    # and cell k of a stride-s map sits on pixel s k + s - 1 (checked in tests/test_model.py). Other
    # sizes shift maps by up to half a cell: keep tile + 2 x context a multiple of 32.
    _geometry = {"blocks.0": (2, 1), "blocks.1": (4, 3), "blocks.2": (8, 7), "blocks.3": (16, 15),
                 "blocks.4": (16, 15), "blocks.5": (32, 31), "blocks.6": (32, 31), "conv_head": (32, 31)}

    def __init__(self, config: "ModelConfig") -> None:
        super().__init__()
        import timm  # only this backbone needs it; importing it costs seconds

        self.branch_layer = config.branch_at or "blocks.2"
        if self.branch_layer not in self._branch_points:
            raise ModelError(f"{self.display_name}'s branch reads one of {', '.join(self._branch_points)}, "
                             f"not {self.branch_layer!r}")
        self.branch_channels_in = self._branch_points[self.branch_layer]
        self._split = int(self.branch_layer.split(".")[1]) + 1
        self.net = timm.create_model(self.timm_name, pretrained=False, num_classes=2)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.bn1(self.net.conv_stem(x))

    def branch_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.blocks[:self._split](self.stem(x))

    def context_features(self, branch_features: torch.Tensor) -> torch.Tensor:
        return self.net.blocks[self._split:5](branch_features)  # nothing to add where the branch reads blocks.4

    def top_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.bn2(self.net.conv_head(self.net.blocks[self._split:](x)))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(x)

    @property
    def classifier_weights(self) -> torch.Tensor:
        return self.net.classifier.weight

    def layer(self, name: str) -> nn.Module | None:
        return dict(self.net.named_modules()).get(name) if name in self._geometry else None

    def layer_geometry(self, name: str) -> tuple[float, float] | None:
        return self._geometry.get(name)


class EfficientNetLite2(EfficientNetLite0):
    """EfficientNet-Lite2 (timm's ``tf_efficientnet_lite2``): Lite0's stages at 1.1 x the width and
    1.2 x the depth (6.1 M parameters against 4.7 M; 77.6 % against 75.1 % ImageNet top-1 in its
    authors' table), same strides, inputs and split points, so every geometry and tile size carries over.
    """

    name = "efficientnet-lite2"
    display_name = "EfficientNet-Lite2"
    timm_name = "tf_efficientnet_lite2"
    context_channels = 120  # blocks.4, stride 16
    _branch_points = {"blocks.2": 48, "blocks.4": 120}  # layer -> channels


BACKBONES: dict[str, type[nn.Module]] = {backbone.name: backbone
                                         for backbone in (InceptionV3, EfficientNetLite0, EfficientNetLite2)}


class SegHead(nn.Module):
    """Per-pixel panel logit from RGB and the backbone's stem features (stride 2), optionally the
    CAM branch's last maps (stride 8 on EfficientNet-Lite0) and the backbone's stride-16 stage
    (context).

    RGB and stem features say colour and edges, learnt from the masks' one dataset; the branch's maps
    were trained on every training source to say where a panel is, and the fine layers keep the
    outline sharp. Without context (a receptive field of a few metres beside the branch's), the head
    outlined bright edges, dark pavement and residential roofs as panels; the stride-16 stage says
    what kind of surface a pixel lies on (measured on PV01 validation: docs/real-imagery.md)."""

    def __init__(self, stem_channels: int, branch_channels: int = 0, context_channels: int = 0, width: int = 32,
                 side_width: int = 16):
        super().__init__()
        self.branch_in = self.context_in = None
        if branch_channels:
            self.branch_in = nn.Sequential(nn.Conv2d(branch_channels, side_width, 1), nn.ReLU())
        if context_channels:
            self.context_in = nn.Sequential(nn.Conv2d(context_channels, side_width, 3, padding=1), nn.ReLU())
        extra = side_width * (bool(branch_channels) + bool(context_channels))
        self.net = nn.Sequential(
            nn.Conv2d(3 + stem_channels + extra, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, pixels: torch.Tensor, stem: torch.Tensor, branch: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        size = pixels.shape[-2:]
        parts = [pixels, F.interpolate(stem, size=size, mode="bilinear", align_corners=False)]
        for name, conv, maps in (("the CAM branch's maps", self.branch_in, branch),
                                 ("the backbone's context stage", self.context_in, context)):
            if conv is None:
                continue
            if maps is None:
                raise ModelError(f"this segmentation head reads {name}; none were given")
            parts.append(F.interpolate(conv(maps), size=size, mode="bilinear", align_corners=False))
        return self.net(torch.cat(parts, dim=1))[:, 0]


class SolarNet(nn.Module):
    """A backbone (``.backbone``) + greedy CAM branch (``.branch``: the conv layers, in order) +
    optional segmentation head (``.seg_head``) + optional outline network (``.outline``: a U-Net of
    its own, :mod:`solarmap.model.outline`)."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        if config.backbone not in BACKBONES:
            raise ModelError(f"unknown backbone {config.backbone!r} (this solarmap knows {', '.join(BACKBONES)})")
        self.config = config
        self.backbone = BACKBONES[config.backbone](config)
        c1, c2 = config.branch_channels
        self.branch = nn.ModuleList([nn.Conv2d(self.backbone.branch_channels_in, c1, 3, padding=1),
                                     nn.Conv2d(c1, c2, 3, padding=1)])
        self.branch_heads = nn.ModuleList([nn.Linear(c1, 2), nn.Linear(c2, 2)])
        self.seg_head = self.new_seg_head() if config.pseudo_seg else None
        self.outline = OutlineNet(OutlineSpec.from_config(config.outline)) if config.outline else None
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    @property
    def min_input_px(self) -> int:
        return self.backbone.min_input_px

    # -- the backbone, in the parts the branch and the CAM methods need ---------------------------

    def standardise(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB -> the input scale the weights were trained with."""
        return (pixels - self.mean) / self.std

    def stem_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Early features (stride 2) from [0, 1] RGB: what the segmentation head sees beside RGB."""
        return self.backbone.stem(self.standardise(pixels))

    def new_seg_head(self) -> SegHead:
        """An untrained segmentation head shaped for this model's config."""
        levels = self.config.branch_levels
        reads = self.config.branch_channels[levels - 1] if self.config.seg_reads_branch and levels else 0
        context = self.backbone.context_channels if self.config.seg_reads_context else 0
        return SegHead(self.backbone.stem_channels, reads, context)

    def seg_logits(self, pixels: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """The segmentation head's per-pixel logits (batch, H, W) from [0, 1] RGB windows
        (``features``: their :meth:`branch_features`, where the caller has them)."""
        branch = context = None
        if self.config.seg_reads_branch or self.config.seg_reads_context:
            features = self.branch_features(pixels) if features is None else features
        if self.config.seg_reads_branch:
            branch = self.branch_maps(features)
        if self.config.seg_reads_context:
            context = self.backbone.context_features(features)
        return self.seg_head(pixels, self.stem_features(pixels), branch, context)

    def branch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features where the branch attaches, from [0, 1] RGB tiles."""
        return self.backbone.branch_features(self.standardise(pixels))

    def top_features(self, branch_features: torch.Tensor) -> torch.Tensor:
        """The classifier's last feature maps, from :meth:`branch_features`."""
        return self.backbone.top_features(branch_features)

    def classify(self, top_features: torch.Tensor) -> torch.Tensor:
        """Logits (batch, 2) from :meth:`top_features`."""
        return self.backbone.classify(top_features)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Main classifier logits (batch, 2)."""
        return self.classify(self.top_features(self.branch_features(pixels)))

    # -- the branch --------------------------------------------------------------------------------

    def branch_maps(self, features: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Feature maps after ``levels`` branch convolutions (each + ReLU)."""
        levels = self.config.branch_levels if levels is None else levels
        x = features
        for conv in self.branch[:levels]:
            x = F.relu(conv(x))
        return x

    def branch_logits(self, features: torch.Tensor, level: int) -> torch.Tensor:
        """GAP + the level's own linear layer: what trains branch level ``level`` (1-based)."""
        maps = self.branch_maps(features, level)
        return self.branch_heads[level - 1](maps.mean(dim=(2, 3)))

    def branch_cam(self, features: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Raw class activation map of the positive class at the deepest branch level (batch, h, w)."""
        levels = self.config.branch_levels if levels is None else levels
        if levels < 1:
            raise ModelError("this model has no trained CAM branch level (train stage branch1 first)")
        maps = self.branch_maps(features, levels)
        weights = self.branch_heads[levels - 1].weight[1]
        return torch.einsum("bchw,c->bhw", maps, weights)

    def gap_cam(self, top_features: torch.Tensor) -> torch.Tensor:
        """Zhou et al.'s CAM of the main classifier on its last feature maps, raw scale."""
        return torch.einsum("bchw,c->bhw", top_features, self.backbone.classifier_weights[1])

    @torch.inference_mode()
    def predict(self, pixels: torch.Tensor, *, with_cam: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tile probabilities (batch,) and raw branch CAMs (batch, h, w) in one pass."""
        features = self.branch_features(pixels)
        probs = torch.softmax(self.classify(self.top_features(features)).float(), dim=1)[:, 1]
        cam = self.branch_cam(features) if with_cam and self.config.branch_levels > 0 else None
        return probs, cam
