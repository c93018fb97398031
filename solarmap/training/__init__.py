"""Training, on top of everything else: data, greedy stages, calibration, the segmentation head,
synthetic towns and the recipe that ties them together. Nothing below imports it."""
