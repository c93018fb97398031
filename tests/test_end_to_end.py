"""End to end with the real bundled model on a small synthetic town it never saw."""

import geopandas as gpd
import pytest

from solarmap import model as model_lib

pytestmark = pytest.mark.skipif(not model_lib.DEFAULT_MODEL_PATH.exists(),
                                reason="the bundled default model is not in this checkout")


def test_detect_finds_the_panels_of_a_small_town(tmp_path):
    from click.testing import CliRunner

    from solarmap.cli import main
    from solarmap.evaluate import evaluate
    from solarmap.training.synth import SynthConfig, render_town, write_town

    town = render_town(SynthConfig(size_px=600, seed=777, panel_house_fraction=0.6))
    scene, truth = write_town(town, tmp_path)
    out = tmp_path / "panels.gpkg"
    result = CliRunner().invoke(main, ["detect", scene, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    predicted = gpd.read_file(out, layer="panels")
    assert len(predicted) > 0
    tile_px = model_lib.load().config.tile_size_px
    metrics = evaluate(predicted, gpd.read_file(truth, layer="panels"), scene, tile_size_px=tile_px)
    # versions 8 to 13 learnt from real imagery only and have never seen this renderer. Versions 9 and
    # 10 found its tiles (measured on its 96 px grid: recall 0.76, precision 0.73) but outlined pavement
    # edges and pool rims, not the arrays (pixel IoU 0.002). Version 11's head reads the backbone's
    # context and learnt from negatives of other places: it draws less, and on the arrays (tile recall
    # 0.52, precision 0.79, pixel IoU 0.16, area -58 %; version 12, no gate: 0.57, 0.80, 0.16, -56 %;
    # version 13, the branch CAM on sure tiles the head leaves empty: 0.62, 0.72, 0.12, -16 %;
    # docs/real-imagery.md). Version 14's outline network (real masks only) on the test towns
    # 301-303: tile precision 0.60, recall 0.57, pixel IoU 0.29. Version 7 (trained on these towns)
    # measured 0.95 / 1.0, IoU 0.74.
    assert metrics.tile_recall >= 0.45 and metrics.tile_precision >= 0.6 and metrics.pixel_iou >= 0.1
    assert predicted.crs == gpd.read_file(truth, layer="panels").crs and predicted.is_valid.all()


def test_the_demo_town_gives_the_recorded_geopackage(tmp_path):
    """The bundled model on the demo town gives the GeoPackage recorded in tests/data/demo_panels.json.gz
    (same columns, the same panels where they are, the same scores), up to float32 rounding: masks are
    thresholded maps, and another CPU sums in another order, which moves a map value by about 1e-6 of
    its scale and so may flip the pixels that lie that close to a threshold (issue 32). A change of the
    model or the pipeline's output moves far more than that. Record it again only when one is meant to."""
    import gzip
    import json
    from pathlib import Path

    import shapely
    from click.testing import CliRunner

    from solarmap.cli import main
    from solarmap.training.synth import SynthConfig, render_town, write_town

    recorded = json.loads(gzip.open(Path(__file__).parent / "data" / "demo_panels.json.gz", "rt").read())
    scene, _ = write_town(render_town(SynthConfig(size_px=1024, seed=20261121)), tmp_path)  # `solarmap demo`'s town
    out = tmp_path / "panels.gpkg"
    result = CliRunner().invoke(main, ["detect", scene, "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    frame = gpd.read_file(out, layer="panels")
    assert list(frame.columns) == recorded["columns"]
    want = gpd.GeoDataFrame(recorded["rows"], geometry=[shapely.from_wkb(bytes.fromhex(r["wkb"])) for r in recorded["rows"]],
                            crs=frame.crs)
    assert set(frame.source) == set(want.source)
    assert abs(len(frame) - len(want)) <= 1 + len(want) // 50  # a sliver at the minimum area may come or go
    got_all, want_all = shapely.union_all(frame.geometry.to_numpy()), shapely.union_all(want.geometry.to_numpy())
    assert shapely.symmetric_difference(got_all, want_all).area <= 0.01 * want_all.area
    assert frame.area_m2.sum() == pytest.approx(want.area_m2.sum(), rel=0.01)
    for _, panel in want[want.area_m2 >= 10].iterrows():  # each panel of any size is where it was, scored as it was
        overlap = frame.geometry.intersection(panel.geometry).area
        match = frame.loc[overlap.idxmax()]
        assert overlap.max() / match.geometry.union(panel.geometry).area >= 0.9, panel["id"]
        assert match["score"] == pytest.approx(panel["score"], abs=1e-3), panel["id"]
