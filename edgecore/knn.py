"""Fast exact k-nearest-neighbour search for the host (fit's neighbour table and threshold, evaluate).

``runtime.search.ExactSearch`` stays the camera's numpy reference; on the host the
same answers come from float32 GEMM tiles, each folded into a running top-k by a numba
scan while it is still in cache (``edgecore._knn_kernels``), instead of ``argpartition``
over 50k-wide rows; one thread per core works on whole query blocks, so no core waits
at a per-tile barrier (on 2 shared cores those barriers cost more than the arithmetic).
Its float32 ranking carries a rigorous rounding margin and every point within it gets
the direct-difference distance, so the neighbours are the exact ones by
``runtime.search.exact_l2`` distance, and the reported distances are that very
function's (same numbers as ``ExactSearch`` wherever its GEMM ranking was right).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from edgecore.runtime.search import ExactSearch, exact_l2

__all__ = ["HostExactSearch", "exact_search"]

# GEMM tiles: queries x points per block, small enough that the scan reads the block from cache.
_QUERY_BLOCK = 256
_POINT_BLOCK = 1024
# Candidates kept per query (k nearest plus those within the rounding margin); more means duplicates.
_EXTRA_CANDIDATES = 120


def exact_search(points: np.ndarray) -> "HostExactSearch | ExactSearch":
    """The host's exact searcher over ``points``: this module's where numba is installed (the host
    extra has it), else the camera's ``ExactSearch`` (same neighbours, slower)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return ExactSearch(points)
    return HostExactSearch(points)


def _ranking_error(dim: int) -> float:
    """``e`` with |fl32(||c||^2 - 2 q.c) - (exact_l2^2 - ||q||^2)| <= e (||q||^2 + ||c||^2) on centred rows.

    The two float32 dot products ((2 dim) u), the centring of both rows and the float32
    differences inside ``exact_l2`` (a few u each), with slack.
    """
    return (2 * dim + 32) * 2.0**-24


class HostExactSearch:
    """Exact L2 search with ``ExactSearch``'s interface and results, several times faster on large banks."""

    def __init__(self, points: np.ndarray, query_block: int = _QUERY_BLOCK, point_block: int = _POINT_BLOCK,
                 threads: int | None = None) -> None:
        """Args: points: M x D coreset rows. query_block, point_block: GEMM tile (queries x points).
        threads: worker threads (default: the CPUs this process may use)."""
        if points.ndim != 2 or points.shape[0] == 0:
            raise ValueError(f"need a non-empty M×D point set, got shape {points.shape}")
        self.points = np.ascontiguousarray(points, dtype=np.float32)
        self.center = self.points.mean(axis=0, dtype=np.float64).astype(np.float32)  # as ExactSearch
        self.centered = self.points - self.center
        self.norms = np.einsum("md,md->m", self.centered, self.centered)
        self.max_norm = float(self.norms.max())
        self.error = _ranking_error(self.points.shape[1])
        self.query_block, self.point_block = query_block, point_block
        usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        self.threads = threads or len(usable)
        self.size = self.points.shape[0]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Q×D float32 queries → (Q×k float32 L2 distances, Q×k int64 indices), nearest first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.points.shape[1]:
            raise ValueError(f"queries must be Q×{self.points.shape[1]}, got {queries.shape}")
        k = min(k, self.size)
        indices = np.empty((queries.shape[0], k), dtype=np.int64)
        overflow = np.zeros(queries.shape[0], dtype=np.bool_)
        blocks = iter(range(0, queries.shape[0], self.query_block))
        lock = threading.Lock()

        def work() -> None:  # one thread per core, each on whole query blocks: no sync between tiles
            gram = np.empty((self.query_block, self.point_block), dtype=np.float32)
            while True:
                with lock:
                    start = next(blocks, None)
                if start is None:
                    return
                stop = min(start + self.query_block, queries.shape[0])
                self._search_block(queries[start:stop], k, gram, indices[start:stop], overflow[start:stop])

        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(self.threads) as pool:
            for future in [pool.submit(work) for _ in range(self.threads)]:
                future.result()
        for row in np.flatnonzero(overflow):  # many points tie within the margin (duplicates): rank all of them
            indices[row] = self._rank_all(queries[row], k)
        distances = exact_l2(queries, self.points, indices)
        if k > 1:  # as ExactSearch: stable sort on the exact distances
            order = np.argsort(distances, axis=1, kind="stable")
            distances = np.take_along_axis(distances, order, axis=1)
            indices = np.take_along_axis(indices, order, axis=1)
        return distances, indices

    def _search_block(self, queries: np.ndarray, k: int, gram: np.ndarray, out: np.ndarray,
                      overflow: np.ndarray) -> None:
        """The k nearest of one block of queries: GEMM tile by tile, each folded in by the numba scan."""
        from edgecore import _knn_kernels

        n = queries.shape[0]
        block = queries - self.center
        margin = self.error * (np.einsum("qd,qd->q", block, block).astype(np.float64) + self.max_norm)
        best = np.empty((n, k), dtype=np.float32)
        best_index = np.empty((n, k), dtype=np.int64)
        counts = np.zeros(n, dtype=np.int64)
        cand_index = np.empty((n, k + _EXTRA_CANDIDATES), dtype=np.int64)
        cand_value = np.empty((n, k + _EXTRA_CANDIDATES), dtype=np.float32)
        n_cand = np.zeros(n, dtype=np.int64)
        for start in range(0, self.size, self.point_block):
            stop = min(start + self.point_block, self.size)
            tile = gram[:n, : stop - start]
            np.matmul(block, self.centered[start:stop].T, out=tile)
            _knn_kernels.scan_tile(tile, self.norms[start:stop], start, margin, best, best_index, counts, cand_index,
                                   cand_value, n_cand, overflow)
        _knn_kernels.finish(best, margin, cand_index, cand_value, n_cand, overflow, queries, self.points, out)

    def _rank_all(self, query: np.ndarray, k: int) -> np.ndarray:
        """The k nearest by exact distance over every point (ties: smaller index), in ranking-value order."""
        diff = self.points - query
        exact = np.einsum("md,md->m", diff, diff, dtype=np.float64)
        chosen = np.argsort(exact, kind="stable")[:k]
        centred = query - self.center
        ranks = self.norms[chosen] - np.float32(2.0) * (self.centered[chosen] @ centred)
        return chosen[np.argsort(ranks, kind="stable")]
