"""Reading rasters: their grids, bands and value scale, and tiles of them as float pixels.

Reading is windowed (one tile at a time, in row-major order so GDAL's block cache is reused), so
peak memory depends on the tile size, not on the raster's size.

Pixel values are scaled to floats in [0, 1] with one rule per scene (never per tile, so tiles stay
comparable):

* 8-bit: divide by 255.
* other integers: divide by 2**NBITS - 1 when the file declares NBITS (e.g. 12-bit sensors stored in
  16 bits), else by the 99.8th percentile of a decimated read of the whole raster.
* floats: kept as they are when that percentile is at most 1 (reflectance), else divided by it.
"""

from __future__ import annotations

import glob
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from solarmap.errors import GeoreferenceError, InputError, OptionError
from solarmap.geo.tiling import Grid, Tile, resampled_grid

DEFAULT_BANDS = (1, 2, 3)
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
_MIN_BLOCK_CACHE = 32 * 2**20  # bytes: the floor of block_cache_bytes (small rasters, VRT sources)
_SCALE_PERCENTILE = 99.8
_SCALE_SAMPLE_PX = 1024


@dataclass(frozen=True)
class TileImage:
    """A tile's pixels: float32 (bands, size, size) in [0, 1], and where they are valid."""

    tile: Tile
    pixels: np.ndarray
    valid: np.ndarray

    @property
    def is_empty(self) -> bool:
        """No valid pixel, or a uniform black/white fill (collars of mosaics without a nodata tag)."""
        if self.valid.all():  # the usual case: no copy, and most tiles fail at the first pixel
            first = self.pixels.flat[0]
            return bool(first in (0.0, 1.0) and not (self.pixels != first).any())
        if not self.valid.any():
            return True
        values = self.pixels[:, self.valid]
        return bool(values.min() == values.max() and values.min() in (0.0, 1.0))


@dataclass(frozen=True)
class SceneInfo:
    """What solarmap needs to know about a raster before reading tiles from it."""

    path: str
    source_grid: Grid
    grid: Grid
    bands: tuple[int, ...]
    dtype: str
    scale: float
    has_mask: bool
    block_shape: tuple[int, int]
    georeferencing: str = "geotransform"  # or how the raster was placed (e.g. read through its GCPs)


def parse_bands(text: str | None) -> tuple[int, ...]:
    """'1,2,3' -> (1, 2, 3); None -> RGB default."""
    if text is None or text == "":
        return DEFAULT_BANDS
    try:
        bands = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise InputError(f"--bands takes comma-separated band numbers like 1,2,3, got {text!r}") from None
    if len(bands) != 3 or min(bands) < 1:
        raise InputError(f"--bands needs three band numbers (1-based) for R,G,B, got {text!r}")
    return bands


# ---------------------------------------------------------------------------------------------
# Inputs


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Rasters named by paths, directories (their rasters, sorted), globs, URLs or text files that
    list one raster per line (``#`` comments allowed). Order is kept; duplicates are dropped."""
    found: list[str] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if "://" in text or text.startswith("/vsi"):
            found.append(text)  # GDAL opens it (or says why not)
        elif path.is_dir():
            rasters = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in RASTER_SUFFIXES)
            if not rasters:
                raise InputError(f"no rasters ({', '.join(RASTER_SUFFIXES)}) in directory {text}")
            found.extend(rasters)
        elif path.suffix.lower() == ".txt" and path.is_file():
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            listed = [ln for ln in lines if ln and not ln.startswith("#")]
            if not listed:
                raise InputError(f"raster list {text} names no rasters")
            base = path.parent
            found.extend(ln if ("://" in ln or ln.startswith("/vsi") or os.path.isabs(ln)) else str(base / ln)
                         for ln in listed)
        elif any(ch in text for ch in "*?["):
            matches = sorted(glob.glob(text))
            if not matches:
                raise InputError(f"no files match {text}")
            found.extend(matches)
        elif path.exists():
            found.append(text)
        else:
            raise InputError(f"input raster not found: {text}")
    return list(dict.fromkeys(found))


class _WarpedFromGcps(WarpedVRT):
    """A raster placed by ground control points only, seen through a warped view onto a north-up
    grid in its GCPs' CRS (GDAL fits the GCPs with a polynomial: exact where they come from an
    affine transform); closing it closes the raster too."""

    def __init__(self, source, **options):
        super().__init__(source, **options)
        self._source = source

    def close(self) -> None:
        super().close()
        self._source.close()


def _georeferenced(dataset, path: str, src_crs: str | None):
    """``dataset`` as solarmap reads it, and how it is placed: its geotransform, or a warped view
    where it carries only GCPs; a raster placed by RPCs alone is refused with what to do."""
    if dataset.transform != Affine.identity():
        return dataset, "geotransform"
    gcps, gcp_crs = dataset.gcps
    if gcps:
        crs = gcp_crs or (parse_crs(src_crs) if src_crs else None)
        if crs is None:
            dataset.close()
            raise GeoreferenceError(f"{path}: its ground control points carry no CRS; pass it with --src-crs "
                                    f"(e.g. --src-crs EPSG:32611)")
        warped = _WarpedFromGcps(dataset, src_crs=crs, resampling=Resampling.bilinear, add_alpha=True)
        return warped, f"{len(gcps)} ground control points in {crs.to_string()} (read through a warped view)"
    if dataset.rpcs:
        dataset.close()
        raise GeoreferenceError(f"{path} is placed by RPCs only (a satellite sensor model), which solarmap does not "
                                f"read; orthorectify it first, e.g. gdalwarp -rpc -t_srs EPSG:xxxx {path} out.tif")
    return dataset, "none"


def _open(path: str | os.PathLike, src_crs: str | None = None):
    """The raster at ``path`` as solarmap reads it (GCP-only rasters through a warped view) and how
    it is georeferenced."""
    path = str(path)
    if not path.startswith(("/vsi", "http://", "https://", "s3://")) and not os.path.exists(path):
        raise InputError(f"input raster not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"input is a directory, not a raster: {path}")
    try:
        dataset = rasterio.open(path)
    except RasterioIOError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise InputError(f"cannot read {path} as a raster ({first_line})") from None
    return _georeferenced(dataset, path, src_crs)


def _scale_for(dataset, bands: tuple[int, ...]) -> float:
    dtype = np.dtype(dataset.dtypes[bands[0] - 1])
    if dtype == np.uint8:
        return 255.0
    nbits = dataset.tags(bands[0], ns="IMAGE_STRUCTURE").get("NBITS")
    if nbits and np.issubdtype(dtype, np.integer):
        return float(2 ** int(nbits) - 1)
    factor = max(dataset.width, dataset.height) / _SCALE_SAMPLE_PX
    out_h = max(1, int(dataset.height / max(factor, 1)))
    out_w = max(1, int(dataset.width / max(factor, 1)))
    sample = dataset.read(list(bands), out_shape=(len(bands), out_h, out_w), masked=True,
                          resampling=Resampling.nearest)
    values = np.ma.compressed(sample).astype(np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 1.0
    high = float(np.percentile(values, _SCALE_PERCENTILE))
    if np.issubdtype(dtype, np.floating) and high <= 1.0:
        return 1.0
    return max(high, 1.0)


def describe_scene(path: str | os.PathLike, *, bands: Sequence[int] = DEFAULT_BANDS,
                   gsd_m: float | None = None, src_crs: str | None = None) -> SceneInfo:
    """Open ``path`` briefly to check it and work out its grids, bands and value scale."""
    dataset, georeferencing = _open(path, src_crs)
    with dataset:
        return _describe(dataset, str(path), tuple(bands), gsd_m, src_crs, georeferencing)


def parse_crs(text: str) -> CRS:
    """A CRS from user text (EPSG:32611, a WKT or PROJ string), or a one-line error."""
    try:
        return CRS.from_user_input(text)
    except Exception:  # noqa: BLE001 - rasterio raises several types for unparseable text
        raise OptionError(f"not a CRS: {text!r} (give e.g. EPSG:32611)") from None


def _describe(dataset, path: str, bands: tuple[int, ...], gsd_m: float | None,
              src_crs: str | None = None, georeferencing: str = "geotransform") -> SceneInfo:
    if dataset.count < max(bands):
        raise InputError(
            f"{path} has {dataset.count} band(s) but band {max(bands)} is needed; "
            f"solarmap needs RGB imagery (pick bands with --bands R,G,B)"
        )
    if dataset.transform == Affine.identity():
        raise GeoreferenceError(
            f"{path} is not georeferenced (no geotransform); give it one first, e.g. "
            f"gdal_translate -a_srs EPSG:xxxx -a_ullr ULX ULY LRX LRY {path} out.tif"
        )
    crs = dataset.crs
    if crs is None:
        if src_crs is None:
            raise GeoreferenceError(
                f"{path} has no CRS; pass the one it is in with --src-crs (e.g. --src-crs EPSG:32611) "
                f"or assign it (gdal_edit.py -a_srs EPSG:32611 {path})"
            )
        crs = parse_crs(src_crs)
    source_grid = Grid(height=dataset.height, width=dataset.width, transform=dataset.transform, crs=crs)
    flags = [dataset.mask_flag_enums[b - 1] for b in bands]
    has_mask = dataset.nodata is not None or any(MaskFlags.all_valid not in f for f in flags)
    return SceneInfo(
        path=path,
        source_grid=source_grid,
        grid=resampled_grid(source_grid, gsd_m),
        bands=bands,
        dtype=str(dataset.dtypes[bands[0] - 1]),
        scale=_scale_for(dataset, bands),
        has_mask=has_mask,
        block_shape=tuple(dataset.block_shapes[0]),
        georeferencing=georeferencing,
    )


def read_image(path: str | Path) -> np.ndarray:
    """Any raster image (georeferenced or not) as float32 (3, h, w) in [0, 1]."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            src = rasterio.open(path)
        with src:
            if src.count < 3:
                raise InputError(f"{path} has {src.count} band(s); RGB images are needed")
            data = src.read([1, 2, 3])
    except rasterio.errors.RasterioIOError:
        raise InputError(f"cannot read image {path}") from None
    scale = 255.0 if data.dtype == np.uint8 else max(float(np.percentile(data, 99.8)), 1.0)
    return np.clip(data.astype(np.float32) / scale, 0, 1)



def block_cache_bytes(dataset, *, window_rows: int) -> int:
    """GDAL block cache for reading ``dataset`` in row-major windows ``window_rows`` source rows high.

    GDAL's default (5 % of RAM) lets the cache, and so memory, grow with the raster's area. Row-major
    reads only revisit the blocks of the current and the next row of windows: enough for those
    (every band: pixel-interleaved blocks hold them all) decodes each block once, and memory then
    depends on the raster's width only. Users can still set ``GDAL_CACHEMAX`` themselves.
    """
    block_rows, _ = dataset.block_shapes[0] if dataset.block_shapes else (1, dataset.width)
    block_rows = max(1, min(int(block_rows), dataset.height))
    rows = (math.ceil(window_rows / block_rows) + 2) * block_rows
    item = max(np.dtype(dtype).itemsize for dtype in dataset.dtypes)
    return max(_MIN_BLOCK_CACHE, rows * dataset.width * dataset.count * item)


class SceneReader:
    """Reads tiles of one raster on the working grid (resampled to the target GSD if asked).

    Open once, read many tiles, close; use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, *, bands: Sequence[int] = DEFAULT_BANDS,
                 gsd_m: float | None = None, src_crs: str | None = None, window_px: int = 512):
        self._dataset, georeferencing = _open(path, src_crs)
        try:
            self.info = _describe(self._dataset, str(path), tuple(bands), gsd_m, src_crs, georeferencing)
        except Exception:
            self._dataset.close()
            raise
        src, grid = self.info.source_grid, self.info.grid
        self._fx = src.width / grid.width
        self._fy = src.height / grid.height
        cache = {} if "GDAL_CACHEMAX" in os.environ else {
            "GDAL_CACHEMAX": block_cache_bytes(self._dataset, window_rows=math.ceil(window_px * self._fy))}
        self._env = rasterio.Env(**cache)
        self._env.__enter__()
        self._resampled = (src.width, src.height) != (grid.width, grid.height)
        downsampling = self._fx > 1 or self._fy > 1
        self._resampling = Resampling.average if downsampling else Resampling.bilinear
        # uint8 pixels scaled by lookup: bit for bit what dividing and clipping give, without either
        self._uint8_table = np.clip(np.arange(256, dtype=np.float32) / np.float32(self.info.scale), 0.0, 1.0)
        self._strip: tuple | None = None  # read_tiles' last strip: ((row_off, height), pixels, mask)

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._dataset.close()
        self._env.__exit__(None, None, None)

    def _source_window(self, valid: Window) -> Window:
        if not self._resampled:
            return valid
        return Window(valid.col_off * self._fx, valid.row_off * self._fy,
                      valid.width * self._fx, valid.height * self._fy)

    def read_tile(self, tile: Tile, out: np.ndarray | None = None) -> TileImage:
        """The tile window's pixels (padded with zeros past the raster's edges) and validity mask.

        ``out`` (float32, (bands, size, size)), e.g. a slot of a batch array, receives the pixels
        instead of a new array, so a batch needs no second copy to stack its tiles.
        """
        src_window = self._source_window(tile.valid)
        valid_shape = (int(tile.valid.height), int(tile.valid.width))
        raw, mask = self._read(src_window, valid_shape, tile)
        return self._tile_image(tile, raw, mask, out)

    def read_tiles(self, tiles: Sequence[Tile], out: np.ndarray) -> list[TileImage]:
        """:meth:`read_tile` for each of ``tiles`` into ``out[i]``, cut from one read of each tile
        row's whole strip (the valid rows of its windows across the raster; the last strip is kept
        for the next call). For a detection's row-major pass.

        Why: GDAL's fixed cost per read is most of a small tile's (reading a 6,144 px scene's 5,929
        tiles one by one took 3.0 s of CPU; strips, docs/benchmarks.md), and neighbouring windows
        overlap. The pixels are :meth:`read_tile`'s bit for bit at the raster's own resolution;
        resampled, a pixel may differ by a rounding step (GDAL's kernel over another window). They
        depend only on the row, never on how tiles are batched, so a resumed or regional run reads
        what an uninterrupted one did. Memory: one row of windows across the raster, as GDAL's
        block cache is sized (:func:`block_cache_bytes`)."""
        images = []
        for tile, slot in zip(tiles, out):
            rows = (int(tile.valid.row_off), int(tile.valid.height))
            if self._strip is None or self._strip[0] != rows:
                strip = Window(0, rows[0], self.info.grid.width, rows[1])
                self._strip = (rows, *self._read(self._source_window(strip), (rows[1], self.info.grid.width), tile))
            _, raw, mask = self._strip
            columns = slice(int(tile.valid.col_off), int(tile.valid.col_off + tile.valid.width))
            images.append(self._tile_image(tile, raw[:, :, columns], None if mask is None else mask[:, columns], slot))
        return images

    def _read(self, src_window: Window, valid_shape: tuple[int, int], tile: Tile) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels (bands, *valid_shape) of ``src_window`` on the working grid, and its dataset mask
        (None without one); ``tile`` names the read in the error for a damaged file."""
        try:
            raw = self._dataset.read(list(self.info.bands), window=src_window,
                                     out_shape=(len(self.info.bands), *valid_shape), resampling=self._resampling)
            mask = self._dataset.dataset_mask(window=src_window, out_shape=valid_shape,
                                              resampling=Resampling.nearest) if self.info.has_mask else None
        except RasterioIOError as exc:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            detail = "" if not detail or "previous exception" in detail else f" ({detail})"
            raise InputError(f"{self.info.path} is damaged or truncated: reading tile {tile.key} failed"
                             f"{detail}; re-export or re-download it") from None
        return raw, mask

    def _tile_image(self, tile: Tile, raw: np.ndarray, mask: np.ndarray | None, out: np.ndarray | None) -> TileImage:
        """The tile's window from its valid part's pixels ``raw`` (and ``mask``): scaled to [0, 1],
        mirrored past the raster's edges, or zero there on rasters smaller than one window; into
        ``out`` if given. ``valid`` marks the raster's own pixels, so nothing is drawn past its edges.

        Why mirrored: every training view is padded by reflection, and against a black border the
        outline network drew crop rows, and arrays cut, at a raster's edge. Why not on rasters
        smaller than a window (chip-sized ones): their windows would be mostly mirror, a
        kaleidoscope: the Swiss register's plants found fell from 0.738 to 0.674 (docs/real-imagery.md,
        "A raster's edges")."""
        size_h, size_w = int(tile.window.height), int(tile.window.width)
        valid_h, valid_w = int(tile.valid.height), int(tile.valid.width)
        r0, c0 = int(tile.valid.row_off - tile.window.row_off), int(tile.valid.col_off - tile.window.col_off)
        inside = (slice(r0, r0 + valid_h), slice(c0, c0 + valid_w))
        shape = (len(self.info.bands), size_h, size_w)
        padded = (valid_h, valid_w) != (size_h, size_w)
        grid = self.info.grid
        mirror = padded and grid.height >= size_h and grid.width >= size_w
        if out is None:
            pixels = (np.empty if mirror else np.zeros)(shape, dtype=np.float32)  # mirroring writes every pixel
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"read_tile: out must be float32 {shape}, got {out.dtype} {out.shape}")
        else:
            pixels = out
            if padded and not mirror:
                pixels[...] = 0.0  # the padding past a small raster's edges
        scaled = pixels[(slice(None), *inside)]  # a view: scaled in place, no temporaries
        if raw.dtype == np.uint8:  # the common case: a 256-entry table, the same values as dividing
            np.take(self._uint8_table, raw, out=scaled, mode="clip")
        else:
            np.divide(raw, np.float32(self.info.scale), out=scaled, casting="unsafe")
            if np.issubdtype(raw.dtype, np.floating):
                np.nan_to_num(scaled, copy=False, nan=0.0)
            np.clip(scaled, 0.0, 1.0, out=scaled)
        if mirror:
            pixels[...] = np.pad(scaled, ((0, 0), (r0, size_h - r0 - valid_h), (c0, size_w - c0 - valid_w)),
                                 mode="symmetric")
        valid = np.zeros((size_h, size_w), dtype=bool)
        valid[inside] = mask > 0 if mask is not None else True
        if np.issubdtype(raw.dtype, np.floating):
            valid[inside] &= np.isfinite(raw).all(axis=0)
        return TileImage(tile=tile, pixels=pixels, valid=valid)
