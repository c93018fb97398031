"""The layout of a synthetic town, in metres on a local frame (x east, y down the image): streets,
parcels, houses and their roof planes, panel arrays of modules, commercial roofs, solar fields,
trees, cars, pools. Drawing it is :mod:`solarmap.training.synth`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from shapely.geometry import Polygon, box

if TYPE_CHECKING:
    from solarmap.training.synth import SynthConfig

MODULE_SHORT_M = 1.0
MODULE_LONG_M = 1.7

ROOF_COLOURS = np.array([
    (0.22, 0.22, 0.23),  # dark grey shingles
    (0.15, 0.15, 0.17),  # charcoal shingles (dark: a confuser)
    (0.40, 0.31, 0.23),  # brown
    (0.62, 0.36, 0.26),  # terracotta
    (0.60, 0.60, 0.59),  # light grey
    (0.84, 0.84, 0.82),  # white / cool roof
    (0.28, 0.33, 0.40),  # blue-grey metal (a confuser)
    (0.68, 0.61, 0.50),  # tan
    (0.32, 0.40, 0.32),  # green metal
    (0.48, 0.45, 0.42),  # weathered
])
ROOF_WEIGHTS = np.array([0.18, 0.1, 0.14, 0.12, 0.1, 0.08, 0.07, 0.1, 0.04, 0.07])
CAR_COLOURS = np.array([
    (0.88, 0.88, 0.88), (0.65, 0.66, 0.68), (0.08, 0.08, 0.09), (0.10, 0.14, 0.30),
    (0.55, 0.08, 0.08), (0.35, 0.36, 0.38), (0.75, 0.72, 0.62),
])



@dataclass
class Plane:
    """A roof plane (or a patch of ground) that can carry a panel array: rectangle + slope direction."""

    centre: np.ndarray
    u: np.ndarray  # along the plane's length
    v: np.ndarray  # across (downslope direction for a pitched plane)
    length: float
    depth: float
    brightness: float


@dataclass
class Layout:
    ground_patches: list = field(default_factory=list)
    ground_colours: list = field(default_factory=list)
    paved: list = field(default_factory=list)
    paved_colours: list = field(default_factory=list)
    pools: list = field(default_factory=list)
    pool_decks: list = field(default_factory=list)
    casters: list = field(default_factory=list)  # (footprint, height m) for shadows
    roof_planes: list = field(default_factory=list)
    roof_colours: list = field(default_factory=list)
    roof_boxes: list = field(default_factory=list)  # HVAC units, skylights
    roof_box_colours: list = field(default_factory=list)
    modules: list = field(default_factory=list)  # (polygon, centre, u, v, length, depth, colour, frame colour)
    arrays: list = field(default_factory=list)  # (polygon local metres, kind, modules)
    trees: list = field(default_factory=list)
    cars: list = field(default_factory=list)
    car_colours: list = field(default_factory=list)


def sun(rng: np.random.Generator):
    azimuth = rng.uniform(0, 2 * math.pi)
    direction = np.array([math.cos(azimuth), math.sin(azimuth)])  # towards the sun
    shadow_len_per_m = rng.uniform(0.35, 0.9)  # shadow length per metre of height
    return direction, shadow_len_per_m


def _plane_brightness(v: np.ndarray, sun_dir: np.ndarray, pitched: bool) -> float:
    if not pitched:
        return 1.0
    return float(1.0 + 0.22 * np.dot(v, sun_dir))


def _add_array(layout: Layout, plane: Plane, rng: np.random.Generator, kind: str,
               *, max_rows: int | None = None, fill: bool = False) -> bool:
    """Place a grid of modules on ``plane``; returns False when none fits."""
    margin = 0.35
    portrait = rng.random() < 0.6
    mod_u, mod_v = (MODULE_SHORT_M, MODULE_LONG_M) if portrait else (MODULE_LONG_M, MODULE_SHORT_M)
    cols_max = int((plane.length - 2 * margin) // mod_u)
    rows_max = int((plane.depth - 2 * margin) // mod_v)
    if max_rows is not None:
        rows_max = min(rows_max, max_rows)
    if cols_max < 2 or rows_max < 1:
        return False
    cols = cols_max if fill else int(rng.integers(max(2, cols_max // 3), cols_max + 1))
    rows = rows_max if fill else int(rng.integers(1, rows_max + 1))
    arr_len, arr_dep = cols * mod_u, rows * mod_v
    slack_u = plane.length - 2 * margin - arr_len
    slack_v = plane.depth - 2 * margin - arr_dep
    off_u = -plane.length / 2 + margin + rng.uniform(0, max(slack_u, 0)) + arr_len / 2
    off_v = -plane.depth / 2 + margin + rng.uniform(0, max(slack_v, 0)) + arr_dep / 2
    centre = plane.centre + off_u * plane.u + off_v * plane.v
    outline = _rotated_box(centre, plane.u, plane.v, arr_len, arr_dep)
    blueness = rng.uniform(0, 1)
    base = np.array([0.045, 0.05, 0.06]) * (1 - blueness) + np.array([0.05, 0.08, 0.17]) * blueness
    base = base * rng.uniform(0.85, 1.2) * plane.brightness
    frame = np.array([0.52, 0.54, 0.57]) if rng.random() < 0.65 else np.array([0.07, 0.07, 0.08])
    for r in range(rows):
        for c in range(cols):
            mc = centre + (-arr_len / 2 + (c + 0.5) * mod_u) * plane.u + (-arr_dep / 2 + (r + 0.5) * mod_v) * plane.v
            module = _rotated_box(mc, plane.u, plane.v, mod_u, mod_v)
            jitter = rng.normal(1.0, 0.03)
            layout.modules.append((module, mc, plane.u, plane.v, mod_u, mod_v, base * jitter, frame, portrait))
    layout.arrays.append((outline, kind, rows * cols))
    return True


def _rotated_box(centre: np.ndarray, u: np.ndarray, v: np.ndarray, length: float, depth: float) -> Polygon:
    hu, hv = u * length / 2, v * depth / 2
    corners = [centre - hu - hv, centre + hu - hv, centre + hu + hv, centre - hu + hv]
    return Polygon([tuple(c) for c in corners])


def _house(layout: Layout, centre: np.ndarray, u: np.ndarray, v: np.ndarray, length: float,
           depth: float, sun_dir: np.ndarray, rng: np.random.Generator, panel_fraction: float) -> None:
    footprint = _rotated_box(centre, u, v, length, depth)
    layout.casters.append((footprint, rng.uniform(3.5, 6.5)))
    colour = ROOF_COLOURS[rng.choice(len(ROOF_COLOURS), p=ROOF_WEIGHTS / ROOF_WEIGHTS.sum())]
    colour = np.clip(colour * rng.uniform(0.85, 1.12), 0, 1)
    kind = rng.choice(["gable", "hip", "flat"], p=[0.55, 0.33, 0.12])
    planes: list[Plane] = []
    if kind == "flat":
        planes.append(Plane(centre, u, v, length, depth, 1.0))
        layout.roof_planes.append(footprint)
        layout.roof_colours.append(colour)
    else:
        for sign in (-1, 1):
            half_centre = centre + sign * v * depth / 4
            slope = sign * v
            bright = _plane_brightness(slope, sun_dir, True)
            half = _rotated_box(half_centre, u, v, length, depth / 2)
            if kind == "hip":
                inset = depth / 2
                ridge_side = centre
                eave_side = centre + sign * v * depth / 2
                half = Polygon([
                    tuple(ridge_side - u * (length / 2 - inset)), tuple(ridge_side + u * (length / 2 - inset)),
                    tuple(eave_side + u * length / 2), tuple(eave_side - u * length / 2)])
                usable = max(length - depth, 0.0)
            else:
                usable = length
            layout.roof_planes.append(half)
            layout.roof_colours.append(np.clip(colour * bright, 0, 1))
            planes.append(Plane(half_centre, u, slope, usable, depth / 2, bright))
            if kind == "hip":
                for end in (-1, 1):  # the two triangular ends
                    apex = centre + end * u * (length / 2 - inset)
                    tri = Polygon([tuple(apex), tuple(centre + end * u * length / 2 - v * depth / 2),
                                   tuple(centre + end * u * length / 2 + v * depth / 2)])
                    if sign == 1:
                        layout.roof_planes.append(tri)
                        layout.roof_colours.append(np.clip(colour * _plane_brightness(end * u, sun_dir, True), 0, 1))
        # ridge line
        layout.roof_boxes.append(_rotated_box(centre, u, v, length * (0.98 if kind == "gable" else 0.99 - depth / length), 0.18))
        layout.roof_box_colours.append(np.clip(colour * 1.15, 0, 1))
    has_panels = rng.random() < panel_fraction
    if has_panels:
        # prefer the plane facing the sun side (south-ish in reality)
        order = sorted(range(len(planes)), key=lambda i: -planes[i].brightness)
        placed = _add_array(layout, planes[order[0]], rng, "roof")
        if placed and len(planes) > 1 and rng.random() < 0.25:
            _add_array(layout, planes[order[1]], rng, "roof")
    if rng.random() < 0.22:  # skylights / vents, away from the panels' plane when possible
        plane = planes[-1]
        for _ in range(int(rng.integers(1, 3))):
            pc = plane.centre + rng.uniform(-0.3, 0.3) * plane.length * plane.u + rng.uniform(-0.2, 0.2) * plane.depth * plane.v
            size = rng.uniform(0.6, 1.2)
            sky = _rotated_box(pc, plane.u, plane.v, size, size * rng.uniform(0.8, 1.6))
            if not any(sky.intersects(m[0]) for m in layout.modules[-60:]):
                layout.roof_boxes.append(sky)
                layout.roof_box_colours.append(np.array([0.9, 0.9, 0.88]) if rng.random() < 0.6 else np.array([0.2, 0.22, 0.26]))


def _residential_block(layout: Layout, centre: np.ndarray, u: np.ndarray, v: np.ndarray,
                       length: float, depth: float, sun_dir, rng, panel_fraction: float) -> None:
    """Two rows of parcels, backs touching, fronts on the roads above and below the block."""
    x = -length / 2
    while x < length / 2 - 12:
        width = rng.uniform(15, 23)
        if x + width > length / 2:
            width = length / 2 - x
        for side in (-1, 1):
            parcel_depth = depth / 2
            pc = centre + (x + width / 2) * u + side * (parcel_depth / 2) * v
            lawn = _rotated_box(pc, u, v, width, parcel_depth)
            layout.ground_patches.append(lawn)
            layout.ground_colours.append(
                np.array([0.24, 0.38, 0.17]) * rng.uniform(0.8, 1.15) if rng.random() < 0.55
                else np.array([0.52, 0.47, 0.34]) * rng.uniform(0.85, 1.1))
            if width - 3.0 < 10 or parcel_depth - 9.0 < 8:
                continue  # parcel too small for a house
            h_len = rng.uniform(10, min(width - 3.0, 19))
            h_dep = rng.uniform(8, min(parcel_depth - 9.0, 13))
            setback = rng.uniform(5, 8)
            front = pc + side * (parcel_depth / 2) * v  # edge towards the road
            hc = front - side * (setback + h_dep / 2) * v + rng.uniform(-1, 1) * (width - h_len) / 2 * u
            tilt = rng.normal(0, 0.025)
            hu = u * math.cos(tilt) + v * math.sin(tilt)
            hv = -u * math.sin(tilt) + v * math.cos(tilt)
            if rng.random() < 0.5:  # ridge across the parcel instead
                hu, hv, h_len, h_dep = hv, hu, h_dep, h_len
            _house(layout, hc, hu, hv, h_len, h_dep, sun_dir, rng, panel_fraction)
            # driveway from the road to the house side
            dw_centre = front - side * (setback / 2) * v + (rng.choice([-1, 1]) * (width / 2 - 2.2)) * u
            layout.paved.append(_rotated_box(dw_centre, u, v, 3.2, setback + 0.5))
            layout.paved_colours.append(np.array([0.66, 0.65, 0.61]) * rng.uniform(0.9, 1.05))
            if rng.random() < 0.4:
                layout.cars.append(_rotated_box(dw_centre, v, -u, 4.5, 1.85))
                layout.car_colours.append(CAR_COLOURS[rng.integers(len(CAR_COLOURS))])
            back = pc - side * (parcel_depth / 2) * v
            if rng.random() < 0.2:  # pool in the back yard
                pcen = back + side * rng.uniform(3.5, 5.0) * v + rng.uniform(-0.25, 0.25) * width * u
                plen, pdep = rng.uniform(5, 9), rng.uniform(3, 4.5)
                pool = _rotated_box(pcen, u, v, plen, pdep).buffer(0.8, join_style=1).buffer(-0.8, join_style=1)
                layout.pool_decks.append(pool.buffer(1.2, join_style=2))
                layout.pools.append(pool)
            for _ in range(int(rng.integers(0, 4))):  # yard trees
                tc = pc + rng.uniform(-0.45, 0.45) * width * u + rng.uniform(-0.45, 0.45) * parcel_depth * v
                radius = rng.uniform(1.5, 4.5)
                layout.trees.append((tc, radius))
        x += width


def _solar_field(layout: Layout, centre, u, v, length, depth, sun_dir, rng) -> None:
    ground = _rotated_box(centre, u, v, length, depth)
    layout.ground_patches.append(ground)
    layout.ground_colours.append(np.array([0.6, 0.57, 0.5]) * rng.uniform(0.9, 1.05))
    row_depth = rng.choice([2 * MODULE_LONG_M, 2 * MODULE_SHORT_M, 3 * MODULE_SHORT_M])
    pitch = row_depth + rng.uniform(2.5, 4.5)
    table_len = rng.uniform(18, 36)
    y = -depth / 2 + 4
    while y + row_depth < depth / 2 - 4:
        x = -length / 2 + 4
        while x + 8 < length / 2 - 4:
            seg = min(table_len, length / 2 - 4 - x)
            rc = centre + (x + seg / 2) * u + (y + row_depth / 2) * v
            plane = Plane(rc, u, v, seg + 0.7, row_depth + 0.7, 1.0)
            _add_array(layout, plane, rng, "ground", fill=True)
            layout.casters.append((_rotated_box(rc, u, v, seg, row_depth), 1.6))
            x += seg + rng.uniform(1.5, 3.0)
        y += pitch


def _commercial(layout: Layout, centre, u, v, length, depth, sun_dir, rng) -> None:
    lot = _rotated_box(centre, u, v, length, depth)
    layout.paved.append(lot)
    layout.paved_colours.append(np.array([0.33, 0.33, 0.34]) * rng.uniform(0.9, 1.1))
    b_len, b_dep = length * rng.uniform(0.45, 0.7), depth * rng.uniform(0.45, 0.7)
    bc = centre + rng.uniform(-0.1, 0.1) * length * u
    footprint = _rotated_box(bc, u, v, b_len, b_dep)
    layout.casters.append((footprint, rng.uniform(6, 10)))
    layout.roof_planes.append(footprint)
    roof = np.array([0.86, 0.86, 0.84]) if rng.random() < 0.6 else np.array([0.55, 0.55, 0.54])
    layout.roof_colours.append(roof * rng.uniform(0.92, 1.04))
    for _ in range(int(rng.integers(3, 10))):  # HVAC boxes
        hc = bc + rng.uniform(-0.4, 0.4) * b_len * u + rng.uniform(-0.4, 0.4) * b_dep * v
        layout.roof_boxes.append(_rotated_box(hc, u, v, rng.uniform(1.5, 3.5), rng.uniform(1.2, 2.5)))
        layout.roof_box_colours.append(np.array([0.62, 0.63, 0.64]))
    if rng.random() < 0.6:  # rows of panels on the flat roof
        half = Plane(bc + 0.25 * b_dep * v, u, v, b_len * 0.8, b_dep * 0.4, 1.0)
        _add_array(layout, half, rng, "roof", fill=rng.random() < 0.5)
    # parking: cars in rows
    for k in range(int(rng.integers(4, 16))):
        cc = centre + rng.uniform(-0.45, 0.45) * length * u + (depth / 2 - 3.5) * v * rng.choice([-1, 1])
        layout.cars.append(_rotated_box(cc, v, -u, 4.5, 1.85))
        layout.car_colours.append(CAR_COLOURS[rng.integers(len(CAR_COLOURS))])


def layout_town(cfg: "SynthConfig", rng: np.random.Generator) -> tuple[Layout, list, list]:
    extent = cfg.size_px * cfg.gsd_m
    centre = np.array([extent / 2, extent / 2])
    angle = rng.normal(0, 0.3) if rng.random() < 0.6 else 0.0
    u = np.array([math.cos(angle), math.sin(angle)])
    v = np.array([-math.sin(angle), math.cos(angle)])
    sun_dir, _ = sun(rng)
    block_len = rng.uniform(85, 130)
    block_dep = rng.uniform(52, 64)
    road_w = rng.uniform(9, 13)
    layout = Layout()
    roads, sidewalks = [], []
    reach = extent * 0.75 + block_len
    origin = centre + rng.uniform(0, block_len) * u + rng.uniform(0, block_dep) * v
    n_u = int(reach // (block_len + road_w)) + 1
    n_v = int(reach // (block_dep + road_w)) + 1
    for j in range(-n_v, n_v + 1):
        rc = origin + j * (block_dep + road_w) * v
        roads.append(_rotated_box(rc, u, v, 3 * reach, road_w))
        sidewalks.append(_rotated_box(rc, u, v, 3 * reach, road_w + 3.0))
    for i in range(-n_u, n_u + 1):
        rc = origin + i * (block_len + road_w) * u
        roads.append(_rotated_box(rc, v, -u, 3 * reach, road_w))
        sidewalks.append(_rotated_box(rc, v, -u, 3 * reach, road_w + 3.0))
    visible = box(-20, -20, extent + 20, extent + 20)
    specials = {"field": rng.random() < cfg.solar_field_probability,
                "commercial": rng.random() < cfg.commercial_probability}
    blocks = []
    for j in range(-n_v, n_v):
        for i in range(-n_u, n_u):
            bc = origin + (i + 0.5) * (block_len + road_w) * u + (j + 0.5) * (block_dep + road_w) * v
            if not _rotated_box(bc, u, v, block_len, block_dep).intersects(visible):
                continue
            blocks.append(bc)
    rng.shuffle(blocks)
    for bc in blocks:
        inner_len, inner_dep = block_len - 3.0, block_dep - 3.0
        fully_visible = _rotated_box(bc, u, v, block_len, block_dep).within(box(0, 0, extent, extent))
        if specials["field"] and fully_visible:
            specials["field"] = False
            _solar_field(layout, bc, u, v, inner_len, inner_dep, sun_dir, rng)
        elif specials["commercial"] and fully_visible:
            specials["commercial"] = False
            _commercial(layout, bc, u, v, inner_len, inner_dep, sun_dir, rng)
        else:
            _residential_block(layout, bc, u, v, inner_len, inner_dep, sun_dir, rng, cfg.panel_house_fraction)
    # street trees and street-parked cars
    for road in roads:
        for _ in range(int(rng.integers(2, 7))):
            p = road.exterior.interpolate(rng.uniform(0, road.exterior.length))
            if visible.contains(p):
                layout.cars.append(_rotated_box(np.array([p.x, p.y]) + rng.normal(0, 1.5, 2), u, v, 4.5, 1.85))
                layout.car_colours.append(CAR_COLOURS[rng.integers(len(CAR_COLOURS))])
    return layout, roads, sidewalks


def tree_polygon(centre: np.ndarray, radius: float, rng) -> Polygon:
    angles = np.linspace(0, 2 * math.pi, 18, endpoint=False)
    radii = radius * (1 + 0.15 * rng.standard_normal(18))
    return Polygon(np.column_stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)]))


