"""The resume journal: ``.NAME.gpkg.partial/`` beside an output, shared by single and regional runs.

It holds a key that names the run (inputs, model, settings), the run's work files and its records:
a single raster's :class:`~solarmap.pipeline.scene.RunState` at a tile-row boundary, or one part per
finished chunk of a regional run. Records are written to a temporary file and renamed, so a kill at
any moment leaves either the old record or the new one. ``--resume`` continues from what is there,
only when the key matches; without it a stale journal is discarded.

Durability: a record and a finished output are flushed to the disk before they are renamed, and
their directory after (:func:`~solarmap.geo.output.durable_replace`), so a power cut leaves the old
record or the new one whole; the record before the last is kept (``NAME.prev``), so a record that
still comes back damaged is read as the one before it, and the run continues from there
(docs/faults.md says what is and is not guaranteed).

A run ends in three steps: its outputs are completed inside the journal, the run's result is
recorded as ``finished``, the outputs are renamed into place, and the journal is removed. A run
killed after the record is finished by ``--resume`` without redoing anything
(:meth:`Journal.resume_finished`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Sequence

from solarmap.errors import OutputError
from solarmap.faults import fault_point
from solarmap.geo.output import durable_replace, fsync_path

__all__ = ["Journal", "run_key"]

FINISHED = "finished.pkl"

log = logging.getLogger(__name__)


def run_key(sources: Sequence[str], *, scorer_name: str, config, **extra) -> str:
    """A short digest of what decides a run's output: the sources (path, size, modification time),
    the scorer, the settings and anything in ``extra``."""
    identity = {"sources": [_file_identity(str(s)) for s in sources], "scorer": scorer_name,
                "config": asdict(config) if is_dataclass(config) else config, **extra}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_identity(path: str) -> list:
    stat = os.stat(path) if os.path.exists(path) else None
    return [os.path.abspath(path), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]


class Journal:
    """The journal of the output at ``out``."""

    def __init__(self, out: str | os.PathLike):
        out = Path(out)
        self.path = out.with_name(f".{out.name}.partial")

    def open(self, key: str, *, resume: bool) -> bool:
        """Make the journal ready for the run named ``key``; True if it continues an earlier one.

        With ``resume`` an existing journal must be of the same run (else OutputError, and it is
        kept); without, an existing journal is discarded."""
        resuming = False
        if self.path.exists():
            if resume:
                if not self._holds(key):
                    raise OutputError(f"cannot resume: the interrupted run in {self.path} used other inputs, "
                                      f"model or settings (run without --resume to start over)")
                resuming = True
            else:
                log.info("discarding the journal of an earlier interrupted run: %s", self.path)
                shutil.rmtree(self.path)
        elif resume:
            log.info("nothing to resume at %s; starting a new run", self.path)
        self.path.mkdir(exist_ok=True)
        if not resuming:
            (self.path / "key").write_text(key)
            fsync_path(self.path / "key")
            fsync_path(self.path.parent)  # the journal's directory entry itself
        return resuming

    def _holds(self, key: str) -> bool:
        key_file = self.path / "key"
        return key_file.exists() and key_file.read_text() == key

    def resume_finished(self, key: str, outputs: Sequence[tuple[Path, Path]]) -> Any:
        """If the run named ``key`` recorded its result once its outputs were complete (and was killed
        while putting them in place), put them in place and return that result; else None."""
        result = self.read(FINISHED) if self._holds(key) else None
        if result is not None:
            self.publish(outputs)
        return result

    def is_finished(self) -> bool:
        """Whether the journal holds a finished run (of any key): its output may already be in place."""
        return (self.path / FINISHED).exists()

    def finish(self, result: Any, outputs: Sequence[tuple[Path, Path]]) -> None:
        """Record ``result``, then rename each completed work file onto its target (``outputs``:
        (work file, target) pairs, in order), then remove the journal."""
        self.record(FINISHED, result)
        self.publish(outputs)

    def publish(self, outputs: Sequence[tuple[Path, Path]]) -> None:
        """Rename the work files that are still here onto their targets, then remove the journal."""
        for work, target in outputs:
            if work.exists():
                durable_replace(work, target)
        fault_point("published")
        self.discard()

    def file(self, name: str) -> Path:
        """A work file kept in the journal (e.g. the GeoPackage being written)."""
        return self.path / name

    def record(self, name: str, value: Any) -> None:
        """Store ``value`` under ``name``, atomically."""
        target = self.path / name
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(pickle.dumps(value))
        fault_point("journal")
        if target.exists():
            os.replace(target, target.with_name(target.name + ".prev"))  # the last whole record, kept
        durable_replace(tmp, target)

    def read(self, name: str, default: Any = None) -> Any:
        """The record ``name``; where it is missing or damaged, the one before it; else ``default``."""
        for path in (self.path / name, self.path / f"{name}.prev"):
            if not path.exists():
                continue
            try:
                return pickle.loads(path.read_bytes())
            except Exception as exc:  # noqa: BLE001 - a damaged record, whatever the unpickler says
                log.warning("journal record %s is damaged (%s); using the one before it", path, type(exc).__name__)
        return default

    def discard(self) -> None:
        """Remove the journal: the run is complete."""
        shutil.rmtree(self.path, ignore_errors=True)
