"""Synthetic georeferenced towns with known solar panels (imagery + truth polygons).

A town is laid out in metres on a local frame (x east, y down the image), drawn on a supersampled
canvas and averaged down to the target GSD, so thin things (module frames, cell lines, car edges)
blend into pixels the way they do in real orthophotos. It is georeferenced on a UTM grid near
Fresno by default.

What is in a town: a street grid (sometimes rotated) with sidewalks, parcels with houses whose roofs
come in many colours (dark shingles and blue-grey metal included), gable/hip/flat roof planes lit
by one sun, house and tree shadows, lawns and dry yards, driveways, cars, swimming pools and
skylights, sometimes a commercial flat roof with HVAC boxes, sometimes a ground-mounted solar field.
Panel arrays are grids of ~1.0 x 1.7 m modules (portrait or landscape) aligned with their roof plane,
dark blue to black with a thin lighter (or black) frame and faint cell lines.

Truth is one polygon per panel array (the outline of its modules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS as ProjCRS
from pyproj import Transformer
from rasterio.crs import CRS
from rasterio.features import rasterize
from scipy import ndimage
from shapely.geometry import Polygon, box

from solarmap.geo.output import write_geopackage, write_geotiff
from solarmap.geo.style import panels_qml
from solarmap.geo.tiling import ground_resolution
from solarmap.geo.vectorize import geodesic_area_m2
from solarmap.training.town_layout import layout_town, sun, tree_polygon


@dataclass(frozen=True)
class SynthConfig:
    """What town to make. Same config and seed -> the same town, pixel for pixel."""

    size_px: int = 1024
    gsd_m: float = 0.3
    seed: int = 0
    lon: float = -119.78  # Fresno, CA
    lat: float = 36.76
    epsg: int | None = None  # None: the UTM zone of (lon, lat)
    supersample: int = 3
    panel_house_fraction: float = 0.35
    solar_field_probability: float = 0.5
    commercial_probability: float = 0.5


@dataclass
class Town:
    """A town's imagery (uint8 RGB, rows x cols x 3), its georeferencing and its truth arrays."""

    image: np.ndarray
    transform: Affine
    crs: str
    arrays: list[dict] = field(default_factory=list)  # {"geometry": Polygon (map CRS), "kind", "modules"}

    def truth_frame(self):
        import geopandas as gpd

        geoms = [a["geometry"] for a in self.arrays]
        frame = gpd.GeoDataFrame(
            {
                "id": np.arange(1, len(geoms) + 1, dtype=np.int64),
                "kind": [a["kind"] for a in self.arrays],
                "modules": np.array([a["modules"] for a in self.arrays], dtype=np.int64),
                "area_m2": geodesic_area_m2(geoms, self.crs) if geoms else np.zeros(0),
            },
            geometry=gpd.GeoSeries(geoms, crs=self.crs),
            crs=self.crs,
        )
        return frame


# ---------------------------------------------------------------------------------------------
# Palettes (linear-ish RGB in [0, 1])

class _Canvas:
    """A supersampled RGB canvas in local metres; shapes are given in metres."""

    def __init__(self, size_px: int, gsd_m: float, supersample: int, rng: np.random.Generator):
        self.n = size_px * supersample
        self.px_m = gsd_m / supersample
        self.rgb = np.zeros((self.n, self.n, 3), dtype=np.float32)
        self.rng = rng
        fine = rng.standard_normal((self.n, self.n)).astype(np.float32)
        self.grain = ndimage.gaussian_filter(fine, 0.7 * supersample)
        self.grain /= self.grain.std() + 1e-6
        coarse = rng.standard_normal((self.n // 16 + 2, self.n // 16 + 2)).astype(np.float32)
        coarse = ndimage.zoom(ndimage.gaussian_filter(coarse, 2.0), 16, order=1)[: self.n, : self.n]
        self.blotch = coarse / (coarse.std() + 1e-6)
        yy, xx = np.mgrid[0: self.n, 0: self.n].astype(np.float32)
        self.x_m = (xx + 0.5) * self.px_m
        self.y_m = (yy + 0.5) * self.px_m

    def ids(self, polys: Sequence[Polygon]) -> np.ndarray:
        """Raster of 1-based polygon indices (later polygons drawn over earlier ones)."""
        scale = 1.0 / self.px_m
        shapes = [(shapely.affinity.scale(p, scale, scale, origin=(0, 0)), i + 1)
                  for i, p in enumerate(polys) if not p.is_empty]
        if not shapes:
            return np.zeros((self.n, self.n), dtype=np.uint32)
        return rasterize(shapes, out_shape=(self.n, self.n), dtype=np.uint32, fill=0)

    def paint(self, polys: Sequence[Polygon], colours: np.ndarray, *, grain: float = 0.02,
              blotch: float = 0.0) -> np.ndarray:
        ids = self.ids(polys)
        inside = ids > 0
        colour = np.asarray(colours, dtype=np.float32)[ids[inside] - 1]
        texture = grain * self.grain[inside] + blotch * self.blotch[inside]
        self.rgb[inside] = colour * (1.0 + texture[:, None])
        return ids

    def darken(self, polys: Sequence[Polygon], factor: float, *, only: np.ndarray | None = None) -> None:
        ids = self.ids(polys)
        inside = ids > 0
        if only is not None:
            inside &= only
        self.rgb[inside] *= factor
        # skylight makes shadows a little blue
        self.rgb[inside, 2] *= 1.12

    def downsample(self, supersample: int) -> np.ndarray:
        n = self.n // supersample
        return self.rgb.reshape(n, supersample, n, supersample, 3).mean(axis=(1, 3))


def render_town(cfg: SynthConfig) -> Town:
    """Lay out and draw a town; return its 8-bit RGB image, georeferencing and truth arrays."""
    rng = np.random.default_rng(cfg.seed)
    layout, roads, sidewalks = layout_town(cfg, rng)
    sun_dir, shadow_per_m = sun(rng)
    canvas = _Canvas(cfg.size_px, cfg.gsd_m, cfg.supersample, rng)

    # ground: dry grass / soil with large blotches
    base = np.array([0.50, 0.46, 0.34]) * rng.uniform(0.85, 1.1)
    canvas.rgb[:] = base * (1.0 + 0.07 * canvas.blotch[..., None] + 0.03 * canvas.grain[..., None])
    canvas.paint(layout.ground_patches, np.array(layout.ground_colours), grain=0.05, blotch=0.06)
    canvas.paint(sidewalks, np.full((len(sidewalks), 3), 0.68) * rng.uniform(0.9, 1.05), grain=0.02)
    asphalt = np.array([0.33, 0.33, 0.345]) * rng.uniform(0.8, 1.15)
    canvas.paint(roads, np.tile(asphalt, (len(roads), 1)), grain=0.05, blotch=0.05)
    canvas.paint(layout.paved, np.array(layout.paved_colours) if layout.paved else np.zeros((0, 3)), grain=0.03)
    canvas.paint(layout.pool_decks, np.full((len(layout.pool_decks), 3), 0.78), grain=0.02)
    water = [np.array([0.22, 0.58, 0.72]) * rng.uniform(0.85, 1.15) for _ in layout.pools]
    canvas.paint(layout.pools, np.array(water) if water else np.zeros((0, 3)), grain=0.04)

    shadow_vec = -sun_dir * shadow_per_m
    def shadow_of(footprint: Polygon, height: float) -> Polygon:
        moved = shapely.affinity.translate(footprint, *(shadow_vec * height))
        return shapely.convex_hull(shapely.union(footprint, moved)) if footprint.area < 2500 else moved

    canvas.darken([shadow_of(f, h) for f, h in layout.casters], 0.48)
    canvas.paint(layout.roof_planes, np.array(layout.roof_colours) if layout.roof_planes else np.zeros((0, 3)),
                 grain=0.05, blotch=0.03)
    canvas.paint(layout.roof_boxes, np.array(layout.roof_box_colours) if layout.roof_boxes else np.zeros((0, 3)),
                 grain=0.02)
    _paint_modules(canvas, layout.modules)

    tree_polys = [tree_polygon(c, r, rng) for c, r in layout.trees]
    if layout.arrays and tree_polys:  # keep arrays unoccluded so truth is what can be seen
        outlines = shapely.STRtree([a[0] for a in layout.arrays])
        tree_polys = [t for t in tree_polys if len(outlines.query(t, predicate="intersects")) == 0]
    tree_shadows = [shapely.affinity.translate(t, *(shadow_vec * rng.uniform(4, 8))) for t in tree_polys]
    canvas.darken(tree_shadows, 0.55)
    greens = np.array([np.array([0.14, 0.26, 0.11]) * rng.uniform(0.75, 1.25) for _ in tree_polys]).reshape(-1, 3)
    canvas.paint(tree_polys, greens, grain=0.25, blotch=0.05)
    canvas.paint(layout.cars, np.array(layout.car_colours) if layout.cars else np.zeros((0, 3)), grain=0.02)

    image = canvas.downsample(cfg.supersample)
    image = ndimage.gaussian_filter(image, sigma=(0.45, 0.45, 0))  # optics
    image = image + rng.normal(0, 0.008, image.shape).astype(np.float32)  # sensor noise
    image = np.clip(image, 0, 1) ** (1 / 1.15)  # mild tone curve, like an orthophoto product
    image_u8 = (image * 255 + 0.5).astype(np.uint8)

    transform, crs = _georeference(cfg)
    extent = cfg.size_px * cfg.gsd_m
    frame = box(0, 0, extent, extent)
    to_map = [transform.a / cfg.gsd_m * 1.0, 0, 0, transform.e / cfg.gsd_m, transform.c, transform.f]
    arrays = []
    for outline, kind, modules in layout.arrays:
        visible = outline.intersection(frame)
        if visible.is_empty or visible.area < 0.5 * outline.area:
            continue  # arrays mostly outside the scene are not truth for it
        arrays.append({"geometry": shapely.affinity.affine_transform(visible, to_map), "kind": kind,
                       "modules": modules})
    return Town(image=image_u8, transform=transform, crs=crs, arrays=arrays)


def _paint_modules(canvas: _Canvas, modules: list) -> None:
    """Modules with frames and faint cell lines, from each pixel's position on its module."""
    if not modules:
        return
    ids = canvas.ids([m[0] for m in modules])
    inside = ids > 0
    idx = ids[inside] - 1
    centres = np.array([m[1] for m in modules])[idx]
    us = np.array([m[2] for m in modules])[idx]
    vs = np.array([m[3] for m in modules])[idx]
    lens = np.array([m[4] for m in modules])[idx]
    deps = np.array([m[5] for m in modules])[idx]
    bases = np.array([m[6] for m in modules], dtype=np.float32)[idx]
    frames = np.array([m[7] for m in modules], dtype=np.float32)[idx]
    dx = canvas.x_m[inside] - centres[:, 0]
    dy = canvas.y_m[inside] - centres[:, 1]
    s = dx * us[:, 0] + dy * us[:, 1] + lens / 2  # 0..len along the module
    t = dx * vs[:, 0] + dy * vs[:, 1] + deps / 2
    frame_w = 0.045
    on_frame = (s < frame_w) | (s > lens - frame_w) | (t < frame_w) | (t > deps - frame_w)
    short = np.minimum(lens, deps)
    cell = short / 6.0
    cell_line = ((np.mod(s, cell) < 0.012) | (np.mod(t, cell) < 0.012)) & ~on_frame
    colour = bases * (1.0 + 0.03 * canvas.grain[inside][:, None])
    colour[cell_line] *= 1.6
    colour[on_frame] = frames[on_frame]
    # specular sheen varying across the array
    colour *= (1.0 + 0.04 * canvas.blotch[inside])[:, None]
    canvas.rgb[inside] = colour


def _georeference(cfg: SynthConfig) -> tuple[Affine, str]:
    """The town's transform: pixels of ``gsd_m`` metres on the ground at the town's centre. Where the
    CRS unit is within 0.1 % of a ground metre (UTM), a pixel is exactly ``gsd_m`` units."""
    epsg = cfg.epsg or _utm_epsg(cfg.lon, cfg.lat)
    crs = ProjCRS.from_epsg(epsg)
    to_crs = Transformer.from_crs(ProjCRS.from_epsg(4326), crs, always_xy=True)
    x, y = to_crs.transform(cfg.lon, cfg.lat)
    ground = ground_resolution(Affine(cfg.gsd_m, 0.0, x, 0.0, -cfg.gsd_m, y), CRS.from_epsg(epsg), 1, 1)
    step_x, step_y = cfg.gsd_m, cfg.gsd_m
    if ground.differs_from_units:
        step_x, step_y = cfg.gsd_m * cfg.gsd_m / ground.x_m, cfg.gsd_m * cfg.gsd_m / ground.y_m
    x0 = math.floor(x / step_x) * step_x
    y0 = math.floor(y / step_y) * step_y
    return Affine(step_x, 0.0, x0, 0.0, -step_y, y0), f"EPSG:{epsg}"


def _utm_epsg(lon: float, lat: float) -> int:
    zone = int((lon + 180) // 6) + 1
    return (32600 if lat >= 0 else 32700) + zone


def write_town(town: Town, out_dir, *, overwrite: bool = False) -> tuple[str, str]:
    """Write ``scene.tif`` and ``truth.gpkg`` into ``out_dir`` (created if needed)."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scene = out / "scene.tif"
    truth = out / "truth.gpkg"
    write_geotiff(scene, np.moveaxis(town.image, -1, 0), transform=town.transform, crs=town.crs,
                  overwrite=overwrite)
    write_geopackage(town.truth_frame(), truth, layer="panels", overwrite=overwrite,
                     metadata={"generator": "solarmap synth"}, style_qml=panels_qml())
    return str(scene), str(truth)
