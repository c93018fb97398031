"""The edges: reading tiles from rasters, writing GeoPackages atomically.

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

import contextlib
import math
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from solarmap.errors import GeoreferenceError, InputError, OptionError, OutputError
from solarmap.tiling import Grid, Tile, resampled_grid

DEFAULT_BANDS = (1, 2, 3)
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


def _open(path: str | os.PathLike):
    path = str(path)
    if not path.startswith(("/vsi", "http://", "https://", "s3://")) and not os.path.exists(path):
        raise InputError(f"input raster not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"input is a directory, not a raster: {path}")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "unreadable"
        raise InputError(f"cannot read {path} as a raster ({first_line})") from None


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
    with _open(path) as dataset:
        return _describe(dataset, str(path), tuple(bands), gsd_m, src_crs)


def parse_crs(text: str) -> CRS:
    """A CRS from user text (EPSG:32611, a WKT or PROJ string), or a one-line error."""
    try:
        return CRS.from_user_input(text)
    except Exception:  # noqa: BLE001 - rasterio raises several types for unparseable text
        raise OptionError(f"not a CRS: {text!r} (give e.g. EPSG:32611)") from None


def _describe(dataset, path: str, bands: tuple[int, ...], gsd_m: float | None,
              src_crs: str | None = None) -> SceneInfo:
    if dataset.count < max(bands):
        raise InputError(
            f"{path} has {dataset.count} band(s) but band {max(bands)} is needed; "
            f"solarmap needs RGB imagery (pick bands with --bands R,G,B)"
        )
    if dataset.transform == Affine.identity() and not dataset.gcps[0]:
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
    )


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
        self._dataset = _open(path)
        try:
            self.info = _describe(self._dataset, str(path), tuple(bands), gsd_m, src_crs)
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
        size_h, size_w = int(tile.window.height), int(tile.window.width)
        valid_h, valid_w = int(tile.valid.height), int(tile.valid.width)
        r0, c0 = int(tile.valid.row_off - tile.window.row_off), int(tile.valid.col_off - tile.window.col_off)
        inside = (slice(r0, r0 + valid_h), slice(c0, c0 + valid_w))
        src_window = self._source_window(tile.valid)
        try:
            raw = self._dataset.read(list(self.info.bands), window=src_window,
                                     out_shape=(len(self.info.bands), valid_h, valid_w),
                                     resampling=self._resampling)
        except RasterioIOError as exc:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            detail = "" if not detail or "previous exception" in detail else f" ({detail})"
            raise InputError(f"{self.info.path} is damaged or truncated: reading tile {tile.key} failed"
                             f"{detail}; re-export or re-download it") from None
        shape = (len(self.info.bands), size_h, size_w)
        if out is None:
            pixels = np.zeros(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"read_tile: out must be float32 {shape}, got {out.dtype} {out.shape}")
        else:
            pixels = out
            if (valid_h, valid_w) != (size_h, size_w):
                pixels[...] = 0.0  # the padding past the raster's edges
        scaled = pixels[(slice(None), *inside)]  # a view: scaled in place, no temporaries
        if raw.dtype == np.uint8:  # the common case: a 256-entry table, the same values as dividing
            np.take(self._uint8_table, raw, out=scaled, mode="clip")
        else:
            np.divide(raw, np.float32(self.info.scale), out=scaled, casting="unsafe")
            if np.issubdtype(raw.dtype, np.floating):
                np.nan_to_num(scaled, copy=False, nan=0.0)
            np.clip(scaled, 0.0, 1.0, out=scaled)
        valid = np.zeros((size_h, size_w), dtype=bool)
        if self.info.has_mask:
            mask = self._dataset.dataset_mask(window=src_window, out_shape=(valid_h, valid_w),
                                              resampling=Resampling.nearest)
            valid[inside] = mask > 0
        else:
            valid[inside] = True
        if np.issubdtype(raw.dtype, np.floating):
            valid[inside] &= np.isfinite(raw).all(axis=0)
        return TileImage(tile=tile, pixels=pixels, valid=valid)


# ---------------------------------------------------------------------------------------------
# Output paths and atomic writes


def check_output_path(path: str | os.PathLike, *, overwrite: bool, suffixes: Sequence[str] = (".gpkg",),
                      kind: str = "GeoPackage") -> Path:
    """Fail early, before any work, if ``path`` could not be written at the end."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise OutputError(f"output {out} must end in {' or '.join(suffixes)} (solarmap writes {kind} there)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output directory is not writable: {parent}")
    if out.is_dir():
        raise OutputError(f"output path is a directory: {out}")
    if out.exists() and not overwrite:
        raise OutputError(f"output exists: {out} (use --overwrite to replace it)")
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    On any error the temporary file is removed and ``path`` (if it existed) is left untouched.
    """
    out = check_output_path(path, overwrite=overwrite, suffixes=(Path(path).suffix.lower(),))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=f".tmp{out.suffix}", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # writers (GDAL) want to create the file themselves
    try:
        yield tmp
        if out.exists() and not overwrite:
            raise OutputError(f"output exists: {out} (use --overwrite to replace it)")
        os.replace(tmp, out)
    finally:
        _remove_sqlite_files(tmp)


class GeoPackageWriter:
    """Streams GeoDataFrame chunks into one layer of a work file, renamed onto ``path`` by ``commit``.

    Until ``commit`` (and if anything fails) ``path`` is untouched. The work file is a temporary file
    beside ``path`` that is removed on failure, or -- for resumable runs -- a given ``work_path`` that
    is kept on failure and reopened with ``resume_rows`` (features past that count, written after the
    last checkpoint, are dropped). Memory stays bounded by one chunk however many polygons a run finds.
    """

    def __init__(self, path: str | os.PathLike, *, layer: str = "panels", overwrite: bool = False,
                 work_path: str | os.PathLike | None = None, resume_rows: int | None = None):
        self.path = check_output_path(path, overwrite=overwrite, suffixes=(Path(path).suffix.lower(),))
        self.layer = layer
        self.overwrite = overwrite
        self.rows = 0
        self._keep_on_abort = work_path is not None
        if work_path is None:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".tmp{self.path.suffix}",
                                        dir=self.path.parent)
            os.close(fd)
            work_path = name
            os.unlink(name)  # GDAL wants to create the file itself
        self.work_path = Path(work_path)
        self._created = False
        if resume_rows is not None and self.work_path.exists():
            _truncate_layer(self.work_path, layer, resume_rows)
            self._created, self.rows = True, resume_rows
        else:
            _remove_sqlite_files(self.work_path)

    def __enter__(self) -> "GeoPackageWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def append(self, frame, *, layer_metadata: dict[str, str] | None = None) -> None:
        import pyogrio

        try:
            pyogrio.write_dataframe(frame, self.work_path, layer=self.layer, driver="GPKG", append=self._created,
                                    geometry_type="Polygon" if not self._created else None,
                                    promote_to_multi=False, layer_metadata=layer_metadata or None,
                                    # GeoPackage 1.2: read without warnings by the GDAL of older QGIS installs
                                    dataset_options=None if self._created else {"VERSION": "1.2"})
        except OSError as exc:
            self.abort()
            raise OutputError(f"could not write {self.path}: {exc.strerror or exc}") from None
        self._created = True
        self.rows += len(frame)

    def commit(self, *, empty_frame, metadata: dict[str, str] | None = None, style_qml: str | None = None,
               style_name: str = "solarmap default") -> Path:
        """Finish the file (``empty_frame`` gives the schema if nothing was appended) and rename it."""
        try:
            self.append(empty_frame, layer_metadata={k: str(v) for k, v in (metadata or {}).items()})
            if style_qml is not None:
                add_layer_style(self.work_path, layer=self.layer,
                                geometry_column=_gpkg_geometry_column(self.work_path, self.layer),
                                qml=style_qml, name=style_name)
            if self.path.exists() and not self.overwrite:
                raise OutputError(f"output exists: {self.path} (use --overwrite to replace it)")
            os.replace(self.work_path, self.path)
        except OSError as exc:
            self.abort()
            if isinstance(exc, OutputError):
                raise
            raise OutputError(f"could not write {self.path}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            self.abort()
            raise OutputError(f"could not write {self.path}: {exc}") from None
        _remove_sqlite_files(self.work_path)
        return self.path

    def abort(self) -> None:
        """Give up: the target path is left as it was; a temporary work file is removed."""
        if not self._keep_on_abort:
            _remove_sqlite_files(self.work_path)


def _remove_sqlite_files(path: Path) -> None:
    """Remove a work file and any SQLite side files (GeoPackages are SQLite databases)."""
    for leftover in (path, Path(f"{path}-journal"), Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def _truncate_layer(path: Path, layer: str, rows: int) -> None:
    """Drop features past the first ``rows`` (written after a resumable run's last checkpoint)."""
    with contextlib.closing(sqlite3.connect(path)) as con, con:
        con.execute(f'DELETE FROM "{layer}" WHERE fid > ?', (rows,))
        con.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (rows, layer))


def write_geopackage(frame, path: str | os.PathLike, *, layer: str = "panels",
                     metadata: dict[str, str] | None = None, style_qml: str | None = None,
                     style_name: str = "solarmap default", overwrite: bool = False) -> Path:
    """Write a GeoDataFrame as one GeoPackage layer, with run metadata and a default QGIS style.

    The file appears at ``path`` only when complete (temporary file + rename).
    """
    writer = GeoPackageWriter(path, layer=layer, overwrite=overwrite)
    with writer:
        writer.append(frame)
        return writer.commit(empty_frame=frame.iloc[:0], metadata=metadata, style_qml=style_qml,
                             style_name=style_name)


def _gpkg_geometry_column(path: Path, layer: str) -> str:
    with contextlib.closing(sqlite3.connect(path)) as con:
        row = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?",
                          (layer,)).fetchone()
    return row[0] if row else "geom"


def add_layer_style(path: str | os.PathLike, *, layer: str, geometry_column: str, qml: str,
                    name: str) -> None:
    """Store ``qml`` as the layer's default style in the QGIS ``layer_styles`` table."""
    with contextlib.closing(sqlite3.connect(path)) as con, con:
        con.execute(
            """CREATE TABLE IF NOT EXISTS layer_styles (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256),
                f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT,
                useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),
                update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"""
        )
        con.execute(
            "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier, description) "
            "VALUES ('layer_styles', 'attributes', 'layer_styles', 'QGIS layer styles')"
        )
        con.execute(
            "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, "
            "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, owner) "
            "VALUES ('', '', ?, ?, ?, ?, '', 1, ?, 'solarmap')",
            (layer, geometry_column, name, qml, "Panel outlines graduated by area"),
        )


def read_layer_metadata(path: str | os.PathLike, layer: str = "panels") -> dict[str, str]:
    """The run metadata stored with a layer by :func:`write_geopackage`."""
    import pyogrio

    return dict(pyogrio.read_info(path, layer=layer).get("layer_metadata") or {})


def write_geotiff(path: str | os.PathLike, array: np.ndarray, *, transform: Affine, crs,
                  nodata=None, overwrite: bool = False, tiled: bool = True) -> Path:
    """Write a small (in-memory) array as a compressed GeoTIFF, atomically."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    profile = dict(driver="GTiff", height=array.shape[1], width=array.shape[2], count=array.shape[0],
                   dtype=array.dtype, crs=crs, transform=transform, compress="deflate", nodata=nodata)
    if tiled and min(array.shape[1:]) >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(array)
    return Path(path)


def block_aligned(info: SceneInfo, stride_px: int) -> bool:
    """Whether tile reads start on the file's internal block boundaries (no resampling case)."""
    block_h, block_w = info.block_shape
    same_grid = info.grid == info.source_grid
    return same_grid and stride_px % block_h == 0 and stride_px % block_w == 0


HEAT_SCALE = 100  # heatmap value = normalised CAM x 100 (so the default CAM threshold 0.5 reads 50)


class HeatmapWriter:
    """The stitched CAM as a tiled, compressed uint8 GeoTIFF on the working grid, written per tile core.

    Tiles are written as they are scored (windowed, so memory stays flat); negative tiles are left
    at 0. ``finish`` builds overviews so QGIS draws it quickly at any zoom, then renames it into place.
    """

    def __init__(self, path: str | os.PathLike, grid: Grid, *, overwrite: bool = False,
                 work_path: str | os.PathLike | None = None, resume: bool = False):
        self.path = check_output_path(path, overwrite=overwrite, suffixes=(".tif", ".tiff"), kind="the heatmap GeoTIFF")
        self.overwrite = overwrite
        self.work_path = Path(work_path) if work_path else self.path.with_name(f".{self.path.name}.tmp.tif")
        self._keep_on_abort = work_path is not None
        if resume and self.work_path.exists():
            self._dataset = rasterio.open(self.work_path, "r+")
        else:
            profile = dict(driver="GTiff", height=grid.height, width=grid.width, count=1, dtype="uint8",
                           crs=grid.crs, transform=grid.transform, tiled=True, blockxsize=256, blockysize=256,
                           compress="deflate", BIGTIFF="IF_SAFER")
            self._dataset = rasterio.open(self.work_path, "w", **profile)
            self._dataset.set_band_description(1, f"normalised CAM x {HEAT_SCALE}")

    def write(self, tile: Tile, score_map: np.ndarray) -> None:
        """Write the tile's core part of a full-tile score map (normalised CAM)."""
        r0 = int(tile.core.row_off - tile.window.row_off)
        c0 = int(tile.core.col_off - tile.window.col_off)
        core = score_map[r0: r0 + int(tile.core.height), c0: c0 + int(tile.core.width)]
        heat = np.clip(np.rint(core * HEAT_SCALE), 0, 255).astype(np.uint8)
        self._dataset.write(heat, 1, window=tile.core)

    def finish(self) -> Path:
        self._dataset.build_overviews([2, 4, 8, 16, 32], Resampling.average)
        self._dataset.update_tags(ns="rio_overview", resampling="average")
        self._dataset.close()
        if self.path.exists() and not self.overwrite:
            raise OutputError(f"output exists: {self.path} (use --overwrite to replace it)")
        os.replace(self.work_path, self.path)
        return self.path

    def close(self) -> None:
        """Stop without finishing (kept for resuming when a work path was given)."""
        if not self._dataset.closed:
            self._dataset.close()
        if not self._keep_on_abort:
            with contextlib.suppress(FileNotFoundError):
                self.work_path.unlink()
