"""The labelled-defect (anomaly) bank and the one rule that sharpens patch distances with it.

Labeled PatchCore (seed §5.2): besides the normal coreset, keep the patches of a few
labelled defects. Per patch, ``d_n`` is the distance to the normal bank and ``d_a``
the distance to the anomaly bank; the sharpened distance is

    s = d_n + weight · max(0, d_n − d_a)

A patch closer to a known defect than to any normal patch is pushed up by ``weight``
times that margin; every other patch keeps ``d_n`` exactly. So ``s >= d_n`` always:
a defect of a type nobody labelled scores what the normal-only model gave it (never
less), and the rule is continuous (host and camera cannot flip a step between them).
Host and camera both run it inside :class:`~edgecore.runtime.scorer.PatchScorer`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecore.runtime.errors import BundleError
from edgecore.runtime.search import ExactSearch

#: The combined score, recorded verbatim in the model config and the manifest.
SCORE_RULE = "d_n + weight * max(0, d_n - d_a)"
ANOMALY_BANK_FILE = "anomaly_bank.npy"


class AnomalyBank:
    """K×D labelled-defect patches searched exactly (the bank is small: at most a few thousand rows)."""

    def __init__(self, points: np.ndarray, weight: float) -> None:
        points = np.asarray(points)
        if points.ndim != 2 or points.shape[0] == 0 or points.dtype != np.float32:
            raise ValueError(f"anomaly bank must be a non-empty K×D float32 array, got {points.dtype} {points.shape}")
        if not np.isfinite(points).all():
            raise ValueError("anomaly bank contains NaN or infinite values")
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"anomaly weight must be a finite number >= 0, got {weight!r}")
        self.points = points
        self.weight = float(weight)
        self.search = ExactSearch(points)

    @property
    def dim(self) -> int:
        return int(self.points.shape[1])

    def sharpen(self, normal_distances: np.ndarray, features: np.ndarray) -> np.ndarray:
        """N×P distances to the normal bank + N×P×D features → N×P sharpened distances (:data:`SCORE_RULE`)."""
        n, p, d = features.shape
        anomaly_distances = self.search.search(features.reshape(n * p, d), k=1)[0][:, 0].reshape(n, p)
        margin = np.maximum(normal_distances - anomaly_distances, 0.0)
        return (normal_distances + np.float32(self.weight) * margin).astype(normal_distances.dtype, copy=False)


def validate_labelled_section(section: object, embed_dim: int, where: str) -> None:
    """manifest/config ``labelled``: file, [K, embed_dim] shape, finite weight >= 0 (else BundleError)."""
    if not isinstance(section, dict):
        raise BundleError(f"{where}: expected an object")
    if not isinstance(section.get("file"), str):
        raise BundleError(f"{where}.file: expected a file name, got {section.get('file')!r}")
    shape = section.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in shape) and shape[0] >= 1):
        raise BundleError(f"{where}.shape: expected [rows >= 1, embed_dim], got {shape!r}")
    if shape[1] != embed_dim:
        raise BundleError(f"{where}.shape: {shape[1]}-d patches, but the graph embeds {embed_dim}-d (features.embed_dim)")
    weight = section.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
        raise BundleError(f"{where}.weight: expected a finite number >= 0, got {weight!r}")
    if section.get("score", SCORE_RULE) != SCORE_RULE:
        raise BundleError(f"{where}.score: {section.get('score')!r}, but this runtime implements only {SCORE_RULE!r}")


def open_anomaly_bank(bundle: Path, manifest: dict) -> AnomalyBank | None:
    """The verified bundle's anomaly bank (None when the bundle has no labelled defects).

    The array is checked against the manifest (shape, float32, finite) before any frame is scored.
    """
    section = manifest.get("labelled")
    if section is None:
        return None
    path = bundle / section["file"]
    try:
        points = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable anomaly bank: {exc}") from exc
    if points.dtype != np.float32 or list(points.shape) != section["shape"]:
        raise BundleError(f"{path}: {points.dtype} {list(points.shape)}, manifest labelled.shape says float32 {section['shape']}")
    if not np.isfinite(points).all():
        raise BundleError(f"{path}: the anomaly bank holds NaN or infinite values; refused")
    return AnomalyBank(points, section["weight"])
