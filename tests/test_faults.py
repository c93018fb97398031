"""Bad input and faults through the CLI: one-line errors, non-zero exits, nothing at the output path."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import rectangle_raster, write_tif
from solarmap.cli import main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from solarmap import model as M

    torch.manual_seed(0)
    return str(M.save(M.SolarNet(M.ModelConfig.tiny()), tmp_path_factory.mktemp("m") / "tiny.pt"))


def run_detect(raster, out, *args):
    return CliRunner().invoke(main, ["detect", str(raster), "--out", str(out), *args])


def assert_clean_failure(result, out, message):
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_truncated_geotiff(tmp_path, tiny_model):
    good = write_tif(tmp_path / "good.tif", np.random.default_rng(0).integers(0, 255, (3, 300, 300), dtype=np.uint8),
                     compress="deflate", tiled=True, blockxsize=64, blockysize=64)
    data = open(good, "rb").read()
    broken = tmp_path / "broken.tif"
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "p.gpkg"
    result = run_detect(broken, out, "--model", tiny_model, "--cam-method", "gap")
    assert_clean_failure(result, out, "broken.tif")


@pytest.mark.parametrize("content", [b"", b"hello, not a raster\n"])
def test_empty_or_text_file(tmp_path, tiny_model, content):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(content)
    out = tmp_path / "p.gpkg"
    assert_clean_failure(run_detect(bad, out, "--model", tiny_model), out, "cannot read")


def test_directory_without_rasters(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "p.gpkg"
    assert_clean_failure(run_detect(tmp_path / "empty", out, "--model", tiny_model), out, "is a directory")


def test_tile_size_below_inception_minimum(tmp_path, tiny_model):
    raster = write_tif(tmp_path / "r.tif", np.full((3, 100, 100), 90, np.uint8))
    out = tmp_path / "p.gpkg"
    result = run_detect(raster, out, "--model", tiny_model, "--tile-size", "50", "--overlap", "0", "--cam-method", "gap")
    assert_clean_failure(result, out, "too small for Inception-v3")


def test_sigterm_leaves_no_output_and_resume_completes(tmp_path, tiny_model):
    raster = write_tif(tmp_path / "big.tif", (rectangle_raster(900, 900, (100, 100, 300, 300)) * 200).astype(np.uint8))
    out = tmp_path / "p.gpkg"
    args = [sys.executable, "-m", "solarmap.cli", "detect", raster, "--out", str(out), "--model", tiny_model,
            "--cam-method", "gap", "--score-threshold", "0", "--gsd", "0.5", "--batch-size", "4", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / ".p.gpkg.partial" / "state.pkl"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists()
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.exists() and not (tmp_path / ".p.gpkg.partial").exists()
