import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.features import rasterize

from solarmap.training.synth import SynthConfig, render_town, write_town


@pytest.fixture(scope="module")
def town():
    return render_town(SynthConfig(size_px=384, seed=7, supersample=2, panel_house_fraction=0.8))


def test_same_seed_same_town_other_seed_other_town():
    cfg = SynthConfig(size_px=160, seed=3, supersample=2)
    a, b = render_town(cfg), render_town(cfg)
    c = render_town(SynthConfig(size_px=160, seed=4, supersample=2))
    assert np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)


def test_truth_arrays_are_in_the_scene_and_look_like_panels(town):
    assert len(town.arrays) > 0
    frame = town.truth_frame()
    h, w, _ = town.image.shape
    minx, maxy = town.transform.c, town.transform.f
    maxx, miny = minx + w * town.transform.a, maxy + h * town.transform.e
    for geom in frame.geometry:
        gx0, gy0, gx1, gy1 = geom.bounds
        assert minx - 1e-6 <= gx0 and gx1 <= maxx + 1e-6 and miny - 1e-6 <= gy0 and gy1 <= maxy + 1e-6
    # module area: an array of k modules covers about k * 1.7 m² (clipped arrays cover less)
    assert (frame.area_m2 <= frame.modules * 1.7 * 1.01).all()
    inside = rasterize([(g, 1) for g in frame.geometry], out_shape=(h, w), transform=town.transform).astype(bool)
    core = rasterize([(g.buffer(-0.4), 1) for g in frame.geometry if not g.buffer(-0.4).is_empty],
                     out_shape=(h, w), transform=town.transform).astype(bool)
    brightness = town.image.astype(float).mean(axis=2)
    assert brightness[core].mean() < 0.5 * brightness[~inside].mean()  # panels are dark
    blue_excess = town.image[..., 2].astype(float) - town.image[..., 0]
    assert blue_excess[core].mean() > 0  # and bluish on average


def test_write_town_writes_georeferenced_scene_and_truth(tmp_path, town):
    scene, truth = write_town(town, tmp_path)
    with rasterio.open(scene) as src:
        assert src.count == 3 and src.dtypes[0] == "uint8"
        assert src.crs.to_epsg() == 32611
        assert src.transform == town.transform
    frame = gpd.read_file(truth, layer="panels")
    assert len(frame) == len(town.arrays)
    assert set(frame.kind) <= {"roof", "ground"}
