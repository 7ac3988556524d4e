"""Contamination-robust coreset: flag training images that look like defects and leave them out of the bank.

Why: k-center greedy picks the patches farthest from everything it already holds,
so a defective image hidden among the "normal" training images is exactly what it
keeps first; its defect then scores as normal forever (seed §2.3/§5.1; SoftPatch,
NeurIPS 2022). A defect is rare *across images*: a normal patch has close
neighbours in other normal images, a defect patch does not. So each training
image is scored by its worst patch's distance to the nearest patch of OTHER
training images (the mean of its :data:`TOP_PATCHES` worst patches: one noisy
patch does not flag a normal image, a defect spans several), and images whose
score is an outlier are dropped before the sampler runs.

Speed: distances are taken in a 64-d random projection (JL) against a bounded random
subsample of reference patches, with the runtime's exact search (≈2 s for bottle's
147 k patches on 2 cores; see benchmarks/RESULTS.md §15.3). Images are split into
folds; an image's queries only see reference patches of the other folds, so no
image is its own neighbour.

Modes (``fit --denoise``): ``off``; ``auto`` — no contamination estimate: drop images
whose robust z-score (median / MAD of the image scores) exceeds :data:`AUTO_Z`;
a fraction ``f`` in (0, 0.5) — drop the ``round(f × N)`` highest-scoring images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgecore.coreset import projection_matrix
from edgecore.knn import exact_search

AUTO_Z = 3.5  # Iglewicz & Hoaglin's cut for the modified z-score: "potential outlier"
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution × this = its standard deviation
AUTO_MAX_FRACTION = 0.25  # auto never drops more: beyond that the median/MAD are not normal data's any more
REFERENCE_PATCHES = 4096  # reference subsample size: bounds the cost on bottle-size banks
PROJECTION_DIM = 64  # bottle: separates the planted defects as well as 128-d at half the cost
TOP_PATCHES = 3
FOLDS = 8


@dataclass(frozen=True)
class DenoiseResult:
    """Which bank images to keep, and the record written to config.json / the manifest."""

    keep: np.ndarray  # indices (into the bank images) that stay, sorted
    record: dict


def parse_denoise(value: str | float | None) -> str | float:
    """``off`` | ``auto`` | a fraction in (0, 0.5) → the FitConfig value; raise ValueError otherwise."""
    if value is None:
        return "off"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("off", "auto"):
            return text
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"denoise must be off, auto or a fraction in (0, 0.5), got {value!r}") from None
    if isinstance(value, bool) or not 0.0 < float(value) < 0.5:
        raise ValueError(f"denoise fraction must be in (0, 0.5), got {value!r}")
    return float(value)


def image_outlier_scores(
    features: np.ndarray, projection_dim: int = PROJECTION_DIM, seed: int = 0,
    reference_patches: int = REFERENCE_PATCHES, folds: int = FOLDS,
) -> np.ndarray:
    """Per image: mean over its :data:`TOP_PATCHES` worst patches of the L2 distance to the nearest
    reference patch of other images.

    Args:
        features: N×P×D patch embeddings of the bank images.
        projection_dim: random-projection size; distances are taken there.
        seed: for the projection and the reference subsample.
        reference_patches: at most this many reference patches in all.
        folds: images are split into this many folds (at most N); queries see only other folds.

    Returns:
        N float32 scores (higher = less like the other images).
    """
    count, per_image, dim = features.shape
    if count < 2:
        return np.zeros(count, np.float32)
    rng = np.random.default_rng([seed, 15])
    matrix = projection_matrix(dim, projection_dim, rng)
    flat = features.reshape(-1, dim)
    points = np.ascontiguousarray(flat @ matrix if matrix is not None else flat, dtype=np.float32)
    folds = min(folds, count)
    fold_of_image = rng.permutation(count) % folds
    per_image_refs = max(1, min(per_image, reference_patches // count))
    reference = np.concatenate(
        [i * per_image + rng.choice(per_image, per_image_refs, replace=False) for i in range(count)]
    )
    reference_fold = fold_of_image[reference // per_image]
    scores = np.empty(count, np.float32)
    for fold in range(folds):
        images = np.flatnonzero(fold_of_image == fold)
        search = exact_search(points[reference[reference_fold != fold]])
        queries = points[(images[:, None] * per_image + np.arange(per_image)).ravel()]
        distances, _ = search.search(queries, k=1)
        worst = np.sort(distances[:, 0].reshape(len(images), per_image), axis=1)[:, -TOP_PATCHES:]
        scores[images] = worst.mean(axis=1)
    return scores


def select_clean_images(
    features: np.ndarray, mode: str | float, sources: Sequence[str] | None = None, seed: int = 0
) -> DenoiseResult:
    """Score the bank images (:func:`image_outlier_scores`) and choose the ones to keep.

    Args:
        features: N×P×D patch embeddings of the bank images.
        mode: ``auto`` or a fraction in (0, 0.5) (see :func:`parse_denoise`).
        sources: the N images' file names, for the flagged list an operator reviews.
        seed: for the projection and the reference subsample.

    Returns:
        the kept indices and the record (mode, scores' median/MAD, flagged images with score and z).
    """
    count, per_image, _ = features.shape
    scores = image_outlier_scores(features, seed=seed)
    median = float(np.median(scores))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(scores - median)))
    z = (scores - median) / max(scale, 1e-12 * max(median, 1.0))
    order = np.argsort(-scores, kind="stable")
    if mode == "auto":
        n_drop = min(int((z > AUTO_Z).sum()), int(math.floor(AUTO_MAX_FRACTION * count)))
    else:
        n_drop = int(round(float(mode) * count))
    n_drop = min(n_drop, count - 1)
    dropped = np.sort(order[:n_drop])
    keep = np.setdiff1d(np.arange(count), dropped)
    names = list(sources) if sources is not None and len(sources) == count else [f"#{i}" for i in range(count)]
    record = {
        "mode": "auto" if mode == "auto" else "fraction",
        "fraction": None if mode == "auto" else float(mode),
        "z_threshold": AUTO_Z if mode == "auto" else None,
        "score": f"mean of the {TOP_PATCHES} worst patches' L2 distance to the nearest patch of other "
                 f"training images ({PROJECTION_DIM}-d projection, {REFERENCE_PATCHES} reference patches)",
        "images_scored": int(count),
        "images_dropped": int(n_drop),
        "patches_dropped": int(n_drop * per_image),
        "score_median": median,
        "score_mad_sigma": scale,
        "flagged": [
            {"source": names[i], "score": float(scores[i]), "z": float(z[i])} for i in order[:n_drop]
        ],
    }
    return DenoiseResult(keep, record)


def screen_validation(scores: np.ndarray, sources: Sequence[str] | None = None) -> tuple[np.ndarray, list[dict]]:
    """Leave defective images out of the held-out split before the threshold is set.

    Why: cleaning the bank is not enough. A defective image that lands in the
    validation split sets the false-alarm threshold at a defect's score, and recall at
    the threshold collapses (bottle, 5 % contaminated: 0.07). Held-out scores of normal
    images are one population, so the same robust rule as ``auto`` applies: modified
    z-score > :data:`AUTO_Z` against their median/MAD, at most :data:`AUTO_MAX_FRACTION`,
    never fewer than 2 images kept. Runs with every ``--denoise`` mode except ``off``.

    Args:
        scores: the held-out images' image scores against the cleaned bank.
        sources: their file names, for the operator's list.

    Returns:
        (boolean keep mask, flagged images ``{source, score, z}``, highest first).
    """
    scores = np.asarray(scores, dtype=np.float64)
    count = len(scores)
    keep = np.ones(count, bool)
    if count < 5:  # too few for a median/MAD to mean anything
        return keep, []
    median = float(np.median(scores))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(scores - median)))
    z = (scores - median) / max(scale, 1e-12 * max(abs(median), 1.0))
    order = np.argsort(-z, kind="stable")
    n_drop = min(int((z > AUTO_Z).sum()), int(math.floor(AUTO_MAX_FRACTION * count)), count - 2)
    keep[order[:n_drop]] = False
    names = list(sources) if sources is not None and len(sources) == count else [f"#{i}" for i in range(count)]
    return keep, [{"source": names[i], "score": float(scores[i]), "z": float(z[i])} for i in order[:n_drop]]

