"""Georeferenced rasters and vectors, without torch: tiling (pure window and affine math), raster
reading, masks -> polygons with seams and areas, colour refinement, and the written outputs."""
