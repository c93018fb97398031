"""solarmap: find solar panels in georeferenced aerial imagery and map them as polygons."""

__version__ = "0.1.0"
