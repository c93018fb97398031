"""Writing results: GeoPackages and GeoTIFFs, atomically, never over an existing file unasked.

Every output is written to a temporary file beside its target and renamed onto it when complete, so
a failed or interrupted run leaves either the old file or nothing, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling

from solarmap.errors import OutputError
from solarmap.faults import fault_point
from solarmap.geo.tiling import Grid, Tile

# ---------------------------------------------------------------------------------------------
# Output paths and atomic writes


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's contents from the page cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` onto ``dst`` so that a power cut leaves one of the two whole: ``src``'s data is
    flushed before the rename and the directory (which holds the rename) after it. Without the
    first, a renamed file can come back empty after a power cut (ext4, XFS: the rename reaches the
    disk before the data); without the second, the rename itself can be lost."""
    fsync_path(src)
    os.replace(src, dst)
    fsync_path(Path(dst).parent if str(Path(dst).parent) else ".")


def check_output_path(path: str | os.PathLike, *, overwrite: bool, suffixes: Sequence[str] = (".gpkg",),
                      kind: str = "GeoPackage") -> Path:
    """Fail early, before any work, if ``path`` could not be written at the end."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise OutputError(f"output {out} must end in {' or '.join(suffixes)} (solarmap writes {kind} there)")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"output directory is not a directory: {parent}")
    if not parent.is_dir():
        raise OutputError(f"output directory does not exist: {parent}")
    _check_writable(parent)
    if out.is_dir():
        raise OutputError(f"output path is a directory: {out}")
    if out.exists() and not overwrite:
        raise OutputError(f"output exists: {out} (use --overwrite to replace it)")
    return out


def _check_writable(directory: Path) -> None:
    """Create and remove a file in ``directory``: permission bits do not tell (root ignores them; a
    read-only mount or a virtual file system refuses everyone)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".solarmap-probe-", dir=directory)
    except OSError as exc:
        raise OutputError(f"output directory is not writable: {directory} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


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
        durable_replace(tmp, out)
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
        fault_point("gpkg-append")

    def commit(self, *, empty_frame, metadata: dict[str, str] | None = None, style_qml: str | None = None,
               style_name: str = "solarmap default") -> Path:
        """Finish the file (``empty_frame`` gives the schema if nothing was appended) and rename it."""
        self.finish(empty_frame=empty_frame, metadata=metadata, style_qml=style_qml, style_name=style_name)
        return self.publish()

    def finish(self, *, empty_frame, metadata: dict[str, str] | None = None, style_qml: str | None = None,
               style_name: str = "solarmap default") -> None:
        """Complete the work file: the layer (``empty_frame`` gives the schema if nothing was
        appended), its metadata and its style. ``publish`` then puts it in place."""
        try:
            self.append(empty_frame, layer_metadata={k: str(v) for k, v in (metadata or {}).items()})
            if style_qml is not None:
                add_layer_style(self.work_path, layer=self.layer,
                                geometry_column=_gpkg_geometry_column(self.work_path, self.layer),
                                qml=style_qml, name=style_name)
        except OutputError:
            raise
        except OSError as exc:
            self.abort()
            raise OutputError(f"could not write {self.path}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            self.abort()
            raise OutputError(f"could not write {self.path}: {exc}") from None
        fault_point("commit")

    def add_layer(self, frame, *, layer: str, metadata: dict[str, str] | None = None, style_qml: str | None = None,
                  style_description: str = "", style_name: str = "solarmap default") -> None:
        """Write ``frame`` whole as another layer of the finished work file (replacing a layer of that
        name: a run finished again after a kill), with its metadata and style, before ``publish``."""
        import pyogrio

        try:
            pyogrio.write_dataframe(frame, self.work_path, layer=layer, driver="GPKG", promote_to_multi=True,
                                    geometry_type="MultiPolygon", layer_options={"OVERWRITE": "YES"},
                                    layer_metadata={k: str(v) for k, v in (metadata or {}).items()} or None)
            if style_qml is not None:
                add_layer_style(self.work_path, layer=layer, geometry_column=_gpkg_geometry_column(self.work_path, layer),
                                qml=style_qml, name=style_name, description=style_description)
        except (OSError, sqlite3.Error) as exc:
            self.abort()
            raise OutputError(f"could not write {self.path}: {getattr(exc, 'strerror', None) or exc}") from None

    def publish(self) -> Path:
        """Rename the finished work file onto the target."""
        try:
            if self.path.exists() and not self.overwrite:
                raise OutputError(f"output exists: {self.path} (use --overwrite to replace it)")
            durable_replace(self.work_path, self.path)
        except OutputError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise OutputError(f"could not write {self.path}: {exc.strerror or exc}") from None
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
                    name: str, description: str = "Panel outlines graduated by area") -> None:
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
        # a run finished again after a kill must not stack a second copy of its style
        con.execute("DELETE FROM layer_styles WHERE f_table_name = ? AND styleName = ?", (layer, name))
        con.execute(
            "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, "
            "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, owner) "
            "VALUES ('', '', ?, ?, ?, ?, '', 1, ?, 'solarmap')",
            (layer, geometry_column, name, qml, description),
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


HEAT_SCALE = 100  # heatmap value = normalised CAM x 100 (so the default CAM threshold 0.5 reads 50)


class HeatmapWriter:
    """The stitched CAM as a tiled, compressed uint8 GeoTIFF on the working grid, written per tile core.

    Tiles are written as they are scored (windowed, so memory stays flat) into ``work_path`` (a file in
    the run's journal, reopened on resume); negative tiles are left at 0. ``complete`` builds overviews
    so QGIS draws it quickly at any zoom; the journal then renames it onto ``path``.
    """

    def __init__(self, path: str | os.PathLike, grid: Grid, *, work_path: str | os.PathLike, overwrite: bool = False,
                 resume: bool = False):
        self.path = check_output_path(path, overwrite=overwrite, suffixes=(".tif", ".tiff"), kind="the heatmap GeoTIFF")
        self.work_path = Path(work_path)
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

    def complete(self) -> None:
        """Overviews, then close: the work file is final (the caller's journal renames it into place)."""
        self._dataset.build_overviews([2, 4, 8, 16, 32], Resampling.average)
        self._dataset.update_tags(ns="rio_overview", resampling="average")
        self._dataset.close()

    def close(self) -> None:
        """Stop without completing (the work file stays in the journal for resuming)."""
        if not self._dataset.closed:
            self._dataset.close()
