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


def run_detect(raster, out, *args):
    return CliRunner().invoke(main, ["detect", str(raster), "--out", str(out), *args])


def assert_clean_failure(result, out, message):
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not os.path.exists(out)


def test_truncated_geotiff(tmp_path, tiny_model_file):
    good = write_tif(tmp_path / "good.tif", np.random.default_rng(0).integers(0, 255, (3, 300, 300), dtype=np.uint8),
                     compress="deflate", tiled=True, blockxsize=64, blockysize=64)
    data = open(good, "rb").read()
    broken = tmp_path / "broken.tif"
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "p.gpkg"
    result = run_detect(broken, out, "--model", tiny_model_file, "--cam-method", "gap")
    assert_clean_failure(result, out, "broken.tif")


@pytest.mark.parametrize("content", [b"", b"hello, not a raster\n"])
def test_empty_or_text_file(tmp_path, tiny_model_file, content):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(content)
    out = tmp_path / "p.gpkg"
    assert_clean_failure(run_detect(bad, out, "--model", tiny_model_file), out, "cannot read")


def test_directory_without_rasters(tmp_path, tiny_model_file):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "p.gpkg"
    assert_clean_failure(run_detect(tmp_path / "empty", out, "--model", tiny_model_file), out, "no rasters")


def _raster(tmp_path, kind):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (3, 120, 120), dtype=np.uint8)
    if kind == "no-crs":
        return write_tif(tmp_path / "nocrs.tif", rgb, crs=None)
    if kind == "no-transform":
        from affine import Affine

        return write_tif(tmp_path / "plain.tif", rgb, crs=None, transform=Affine.identity())
    if kind in ("1-band", "2-band"):
        return write_tif(tmp_path / f"{kind}.tif", rgb[: int(kind[0])])
    return write_tif(tmp_path / "ok.tif", rgb)


@pytest.mark.parametrize("kind, args, message", [
    ("missing", [], "input raster not found"),
    ("no-crs", [], "has no CRS; pass the one it is in with --src-crs"),
    ("no-transform", [], "is not georeferenced (no geotransform)"),
    ("1-band", [], "has 1 band(s) but band 3 is needed"),
    ("2-band", [], "has 2 band(s) but band 3 is needed"),
    ("ok", ["--src-crs", "EPSG:99999999"], "not a CRS"),
    ("ok", ["--model", "{tmp}/none.pt"], "model file not found"),
    ("ok", ["--model", "{tmp}/corrupt.pt"], "not a solarmap checkpoint or corrupt"),
    ("ok", ["--model", "{tmp}/foreign.pt"], "is not a solarmap model"),
    ("ok", ["--tile-size", "0"], "tile size must be a positive number"),
    ("ok", ["--tile-size", "-5"], "tile size must be a positive number"),
    ("ok", ["--cam-threshold", "1.5"], "must be between 0 and 1"),
    ("ok", ["--score-threshold", "-0.1"], "must be between 0 and 1"),
    ("ok", ["--device", "tpu"], "unknown device"),
    ("ok", ["--heatmap", "{tmp}/heat.png"], "must end in .tif or .tiff (solarmap writes the heatmap GeoTIFF there)"),
])
def test_bad_input_is_one_line_and_leaves_no_output(tmp_path, tiny_model_file, kind, args, message):
    import torch

    (tmp_path / "corrupt.pt").write_bytes(b"\x00" * 512)
    torch.save({"architecture": "resnet50", "format": 1, "state_dict": {}}, tmp_path / "foreign.pt")
    raster = tmp_path / "missing.tif" if kind == "missing" else _raster(tmp_path, kind)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model" not in args:
        args += ["--model", tiny_model_file, "--cam-method", "gap"]
    out = tmp_path / "p.gpkg"
    assert_clean_failure(run_detect(raster, out, *args), out, message)


@pytest.mark.parametrize("out_name, message", [
    ("nodir/p.gpkg", "output directory does not exist"),
    ("p.shp", "must end in .gpkg"),
])
def test_bad_output_paths_through_the_cli(tmp_path, tiny_model_file, out_name, message):
    raster = _raster(tmp_path, "ok")
    assert_clean_failure(run_detect(raster, tmp_path / out_name, "--model", tiny_model_file), tmp_path / out_name, message)


def test_existing_output_is_kept_without_overwrite(tmp_path, tiny_model_file):
    out = tmp_path / "p.gpkg"
    out.write_bytes(b"previous result")
    result = run_detect(_raster(tmp_path, "ok"), out, "--model", tiny_model_file)
    assert result.exit_code == 1 and "use --overwrite" in result.output and "Traceback" not in result.output
    assert out.read_bytes() == b"previous result"


def test_src_crs_georeferences_a_raster_without_one(tmp_path, tiny_model_file):
    import geopandas as gpd

    raster = write_tif(tmp_path / "nocrs.tif", (rectangle_raster(120, 120, (30, 30, 60, 70)) * 200).astype(np.uint8),
                       crs=None)
    out = tmp_path / "p.gpkg"
    result = run_detect(raster, out, "--model", tiny_model_file, "--cam-method", "gap", "--score-threshold", "0",
                        "--src-crs", "EPSG:32611", "--quiet")
    assert result.exit_code == 0, result.output
    assert gpd.read_file(out).crs.to_epsg() == 32611


def test_16_bit_and_float_rasters_run_and_all_nodata_gives_an_empty_geopackage(tmp_path, tiny_model_file):
    """Scaling itself is checked pixel by pixel in test_io; here: the CLI accepts them end to end."""
    import geopandas as gpd

    unit = rectangle_raster(120, 120, (30, 30, 60, 70))  # 0 / 1
    versions = {"u8": (unit * 255).astype(np.uint8), "u16": (unit * 4000).astype(np.uint16),
                "f32": unit.astype(np.float32)}
    frames = {}
    for name, array in versions.items():
        out = tmp_path / f"{name}.gpkg"
        result = run_detect(write_tif(tmp_path / f"{name}.tif", array), out, "--model", tiny_model_file,
                            "--cam-method", "gap", "--score-threshold", "0", "--cam-threshold", "0.2", "--quiet")
        assert result.exit_code == 0, result.output
        frames[name] = gpd.read_file(out)
    for name in ("u16", "f32"):  # same pixels after scaling -> the same result
        assert len(frames[name]) == len(frames["u8"])
    out = tmp_path / "nodata.gpkg"
    result = run_detect(write_tif(tmp_path / "nodata.tif", np.zeros((3, 120, 120), np.uint8), nodata=0), out,
                        "--model", tiny_model_file, "--cam-method", "gap", "--quiet")
    assert result.exit_code == 0, result.output
    assert len(gpd.read_file(out)) == 0


def test_tile_size_below_inception_minimum(tmp_path, tiny_model_file):
    raster = write_tif(tmp_path / "r.tif", np.full((3, 100, 100), 90, np.uint8))
    out = tmp_path / "p.gpkg"
    result = run_detect(raster, out, "--model", tiny_model_file, "--tile-size", "50", "--overlap", "0", "--cam-method", "gap")
    assert_clean_failure(result, out, "too small for Inception-v3")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_leaves_no_output_and_resume_completes(tmp_path, tiny_model_file, sig):
    raster = write_tif(tmp_path / "big.tif", (rectangle_raster(900, 900, (100, 100, 300, 300)) * 200).astype(np.uint8))
    out = tmp_path / "p.gpkg"
    args = [sys.executable, "-m", "solarmap.cli", "detect", raster, "--out", str(out), "--model", tiny_model_file,
            "--cam-method", "gap", "--score-threshold", "0", "--gsd", "0.5", "--batch-size", "4", "--quiet"]
    # a shell that backgrounds the test run (nohup, CI runners) may leave SIGINT ignored; a user's
    # terminal does not, so the child starts with the default disposition (Python then installs its own)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = tmp_path / ".p.gpkg.partial" / "state.pkl"
    deadline = time.monotonic() + 120
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists()
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.exists() and not (tmp_path / ".p.gpkg.partial").exists()


def test_unwritable_output_directory_is_refused_before_any_work(tmp_path, tiny_model_file):
    """A directory no one can write in, root included (CI runs as root)."""
    out = "/proc/p.gpkg"
    assert_clean_failure(run_detect(_raster(tmp_path, "ok"), out, "--model", tiny_model_file), out,
                         "output directory is not writable: /proc")


def test_disk_full_during_export_keeps_the_previous_output(tmp_path, tiny_model_file, monkeypatch):
    out = tmp_path / "p.gpkg"
    out.write_bytes(b"previous result")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("solarmap.geo.output.add_layer_style", disk_full)  # while the file is being finished
    result = run_detect(_raster(tmp_path, "ok"), out, "--model", tiny_model_file, "--cam-method", "gap", "--overwrite",
                        "--quiet")
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".p.gpkg.partial")) == ["ok.tif", "p.gpkg"]
