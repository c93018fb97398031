import numpy as np
import pytest

from conftest import rectangle_raster, tiny_config
from solarmap.geo.refine import ColourRefine, colour_codes, colour_histograms, colour_log_ratio, grow, refine_mask

ROOF = (0.75, 0.55, 0.45)
PANEL = (0.10, 0.15, 0.35)
LAWN = (0.30, 0.55, 0.25)


def paint(shape, background, rects):
    """(3, h, w) pixels of ``background`` colour with (rect, colour) pairs painted on it."""
    pixels = np.empty((3, *shape), dtype=np.float32)
    pixels[:] = np.array(background, dtype=np.float32)[:, None, None]
    for (r0, c0, r1, c1), colour in rects:
        pixels[:, r0:r1, c0:c1] = np.array(colour, dtype=np.float32)[:, None, None]
    return pixels


def panel_table():
    """A table learnt from two tiles: panels on a roof (positive) and a bare roof with lawn (negative)."""
    positive = paint((40, 40), ROOF, [((10, 10, 20, 30), PANEL)])
    negative = paint((40, 40), ROOF, [((0, 0, 40, 15), LAWN)])
    return colour_log_ratio(colour_histograms([(positive, 1), (negative, 0)]))


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_colours_only_positive_tiles_have_get_a_high_ratio_shared_ones_about_zero():
    table = panel_table()
    code = lambda colour: int(colour_codes(np.array(colour, dtype=np.float32)[:, None, None])[0, 0])  # noqa: E731
    assert table[code(PANEL)] > 3.0
    assert table[code(LAWN)] < -3.0
    assert abs(table[code(ROOF)]) < 1.0  # on both sides: no evidence either way
    assert table[code((0.99, 0.01, 0.99))] == pytest.approx(0.0, abs=0.5)  # never seen
    counts = colour_histograms([(paint((4, 5), ROOF, []), 1)])
    assert counts.shape == (2, 16 ** 3) and counts[1].sum() == 20 and counts[0].sum() == 0


def test_a_blob_around_an_array_becomes_the_array_and_arrays_far_away_stay_out():
    pixels = paint((100, 100), ROOF, [((40, 30, 52, 60), PANEL), ((5, 80, 15, 95), PANEL), ((70, 0, 100, 100), LAWN)])
    truth = np.zeros((100, 100), bool)
    truth[40:52, 30:60] = True
    blob = grow(truth, 10)  # a blurred CAM mask, spilling over roof and lawn
    blob[30:36, 20:70] = True
    valid = np.ones_like(truth)
    refined = refine_mask(pixels, blob, valid, log_ratio=panel_table(), rule=ColourRefine(grow_px=8, smooth_px=0))
    assert iou(blob, truth) < 0.3
    assert iou(refined, truth) == 1.0
    assert not refined[5:15, 80:95].any()  # the second array is more than grow_px from the blob


def test_smoothing_joins_an_array_cut_by_grid_lines():
    pixels = paint((60, 60), ROOF, [((20, 10, 30, 50), PANEL), ((20, 29, 30, 30), (0.95, 0.95, 0.95))])
    blob = np.zeros((60, 60), bool)
    blob[15:35, 5:55] = True
    table, valid = panel_table(), np.ones_like(blob)
    sharp = refine_mask(pixels, blob, valid, log_ratio=table, rule=ColourRefine(smooth_px=0))
    smooth = refine_mask(pixels, blob, valid, log_ratio=table, rule=ColourRefine(smooth_px=1, min_log_ratio=2.25))
    from scipy import ndimage

    assert ndimage.label(sharp)[1] == 2 and sharp.sum() == 10 * 39
    assert ndimage.label(smooth)[1] == 1 and smooth.sum() == 10 * 40  # the line closed, the outline kept


def test_an_offset_blob_still_finds_its_array_within_grow_distance_and_invalid_pixels_stay_out():
    pixels = paint((80, 80), ROOF, [((30, 30, 40, 50), PANEL)])
    blob = np.zeros((80, 80), bool)
    blob[10:24, 28:52] = True  # 6 px above the array, not touching it
    valid = np.ones_like(blob)
    valid[:, 45:] = False
    table = panel_table()
    assert not refine_mask(pixels, blob, valid, log_ratio=table, rule=ColourRefine(grow_px=4)).any()
    part = refine_mask(pixels, blob, valid, log_ratio=table, rule=ColourRefine(grow_px=12, smooth_px=0))
    assert part[30:36, 30:45].all() and not part[36:].any()  # rows within 12 px of the blob only
    whole = refine_mask(pixels, blob, valid, log_ratio=table, rule=ColourRefine(grow_px=20, smooth_px=0))
    expected = np.zeros_like(blob)
    expected[30:40, 30:45] = True  # the array, less its invalid part
    assert (whole == expected).all()


def test_no_panel_colour_near_the_blob_gives_an_empty_mask():
    pixels = paint((60, 60), ROOF, [((0, 0, 60, 20), LAWN)])
    blob = np.zeros((60, 60), bool)
    blob[20:40, 20:40] = True
    assert not refine_mask(pixels, blob, np.ones_like(blob), log_ratio=panel_table()).any()
    assert not refine_mask(pixels, np.zeros_like(blob), np.ones_like(blob), log_ratio=panel_table()).any()


def test_bad_rules_and_tables_are_refused():
    with pytest.raises(ValueError, match="negative"):
        ColourRefine(grow_px=-1)
    blob = np.ones((8, 8), bool)
    with pytest.raises(ValueError, match="bins"):
        refine_mask(np.zeros((3, 8, 8), np.float32), blob, blob, log_ratio=np.zeros(100, np.float32))


class PanelTableScorer:
    """Test scorer: a blob (every pixel of a tile with any dark-blue pixel) and the panel table."""

    name = "blob"

    def __init__(self, table=None):
        self.colour_prior = table

    def __call__(self, pixels):
        blue = (pixels[:, 2] > pixels[:, 0] + 0.1)
        positive = blue.any(axis=(1, 2))
        maps = np.repeat(positive[:, None, None], pixels.shape[2], 1).repeat(pixels.shape[3], 2).astype(np.float32)
        return positive.astype(np.float32), maps


def test_detect_with_refinement_outlines_the_array_instead_of_the_tiles(geotiff):
    from dataclasses import replace

    from solarmap.errors import OptionError
    from solarmap.pipeline import DetectConfig, detect_scene

    array = rectangle_raster(64, 64, (0, 0, 64, 64), value=0.0)
    array[:] = np.array(ROOF, dtype=np.float32)[:, None, None]
    array[:, 20:28, 10:40] = np.array(PANEL, dtype=np.float32)[:, None, None]
    scene = geotiff(array)  # 0.5 m pixels
    base = DetectConfig(tile_size_px=32, overlap_px=0, min_area_m2=0)
    blobs, _ = detect_scene(scene, scorer=PanelTableScorer(panel_table()), config=base)
    refined, _ = detect_scene(scene, scorer=PanelTableScorer(panel_table()),
                              config=replace(base, refine=ColourRefine(grow_px=4, smooth_px=0)))
    assert blobs.area.sum() == pytest.approx(32 * 64 * 0.25)  # both top tiles, whole
    assert len(refined) == 1 and refined.area.sum() == pytest.approx(8 * 30 * 0.25)  # one array across the seam
    with pytest.raises(OptionError, match="colour prior"):
        detect_scene(scene, scorer=PanelTableScorer(None), config=replace(base, refine=ColourRefine()))


def test_refinement_is_the_branch_default_only_when_the_checkpoint_has_a_prior_and_rule(tmp_path):
    from dataclasses import replace

    from solarmap import model as M
    from solarmap.errors import ModelError
    from solarmap.model.scorer import ModelScorer
    from solarmap.pipeline import DetectConfig

    def refine(config, method="branch", **options):
        return DetectConfig.for_scorer(ModelScorer(M.SolarNet(config), method=method, **options)).refine

    plain = tiny_config(branch_levels=1)
    assert refine(plain) is None
    with pytest.raises(ModelError, match="no colour prior"):
        refine(plain, refine=True)
    config = replace(plain, colour_prior=tuple(float(v) for v in panel_table()),
                     refine_rule={"grow_px": 20, "min_log_ratio": 1.5, "smooth_px": 2})
    config = M.load(M.save(M.SolarNet(config), tmp_path / "m.pt")).config  # both survive a checkpoint
    assert len(config.colour_prior) == 16 ** 3
    assert refine(config) == ColourRefine(grow_px=20, min_log_ratio=1.5, smooth_px=2)
    assert refine(config, "feedback") is None  # calibrated on branch masks only
    assert refine(config, "feedback", refine=True) == ColourRefine(grow_px=20, min_log_ratio=1.5, smooth_px=2)
    assert refine(config, refine=False) is None
    assert refine(replace(config, refine_rule={})) is None


def test_a_region_gives_the_whole_window_result_there_and_nothing_outside():
    pixels = paint((100, 100), ROOF, [((40, 30, 52, 60), PANEL), ((5, 80, 15, 95), PANEL)])
    blob = np.zeros((100, 100), bool)
    blob[30:60, 20:70] = True
    valid, table = np.ones_like(blob), panel_table()
    region = (slice(45, 90), slice(10, 50))
    whole = refine_mask(pixels, blob, valid, log_ratio=table, rule=ColourRefine(grow_px=40))
    part = refine_mask(pixels, blob, valid, log_ratio=table, rule=ColourRefine(grow_px=40), region=region)
    outside = np.ones_like(blob)
    outside[region] = False
    assert (part[region] == whole[region]).all() and part[region].any() and not part[outside].any()
    assert whole[5:15, 80:95].all()  # within 40 px of the blob: found when the region allows


def test_grow_is_the_euclidean_distance_rule_on_any_region():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    for _ in range(40):
        mask = np.zeros((60, 70), bool)
        mask[rng.integers(0, 60, 3), rng.integers(0, 70, 3)] = True
        region = (slice(int(rng.integers(0, 30)), int(rng.integers(31, 60))),
                  slice(int(rng.integers(0, 30)), int(rng.integers(31, 70))))
        for radius in (5.0, 20.0, 45.0, 90.0):  # small ones need distances, large ones take the shortcut
            expected = (ndimage.distance_transform_edt(~mask) <= radius)[region]
            assert (grow(mask, radius, region) == expected).all()
    assert not grow(np.zeros((5, 5), bool), 3.0).any()
