"""Capacity from drawn module area, measured against the Swiss register of PV plants (Bern chips).

    python scripts/capacity_register.py --model FILE [--data ../shared/data] [--json OUT]

Each Bern chip (25 m at 0.2 m, EPSG:2056, centred on a registered plant's building) is detected as
its own GeoTIFF with the model's default outline method; the plant's drawn module area is the panel
area of the installations within ``REACH_M`` of the chip centre (the building), not of neighbours at
the chip's edge. Plants that began operating after the orthophoto was flown cannot be seen: the
flight year is read off the data (the first year from which fewer than half the plants get a
polygon, ``--flown`` to give it). The kWp per m² factor is fitted (total kWp / total drawn area) on
the Bern training and validation blocks' plants; the figures are on the test blocks' plants (held
out from the classifier's training too): plants found, median absolute error per found plant, and
the aggregate error over all plants (missed ones count as zero).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely
from affine import Affine

from solarmap.geo.installations import KWP_PER_M2, group_installations
from solarmap.geo.output import write_geotiff
from solarmap.model.scorer import build_scorer
from solarmap.pipeline import DetectConfig, detect_scene
from solarmap.training.real_data import _read_rgb, load_source

REACH_M = 8.0  # installations this close to the chip centre belong to the registered building


def drawn_areas(scorer, data: Path, ids: list[str], workdir: Path, cache: Path, out: dict) -> dict[str, float]:
    """Drawn module area (m²) near the centre of each chip, added to ``out`` and saved to ``cache``
    every 250 chips (rerunning continues)."""
    config = DetectConfig.for_scorer(scorer)
    for k, chip in enumerate(ids):
        east, north = (int(v) for v in chip.split("_")[1:3])
        pixels = _read_rgb(data / "bern-pv-positives" / "chips" / f"{chip}.jpg")
        scene = write_geotiff(workdir / "chip.tif", pixels, transform=Affine(0.2, 0, east - 12.5, 0, -0.2, north + 12.5),
                              crs="EPSG:2056", overwrite=True)
        frame, _ = detect_scene(str(scene), scorer=scorer, config=config)
        area = 0.0
        if len(frame):
            installations = group_installations(frame, join_m=config.join_m)
            near = installations.geometry.distance(shapely.Point(east, north)) <= REACH_M
            area = float(installations.loc[near, "panel_area_m2"].sum())
        out[chip] = area
        if (k + 1) % 250 == 0:
            cache.write_text(json.dumps(out))
            print(f"  {k + 1}/{len(ids)} chips", flush=True)
    cache.write_text(json.dumps(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "solarmap-capacity")
    parser.add_argument("--flown", type=int, default=None, help="The orthophoto's flight year (default: read off the data).")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="Only the first N plants (a quick look).")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    register = {r["id"]: r for r in csv.DictReader(open(args.data / "bern-pv-positives" / "register.csv"))}
    split = {im.key.split(":")[1]: im.split for im in load_source("bern", args.data, gsd_m=1.0)}
    ids = sorted(register)[: args.limit]
    cache = args.workdir / f"drawn-{Path(args.model or 'bundled').name}.json"
    drawn = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [i for i in ids if i not in drawn]
    if missing:
        drawn_areas(build_scorer(args.model), args.data, missing, args.workdir, cache, drawn)
    year = {i: int(register[i]["first_operation"][:4]) for i in ids}
    by_year = {}
    for i in ids:
        by_year.setdefault(year[i], []).append(drawn[i] > 0)
    found_by_year = {y: round(float(np.mean(v)), 3) for y, v in sorted(by_year.items()) if len(v) >= 20}
    flown = args.flown or next((y for y, share in found_by_year.items() if share < 0.5 and y >= 2015), max(year.values()) + 1)
    seen = [i for i in ids if year[i] < flown]
    kwp = {i: float(register[i]["total_power_kw"]) for i in ids}
    fit = [i for i in seen if split[i] in ("train", "val")]
    test = [i for i in seen if split[i] == "test"]
    fitted = sum(kwp[i] for i in fit if drawn[i] > 0) / max(sum(drawn[i] for i in fit if drawn[i] > 0), 1e-9)

    def measure(part, factor):
        found = [i for i in part if drawn[i] > 0]
        errors = [abs(drawn[i] * factor - kwp[i]) / kwp[i] for i in found]
        total_true, total_drawn = sum(kwp[i] for i in part), sum(drawn[i] * factor for i in part)
        return {"plants": len(part), "found": round(len(found) / max(len(part), 1), 3),
                "median_abs_error": round(float(np.median(errors)), 3) if errors else None,
                "aggregate_error": round((total_drawn - total_true) / total_true, 3) if total_true else None,
                "kwp_true": round(total_true, 1), "kwp_drawn": round(total_drawn, 1)}

    result = {"model": args.model or "bundled", "flown_before": flown, "found_by_first_year": found_by_year,
              "kwp_per_m2_fitted": round(fitted, 4), "kwp_per_m2_default": KWP_PER_M2,
              "fit_part": measure(fit, fitted), "test_part_fitted": measure(test, fitted),
              "test_part_default": measure(test, KWP_PER_M2), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
