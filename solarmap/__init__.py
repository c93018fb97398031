"""solarmap: find solar panels in georeferenced aerial imagery and map them as polygons with areas.

Packages, each importing only those before it: ``geo`` (no torch), ``model`` (inference),
``pipeline`` (runs), ``training`` (on top of everything).
"""

__version__ = "0.1.0"


def __getattr__(name):
    """``solarmap.detect``, ``solarmap.summarize`` and ``solarmap.compare`` without importing torch
    and GDAL when only the version is wanted."""
    if name == "detect":
        from solarmap.pipeline import detect

        return detect
    if name in ("summarize", "compare"):
        from solarmap.geo import inventory

        return getattr(inventory, name)
    raise AttributeError(f"module 'solarmap' has no attribute {name!r}")
