"""Decision thresholds from normal images only (used at fit time and re-fit on the camera's engine)."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

from edgecore.metrics import threshold_for_false_alarm_rate
from edgecore.runtime.scoring import Normalization


def threshold_config(normal_scores: np.ndarray, false_alarm_rate: float, held_out: bool) -> dict:
    """Decision threshold from normal images only, plus the normalisation that puts it at 0.5.

    A handful of held-out images cannot show a 1 % tail empirically, so the
    threshold is the larger of the empirical quantile and a Gaussian tail
    estimate (mean + z·std); with enough images the empirical one dominates.
    """
    normal_scores = np.asarray(normal_scores, dtype=np.float64)
    empirical = float(threshold_for_false_alarm_rate(normal_scores, false_alarm_rate))
    gaussian = empirical
    if len(normal_scores) >= 2 and false_alarm_rate > 0:
        z = NormalDist().inv_cdf(1.0 - false_alarm_rate)
        gaussian = float(np.mean(normal_scores) + z * np.std(normal_scores, ddof=1))
    threshold = max(empirical, gaussian)
    normalization = Normalization(threshold=threshold, min=float(np.min(normal_scores)), max=float(np.max(normal_scores)))
    return {
        "value": threshold,
        "mode": "false_alarm_rate",
        "false_alarm_rate": false_alarm_rate,
        "empirical": empirical,
        "gaussian_tail": gaussian,
        "from_held_out_normals": held_out,
        "validation_scores": [float(s) for s in normal_scores],
        "normalization": normalization.to_dict(),
    }
