import numpy as np
import pytest
from click.testing import CliRunner

from solarmap.cli import main


@pytest.fixture
def runner():
    return CliRunner()


def test_help_lists_commands(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("synth", "demo", "info"):
        assert command in result.output


def test_synth_writes_scene_and_refuses_to_overwrite(runner, tmp_path):
    out = tmp_path / "town"
    args = ["synth", str(out), "--size-px", "128", "--seed", "5"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "scene.tif").exists() and (out / "truth.gpkg").exists()
    before = (out / "scene.tif").read_bytes()
    again = runner.invoke(main, args + ["--seed", "6"])
    assert again.exit_code == 1
    assert "use --overwrite" in again.output and "Traceback" not in again.output
    assert (out / "scene.tif").read_bytes() == before
    assert runner.invoke(main, args + ["--overwrite"]).exit_code == 0


def test_synth_rejects_bad_sizes(runner, tmp_path):
    result = runner.invoke(main, ["synth", str(tmp_path / "x"), "--size-px", "0"])
    assert result.exit_code == 2 and "must be positive" in result.output


def test_info_describes_tiling(runner, geotiff):
    path = geotiff(np.zeros((3, 700, 500), np.uint8) + 5)
    result = runner.invoke(main, ["info", path, "--tile-size", "256", "--overlap", "32"])
    assert result.exit_code == 0, result.output
    assert "EPSG:32611" in result.output
    assert "3 x 3 = 9 of 256 px" in result.output


def test_info_on_missing_raster_is_one_line_error(runner, tmp_path):
    result = runner.invoke(main, ["info", str(tmp_path / "missing.tif")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"solarmap: error: input raster not found: {tmp_path / 'missing.tif'}"]


def test_info_with_bad_overlap_is_one_line_error(runner, geotiff):
    path = geotiff(np.zeros((3, 20, 20), np.uint8))
    result = runner.invoke(main, ["info", path, "--tile-size", "16", "--overlap", "16"])
    assert result.exit_code == 1
    assert "must be smaller than the tile size" in result.output


def test_demo_generates_a_town(runner, tmp_path):
    result = runner.invoke(main, ["demo", "--out-dir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "panel arrays" in result.output
    assert (tmp_path / "demo" / "scene.tif").exists()
