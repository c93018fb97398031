"""Inception-v3 tile classifier with a greedily trained CAM branch; checkpoints that carry their config.

The branch reads ``Mixed_5d`` (288 channels; 35 x 35 for a 299 px tile) and has up to two levels,
each a 3x3 convolution + ReLU. While a level is trained it ends in global average pooling and its
own 2-class linear layer; everything else is frozen (see :mod:`solarmap.train`). The class
activation map is the positive-class weights of the deepest trained level's linear layer applied to
that level's feature maps, on the raw (unnormalised) scale.

The main classifier (torchvision's Inception3, 2 classes, no auxiliary head) is untouched by the
branch, so classification quality does not depend on the localization branch.
"""

from __future__ import annotations

import hashlib
import io
import lzma
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from solarmap.errors import ModelError

ARCHITECTURE = "inception_v3+greedy_cam_branch"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MODEL_PATH = Path(__file__).parent / "data" / "default_model.pt.xz"


@dataclass(frozen=True)
class ModelConfig:
    """What a checkpoint needs to be used correctly; stored inside it."""

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
    pseudo_seg: bool = False  # has a pseudo-seg segmentation head (solarmap.pseudoseg)
    mask_rules: dict = field(default_factory=dict)  # other CAM methods: method -> (threshold, peak fraction)
    colour_prior: tuple[float, ...] | None = None  # panel-colour log ratios (solarmap.refine), bins³ entries
    refine_rule: dict = field(default_factory=dict)  # solarmap.refine.ColourRefine fields, calibrated
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """A small branch for fast tests (the Inception backbone itself is always full size)."""
        return cls(tile_size_px=96, overlap_px=16, train_tile_px=80, branch_channels=(16, 16))


class SolarNet(nn.Module):
    """Inception-v3 (``.backbone``) + greedy CAM branch (``.branch``: the conv layers, in order)."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        from torchvision.models import inception_v3

        self.config = config
        self.backbone = inception_v3(weights=None, aux_logits=False, num_classes=2, transform_input=False,
                                     init_weights=False)
        c1, c2 = config.branch_channels
        self.branch = nn.ModuleList([nn.Conv2d(288, c1, 3, padding=1), nn.Conv2d(c1, c2, 3, padding=1)])
        self.branch_heads = nn.ModuleList([nn.Linear(c1, 2), nn.Linear(c2, 2)])
        self.seg_head = None
        if config.pseudo_seg:
            from solarmap.pseudoseg import SegHead

            self.seg_head = SegHead()
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    # -- the backbone in two halves, split at Mixed_5d -----------------------------------------

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB -> the normalisation the weights were trained with."""
        return (pixels - self.mean) / self.std

    def mixed_5d(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features at Mixed_5d (288 channels, 35 x 35 for 299 px) from [0, 1] RGB tiles."""
        b = self.backbone
        x = self.normalize(pixels)
        x = b.Conv2d_2b_3x3(b.Conv2d_2a_3x3(b.Conv2d_1a_3x3(x)))
        x = b.maxpool1(x)
        x = b.Conv2d_4a_3x3(b.Conv2d_3b_1x1(x))
        x = b.maxpool2(x)
        return b.Mixed_5d(b.Mixed_5c(b.Mixed_5b(x)))

    def mixed_7c(self, f5d: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.Mixed_6a(f5d)
        x = b.Mixed_6e(b.Mixed_6d(b.Mixed_6c(b.Mixed_6b(x))))
        return b.Mixed_7c(b.Mixed_7b(b.Mixed_7a(x)))

    def classify_7c(self, f7c: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = torch.flatten(b.avgpool(f7c), 1)
        return b.fc(b.dropout(x))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Main classifier logits (batch, 2)."""
        return self.classify_7c(self.mixed_7c(self.mixed_5d(pixels)))

    # -- the branch --------------------------------------------------------------------------------

    def branch_features(self, f5d: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Feature maps after ``levels`` branch convolutions (each + ReLU)."""
        levels = self.config.branch_levels if levels is None else levels
        x = f5d
        for conv in self.branch[:levels]:
            x = F.relu(conv(x))
        return x

    def branch_logits(self, f5d: torch.Tensor, level: int) -> torch.Tensor:
        """GAP + the level's own linear layer: what trains branch level ``level`` (1-based)."""
        maps = self.branch_features(f5d, level)
        return self.branch_heads[level - 1](maps.mean(dim=(2, 3)))

    def branch_cam(self, f5d: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Raw class activation map of the positive class at the deepest branch level (batch, h, w)."""
        levels = self.config.branch_levels if levels is None else levels
        if levels < 1:
            raise ModelError("this model has no trained CAM branch level (train stage branch1 first)")
        maps = self.branch_features(f5d, levels)
        weights = self.branch_heads[levels - 1].weight[1]
        return torch.einsum("bchw,c->bhw", maps, weights)

    def gap_cam(self, f7c: torch.Tensor) -> torch.Tensor:
        """Zhou et al.'s CAM of the main classifier at Mixed_7c (8 x 8 for 299 px), raw scale."""
        return torch.einsum("bchw,c->bhw", f7c, self.backbone.fc.weight[1])

    @torch.inference_mode()
    def predict(self, pixels: torch.Tensor, *, with_cam: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tile probabilities (batch,) and raw branch CAMs (batch, h, w) in one pass."""
        f5d = self.mixed_5d(pixels)
        probs = torch.softmax(self.classify_7c(self.mixed_7c(f5d)).float(), dim=1)[:, 1]
        cam = self.branch_cam(f5d) if with_cam and self.config.branch_levels > 0 else None
        return probs, cam


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save(model: SolarNet, path: str | Path, *, half: bool = False, compress: bool | None = None,
         preset: int = 6) -> Path:
    """Write weights + config. ``half`` stores floats as fp16 and ``.xz`` paths are LZMA-compressed
    (``preset`` 0-9): together they keep the bundled model under 50 MB."""
    path = Path(path)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    payload = {"format": FORMAT_VERSION, "architecture": ARCHITECTURE, "config": asdict(model.config),
               "state_dict": state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    if compress if compress is not None else path.suffix == ".xz":
        data = lzma.compress(data, preset=preset)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def load(path: str | Path | None = None, *, map_location: str | torch.device = "cpu") -> SolarNet:
    """Load a checkpoint (``None``: the bundled default model) in eval mode."""
    path = DEFAULT_MODEL_PATH if path is None else Path(path)
    if not path.exists():
        if path == DEFAULT_MODEL_PATH:
            raise ModelError("the bundled default model is missing from this installation; pass --model FILE")
        raise ModelError(f"model file not found: {path}")
    payload = _read_payload(path, map_location)
    if not isinstance(payload, dict) or payload.get("architecture") != ARCHITECTURE:
        found = payload.get("architecture") if isinstance(payload, dict) else type(payload).__name__
        raise ModelError(f"{path} is not a solarmap model (architecture {found!r}, expected {ARCHITECTURE!r})")
    if payload.get("format") != FORMAT_VERSION:
        raise ModelError(f"{path} has checkpoint format {payload.get('format')}, this solarmap reads {FORMAT_VERSION}")
    config = _config_from_dict(payload["config"])
    model = SolarNet(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{path} does not fit the architecture: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _read_payload(path: Path, map_location) -> Any:
    try:
        data = path.read_bytes()
        if data[:6] == b"\xfd7zXZ\x00":
            data = lzma.decompress(data)
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the failure (lzma, pickle, zip, I/O), the file is unusable
        raise ModelError(f"cannot read model file {path}: not a solarmap checkpoint or corrupt "
                         f"({type(exc).__name__})") from None


def _config_from_dict(data: dict) -> ModelConfig:
    known = {f for f in ModelConfig.__dataclass_fields__}
    values = {k: v for k, v in data.items() if k in known}
    for key in ("mean", "std", "branch_channels", "colour_prior"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    try:
        return ModelConfig(**values)
    except TypeError as exc:
        raise ModelError(f"checkpoint config is invalid: {exc}") from None


def with_config(model: SolarNet, **changes) -> SolarNet:
    """The same weights under an updated config (e.g. after calibrating thresholds)."""
    model.config = replace(model.config, **changes)
    return model


def file_digest(path: str | Path) -> str:
    """Short SHA-256 of a file, to name a model in run metadata."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def init_from_imagenet(model: SolarNet, weights_file: str | Path | None = None) -> SolarNet:
    """Copy torchvision's ImageNet Inception-v3 weights (all but the classifier) into ``model``.

    Nothing is downloaded: the weights must be in the torch hub cache or given as a file.
    """
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
