"""scene -> tiles -> batches -> score maps -> polygons -> GeoPackage: the tool behind ``solarmap detect``.

The scoring step is a plug-in (:class:`Scorer`): anything that maps a batch of tiles to per-tile
probabilities and per-tile score maps; :func:`solarmap.model.scorer.build_scorer` makes the model's.
"""

from solarmap.pipeline.api import detect, detect_scene, detect_to_file, run_metadata
from solarmap.pipeline.config import DetectConfig, DetectStats, Scorer, SpectralBaseline
from solarmap.pipeline.scene import RunState, SceneRun

__all__ = ["DetectConfig", "DetectStats", "RunState", "SceneRun", "Scorer", "SpectralBaseline", "detect",
           "detect_scene", "detect_to_file", "run_metadata"]
