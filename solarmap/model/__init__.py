"""The network (torch, inference only): backbones behind one seam, checkpoints, CAM methods, the
scorer the pipeline runs."""

from solarmap.model.checkpoint import DEFAULT_MODEL_PATH, load, read_config, save, with_config
from solarmap.model.network import ModelConfig, SolarNet

__all__ = ["DEFAULT_MODEL_PATH", "ModelConfig", "SolarNet", "load", "read_config", "save", "with_config"]
