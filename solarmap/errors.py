"""The solarmap error tree.

Every error a user can cause is a ``SolarmapError``; the CLI turns it into one line and exit 1.
Subclasses also inherit the builtin a caller would naturally catch (``ValueError``, ``OSError``).
"""

from __future__ import annotations


class SolarmapError(Exception):
    """Root of every error solarmap raises on purpose."""


class InputError(SolarmapError, ValueError):
    """The input raster (or its options) cannot be used as given."""


class GeoreferenceError(InputError):
    """The raster has no CRS or no geotransform, so polygons cannot be placed on the map."""


class OptionError(SolarmapError, ValueError):
    """An option value is out of range or inconsistent with another option."""


class OutputError(SolarmapError, OSError):
    """The output cannot be written where asked (exists, missing directory, not writable)."""


class ModelError(SolarmapError, ValueError):
    """A model checkpoint is missing, corrupt or incompatible."""
