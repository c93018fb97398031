"""Real imagery for training and validation: five public sets in ``../shared/data`` (see the README
for sources), each read at the model's GSD and split deterministically.

Splits are by *group*: a spatial block where a set gives locations (Bern's chips overlap their
neighbours, OpenAerialMap's zoom-19 and zoom-20 tiles show the same ground, PV01's images come in
clusters), the image itself elsewhere, so a test image never has a near-copy in training.

Every set has its own look (sensor, season, GSD, compression). A set that brings only one class
(Bern: positives; UC Merced, OpenAerialMap: negatives) invites the network to learn the look
instead of the panel; :mod:`solarmap.training.views` degrades every image to every look.
"""

from __future__ import annotations

import csv
import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from solarmap.errors import InputError

__all__ = ["NEGATIVE_SOURCES", "RealImage", "SOURCES", "assign_splits", "load_all", "load_cached", "load_source"]

SPLITS = ("train", "val", "test")
# (validation, test) fractions of each set's groups; PV01's 80 images in 34 blocks need more than 15 %
# each for a validation and a test part that can measure outlines at all
SPLIT_FRACTIONS = {"pv01": (0.25, 0.25)}


@dataclass(frozen=True)
class RealImage:
    """One image at the model's GSD: uint8 (3, h, w), its label, and where it came from."""

    pixels: np.ndarray
    label: int
    source: str
    key: str
    group: str  # the unit of the train / val / test split
    mask: np.ndarray | None = None  # uint8 fraction of panel per pixel x 255 (PV01 only)
    split: str = ""  # "train", "val" or "test" (set by load_source)


def assign_splits(images: list[RealImage], *, val_fraction: float, test_fraction: float) -> list[RealImage]:
    """Whole groups to train / val / test, in the order of a hash of their names, each to the split
    furthest below its share of images so far: deterministic, and close to the fractions even for a
    set of a few dozen groups (a plain hash threshold gave PV01 a 46 / 25 / 9 split)."""
    sizes: dict[str, int] = {}
    for image in images:
        sizes[image.group] = sizes.get(image.group, 0) + 1
    targets = {"test": test_fraction, "val": val_fraction, "train": 1 - val_fraction - test_fraction}
    filled = dict.fromkeys(targets, 0)
    chosen = {}
    for group in sorted(sizes, key=lambda g: zlib.crc32(g.encode())):
        split = min(targets, key=lambda k: (filled[k] + sizes[group]) / len(images) - targets[k])
        chosen[group] = split
        filled[split] += sizes[group]
    return [replace(image, split=chosen[image.group]) for image in images]


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy()


def _resample(pixels: np.ndarray, factor: float) -> np.ndarray:
    """uint8 or float (c, h, w) resized by ``factor`` as detection resamples rasters (area average
    when shrinking, bilinear when enlarging); uint8 stays uint8."""
    from solarmap.model.scorer import resample

    out = resample(pixels.astype(np.float32), factor)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8) if pixels.dtype == np.uint8 else out


def _fresno(root: Path, gsd_m: float) -> list[RealImage]:
    images = []
    with open(root / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            pixels = _resample(_read_rgb(root / "chips" / f"{row['id']}.tif"), 0.3 / gsd_m)
            images.append(RealImage(pixels, int(row["label"]), "fresno", f"fresno:{row['id']}", f"fresno:{row['id']}"))
    return images


def _bern(root: Path, gsd_m: float) -> list[RealImage]:
    images = []
    with open(root / "chips.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            east, north = int(row["easting_epsg2056"]), int(row["northing_epsg2056"])
            pixels = _resample(_read_rgb(root / "chips" / f"{row['id']}.jpg"), 0.2 / gsd_m)
            block = f"bern:{east // 500}:{north // 500}"  # 500 m blocks: neighbouring chips overlap
            images.append(RealImage(pixels, 1, "bern", f"bern:{row['id']}", block))
    return images


def _pv01(root: Path, gsd_m: float) -> list[RealImage]:
    images = []
    for path in sorted((root / "images").glob("*.png")):
        _, lat, lon = path.stem.split("_")  # coordinates x 10^4
        pixels = _resample(_read_rgb(path), 0.1 / gsd_m)
        mask = _read_mask(root / "masks" / path.name)
        fraction = _resample(mask[None].astype(np.float32), 0.1 / gsd_m)[0]
        label = int(mask.sum() * 0.1 ** 2 >= 2.0)  # at least 2 m² of panel, as for scene tiles
        block = f"pv01:{int(lat) // 10}:{int(lon) // 10}"  # 0.001 degree (~100 m) blocks: images tile an area
        images.append(RealImage(pixels, label, "pv01", f"pv01:{path.stem}", block,
                                np.clip(np.rint(fraction * 255), 0, 255).astype(np.uint8)))
    return images


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return (np.asarray(image) > 0).astype(np.uint8)


def _ucmerced(root: Path, gsd_m: float) -> list[RealImage]:
    images = []
    with open(root / "images.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            pixels = _resample(_read_rgb(root / "images" / row["path"]), 0.3048 / gsd_m)
            key = f"ucmerced:{row['path']}"
            images.append(RealImage(pixels, 0, "ucmerced", key, key))
    return images


def _oam(root: Path, gsd_m: float) -> list[RealImage]:
    images = []
    with open(root / "tiles.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            pixels = _resample(_read_rgb(root / "tiles" / row["file"]), float(row["gsd_m"]) / gsd_m)
            shift = int(row["zoom"]) - 16  # the zoom-16 tile holding it: zoom 19 and 20 of one place together
            block = f"oam:{int(row['tile_x']) >> shift}:{int(row['tile_y']) >> shift}"
            images.append(RealImage(pixels, 0, "oam", f"oam:{row['file']}", block))
    return images


SOURCES: dict[str, tuple[str, Callable[[Path, float], list[RealImage]]]] = {
    "fresno": ("duke-fresno-pv", _fresno),
    "bern": ("bern-pv-positives", _bern),
    "pv01": ("pv01-masks", _pv01),
    "ucmerced": ("ucmerced-negatives", _ucmerced),
    "oam": ("oam-negatives", _oam),
}
# the sets whose panel-free images are scenes of other places (PV01's belong to the masks' own
# UAV set; Bern has none): the real negatives that training and the real-data table count
NEGATIVE_SOURCES = ("fresno", "ucmerced", "oam")


def load_source(name: str, data_root: str | Path, *, gsd_m: float) -> list[RealImage]:
    """Every image of set ``name`` under ``data_root`` (e.g. ``../shared/data``) at ``gsd_m``."""
    folder, read = SOURCES[name]
    root = Path(data_root) / folder
    if not root.is_dir():
        raise InputError(f"{name}: {root} not found (see the README's Training data for where to get it)")
    if name == "fresno":  # the split the Inception models were trained and tested on, kept comparable
        from solarmap.training.data import split_of

        return [replace(im, split=split_of(f"duke-fresno-pv:{im.key.split(':')[1]}", val_fraction=0.15,
                                           test_fraction=0.20)) for im in read(root, gsd_m)]
    val, test = SPLIT_FRACTIONS.get(name, (0.15, 0.15))
    return assign_splits(read(root, gsd_m), val_fraction=val, test_fraction=test)


def load_cached(sources: tuple[str, ...], load_one: Callable[[str], list], *, cache_dir: str | Path | None,
                cache_name: Callable[[str], str]) -> list:
    """Every set ``load_one(name)`` can read (those it cannot find, an InputError, are skipped), each
    cached under ``cache_dir`` as one pickle named ``cache_name(name)``."""
    import pickle

    images: list = []
    for name in sources:
        cache = Path(cache_dir) / cache_name(name) if cache_dir else None
        if cache is not None and cache.exists():
            images += pickle.loads(cache.read_bytes())
            continue
        try:
            loaded = load_one(name)
        except InputError:
            continue
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(pickle.dumps(loaded))
        images += loaded
    return images


def load_all(data_root: str | Path, *, gsd_m: float, sources: tuple[str, ...] = tuple(SOURCES),
             cache_dir: str | Path | None = None) -> list[RealImage]:
    """Every available set (missing ones are skipped), cached as one pickle per set and GSD."""
    return load_cached(sources, lambda name: load_source(name, data_root, gsd_m=gsd_m), cache_dir=cache_dir,
                       cache_name=lambda name: f"{name}-{gsd_m:g}m.pkl")


def write_pv01_scenes(data_root: str | Path, names: list[str], out_dir: str | Path, *,
                      per_side: int = 4, gsd_m: float | None = None) -> list[tuple[str, str]]:
    """PV01 images (by name) as georeferenced mosaics at their own 0.1 m, ``per_side`` x ``per_side``
    images each, with truth polygons from their masks: (scene.tif, truth.gpkg) pairs that the
    calibrations (CAM offsets, scales, mask rules, refinement) and evaluations read like any scene.

    ``gsd_m``: the mosaics area-averaged to that coarser GSD (same extent and truth), as a user's
    0.5 m orthophoto or 0.6 m NAIP would show the same roofs."""
    import geopandas as gpd
    import shapely
    from affine import Affine
    from rasterio.features import shapes

    from solarmap.geo.output import write_geopackage, write_geotiff

    root, out_dir = Path(data_root) / "pv01-masks", Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    per_scene = per_side * per_side
    for index in range(0, len(names), per_scene):
        group = names[index: index + per_scene]
        side = math.ceil(math.sqrt(len(group)))
        rows = math.ceil(len(group) / side)
        pixels = np.zeros((3, rows * 256, side * 256), np.uint8)
        mask = np.zeros((rows * 256, side * 256), np.uint8)
        for k, name in enumerate(group):
            r, c = divmod(k, side)
            pixels[:, r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = _read_rgb(root / "images" / f"{name}.png")
            mask[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] = _read_mask(root / "masks" / f"{name}.png")
        transform = Affine(0.1, 0, 500_000.0 + 2_000 * index, 0, -0.1, 4_000_000.0)
        scene = out_dir / (f"pv01_{index // per_scene}" + (f"_{gsd_m:g}m" if gsd_m else "") + ".tif")
        shown = _resample(pixels, 0.1 / gsd_m) if gsd_m else pixels
        write_geotiff(scene, shown, transform=transform @ Affine.scale(pixels.shape[2] / shown.shape[2],
                                                                       pixels.shape[1] / shown.shape[1]),
                      crs="EPSG:32611", overwrite=True)
        polygons = [shapely.geometry.shape(g) for g, v in shapes(mask, mask=mask > 0, transform=transform) if v]
        truth = out_dir / f"pv01_{index // per_scene}_truth.gpkg"
        frame = gpd.GeoDataFrame({"kind": ["pv01"] * len(polygons)}, geometry=polygons, crs="EPSG:32611")
        write_geopackage(frame, truth, overwrite=True)
        pairs.append((str(scene), str(truth)))
    return pairs


def synthetic_images(out_dir: str | Path, *, seeds, split: str, gsd_m: float, chip_px: int = 128,
                     town_px: int = 1024) -> list[RealImage]:
    """Synthetic towns (rendered where missing) cut into chips with pixel masks: a supplement for
    geometry, labelled like scene tiles (at least 2 m² of panel is a positive; slivers are left out)."""
    import geopandas as gpd
    from rasterio.features import rasterize

    from solarmap.geo.raster import SceneReader
    from solarmap.geo.tiling import TileSpec, iter_tiles
    from solarmap.training.data import town_paths

    images = []
    for seed, (scene, truth) in zip(seeds, town_paths(out_dir, seeds=seeds, size_px=town_px, gsd_m=gsd_m)):
        frame = gpd.read_file(truth, layer="panels")
        with SceneReader(scene, gsd_m=gsd_m) as reader:
            grid = reader.info.grid
            mask = rasterize([(g, 1) for g in frame.to_crs(grid.crs.to_wkt()).geometry],
                             out_shape=(grid.height, grid.width), transform=grid.transform).astype(np.uint8)
            for tile in iter_tiles(grid, TileSpec(chip_px, 0)):
                if tile.valid.width < chip_px or tile.valid.height < chip_px:
                    continue
                image = reader.read_tile(tile)
                r0, c0 = int(tile.window.row_off), int(tile.window.col_off)
                part = mask[r0: r0 + chip_px, c0: c0 + chip_px]
                panel_m2 = float(part.sum()) * gsd_m ** 2
                if 0 < panel_m2 < 2.0:
                    continue
                pixels = np.clip(np.rint(image.pixels * 255), 0, 255).astype(np.uint8)
                key = f"synthetic:{seed}:{tile.tile_row}:{tile.tile_col}"
                images.append(RealImage(pixels, int(panel_m2 > 0), "synthetic", key, f"synthetic:{seed}",
                                        (part * 255).astype(np.uint8), split=split))
    return images
