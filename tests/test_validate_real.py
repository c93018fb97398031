"""The per-array area split of scripts/validate_real.py: what the PV01 size columns are made of."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import shapely


@pytest.fixture(scope="module")
def validate_real():
    path = Path(__file__).resolve().parents[1] / "scripts" / "validate_real.py"
    spec = importlib.util.spec_from_file_location("validate_real", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_area_drawn_across_two_close_arrays_counts_once_split_where_they_meet(validate_real):
    left, right = shapely.box(0, 0, 10, 10), shapely.box(12, 0, 22, 10)  # 2 m apart
    predicted = shapely.box(-1, -1, 23, 11)  # one polygon over both and the gap, 1 m too wide all round
    far_away = shapely.box(100, 100, 110, 110)  # drawn where no array is: nobody's
    rows = validate_real.per_array(np.array([left, right]), shapely.union_all([predicted, far_away]))
    (area_l, inside_l, given_l), (area_r, inside_r, given_r) = rows
    assert (area_l, inside_l, area_r, inside_r) == pytest.approx((100, 100, 100, 100))
    assert given_l == pytest.approx(given_r, rel=1e-6)  # mirror images: the gap is split at x = 11
    assert given_l + given_r == pytest.approx(predicted.area, rel=1e-6)  # all of it, once; not the far square


def test_size_groups_say_how_many_arrays_were_found_and_how_much_was_drawn(validate_real):
    arrays = np.array([[10.0, 0.0, 0.0], [15.0, 15.0, 30.0], [50.0, 40.0, 45.0], [400.0, 400.0, 300.0]])
    groups = validate_real.by_array_size(arrays)
    assert groups["under 20 m²"] == {"arrays": 2, "found": 0.5, "truth_m2": 25.0, "drawn_error": pytest.approx(30 / 25 - 1)}
    assert groups["20-100 m²"]["drawn_error"] == pytest.approx(-0.1)
    assert groups["100 m² and more"]["drawn_error"] == pytest.approx(-0.25)


def test_area_away_counts_only_what_lies_beyond_every_arrays_reach(validate_real):
    reach = validate_real.ARRAY_REACH_M
    truth = shapely.union_all([shapely.box(0, 0, 10, 10), shapely.box(50, 0, 60, 10)])
    assert validate_real.area_away(truth, shapely.box(-reach, 0, 10, 10)) == pytest.approx(0, abs=1e-9)
    beyond = shapely.box(10 + reach, 0, 10 + reach + 5, 4)  # 5 x 4 m, just out of the left array's reach
    assert validate_real.area_away(truth, shapely.union_all([beyond, shapely.box(2, 2, 8, 8)])) == pytest.approx(20)
