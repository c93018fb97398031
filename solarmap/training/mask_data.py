"""Real pixel truth for the outline network: four masked sets and the real negatives, at the
model's GSD, split by group, with two truths kept apart.

Panels (module pixels) and installations (footprints: a farm's rows with the gaps between them)
are different truths, and each set labels one of them:

* PV01 (0.1 m UAV, China), Bradbury (0.3 m USGS, California homes), Bolzano (0.2 m orthophotos,
  Italian roofs): modules. Their footprint target is the module mask itself (a roof array's
  footprint is its modules).
* NREL (~0.5 m Google, US farms and commercial roofs): footprints. Its panel target is known only
  outside the footprint (no panel there); inside, the module pixels are not labelled, so they are
  left out of the panel loss.

Bolzano also outlines every roof without panels: hard negatives, and the truth for "area drawn on
roofs without panels". The negatives of the classifier's sets (Fresno, UC Merced, OpenAerialMap)
are images with no panel anywhere.

Splits are by group (see :func:`solarmap.training.real_data.assign_splits`): PV01 keeps the
classifier's split (its test images stay unseen), Bradbury by runs of 20 ids (neighbouring arrays
overlap), Bolzano by 1 km blocks of the location in its names, NREL chip by chip (no locations are
given; the ten farm chips, which look like ten different farms, split apart from the rest).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from solarmap.errors import InputError
from solarmap.training.real_data import (
    NEGATIVE_SOURCES,
    _read_mask,
    _read_rgb,
    _resample,
    assign_splits,
    load_cached,
    load_source,
)

__all__ = ["MASK_SOURCES", "MaskedImage", "load_masked", "load_masked_source"]

NREL_LOGO_PX = 26  # the imagery provider's logo strip at the bottom of each NREL chip
NREL_FARM_COVER = 0.25  # an NREL chip whose installations cover this much of it: a solar farm


@dataclass(frozen=True)
class MaskedImage:
    """One image at the model's GSD with its targets, each float32 (h, w) in [0, 1] (area fractions
    after resampling); NaN where the set does not say (left out of the loss and of the metrics)."""

    pixels: np.ndarray  # uint8 (3, h, w)
    panel: np.ndarray  # module pixels
    footprint: np.ndarray  # installation footprints
    source: str
    key: str
    group: str
    split: str = ""
    roof: np.ndarray | None = None  # Bolzano: roofs without panels (fraction), else None
    native_gsd_m: float = 0.3

    @property
    def has_panels(self) -> bool:
        return bool(np.nansum(self.footprint) > 0)


def _fraction(mask: np.ndarray, factor: float) -> np.ndarray:
    """A {0, 1} mask as the area fraction of each pixel after resampling by ``factor``."""
    return np.clip(_resample(mask[None].astype(np.float32), factor)[0], 0, 1).astype(np.float32)


def _module_image(pixels, mask, gsd_native, gsd_m, **fields) -> MaskedImage:
    factor = gsd_native / gsd_m
    panel = _fraction(mask, factor)
    return MaskedImage(_resample(pixels, factor), panel, panel.copy(), native_gsd_m=gsd_native, **fields)


def _pv01(root: Path, gsd_m: float) -> list[MaskedImage]:
    split_of = {im.key: (im.group, im.split) for im in load_source("pv01", root.parent, gsd_m=gsd_m)}
    images = []
    for path in sorted((root / "images").glob("*.png")):
        key = f"pv01:{path.stem}"
        group, split = split_of[key]
        images.append(_module_image(_read_rgb(path), _read_mask(root / "masks" / path.name), 0.1, gsd_m,
                                    source="pv01", key=key, group=group, split=split))
    return images


def _bradbury(root: Path, gsd_m: float) -> list[MaskedImage]:
    images = []
    for path in sorted((root / "images").glob("*.png"), key=lambda p: int(p.stem)):
        images.append(_module_image(_read_rgb(path), _read_mask(root / "masks" / path.name), 0.3, gsd_m,
                                    source="bradbury", key=f"bradbury:{path.stem}",
                                    group=f"bradbury:{int(path.stem) // 20}"))
    return assign_splits(images, val_fraction=0.2, test_fraction=0.2)


def _bolzano(root: Path, gsd_m: float) -> list[MaskedImage]:
    from PIL import Image

    images = []
    for path in sorted((root / "images").glob("*.jpg")):
        with Image.open(root / "masks" / f"{path.stem}.png") as image:
            classes = np.asarray(image)
        x, y = (int(v) for v in path.stem.rsplit("-", 1)[1].split("_"))
        image = _module_image(_read_rgb(path), (classes == 2).astype(np.uint8), 0.2, gsd_m, source="bolzano",
                              key=f"bolzano:{path.stem}", group=f"bolzano:{x // 1000}:{y // 1000}")
        images.append(replace(image, roof=_fraction((classes == 1).astype(np.uint8), 0.2 / gsd_m)))
    return assign_splits(images, val_fraction=0.2, test_fraction=0.2)


def _nrel(root: Path, gsd_m: float) -> list[MaskedImage]:
    images = []
    for path in sorted((root / "images").glob("*.jpg"), key=lambda p: int(p.stem.split("_")[0])):
        pixels = _read_rgb(path)[:, :-NREL_LOGO_PX]
        mask = _read_mask(root / "masks" / f"{path.stem}.png")[:-NREL_LOGO_PX]
        factor = 0.5 / gsd_m
        footprint = _fraction(mask, factor)
        panel = np.where(footprint > 0, np.nan, 0.0).astype(np.float32)  # modules inside are not labelled
        number = int(path.stem.split("_")[0])
        images.append(MaskedImage(_resample(pixels, factor), panel, footprint, "nrel", f"nrel:{path.stem}",
                                  f"nrel:{number}", native_gsd_m=0.5))
    # farms split apart from the rest, so that validation and test each hold some (a plain split of
    # 80 chips put all ten in training)
    farms = [im for im in images if float(np.mean(im.footprint)) >= NREL_FARM_COVER]
    others = [im for im in images if float(np.mean(im.footprint)) < NREL_FARM_COVER]
    return (assign_splits(farms, val_fraction=0.2, test_fraction=0.2)
            + assign_splits(others, val_fraction=0.2, test_fraction=0.2))


MASK_SOURCES: dict[str, tuple[str, Callable[[Path, float], list[MaskedImage]]]] = {
    "pv01": ("pv01-masks", _pv01),
    "bradbury": ("bradbury-pv-masks", _bradbury),
    "bolzano": ("bolzano-pv-roofs", _bolzano),
    "nrel": ("nrel-train-masks", _nrel),
}


def _negatives(name: str, data_root: Path, gsd_m: float) -> list[MaskedImage]:
    """A classifier set's panel-free images, with its split, as all-zero targets."""
    images = []
    for image in load_source(name, data_root, gsd_m=gsd_m):
        if image.label:
            continue
        zeros = np.zeros(image.pixels.shape[1:], np.float32)
        images.append(MaskedImage(image.pixels, zeros, zeros, name, image.key, image.group, image.split))
    return images


def load_masked_source(name: str, data_root: str | Path, *, gsd_m: float) -> list[MaskedImage]:
    """Every image of set ``name`` (a masked set or a negative set) under ``data_root`` at ``gsd_m``."""
    data_root = Path(data_root)
    if name in NEGATIVE_SOURCES:
        return _negatives(name, data_root, gsd_m)
    folder, read = MASK_SOURCES[name]
    root = data_root / folder
    if not root.is_dir():
        raise InputError(f"{name}: {root} not found (see the README's Training data for where to get it)")
    return read(root, gsd_m)


def load_masked(data_root: str | Path, *, gsd_m: float,
                sources: tuple[str, ...] = (*MASK_SOURCES, *NEGATIVE_SOURCES),
                cache_dir: str | Path | None = None) -> list[MaskedImage]:
    """Every available set (missing ones skipped), cached as one pickle per set and GSD."""
    return load_cached(sources, lambda name: load_masked_source(name, data_root, gsd_m=gsd_m), cache_dir=cache_dir,
                       cache_name=lambda name: f"masked-{name}-{gsd_m:g}m.pkl")
