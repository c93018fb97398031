"""QGIS itself opens solarmap's GeoPackage with the default style (skipped where PyQGIS is absent)."""

import shutil
import subprocess

import pytest

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin")


def qgis_available() -> bool:
    if not SYSTEM_PYTHON:
        return False
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not qgis_available(), reason="PyQGIS (Debian python3-qgis) is not installed")

SCRIPT = """
import os
os.environ["QT_QPA_PLATFORM"] = "offscreen"
from qgis.core import QgsApplication, QgsVectorLayer
app = QgsApplication([], False)
app.initQgis()
layer = QgsVectorLayer("{path}|layername=panels", "panels", "ogr")
renderer = layer.renderer()
print(layer.isValid(), layer.featureCount(), layer.crs().authid(), renderer.type(), renderer.classAttribute(),
      len(renderer.ranges()), flush=True)
os._exit(0)  # QGIS can crash while tearing down at interpreter exit; the answer is already out
"""


def test_qgis_opens_the_panels_layer_styled(tmp_path):
    from solarmap.training.synth import SynthConfig, render_town, write_town

    town = render_town(SynthConfig(size_px=256, seed=5, supersample=2))
    _, truth = write_town(town, tmp_path)
    run = subprocess.run([SYSTEM_PYTHON, "-c", SCRIPT.format(path=truth)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "partially supported" not in run.stderr
    valid, count, crs, renderer, attribute, ranges = run.stdout.split()[-6:]
    assert (valid, crs, renderer, attribute, ranges) == ("True", "EPSG:32611", "graduatedSymbol", "area_m2", "4")
    assert int(count) == len(town.arrays)
