"""Nearest-neighbour search objects over the coreset (swappable, like patchcore-inspection's).

Every searcher answers ``search(queries, k) -> (distances, indices)`` with true
L2 distances, so scoring does not care which one ran.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class NearestNeighbourSearch(Protocol):
    size: int

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Q×D float32 queries → (Q×k float32 L2 distances, Q×k int64 indices), nearest first."""
        ...


def exact_l2(queries: np.ndarray, points: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Recompute the winners' distances by direct difference: the GEMM form
    ‖x‖²+‖y‖²−2xyᵀ loses digits to cancellation when distances are small."""
    diff = points[index] - queries[:, None, :]
    return np.sqrt(np.einsum("qkd,qkd->qk", diff, diff, dtype=np.float64)).astype(np.float32)


class ExactSearch:
    """Brute force via the export-friendly ‖x‖²+‖y‖²−2xyᵀ, chunked so memory stays bounded."""

    def __init__(self, points: np.ndarray, chunk_elements: int = 1 << 24) -> None:
        if points.ndim != 2 or points.shape[0] == 0:
            raise ValueError(f"need a non-empty M×D point set, got shape {points.shape}")
        self.points = np.ascontiguousarray(points, dtype=np.float32)
        # Centering leaves distances unchanged but shrinks the norms, so the
        # GEMM form ranks near neighbours correctly even far from the origin.
        self.center = self.points.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.centered = self.points - self.center
        self.norms = np.einsum("md,md->m", self.centered, self.centered)
        self.chunk_elements = chunk_elements
        self.size = self.points.shape[0]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.points.shape[1]:
            raise ValueError(f"queries must be Q×{self.points.shape[1]}, got {queries.shape}")
        k = min(k, self.size)
        rows = max(1, self.chunk_elements // self.size)
        indices = np.empty((queries.shape[0], k), dtype=np.int64)
        for start in range(0, queries.shape[0], rows):
            block = queries[start : start + rows] - self.center
            # ‖x‖² is constant per row, so it does not change the ranking.
            partial = self.norms[None, :] - 2.0 * (block @ self.centered.T)
            if k == 1:
                indices[start : start + rows, 0] = np.argmin(partial, axis=1)
            else:
                top = np.argpartition(partial, k - 1, axis=1)[:, :k]
                order = np.argsort(np.take_along_axis(partial, top, axis=1), axis=1)
                indices[start : start + rows] = np.take_along_axis(top, order, axis=1)
        distances = exact_l2(queries, self.points, indices)
        if k > 1:  # re-sort on exact distances (ties/cancellation can swap near-equal neighbours)
            order = np.argsort(distances, axis=1, kind="stable")
            distances = np.take_along_axis(distances, order, axis=1)
            indices = np.take_along_axis(indices, order, axis=1)
        return distances, indices


def neighbour_table(points: np.ndarray, num_neighbors: int, search: NearestNeighbourSearch | None = None) -> np.ndarray:
    """For each coreset point, its ``num_neighbors`` nearest coreset points (itself first).

    Eq. 7 needs the neighbourhood of the matched coreset point; precomputing it
    once means the camera only computes ``num_neighbors`` distances per image.
    ``search``: an exact searcher over ``points`` (the host passes a faster one); default ExactSearch.
    """
    k = min(num_neighbors, points.shape[0])
    _, index = (ExactSearch(points) if search is None else search).search(points, k)
    # Put the point itself first even when exact duplicates tie with it.
    own = np.arange(points.shape[0])
    for row in np.nonzero(index[:, 0] != own)[0]:
        others = [i for i in index[row] if i != row]
        index[row] = [row, *others[: k - 1]]
    return index.astype(np.int32)
