"""Record tests/data/demo_panels.json.gz: the bundled model's GeoPackage on `solarmap demo`'s town, which
tests/test_end_to_end.py compares feature for feature. Run it only when the model or the output is meant to change.

    python scripts/record_demo_golden.py [tests/data/demo_panels.json.gz]
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import geopandas as gpd
from click.testing import CliRunner

from solarmap.cli import main
from solarmap.training.synth import SynthConfig, render_town, write_town

NUMBERS = ("area_m2", "centroid_lon", "centroid_lat", "score", "cam_peak")


def record(out_json: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        scene, _ = write_town(render_town(SynthConfig(size_px=1024, seed=20261121)), Path(tmp))  # the demo's town
        out = Path(tmp) / "panels.gpkg"
        result = CliRunner().invoke(main, ["detect", scene, "--out", str(out), "--quiet"])
        if result.exit_code != 0:
            raise SystemExit(f"detect failed: {result.output.strip()}")
        frame = gpd.read_file(out, layer="panels")
    rows = [{"id": int(row["id"]), "source": row["source"], "wkb": row.geometry.wkb_hex,
             **{column: float(row[column]) for column in NUMBERS}} for _, row in frame.iterrows()]
    with gzip.open(out_json, "wt") as fh:
        json.dump({"columns": list(frame.columns), "rows": rows}, fh)
    return len(rows)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "tests/data/demo_panels.json.gz"
    print(f"{record(target)} panels recorded in {target}")
