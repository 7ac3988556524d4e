"""Decision thresholds from normal scores alone (torch-free: fit, compile --refit-threshold and
`edgecore threshold` on the camera all compute the boundary with this one implementation)."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np

from edgecore.runtime.scoring import Normalization


def as_scores(scores: object, name: str = "scores") -> np.ndarray:
    """Return a non-empty, finite, floating array (keeps float32 to save memory)."""
    arr = np.asarray(scores)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.issubdtype(arr.dtype, np.floating):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def descending_steps(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descending sort order, the sorted scores, and the positions ending each run of ties.

    Thresholding at a score value flags every sample up to and including the last
    sample with that value, so curves are only evaluated at those positions.
    """
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    ends = np.append(np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1)
    return order, sorted_scores, ends


def threshold_for_false_alarm_rate(normal_scores: object, rate: float) -> float:
    """Decision threshold from normal validation scores alone, for ``score >= threshold``.

    Returns the smallest *observed* normal score ``t`` whose false-alarm fraction
    ``mean(normal_scores >= t)`` is ``<= rate``; if no observed score qualifies
    (always the case for ``rate=0``), returns the next float above the maximum
    (``np.nextafter`` in the scores' dtype), which flags no normal score. Ties are
    never split, so the achieved rate can be below ``rate``.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    s = as_scores(normal_scores, "normal_scores").ravel()
    _, sorted_scores, ends = descending_steps(s)
    flagged_fraction = (ends + 1) / s.size
    ok = np.flatnonzero(flagged_fraction <= rate)
    if ok.size:
        return float(sorted_scores[ends[ok[-1]]])
    top = s.max()
    return float(np.nextafter(top, np.asarray(np.inf, dtype=top.dtype)))


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
