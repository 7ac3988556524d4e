"""The held-out validation images travel in the bundle, so `compile` can re-fit the operating point.

A threshold fitted on fp32 host scores does not hold for an INT8 engine whose
scores shift (issue #15: recall at the threshold fell from 0.38 to 0.24). The
bundle therefore keeps the validation crops (uint8, exactly what the graph sees)
next to their fp32 scores; `compile` scores them with the new engine, re-fits
threshold + normalisation from those scores and records the shift.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

VALIDATION_FILE = "validation/crops.npy"
#: The crops must reproduce the stored fp32 scores this closely (relative), or they are not the same images.
SCORE_MATCH = 1e-4


def validation_crops(model, log=lambda message: None) -> tuple[np.ndarray | None, str]:
    """The model's held-out validation images, preprocessed, if they still are what the fit scored.

    Args:
        model: a loaded :class:`~edgecore.model.PatchCoreModel`.
        log: progress lines.

    Returns:
        (N×H×W×3 uint8 crops in the order of ``threshold.validation_scores``, or None; why).
    """
    from edgecore.runtime.errors import EdgecoreError
    from edgecore.runtime.imageio import load_image
    from edgecore.runtime.preprocess import preprocess

    sources = model.config.get("fit", {}).get("validation_sources") or []
    stored = np.asarray(model.config["threshold"].get("validation_scores", []), dtype=np.float64)
    if not sources or len(sources) != len(stored):
        return None, "the model records no held-out validation images"
    try:
        crops = np.stack([preprocess(load_image(Path(source)), model.preprocess_config) for source in sources])
    except (EdgecoreError, OSError) as exc:
        return None, f"validation image unreadable ({exc})"
    scores = model.score_crops(crops).image
    worst = float(np.max(np.abs(scores - stored) / np.maximum(np.abs(stored), 1e-12)))
    if worst > SCORE_MATCH:
        return None, f"validation images changed since fit (score differs by {worst:.2e} relative)"
    log(f"export: storing the {len(crops)} validation images for the engine's own threshold")
    return crops, f"{len(crops)} images, fp32 scores reproduced within {worst:.1e}"


def load_validation(bundle: Path, manifest: dict) -> np.ndarray | None:
    """The stored validation crops of a verified bundle (None for bundles exported without them)."""
    from edgecore.runtime.bundle import map_hw
    from edgecore.runtime.errors import BundleError

    entry = manifest.get("validation")
    if not entry:
        return None
    if not isinstance(entry, dict) or entry.get("file") not in manifest["files"]:
        raise BundleError(f"{bundle}: manifest.validation {entry!r} names no verified file")
    path = bundle / entry["file"]
    try:
        crops = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable validation images: {exc}") from exc
    expected = (len(manifest["threshold"].get("validation_scores", [])), *map_hw(manifest["preprocess"]), 3)
    if crops.dtype != np.uint8 or crops.shape != expected:
        raise BundleError(f"{path}: validation images {crops.dtype} {crops.shape}, manifest says uint8 {expected}")
    return crops


def score_shift(engine_scores: np.ndarray, fp32_scores: np.ndarray, old: float, new: float) -> dict:
    """How the engine's scores moved against the host's fp32 scores of the same images."""
    engine_scores, fp32_scores = np.asarray(engine_scores, np.float64), np.asarray(fp32_scores, np.float64)
    relative = (engine_scores - fp32_scores) / np.maximum(np.abs(fp32_scores), 1e-12)
    return {
        "images": int(len(engine_scores)),
        "mean_relative": float(np.mean(relative)),
        "max_abs_relative": float(np.max(np.abs(relative))),
        "threshold_fp32": float(old),
        "threshold_engine": float(new),
    }


def describe_shift(shift: dict, precision: str) -> str:
    return (
        f"compile: {precision} engine vs fp32 on {shift['images']} validation images: score shift "
        f"{100 * shift['mean_relative']:+.2f} % mean, {100 * shift['max_abs_relative']:.2f} % max; threshold "
        f"{shift['threshold_fp32']:.6g} → {shift['threshold_engine']:.6g} (re-fitted on the engine)"
    )
