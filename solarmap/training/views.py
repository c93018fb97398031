"""Random views of training images: where a sample is cut, at what scale, and in what look.

Every source has its own look (sensor, GSD, blur, compression, colour). Where one source brings only
one class, a network learns the look instead of the panel: Bern's positives are sharp Swiss roofs,
the negatives of other sets older and blurrier ("sharp -> panel"). So every image, whatever its
class, is shown in every look: resampled to a coarser GSD and back, blurred, JPEG-compressed, noisy,
with its colours moved; at a jittered scale (GSD x 0.6-1.6); and cut like a chip (a square of 83-110
px at the model's GSD, padded by reflection where the image is smaller), so neither the chip size
nor the padding tells the class.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from solarmap.model.scorer import fit_square

__all__ = ["ViewConfig", "centre_view", "random_view"]


@dataclass(frozen=True)
class ViewConfig:
    size_px: int = 96  # the training input: the model's tile
    chip_px: tuple[int, int] = (83, 110)  # side of the square cut from images larger than a chip
    scale: tuple[float, float] = (0.7, 1.4)  # GSD jitter, log-uniform (wider crops the panels out of positives)
    coarser: tuple[float, float] = (1.0, 2.5)  # "seen at a coarser GSD": down by this, back up
    p_coarser: float = 0.5
    p_blur: float = 0.3
    p_jpeg: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 95)
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.3
    hue: float = 0.04
    gamma: tuple[float, float] = (0.75, 1.35)
    noise: float = 0.03


def _pil(pixels: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))


def _array(image) -> np.ndarray:
    return np.asarray(image).transpose(2, 0, 1)


def random_view(pixels: np.ndarray, rng: np.random.Generator, config: ViewConfig = ViewConfig(),
                mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A random view of uint8 (3, h, w): float32 (3, size, size) in [0, 1] (and the mask's same view)."""
    from PIL import Image, ImageFilter

    _, h, w = pixels.shape
    # chips (Fresno 101 px, Bern 83, PV01 85) are taken whole: a cut could drop the panel a label promises
    chip = min(h, w) if min(h, w) <= config.chip_px[1] else int(rng.integers(config.chip_px[0], config.chip_px[1] + 1))
    top, left = int(rng.integers(0, h - chip + 1)), int(rng.integers(0, w - chip + 1))
    layers = [pixels[:, top: top + chip, left: left + chip]]
    if mask is not None:
        layers.append(np.repeat(mask[None, top: top + chip, left: left + chip], 3, axis=0))
    k = int(rng.integers(0, 8))
    layers = [np.rot90(a, k % 4, axes=(1, 2)) for a in layers]
    if k >= 4:
        layers = [a[:, :, ::-1] for a in layers]
    scale = math.exp(rng.uniform(math.log(config.scale[0]), math.log(config.scale[1])))
    side = max(8, round(chip * scale))
    images = [_pil(a).resize((side, side), Image.BILINEAR if scale > 1 else Image.BOX) for a in layers]
    image = images[0]
    if rng.random() < config.p_coarser:
        factor = rng.uniform(*config.coarser)
        small = max(4, round(side / factor))
        image = image.resize((small, small), Image.BOX).resize((side, side), Image.BILINEAR)
    if rng.random() < config.p_blur:
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.2)))
    if rng.random() < config.p_jpeg:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(*config.jpeg_quality)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    out = fit_square(_array(image), config.size_px).astype(np.float32) / 255.0
    out = _photometric(out, rng, config)
    view_mask = None
    if mask is not None:
        view_mask = fit_square(_array(images[1]), config.size_px)[0]
    return out, view_mask


def _photometric(x: np.ndarray, rng: np.random.Generator, config: ViewConfig) -> np.ndarray:
    grey = x.mean(axis=0, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - config.saturation, 1 + config.saturation)
    angle = rng.uniform(-config.hue, config.hue) * 2 * math.pi  # rotate chroma around the grey axis
    x = _rotate_hue(x, angle)
    mean = x.mean()
    x = mean + (x - mean) * rng.uniform(1 - config.contrast, 1 + config.contrast)
    x = x * rng.uniform(1 - config.brightness, 1 + config.brightness)
    x = np.clip(x, 0, 1) ** rng.uniform(*config.gamma)
    x = x + rng.normal(0, rng.uniform(0, config.noise), x.shape)
    return np.clip(x, 0, 1).astype(np.float32)


def _rotate_hue(x: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    k = 1 / math.sqrt(3)
    a = (1 - c) / 3
    matrix = np.array([[c + a, a - k * s, a + k * s], [a + k * s, c + a, a - k * s], [a - k * s, a + k * s, c + a]],
                      dtype=np.float32)
    return np.einsum("ij,jhw->ihw", matrix, x)


def centre_view(pixels: np.ndarray, size_px: int) -> np.ndarray:
    """The deterministic view validation and test use: the centre (or the reflect-padded whole)."""
    return fit_square(pixels, size_px).astype(np.float32) / 255.0
