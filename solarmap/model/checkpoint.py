"""Checkpoints: the weights and the :class:`~solarmap.model.network.ModelConfig` they need, in one file.

The bundled model stores floats as fp16 and is LZMA-compressed (``.xz``): together they keep it
under 50 MB. Whatever goes wrong reading a file becomes one :class:`~solarmap.errors.ModelError`.
"""

from __future__ import annotations

import io
import lzma
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from solarmap.errors import ModelError
from solarmap.model.network import ModelConfig, SolarNet

__all__ = ["ARCHITECTURE", "DEFAULT_MODEL_PATH", "FORMAT_VERSION", "load", "read_config", "save", "with_config"]

ARCHITECTURE = "inception_v3+greedy_cam_branch"  # the checkpoint family (any backbone: see ModelConfig.backbone)
FORMAT_VERSION = 1
DEFAULT_MODEL_PATH = Path(__file__).parent / "data" / "default_model.pt.xz"


def save(model: SolarNet, path: str | Path, *, half: bool = False, compress: bool | None = None,
         preset: int = 6) -> Path:
    """Write weights + config. ``half`` stores floats as fp16 and ``.xz`` paths are LZMA-compressed
    (``preset`` 0-9); the file appears only when complete."""
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
    path, payload = _checked_payload(path, map_location)
    model = SolarNet(_config_from_dict(payload["config"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{path} does not fit the architecture: {str(exc).splitlines()[0]}") from None
    return model.eval()


def read_config(path: str | Path | None = None) -> ModelConfig:
    """A checkpoint's config alone (``None``: the bundled model's), without building the network:
    what a command that only needs the model's tile size and GSD reads."""
    return _config_from_dict(_checked_payload(path, "cpu")[1]["config"])


def _checked_payload(path: str | Path | None, map_location) -> tuple[Path, dict]:
    """The file's contents, once it is known to be a solarmap checkpoint this code reads."""
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
    return path, payload


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
    for key in ("mean", "std", "branch_channels", "colour_prior", "seg_blob_levels"):
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
