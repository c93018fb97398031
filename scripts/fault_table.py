"""Print the table of bad-input cases and the exact message `solarmap` gives for each (issue 6), then
the kill matrix (issue 18): `detect` killed with SIGKILL at each point of solarmap.faults, what that
left behind, and what `--resume` made of it (the cases of tests/test_crash.py).

    python scripts/fault_table.py            # both tables; runs `solarmap` in a temporary directory
    python scripts/fault_table.py --kills    # only the kill matrix
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin

ROOT = Path(__file__).resolve().parents[1]
os.chdir(tempfile.mkdtemp(prefix="solarmap-faults-"))
def bad_input_table():
    T = from_origin(500000, 4000000, 0.3, 0.3)


    def tif(name, arr, crs="EPSG:32611", transform=T, **kw):
        with rasterio.open(name, "w", driver="GTiff", height=arr.shape[1], width=arr.shape[2], count=arr.shape[0],
                           dtype=arr.dtype, crs=crs, transform=transform, **kw) as d:
            d.write(arr)


    rng = np.random.default_rng(0)
    tif("ok.tif", rng.integers(0, 255, (3, 300, 300), dtype=np.uint8))
    tif("nocrs.tif", rng.integers(0, 255, (3, 300, 300), dtype=np.uint8), crs=None)
    with rasterio.open("notransform.tif", "w", driver="GTiff", height=300, width=300, count=3, dtype="uint8") as d:
        d.write(rng.integers(0, 255, (3, 300, 300), dtype=np.uint8))
    tif("one.tif", rng.integers(0, 255, (1, 300, 300), dtype=np.uint8))
    tif("two.tif", rng.integers(0, 255, (2, 300, 300), dtype=np.uint8))
    tif("u16.tif", rng.integers(0, 4095, (3, 300, 300), dtype=np.uint16))
    tif("f32.tif", rng.random((3, 300, 300), dtype=np.float32))
    tif("small.tif", rng.integers(0, 255, (3, 40, 30), dtype=np.uint8))
    tif("nodata.tif", np.zeros((3, 300, 300), dtype=np.uint8), nodata=0)
    Path("notes.txt").write_text("not a raster\n")
    Path("empty.tif").write_bytes(b"")
    data = Path("ok.tif").read_bytes()
    Path("truncated.tif").write_bytes(data[: len(data) // 3])
    Path("norasters").mkdir()
    (Path("norasters") / "readme.txt").write_text("x")
    Path("existing.gpkg").write_bytes(b"previous")
    Path("corrupt.pt").write_bytes(b"\x00" * 1000)
    torch.save({"architecture": "resnet50", "format": 1, "state_dict": {}}, "foreign.pt")
    cases = [
     ("input path missing", "detect missing.tif --out o.gpkg"),
     ("directory with no rasters", "detect norasters --out o.gpkg"),
     ("text file", "detect notes.txt --out o.gpkg"),
     ("empty file", "detect empty.tif --out o.gpkg"),
     ("truncated GeoTIFF", "detect truncated.tif --out o.gpkg"),
     ("no CRS", "detect nocrs.tif --out o.gpkg"),
     ("no geotransform", "detect notransform.tif --out o.gpkg"),
     ("1-band raster", "detect one.tif --out o.gpkg"),
     ("2-band raster", "detect two.tif --out o.gpkg"),
     ("16-bit raster (works, scaled)", "detect u16.tif --out u16.gpkg --quiet"),
     ("float raster (works)", "detect f32.tif --out f32.gpkg --quiet"),
     ("raster smaller than a tile (works)", "detect small.tif --out small.gpkg --quiet"),
     ("all-nodata raster (empty GeoPackage)", "detect nodata.tif --out nodata.gpkg --quiet"),
     ("output directory missing", "detect ok.tif --out nodir/o.gpkg"),
     ("existing output, no --overwrite", "detect ok.tif --out existing.gpkg"),
     ("output not .gpkg", "detect ok.tif --out o.shp"),
     ("heatmap not .tif", "detect ok.tif --out o.gpkg --heatmap h.png"),
     ("model file missing", "detect ok.tif --out o.gpkg --model nomodel.pt"),
     ("model file corrupt", "detect ok.tif --out o.gpkg --model corrupt.pt"),
     ("checkpoint of another architecture", "detect ok.tif --out o.gpkg --model foreign.pt"),
     ("tile size the model cannot take", "detect ok.tif --out o.gpkg --tile-size 50"),
     ("--device cuda without a GPU", "detect ok.tif --out o.gpkg --device cuda"),
     ("--device nonsense", "detect ok.tif --out o.gpkg --device tpu"),
     ("tile size zero", "detect ok.tif --out o.gpkg --tile-size 0"),
     ("tile size negative", "detect ok.tif --out o.gpkg --tile-size -5"),
     ("no CRS, given with --src-crs (works)", "detect nocrs.tif --src-crs EPSG:32611 --out nocrs.gpkg --quiet"),
     ("batch size zero", "detect ok.tif --out o.gpkg --batch-size 0"),
     ("overlap >= tile size", "detect ok.tif --out o.gpkg --tile-size 101 --overlap 101"),
     ("CAM threshold > 1", "detect ok.tif --out o.gpkg --cam-threshold 1.5"),
     ("score threshold < 0", "detect ok.tif --out o.gpkg --score-threshold -0.1"),
     ("evaluate: truth missing", "evaluate existing.gpkg --truth none.gpkg --scene ok.tif"),
     ("classify: not an image", "classify notes.txt --gsd 0.3 --out s.csv"),
    ]
    print("| case | command | exit | message (stderr, last line) |\n| --- | --- | --- | --- |")
    for name, cmd in cases:
        r = subprocess.run(["solarmap", *cmd.split()], capture_output=True, text=True, timeout=300)
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
        msg = lines[-1] if lines else "(none)"
        tb = " TRACEBACK!" if "Traceback" in r.stderr else ""
        print(f"| {name} | `solarmap {cmd}` | {r.returncode} | {msg.replace('|', '/')}{tb} |")
    print("existing.gpkg untouched:", Path("existing.gpkg").read_bytes() == b"previous",
          "; o.gpkg exists:", Path("o.gpkg").exists())


def kill_matrix():
    """The kill-and-resume cases of tests/test_crash.py, one row each."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_crash as crash
    from affine import Affine

    from solarmap.model import ModelConfig, SolarNet, save

    torch.manual_seed(0)
    model = str(save(SolarNet(ModelConfig.for_backbone("efficientnet-lite0", branch_channels=(16, 16))).eval(),
                     Path("lite0.pt").resolve(), half=True))
    base = Path("kills").resolve()
    base.mkdir()
    x0, y0 = crash.UTM_ORIGIN
    scene = crash.write_tif(base / "town.tif", crash.town(560, 560, seed=3), transform=Affine(0.3, 0, x0, 0, -0.3, y0))
    image = crash.town(480, 560, seed=4)
    region = [crash.write_tif(base / "north.tif", image[:, :240], transform=Affine(0.3, 0, x0, 0, -0.3, y0)),
              crash.write_tif(base / "south.tif", image[:, 240:], transform=Affine(0.3, 0, x0, 0, -0.3, y0 - 72))]
    runs = [("single raster", [scene], ["--checkpoint-every", "0"], crash.SINGLE_CASES),
            ("2 rasters", region, ["--rows-per-chunk", "1"], crash.REGIONAL_CASES),
            ("2 rasters, dask local:1", region, ["--rows-per-chunk", "1", "--scheduler", "local:1"],
             [("chunk:4", "the 4th chunk recorded (the client killed; its workers stopped after)")])]
    print("\n| run | killed at | where | left after the kill | recorded | resume | resumed output |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, rasters, extra, cases in runs:
        reference = base / f"{len(rasters)}-reference.gpkg"
        if not reference.exists():
            code, _, err = crash.run(crash.detect_command(rasters, reference, model, *extra[:2]))
            assert code == 0, err
        for kill_at, where in cases:
            case = base / f"{name.replace(' ', '_').replace(',', '')}-{kill_at.replace(':', '_')}"
            case.mkdir()
            out = case / "out.gpkg"
            o = crash.kill_then_resume(crash.detect_command(rasters, out, model, *extra), out, reference, kill_at)
            killed = "SIGKILL" if o.exit_code == -9 else f"exit {o.exit_code} (point not reached)"
            target = {"absent": "no output", "": "complete output"}.get(o.target_after_kill, "PARTIAL OUTPUT")
            others = [n for n in o.left_after_kill if n != out.name]
            unit = "rows" if name == "single raster" else "chunks"
            counts = (crash.TILES_READ if unit == "rows" else crash.CHUNKS).search(o.resume_stderr)
            resumed = (f"exit {o.resume_code}; " + (f"tiles {counts[2]} skipped, {counts[3]} read" if unit == "rows"
                                                     else f"{counts[2]} of {counts[1]} chunks resumed")
                       if counts else f"exit {o.resume_code}")
            result = "identical (ids, exact geometry, attributes)" if o.difference == "" else o.difference.upper()
            left = f"{killed}; {target} + {', '.join(others) or 'nothing'}"
            if o.left_after_resume != [out.name]:
                result += f"; LEFT: {o.left_after_resume}"
            print(f"| {name} | `{kill_at}` | {where} | {left} | {o.recorded} {unit} | {resumed} | {result} |")


if __name__ == "__main__":
    if "--kills" not in sys.argv:
        bad_input_table()
    kill_matrix()
