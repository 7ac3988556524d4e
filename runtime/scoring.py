"""The ONE scoring implementation (image score, anomaly map, normalisation).

Host and camera both call these functions on the nearest-neighbour results, so
a score can only differ between them if the features or the search differ.
numpy only: the camera has no torch and no scipy.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass
class Scores:
    """What scoring a batch returns: raw image scores, patch distances, crop-size maps."""

    image: np.ndarray  # N
    patches: np.ndarray  # N×P
    maps: np.ndarray  # N×crop×crop

    @staticmethod
    def concatenate(parts: list["Scores"]) -> "Scores":
        return Scores(
            image=np.concatenate([s.image for s in parts]),
            patches=np.concatenate([s.patches for s in parts]),
            maps=np.concatenate([s.maps for s in parts]),
        )


def image_scores(
    patch_scores: np.ndarray,
    nn_index: np.ndarray,
    features: np.ndarray,
    memory_bank: np.ndarray,
    neighbour_table: np.ndarray,
) -> np.ndarray:
    """Image score with the paper's Eq. 7 reweighting of the largest patch distance.

    s* = distance of the most anomalous patch m_test* to its nearest coreset
    point m*; the weight is 1 − softmax over the distances from m_test* to the
    b nearest coreset neighbours of m* (m* itself first, from the precomputed
    ``neighbour_table``) taken at m*. A patch whose nearest point sits in a dense
    region of the memory bank is less surprising, and is damped more.

    patch_scores: N×P distances; nn_index: N×P coreset indices; features: N×P×D;
    memory_bank: M×D; neighbour_table: M×b (b = num_neighbors; b = 1 → plain max).
    """
    rows = np.arange(patch_scores.shape[0])
    worst = np.argmax(patch_scores, axis=1)
    s_star = patch_scores[rows, worst].astype(np.float64)
    if neighbour_table.shape[1] <= 1:
        return s_star
    m_star = nn_index[rows, worst]
    support = memory_bank[neighbour_table[m_star]].astype(np.float64)  # N×b×D
    query = features[rows, worst].astype(np.float64)[:, None, :]  # N×1×D
    distances = np.sqrt(np.sum((support - query) ** 2, axis=2))  # N×b
    shifted = np.exp(distances - distances.max(axis=1, keepdims=True))
    softmax_first = shifted[:, 0] / shifted.sum(axis=1)
    return (1.0 - softmax_first) * s_star


@lru_cache(maxsize=16)
def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Rows map an input line to an output line: bilinear, half-pixel centres
    (``align_corners=False``, as torch and OpenCV resize)."""
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    scale = size_in / size_out
    for i in range(size_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        lo = min(int(np.floor(src)), size_in - 1)
        hi = min(lo + 1, size_in - 1)
        frac = src - lo
        matrix[i, lo] += 1.0 - frac
        matrix[i, hi] += frac
    return matrix


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian, radius 4σ (kernel size 2·int(4σ+0.5)+1, as anomalib/kornia)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


@lru_cache(maxsize=16)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """Gaussian blur along one axis with reflect padding ('dcb|abcd|cba'), as a matrix."""
    if sigma <= 0:
        return np.eye(size)
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    matrix = np.zeros((size, size), dtype=np.float64)
    for i in range(size):
        for offset, weight in zip(range(-radius, radius + 1), kernel):
            j = i + offset
            # reflect without repeating the edge pixel; fold repeatedly for tiny sizes
            while j < 0 or j >= size:
                j = -j if j < 0 else 2 * (size - 1) - j
            matrix[i, j] += weight
    return matrix


@lru_cache(maxsize=16)
def map_operator(grid: int, crop: int, sigma: float) -> np.ndarray:
    """Upsample-then-blur fused into one crop×grid matrix (both are linear)."""
    return (_blur_matrix(crop, float(sigma)) @ _bilinear_matrix(grid, crop)).astype(np.float32)


def anomaly_maps(patch_scores: np.ndarray, grid: tuple[int, int], crop, sigma: float) -> np.ndarray:
    """N×(h·w) patch distances → N×H×W float32 maps (``crop``: the input side, or (H, W) for a
    non-square input): bilinear upsample + Gaussian blur σ.

    Both are linear and separable, so they are one cached float32 operator per axis and two
    small matrix products per frame (H×h · h×w · w×W), never an H×W convolution."""
    h, w = grid
    out_h, out_w = (crop, crop) if np.isscalar(crop) else (int(crop[0]), int(crop[1]))
    rows = map_operator(h, int(out_h), sigma)
    cols = map_operator(w, int(out_w), sigma)
    patches = patch_scores.reshape(-1, h, w).astype(np.float32, copy=False)
    return np.matmul(np.matmul(rows, patches), cols.T)


@dataclass(frozen=True)
class Normalization:
    """Maps raw scores so that 0.5 is the decision threshold (anomalib's min-max style).

    normalised = clip((raw − threshold) / (max − min) + 0.5, 0, 1), with min/max of
    the held-out normal images' scores. Maps use the same transform, so a map
    pixel above 0.5 is "as anomalous as an image at the threshold".
    """

    threshold: float
    min: float
    max: float

    def __call__(self, raw: np.ndarray | float) -> np.ndarray:
        span = max(self.max - self.min, 1e-12)
        return np.clip((np.asarray(raw, dtype=np.float64) - self.threshold) / span + 0.5, 0.0, 1.0)

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict) -> "Normalization":
        return cls(threshold=float(data["threshold"]), min=float(data["min"]), max=float(data["max"]))


def search_patches(features: np.ndarray, search) -> tuple[np.ndarray, np.ndarray]:
    """N×P×D embeddings → (N×P nearest-coreset distances, N×P coreset indices)."""
    n, p, d = features.shape
    distances, index = search.search(features.reshape(n * p, d), k=1)
    return distances[:, 0].reshape(n, p), index[:, 0].reshape(n, p)


def score_patches(
    patch_scores: np.ndarray,
    nn_index: np.ndarray,
    features: np.ndarray,
    support_vectors,
    neighbour_table: np.ndarray,
    grid: tuple[int, int],
    crop: int,
    blur_sigma: float,
    roi=None,
) -> Scores:
    """Search results → Scores (Eq. 7 image score + crop-size maps).

    ``support_vectors[ids]`` must return the coreset rows (float32) that Eq. 7
    compares against: the host passes its memory bank, the camera its index's
    dequantized rows. Together with :func:`search_patches` this is the single
    scoring path both sides run. ``roi`` (:class:`~edgecore.runtime.roi.RoiMask`):
    patches outside it are no part of the image score and 0 (not inspected) in the map.
    """
    if roi is not None:
        inside = roi.flat
        scores = image_scores(patch_scores[:, inside], nn_index[:, inside], features[:, inside], support_vectors,
                              neighbour_table)
        patch_scores = np.where(roi.inside.ravel()[None, :], patch_scores, 0).astype(patch_scores.dtype, copy=False)
    else:
        scores = image_scores(patch_scores, nn_index, features, support_vectors, neighbour_table)
    if not (np.isfinite(scores).all() and np.isfinite(patch_scores).all()):
        from edgecore.runtime.errors import NonFiniteError

        raise NonFiniteError("the anomaly score is NaN or infinite (engine, index or memory bank); no verdict given")
    maps = anomaly_maps(patch_scores, grid, crop, blur_sigma)
    if roi is not None:
        maps *= roi.map_mask(maps.shape[1:])
    return Scores(image=scores, patches=patch_scores, maps=maps)


def score_features(features: np.ndarray, search, support_vectors, neighbour_table, grid, crop, blur_sigma) -> Scores:
    patch_scores, nn_index = search_patches(features, search)
    return score_patches(patch_scores, nn_index, features, support_vectors, neighbour_table, grid, crop, blur_sigma)
