"""Print the table of bad-input cases and the exact message `solarmap` gives for each (issue 6).

    python scripts/fault_table.py        # runs the installed `solarmap` in a temporary directory
"""

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin

os.chdir(tempfile.mkdtemp(prefix="solarmap-faults-"))
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
