"""Decision thresholds from normal images only (used at fit time and re-fit on the camera's engine).

The implementation is the runtime's (torch-free), so `edgecore threshold` on the camera computes
the same boundary as `fit` and `compile --refit-threshold`.
"""
from edgecore.runtime.thresholds import threshold_config

__all__ = ["threshold_config"]
