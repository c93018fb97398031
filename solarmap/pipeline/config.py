"""What a detection run is configured by and what it reports: the scorer interface, the settings
(:class:`DetectConfig`) and the counts and timings (:class:`DetectStats`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import numpy as np

from solarmap.errors import OptionError
from solarmap.geo.installations import DEFAULT_JOIN_M
from solarmap.geo.raster import DEFAULT_BANDS, parse_crs
from solarmap.geo.refine import ColourRefine
from solarmap.geo.tiling import TileSpec

__all__ = ["DetectConfig", "DetectStats", "ProgressCallback", "Scorer", "SpectralBaseline"]


class Scorer(Protocol):
    """Scores a batch of windows: float32 (batch, 3, size, size) in [0, 1] -> (probabilities, maps).

    ``maps`` is (batch, h, w) at any resolution (e.g. 35 x 35 CAMs); it is resized to the window and
    compared with the mask threshold, so it must already be on the scale that threshold expects.
    A scorer may also offer ``context_px`` (pixels of surroundings it expects around each tile),
    ``colour_prior`` (for refinement) and ``detect_settings()`` (the settings it was calibrated for).
    """

    name: str

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class SpectralBaseline:
    """Not a detector: marks dark, bluish pixels. For testing and benchmarking the geometry only.

    The map is 1 where brightness < ``max_value`` and blue exceeds red by ``min_blue_excess``; the
    tile probability is the fraction of such pixels, scaled so 1 % of the tile gives 0.5.
    """

    name: str = "spectral-baseline"
    max_value: float = 0.25
    min_blue_excess: float = 0.03

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        red, blue = pixels[:, 0], pixels[:, 2]
        value = pixels.max(axis=1)
        maps = ((value < self.max_value) & (blue - red > self.min_blue_excess)).astype(np.float32)
        probs = np.clip(maps.mean(axis=(1, 2)) * 50.0, 0.0, 1.0)
        return probs.astype(np.float32), maps


@dataclass(frozen=True)
class DetectConfig:
    """Everything that decides a detection result, recorded in the output's metadata."""

    tile_size_px: int = 299
    overlap_px: int = 32
    context_px: int = 0
    gsd_m: float | None = None
    src_crs: str | None = None  # CRS to assume for rasters that carry none
    bands: tuple[int, ...] = DEFAULT_BANDS
    batch_size: int = 16
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    mask_peak_fraction: float | None = None  # weak positive tiles: also mask >= this fraction of their peak
    min_area_m2: float = 1.0
    simplify_m: float = 0.0
    refine: ColourRefine | None = None  # outline masks by the model's panel colours (solarmap.geo.refine)
    join_m: float = DEFAULT_JOIN_M  # panels closer than this form one installation (solarmap.geo.installations)

    def __post_init__(self) -> None:
        self.tile_spec  # validates sizes
        if self.batch_size <= 0:
            raise OptionError(f"batch size must be positive, got {self.batch_size}")
        for name in ("score_threshold", "mask_threshold", "mask_peak_fraction"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise OptionError(f"{name.replace('_', ' ')} must be between 0 and 1, got {value}")
        if self.min_area_m2 < 0 or self.simplify_m < 0 or self.join_m < 0:
            raise OptionError("minimum area, simplification tolerance and join distance must not be negative")
        if self.src_crs is not None:
            parse_crs(self.src_crs)
        if self.gsd_m is not None and not self.gsd_m > 0:
            raise OptionError(f"GSD must be positive metres, got {self.gsd_m}")

    @property
    def tile_spec(self) -> TileSpec:
        return TileSpec(self.tile_size_px, self.overlap_px, self.context_px)

    @classmethod
    def for_scorer(cls, scorer: Scorer, **overrides) -> "DetectConfig":
        """The settings ``scorer`` was calibrated for (its ``detect_settings()``, e.g. a checkpoint's
        tile size, GSD and the mask rule of its CAM method), with ``overrides`` on top."""
        settings = scorer.detect_settings() if hasattr(scorer, "detect_settings") else {}
        return cls(**{**settings, **overrides})


@dataclass
class DetectStats:
    """What happened in a run: counts and seconds per stage."""

    tiles_total: int = 0
    tiles_read: int = 0
    tiles_resumed: int = 0  # of tiles_read, those done before the run was interrupted and resumed
    tiles_skipped_nodata: int = 0
    tiles_positive: int = 0
    tiles_positive_unoutlined: int = 0  # of tiles_positive, those the outline stage drew nothing in
    polygons: int = 0
    area_m2: float = 0.0
    installations: int = 0
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=lambda: {"read": 0.0, "model": 0.0, "vectorize": 0.0,
                                                         "write": 0.0})

    def as_dict(self) -> dict:
        return asdict(self)


ProgressCallback = Callable[[DetectStats], None]
