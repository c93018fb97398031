"""CAM masks snapped to panel-coloured pixels.

A CAM says *where* panels are to within a few metres (the branch CAM has 8 px cells, blurred and
sometimes offset), so a thresholded CAM is a blob around an array and its area is far too large.
The pixels near the blob say *which* of them are panels. Which colours are panel colours is learnt
from the same image-level labels as the classifier: a colour that is much more frequent in tiles
labelled "panels" than in tiles labelled "no panels" is a panel colour (a colour histogram per
class and their log ratio, :func:`colour_log_ratio`; about 5 % of a positive tile's pixels are
panel, so only colours that panels own get a clearly positive ratio). The refined mask keeps the
pixels near the CAM mask whose (locally averaged) log ratio is high enough; the CAM decides where
to look, the colours decide the outline.

Pure functions on arrays of one window; the pipeline calls :func:`refine_mask` per positive tile
with the model's table (``ModelConfig.colour_prior``) and rule (``ModelConfig.refine_rule``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import ndimage

COLOUR_BINS = 16  # per channel: 4096 colours, enough to tell module blue from dark roofs


@dataclass(frozen=True)
class ColourRefine:
    """How a window's CAM mask becomes a panel-coloured mask (defaults: the bundled model's
    calibrated rule, used for checkpoints that carry a colour prior but no rule of their own).

    grow_px : how far from the CAM mask panel pixels are looked for (the CAM can be offset from
        the array or cut by the threshold).
    min_log_ratio : keep a pixel when its colour log ratio, averaged over a (2 smooth_px + 1)²
        neighbourhood, exceeds this (0: as frequent in positive as in negative tiles).
    smooth_px : the averaging radius: it closes the modules' grid lines and drops lone pixels.
    """

    grow_px: int = 96
    min_log_ratio: float = 0.9
    smooth_px: int = 1

    def __post_init__(self) -> None:
        if self.grow_px < 0 or self.smooth_px < 0:
            raise ValueError(f"grow and smoothing distances must not be negative, got {self.grow_px}, {self.smooth_px}")


def colour_codes(pixels: np.ndarray, bins: int = COLOUR_BINS) -> np.ndarray:
    """One histogram bin per pixel of a (bands, h, w) array in [0, 1] (first three bands, RGB)."""
    q = np.clip((pixels[:3] * bins).astype(np.int64), 0, bins - 1)
    return (q[0] * bins + q[1]) * bins + q[2]


def colour_histograms(samples: Iterable[tuple[np.ndarray, int]], bins: int = COLOUR_BINS) -> np.ndarray:
    """Colour counts of (pixels, label) samples: array (2, bins³), row 0 negatives, row 1 positives."""
    counts = np.zeros((2, bins ** 3), dtype=np.float64)
    for pixels, label in samples:
        counts[int(bool(label))] += np.bincount(colour_codes(pixels, bins).ravel(), minlength=bins ** 3)
    return counts


def colour_log_ratio(counts: np.ndarray) -> np.ndarray:
    """log p(colour | positive tile) − log p(colour | negative tile), with add-one smoothing so a
    colour seen on neither side scores 0 and a rare one cannot dominate."""
    smoothed = np.asarray(counts, dtype=np.float64) + 1.0
    probs = smoothed / smoothed.sum(axis=1, keepdims=True)
    return (np.log(probs[1]) - np.log(probs[0])).astype(np.float32)


def grow(mask: np.ndarray, radius_px: float, region: tuple[slice, slice] | None = None) -> np.ndarray:
    """Pixels of ``region`` (rows, cols slices; default all) within ``radius_px`` (Euclidean) of
    the mask. Distances are exact on the smallest box holding the region and the whole mask, which
    is usually much smaller than the window."""
    rows, cols = region or (slice(0, mask.shape[0]), slice(0, mask.shape[1]))
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    mask_r, mask_c = np.nonzero(mask)
    if not len(mask_r):
        return np.zeros(shape, dtype=bool)
    # Shortcut, exact: when one mask pixel is within the radius of all four corners, the whole
    # region is (a disk is convex), which is the usual case for a large radius.
    centre_r, centre_c = (rows.start + rows.stop - 1) / 2, (cols.start + cols.stop - 1) / 2
    k = np.argmin((mask_r - centre_r) ** 2 + (mask_c - centre_c) ** 2)
    corners_r, corners_c = np.array([rows.start, rows.stop - 1]), np.array([cols.start, cols.stop - 1])
    if ((corners_r[:, None] - mask_r[k]) ** 2 + (corners_c[None, :] - mask_c[k]) ** 2).max() <= radius_px ** 2:
        return np.ones(shape, dtype=bool)
    r0, r1 = min(rows.start, mask_r.min()), max(rows.stop, mask_r.max() + 1)
    c0, c1 = min(cols.start, mask_c.min()), max(cols.stop, mask_c.max() + 1)
    distance = ndimage.distance_transform_edt(~mask[r0:r1, c0:c1])
    return distance[rows.start - r0: rows.stop - r0, cols.start - c0: cols.stop - c0] <= radius_px


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not reach its border filled (4-connected);
    the same as ``scipy.ndimage.binary_fill_holes``, about 3× faster."""
    labels, count = ndimage.label(~mask)
    open_to_border = np.zeros(count + 1, dtype=bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        open_to_border[edge] = True
    open_to_border[0] = False  # label 0: the mask itself
    return ~open_to_border[labels]


def refine_mask(pixels: np.ndarray, mask: np.ndarray, valid: np.ndarray, *, log_ratio: np.ndarray,
                rule: ColourRefine = ColourRefine(), region: tuple[slice, slice] | None = None) -> np.ndarray:
    """The CAM ``mask`` of one window replaced by the panel-coloured pixels near it.

    ``log_ratio`` is the model's table (:func:`colour_log_ratio`, bins³ entries). ``region``
    (rows, cols slices; default the whole window) is the part whose result is wanted, e.g. the
    tile's core; the mask anywhere in the window still counts for distances, and pixels outside
    the region come back False. An empty result is returned as is: the colours say there is no
    panel near this blob.
    """
    mask = mask & valid
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    bins = round(len(log_ratio) ** (1 / 3))
    if bins ** 3 != len(log_ratio):
        raise ValueError(f"a colour table has bins³ entries, got {len(log_ratio)}")
    h, w = mask.shape
    rows, cols = region or (slice(0, h), slice(0, w))
    m = rule.smooth_px  # the smoothing reads this many pixels around the region
    r0, r1, c0, c1 = max(rows.start - m, 0), min(rows.stop + m, h), max(cols.start - m, 0), min(cols.stop + m, w)
    score = np.asarray(log_ratio, dtype=np.float32)[colour_codes(pixels[:, r0:r1, c0:c1], bins)]
    if m:
        score = ndimage.uniform_filter(score, size=2 * m + 1, mode="nearest")
    score = score[rows.start - r0: rows.stop - r0, cols.start - c0: cols.stop - c0]
    near = grow(mask, rule.grow_px, (rows, cols))
    inside = valid[rows, cols]
    out[rows, cols] = fill_holes(near & inside & (score > rule.min_log_ratio)) & inside
    return out
