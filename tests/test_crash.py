"""Crash-proof runs: ``detect`` killed with SIGKILL at every point that matters, then ``--resume``.

Each case runs the CLI in a subprocess with ``SOLARMAP_KILL_AT`` naming a point of
:mod:`solarmap.faults` (the process kills itself there: no handler, no cleanup, as on power loss or
the OOM killer), checks what the kill left (the target absent or complete, nothing but the journal
beside it), resumes, and compares the GeoPackage with an uninterrupted run's: same ids, the same
geometry (``equals_exact``, tolerance 0) and the same attributes. ``scripts/fault_table.py`` prints
the same matrix.
"""

import os
import pickle
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pytest
import shapely

from conftest import UTM_ORIGIN, write_tif
from solarmap.faults import KILL_AT

TIMEOUT_S = 300


def town(height, width, seed):
    """Grey ground with dark rectangles of many sizes, some across tile and raster edges."""
    rng = np.random.default_rng(seed)
    image = np.full((3, height, width), 150, np.uint8)
    for _ in range(40):
        r, c = rng.integers(0, height - 20), rng.integers(0, width - 20)
        h, w = rng.integers(8, 60), rng.integers(8, 60)
        image[:, r:r + h, c:c + w] = rng.integers(0, 60, 3, dtype=np.uint8)[:, None, None]
    return image


def detect_command(rasters, out, model, *extra):
    """Grad-CAM of a random network, every tile positive: many polygons of many shapes, quickly. A batch
    is a tile row (7 tiles), so a resumed run scores exactly the batches an uninterrupted one does."""
    return [sys.executable, "-m", "solarmap.cli", "detect", *map(str, rasters), "--out", str(out), "--model", model,
            "--cam-method", "gradcam", "--score-threshold", "0", "--cam-threshold", "0.8", "--min-area", "0",
            "--batch-size", "7", *extra]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random EfficientNet-Lite0 (the fastest backbone on a CPU)."""
    import torch

    from solarmap.model import ModelConfig, SolarNet, save

    torch.manual_seed(0)
    net = SolarNet(ModelConfig.for_backbone("efficientnet-lite0", branch_channels=(16, 16))).eval()
    return str(save(net, tmp_path_factory.mktemp("model") / "lite0.pt", half=True))


def run(command, kill_at=None):
    # one torch thread everywhere: dask starts its workers with OMP_NUM_THREADS=1, and a convolution
    # summed in another order by another thread count may move a Grad-CAM pixel across the threshold
    env = {**{k: v for k, v in os.environ.items() if k != KILL_AT}, "OMP_NUM_THREADS": "1"}
    if kill_at:
        env[KILL_AT] = kill_at
    # a session of its own, so that dask workers a killed client leaves behind can be stopped with it
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, stdout, stderr


def geopackage_difference(got, expected) -> str:
    """'' when ``got`` has the same features as ``expected`` (ids, exact geometry, attributes), else what differs."""
    a, b = gpd.read_file(got, layer="panels"), gpd.read_file(expected, layer="panels")
    if len(a) != len(b) or list(a.columns) != list(b.columns):
        return f"{len(a)} features / columns {list(a.columns)} vs {len(b)} / {list(b.columns)}"
    if not (a["id"].to_numpy() == b["id"].to_numpy()).all():
        return "ids differ"
    if not shapely.equals_exact(a.geometry.to_numpy(), b.geometry.to_numpy(), tolerance=0).all():
        return "geometry differs"
    attributes = [c for c in b.columns if c != "geometry"]
    return "" if a[attributes].equals(b[attributes]) else "attributes differ"


@dataclass
class Outcome:
    """What a run killed at one point left behind, and what ``--resume`` then made of it."""

    exit_code: int  # of the killed run: -9 when the kill point was reached
    left_after_kill: list  # names in the output directory
    target_after_kill: str  # "absent", or what differs from the uninterrupted output ("" if nothing)
    recorded: int  # rows (single raster) or chunks (regional) in the journal at the kill
    resume_code: int
    resume_stderr: str
    left_after_resume: list
    difference: str  # what the resumed output has that the uninterrupted one has not ('' if nothing)


def kill_then_resume(command, out, reference, kill_at) -> Outcome:
    """Run ``command`` (writing ``out``) killed at ``kill_at``, then again with ``--resume``."""
    code, _, _ = run(command, kill_at=kill_at)
    left = sorted(p.name for p in out.parent.iterdir())
    target = geopackage_difference(out, reference) if out.exists() else "absent"
    journal = out.with_name(f".{out.name}.partial")
    recorded = len(list(journal.glob("chunk-*.pkl")))
    if (journal / "state.pkl").exists():
        recorded = pickle.loads((journal / "state.pkl").read_bytes()).rows_done
    resume_code, _, stderr = run(command + ["--resume"])
    return Outcome(code, left, target, recorded, resume_code, stderr, sorted(p.name for p in out.parent.iterdir()),
                   geopackage_difference(out, reference) if out.exists() else "no output")


def assert_recovered(outcome, out):
    assert outcome.exit_code == -signal.SIGKILL  # the kill point was reached
    # the target is absent or complete; beside it there is nothing but the journal
    assert outcome.target_after_kill in ("absent", "")
    assert [n for n in outcome.left_after_kill if n != out.name] == [f".{out.name}.partial"]
    assert outcome.resume_code == 0, outcome.resume_stderr
    assert outcome.difference == ""
    assert outcome.left_after_resume == [out.name]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """One raster of 7 x 7 tiles, and the output of an uninterrupted run over it."""
    base = tmp_path_factory.mktemp("scene")
    from affine import Affine

    raster = write_tif(base / "town.tif", town(560, 560, seed=3), transform=Affine(0.3, 0, UTM_ORIGIN[0], 0, -0.3,
                                                                                   UTM_ORIGIN[1]))
    return base, raster


@pytest.fixture(scope="module")
def reference(scene, model):
    base, raster = scene
    out = base / "reference.gpkg"
    code, _, stderr = run(detect_command([raster], out, model))
    assert code == 0, stderr
    assert gpd.read_file(out, layer="panels").shape[0] > 10
    return out


# kill point (and pass), where that is in the run
SINGLE_CASES = [
    ("batch:6", "mid-batch: the 6th batch scored, not yet made into polygons"),
    ("journal:3", "writing the 3rd row's record (its temporary file written, not renamed)"),
    ("gpkg-append:3", "features appended to the work GeoPackage, before the record that covers them"),
    ("commit", "the work GeoPackage complete (metadata, style), not yet renamed"),
    ("published", "the output renamed into place, the journal not yet removed"),
]
TILES_READ = re.compile(r"tiles: (\d+) read \((\d+) done before the interruption, (\d+) now\)")


@pytest.mark.parametrize("kill_at", [c[0] for c in SINGLE_CASES])
def test_a_single_raster_run_killed_anywhere_resumes_to_the_same_geopackage(tmp_path, scene, reference,
                                                                            model, kill_at):
    _, raster = scene
    out = tmp_path / "p.gpkg"
    outcome = kill_then_resume(detect_command([raster], out, model, "--checkpoint-every", "0"), out, reference,
                               kill_at)
    assert_recovered(outcome, out)
    assert outcome.target_after_kill == ("" if kill_at == "published" else "absent")
    total, before, now = map(int, TILES_READ.search(outcome.resume_stderr).groups())
    assert total == 49 and before + now == total
    if kill_at == "published":
        assert now == 0  # finished before the kill: nothing is read again
    else:
        assert before == outcome.recorded * 7 > 0  # every recorded row is skipped, only the rest is read


REGIONAL_CASES = [
    ("chunk:3", "the 3rd chunk recorded"),
    ("journal:4", "writing the 4th chunk's record"),
    ("commit", "the merged GeoPackage complete in the journal, not yet renamed"),
    ("published", "the output renamed into place, the journal not yet removed"),
]
CHUNKS = re.compile(r"chunks: (\d+) \((\d+) resumed\)")


@pytest.fixture(scope="module")
def region(tmp_path_factory, model):
    """Two rasters that meet edge to edge (3 tile rows each), and an uninterrupted regional run."""
    from affine import Affine

    base = tmp_path_factory.mktemp("region")
    image = town(480, 560, seed=4)
    x0, y0 = UTM_ORIGIN
    rasters = [write_tif(base / "north.tif", image[:, :240], transform=Affine(0.3, 0, x0, 0, -0.3, y0)),
               write_tif(base / "south.tif", image[:, 240:], transform=Affine(0.3, 0, x0, 0, -0.3, y0 - 72))]
    out = base / "reference.gpkg"
    code, _, stderr = run(detect_command(rasters, out, model, "--rows-per-chunk", "1"))
    assert code == 0, stderr
    assert "rasters: 2, chunks: 6" in stderr  # two rasters named on the command line: both are read
    return rasters, out


@pytest.mark.parametrize("kill_at", [c[0] for c in REGIONAL_CASES])
def test_a_regional_run_killed_anywhere_resumes_to_the_same_geopackage(tmp_path, region, model, kill_at):
    rasters, reference = region
    out = tmp_path / "r.gpkg"
    outcome = kill_then_resume(detect_command(rasters, out, model, "--rows-per-chunk", "1"), out, reference, kill_at)
    assert_recovered(outcome, out)
    assert outcome.target_after_kill == ("" if kill_at == "published" else "absent")
    done, resumed = map(int, CHUNKS.search(outcome.resume_stderr).groups())
    assert done == 6 and resumed == (6 if kill_at in ("commit", "published") else outcome.recorded) > 0


def test_a_regional_run_on_local_dask_killed_mid_run_resumes_to_the_same_geopackage(tmp_path, region, model):
    pytest.importorskip("distributed")
    rasters, reference = region
    out = tmp_path / "r.gpkg"
    command = detect_command(rasters, out, model, "--rows-per-chunk", "1", "--scheduler", "local:1")
    outcome = kill_then_resume(command, out, reference, "chunk:4")  # the client; run() stops its orphaned workers
    assert_recovered(outcome, out)
    done, resumed = map(int, CHUNKS.search(outcome.resume_stderr).groups())
    assert done == 6 and resumed == outcome.recorded == 4
