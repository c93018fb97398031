"""Named points where a test can kill the process, to prove that a run killed there resumes.

``SOLARMAP_KILL_AT=POINT[:N]`` in the environment makes the N-th (default first) pass through
``fault_point(POINT)`` send SIGKILL to the process itself: no handler runs, no file is closed, as
when the power fails, the OOM killer strikes or a cloud node is preempted. Unset (always, outside
tests) a point costs one dictionary lookup. The points (see ``scripts/fault_table.py``):

* ``batch``       -- a batch has been scored, not yet turned into polygons;
* ``journal``     -- a journal record is written to its temporary file, not yet renamed;
* ``gpkg-append`` -- features were appended to the work GeoPackage, not yet covered by a record;
* ``chunk``       -- a regional chunk's result is recorded;
* ``commit``      -- the work GeoPackage is complete (metadata, style), not yet renamed;
* ``published``   -- the output is renamed into place, the journal not yet removed.
"""

from __future__ import annotations

import os
import signal

__all__ = ["KILL_AT", "POINTS", "fault_point"]

KILL_AT = "SOLARMAP_KILL_AT"
POINTS = ("batch", "journal", "gpkg-append", "chunk", "commit", "published")
_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process here if ``SOLARMAP_KILL_AT`` names this point and pass."""
    wanted = os.environ.get(KILL_AT)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
