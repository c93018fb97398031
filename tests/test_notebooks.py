"""The notebooks run top to bottom (on small inputs), so they never rot."""

from pathlib import Path

import pytest

from solarmap import model as model_lib

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name, tmp_path, monkeypatch, **env):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    return notebook


def outputs(notebook):
    return "\n".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)


@pytest.mark.skipif(not model_lib.DEFAULT_MODEL_PATH.exists(), reason="needs the bundled model")
def test_detect_walkthrough_notebook_runs(tmp_path, monkeypatch):
    notebook = execute("01_detect_walkthrough.ipynb", tmp_path, monkeypatch, SOLARMAP_NOTEBOOK_SIZE_PX="320")
    text = outputs(notebook)
    assert "polygons" in text and "pixel IoU" in text


def test_1d_cam_notebook_finds_the_noisy_stretch(tmp_path, monkeypatch):
    notebook = execute("02_cam_on_a_1d_signal.ipynb", tmp_path, monkeypatch, SOLARMAP_NOTEBOOK_SIGNALS="300")
    text = outputs(notebook)
    share = float(text.split("CAM peak inside the noisy stretch for ")[1].split("%")[0]) / 100
    assert share > 0.5  # far above the 16 % a random position would get
