"""Write the real scene `solarmap demo` ships: 16 PV01 validation images (UAV, 0.1 m, Jiangsu;
Jiang et al. 2021, CC BY 4.0) side by side as one georeferenced GeoTIFF (JPEG-compressed) with
their panel masks as truth polygons.

    python scripts/make_demo_scene.py [--data ../shared/data]

Validation images, never test ones: the demo's printed evaluation may be looked at by anyone.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import rasterio

from solarmap.training.real_data import load_source, write_pv01_scenes

OUT = Path(__file__).resolve().parents[1] / "solarmap" / "cli" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data")
    args = parser.parse_args()
    names = sorted(im.key.split(":")[1] for im in load_source("pv01", args.data, gsd_m=0.3) if im.split == "val")[:16]
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ((scene, truth),) = write_pv01_scenes(args.data, names, tmp, per_side=4)
        with rasterio.open(scene) as src:
            profile = {**src.profile, "compress": "jpeg", "jpeg_quality": 90, "photometric": "ycbcr", "tiled": True,
                       "blockxsize": 256, "blockysize": 256}
            with rasterio.open(OUT / "demo_pv01.tif", "w", **profile) as dst:
                dst.write(src.read())
                dst.update_tags(SOURCE="PV01, Jiang et al. 2021, doi 10.5281/zenodo.5171712, CC BY 4.0",
                                IMAGES=",".join(names))
        shutil.copy(truth, OUT / "demo_pv01_truth.gpkg")
    for path in sorted(OUT.glob("demo_pv01*")):
        print(f"{path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
