"""Shared fixtures: tiny GeoTIFFs written into tmp_path with known content."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine

UTM_11N = "EPSG:32611"
# A point near the UTM 11N central meridian (-117 deg), so the UTM scale factor is ~0.9996.
UTM_ORIGIN = (500_000.0, 4_000_000.0)


def write_tif(path, array, *, transform=None, crs=UTM_11N, nodata=None, dtype=None, **profile):
    """Write ``array`` (bands, rows, cols) or (rows, cols) as a GeoTIFF and return its path."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if transform is None:
        transform = Affine(0.5, 0, UTM_ORIGIN[0], 0, -0.5, UTM_ORIGIN[1])
    options = dict(driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
                   dtype=dtype or array.dtype, transform=transform, nodata=nodata)
    if crs is not None:
        options["crs"] = crs
    options.update(profile)
    with rasterio.open(path, "w", **options) as dst:
        dst.write(array.astype(options["dtype"]))
    return str(path)


@pytest.fixture
def geotiff(tmp_path):
    """Factory: geotiff(array, name=..., **write_tif options) -> path."""
    counter = {"n": 0}

    def make(array, name=None, **kwargs):
        counter["n"] += 1
        return write_tif(tmp_path / (name or f"raster{counter['n']}.tif"), array, **kwargs)

    return make


def rectangle_raster(height, width, rect, *, value=1.0, bands=3):
    """float32 (bands, h, w) zeros with ``rect`` = (row0, col0, row1, col1) set to ``value``."""
    array = np.zeros((bands, height, width), dtype=np.float32)
    r0, c0, r1, c1 = rect
    array[:, r0:r1, c0:c1] = value
    return array


class BandOneScorer:
    """Test scorer: the map is band 1 itself; a tile is positive if any pixel is >= 0.5."""

    name = "band-one"

    def __call__(self, pixels):
        maps = pixels[:, 0].astype(np.float32)
        return (maps.max(axis=(1, 2)) >= 0.5).astype(np.float32), maps


@pytest.fixture
def band_one_scorer():
    return BandOneScorer()


def tiny_config(**changes):
    """A model config for fast unit tests: small tiles and a 16-channel branch (the backbone itself
    is always full size). Any ModelConfig field can be changed."""
    from solarmap.model import ModelConfig

    return ModelConfig(**{**dict(tile_size_px=96, overlap_px=16, train_tile_px=80, branch_channels=(16, 16)), **changes})


def tiny_net(**changes):
    """A random-init SolarNet on :func:`tiny_config` (seeded, so every call gives the same weights)."""
    import torch

    from solarmap.model import SolarNet

    torch.manual_seed(0)
    return SolarNet(tiny_config(**changes)).eval()


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    """A saved random-init model on :func:`tiny_config` (no trained branch), shared by the CLI tests."""
    from solarmap.model import save

    return str(save(tiny_net(), tmp_path_factory.mktemp("model") / "tiny.pt"))


def assert_close_on_scale(actual, expected, *, rel=1e-4):
    """Two float32 maps from two code paths (another batch, memory layout, kernel or thread count)
    agree to ``rel`` of the expected map's largest magnitude. Summing in another order moves each
    value by about 1e-6 of the largest terms, so near a map's zero crossings an absolute tolerance
    like 1e-5 asks for bits (issue 32: values to 2e5 differed by 0.9 on another CPU)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max())
    worst = float(np.abs(actual - expected).max())
    assert worst <= rel * scale, f"differ by {worst:.3g}, more than {rel:g} of the maps' scale {scale:.3g}"
