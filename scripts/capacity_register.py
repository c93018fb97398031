"""Capacity from drawn module area, measured against the Swiss register of PV plants (Bern chips).

    python scripts/capacity_register.py --model FILE [--data ../shared/data] [--json OUT]
        [--[no-]cam-fallback] [--cam-fallback-min-score S]

Each Bern chip (25 m at 0.2 m, EPSG:2056, centred on a registered plant's building) is detected as
its own GeoTIFF with the model's default outline method and its installations kept as (distance to
the centre, panel area). Which of them are the registered plant's is a rule (``ATTRIBUTION``: all
within 8 m, 4 m or 2 m of the centre, or the nearest one), chosen on the training blocks' plants
(lowest median error). Plants that began operating after the orthophoto was flown cannot be seen:
the flight year is read off the data (the first year whose plants get a polygon within 8 m markedly
less often than those of the years before, ``flight_year``; ``--flown`` to give it). The kWp per m²
factor is fitted (total kWp / total drawn area) on the training and validation blocks' plants;
figures per part (the test blocks are held out from the classifier's training too): plants found,
median absolute error per found plant, and the aggregate error over all plants (missed ones count as
zero).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import shapely
from affine import Affine

from solarmap.geo.installations import KWP_PER_M2
from solarmap.geo.output import write_geotiff
from solarmap.model.scorer import build_scorer
from solarmap.pipeline import DetectConfig, detect_scene
from solarmap.pipeline.footprints import installations_with_footprints
from solarmap.training.real_data import _read_rgb, load_source

# Which drawn installations are the registered plant's: each candidate rule gives a plant's drawn
# module area from its chip's installations as (distance to the chip centre in m, panel area in m²).
# The rule is chosen on the training blocks' plants (lowest median error, each with its own factor).
ATTRIBUTION: dict[str, Callable[[list], float]] = {
    "within 8 m": lambda found: sum(area for distance, area in found if distance <= 8.0),
    "within 4 m": lambda found: sum(area for distance, area in found if distance <= 4.0),
    "within 2 m": lambda found: sum(area for distance, area in found if distance <= 2.0),
    "nearest within 8 m": lambda found: min(found)[1] if found and min(found)[0] <= 8.0 else 0.0,
}


def drawn_installations(scorer, data: Path, ids: list[str], workdir: Path, cache: Path, out: dict) -> dict[str, list]:
    """Each chip's installations as [distance to the chip centre (m), panel area (m²)], added to
    ``out`` and saved to ``cache`` every 250 chips (rerunning continues)."""
    config = DetectConfig.for_scorer(scorer)
    for k, chip in enumerate(ids):
        east, north = (int(v) for v in chip.split("_")[1:3])
        pixels = _read_rgb(data / "bern-pv-positives" / "chips" / f"{chip}.jpg")
        scene = write_geotiff(workdir / "chip.tif", pixels, transform=Affine(0.2, 0, east - 12.5, 0, -0.2, north + 12.5),
                              crs="EPSG:2056", overwrite=True)
        frame, _ = detect_scene(str(scene), scorer=scorer, config=config)
        found = []
        if len(frame):
            installations = installations_with_footprints(frame, sources=[(scene.name, scene)], scorer=scorer,
                                                          config=config)
            distance = installations.geometry.distance(shapely.Point(east, north)).to_numpy()
            found = [[round(float(d), 3), round(float(a), 3)]
                     for d, a in zip(distance, installations["panel_area_m2"].to_numpy())]
        out[chip] = found
        if (k + 1) % 250 == 0:
            cache.write_text(json.dumps(out))
            print(f"  {k + 1}/{len(ids)} chips", flush=True)
    cache.write_text(json.dumps(out))
    return out


def measure(part: list[str], drawn: dict[str, float], kwp: dict[str, float], factor: float) -> dict:
    """Plants found, median absolute error per found plant, aggregate error (missed plants count as zero)."""
    found = [i for i in part if drawn[i] > 0]
    errors = [abs(drawn[i] * factor - kwp[i]) / kwp[i] for i in found]
    total_true, total_drawn = sum(kwp[i] for i in part), sum(drawn[i] * factor for i in part)
    return {"plants": len(part), "found": round(len(found) / max(len(part), 1), 3),
            "median_abs_error": round(float(np.median(errors)), 3) if errors else None,
            "aggregate_error": round((total_drawn - total_true) / total_true, 3) if total_true else None,
            "kwp_true": round(total_true, 1), "kwp_drawn": round(total_drawn, 1)}


def fit_factor(part: list[str], drawn: dict[str, float], kwp: dict[str, float]) -> float:
    """kWp per m² of drawn module area: total registered kWp / total drawn area over the found plants."""
    return sum(kwp[i] for i in part if drawn[i] > 0) / max(sum(drawn[i] for i in part if drawn[i] > 0), 1e-9)


def flight_year(found_by_year: dict[int, float], after_all: int, drop: float = 0.15) -> int:
    """The first year (2015 on) whose plants get a polygon within 8 m at least ``drop`` less often than
    the median of the years before: plants built after the flight show no panels on their chip.

    A drop, not a level: with the CAM fallback, chips of plants built after the flight get polygons
    too (neighbours' panels, roofs), so their share stays above a half."""
    years = sorted(found_by_year)
    for k, year in enumerate(years):
        if year >= 2015 and found_by_year[year] < float(np.median([found_by_year[y] for y in years[:k]])) - drop:
            return year
    return after_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared/data")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "solarmap-capacity")
    parser.add_argument("--flown", type=int, default=None, help="The orthophoto's flight year (default: read off the data).")
    parser.add_argument("--rule", choices=list(ATTRIBUTION), default=None,
                        help="Attribution rule (default: chosen on the training blocks' plants).")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="Only the first N plants (a quick look).")
    parser.add_argument("--cam-fallback", action=argparse.BooleanOptionalAction, default=None,
                        help="As detect's --[no-]cam-fallback (default: the model's).")
    parser.add_argument("--cam-fallback-min-score", type=float, default=None, metavar="S",
                        help="As detect's --cam-fallback-min-score (default: the model's).")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    register = {r["id"]: r for r in csv.DictReader(open(args.data / "bern-pv-positives" / "register.csv"))}
    split = {im.key.split(":")[1]: im.split for im in load_source("bern", args.data, gsd_m=1.0)}
    ids = sorted(register)[: args.limit]
    scorer = build_scorer(args.model, cam_fallback=args.cam_fallback,
                          cam_fallback_min_score=args.cam_fallback_min_score)
    variant = f"-fallback{scorer.cam_fallback_min_score:g}" if scorer.cam_fallback else ""
    cache = args.workdir / f"installations-{Path(args.model or 'bundled').name}-footprints{variant}.json"
    chips = json.loads(cache.read_text()) if cache.exists() else {}
    missing = [i for i in ids if i not in chips]
    if missing:
        drawn_installations(scorer, args.data, missing, args.workdir, cache, chips)
    year = {i: int(register[i]["first_operation"][:4]) for i in ids}
    kwp = {i: float(register[i]["total_power_kw"]) for i in ids}
    any_drawn = {i: ATTRIBUTION["within 8 m"](chips[i]) for i in ids}
    by_year = {}
    for i in ids:
        by_year.setdefault(year[i], []).append(any_drawn[i] > 0)
    found_by_year = {y: round(float(np.mean(v)), 3) for y, v in sorted(by_year.items()) if len(v) >= 20}
    flown = args.flown or flight_year(found_by_year, after_all=max(year.values()) + 1)
    seen = [i for i in ids if year[i] < flown]
    part = {name: [i for i in seen if split[i] == name] for name in ("train", "val", "test")}
    rules = {}
    for name, attribute in ATTRIBUTION.items():
        drawn = {i: attribute(chips[i]) for i in ids}
        rules[name] = measure(part["train"], drawn, kwp, fit_factor(part["train"], drawn, kwp))
    chosen = args.rule or min(rules, key=lambda n: (round(rules[n]["median_abs_error"], 2), -rules[n]["found"]))
    drawn = {i: ATTRIBUTION[chosen](chips[i]) for i in ids}
    fitted = fit_factor(part["train"] + part["val"], drawn, kwp)
    result = {"model": args.model or "bundled", "cam_fallback": scorer.cam_fallback,
              "cam_fallback_min_score": scorer.cam_fallback_min_score if scorer.cam_fallback else None, "flown_before": flown,
              "found_by_first_year": found_by_year, "rules_on_training_blocks": rules, "rule": chosen,
              "kwp_per_m2_fitted": round(fitted, 4), "kwp_per_m2_default": KWP_PER_M2,
              "train_part": measure(part["train"], drawn, kwp, fitted), "val_part": measure(part["val"], drawn, kwp, fitted),
              "test_part_fitted": measure(part["test"], drawn, kwp, fitted),
              "test_part_default": measure(part["test"], drawn, kwp, KWP_PER_M2), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
