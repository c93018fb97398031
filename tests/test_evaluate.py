import geopandas as gpd
import numpy as np
import pytest
import shapely

from conftest import UTM_ORIGIN
from solarmap.evaluate import box_iou, evaluate

X0, Y0 = UTM_ORIGIN  # 0.5 m pixels, north-up


def frame(boxes):
    geoms = [shapely.box(X0 + c0 * 0.5, Y0 - r1 * 0.5, X0 + c1 * 0.5, Y0 - r0 * 0.5) for r0, c0, r1, c1 in boxes]
    return gpd.GeoDataFrame({"id": range(1, len(geoms) + 1)}, geometry=geoms, crs="EPSG:32611")


@pytest.fixture
def scene(geotiff):
    return geotiff(np.full((3, 64, 64), 90, np.uint8))


def test_perfect_prediction_scores_perfectly(scene):
    truth = frame([(4, 4, 12, 20), (40, 40, 50, 60)])
    result = evaluate(truth, truth, scene, tile_size_px=32)
    assert (result.tile_precision, result.tile_recall) == (1.0, 1.0)
    assert result.box_iou == 1.0 and result.pixel_iou == 1.0
    assert (result.object_precision, result.object_recall) == (1.0, 1.0)
    assert result.total_area_error == pytest.approx(0.0) and result.per_system_area_error == pytest.approx(0.0)
    assert result.truth_positive_tiles == 2


def test_shifted_and_missed_predictions(scene):
    truth = frame([(4, 4, 12, 20), (40, 40, 50, 60)])
    predicted = frame([(4, 8, 12, 24)])  # first array shifted 4 px right, second missed
    result = evaluate(predicted, truth, scene, tile_size_px=32)
    assert result.tile_recall == 0.5 and result.tile_precision == 1.0
    assert result.box_iou == pytest.approx((12 / 20 + 0.0) / 2)  # overlap 8x12 / union 8x20, and a miss
    assert result.object_recall == 0.5 and result.object_precision == 1.0
    assert result.total_area_error == pytest.approx((128 - 328) / 328 * 1.0, rel=1e-3)
    assert result.per_system_area_error == pytest.approx((0.0 + 1.0) / 2, abs=1e-3)


def test_false_positive_tile(scene):
    truth = frame([(4, 4, 12, 20)])
    predicted = frame([(4, 4, 12, 20), (40, 40, 50, 60)])
    result = evaluate(predicted, truth, scene, tile_size_px=32)
    assert result.tile_precision == 0.5 and result.tile_recall == 1.0
    assert result.object_precision == 0.5


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 5, 10, 15)) == pytest.approx(50 / 150)
    assert box_iou(None, (0, 0, 1, 1)) == 0.0


def test_object_metrics_from_one_bulk_query_equal_the_pair_by_pair_definition():
    """Overlapping random boxes: precision, recall and per-system error as the definition reads them,
    pair by pair, including a prediction that overlaps two arrays equally (the first one gets it)."""
    import shapely

    from solarmap.evaluate import _object_metrics

    rng = np.random.default_rng(3)
    def boxes(n):
        x, y = rng.uniform(0, 100, n), rng.uniform(0, 100, n)
        w, h = rng.uniform(1, 8, n), rng.uniform(1, 8, n)
        return list(shapely.box(x, y, x + w, y + h))
    truth, pred = boxes(60), boxes(70) + [shapely.box(200, 0, 202, 2)]
    truth += [shapely.box(199, 0, 201, 2), shapely.box(201, 0, 203, 2)]  # the last prediction overlaps both equally
    t_areas, p_areas = np.array([g.area for g in truth]) * 1.1, np.array([g.area for g in pred]) * 1.1
    covered, p_covered = np.zeros(len(truth)), np.zeros(len(pred))
    best, best_truth = np.zeros(len(pred)), np.full(len(pred), -1)
    for i, t in enumerate(truth):
        for j, p in enumerate(pred):
            inter = t.intersection(p).area
            covered[i] += inter
            p_covered[j] += inter
            if inter > best[j]:
                best[j], best_truth[j] = inter, i
    assigned = np.zeros(len(truth))
    for j, i in enumerate(best_truth):
        if i >= 0:
            assigned[i] += p_areas[j]
    expected = (np.mean(p_covered / [p.area for p in pred] >= 0.5), np.mean(covered / [t.area for t in truth] >= 0.5),
                np.mean(np.abs(assigned - t_areas) / t_areas))
    assert _object_metrics(pred, truth, p_areas, t_areas, 0.5) == pytest.approx(expected, rel=1e-12)
