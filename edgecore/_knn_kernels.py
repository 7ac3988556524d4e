"""Compiled top-k scan of :class:`edgecore.knn.HostExactSearch` (host only: numba is not on the camera).

The BLAS GEMM gives each (query, point) pair the ranking value of
``runtime.search.ExactSearch``, ``partial = ||c||^2 - 2 q.c`` on centred rows; its
float32 rounding is bounded by ``margin``. Every point whose ``partial`` is within
``2 margin`` of the k-th smallest can still be one of the k true nearest, so all of
them get the direct-difference distance of ``runtime.search.exact_l2`` (float32
difference, float64 sum), and the k smallest of those win. The result is the exact
k nearest by that distance, whatever rounding the GEMM's blocking chose.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, inline="always")
def _insert(values: np.ndarray, index: np.ndarray, count: int, value: float, j: int) -> int:
    """Insert (value, j) into the sorted ``values[:count]`` (capacity ``values.size``); return the new count."""
    capacity = values.shape[0]
    if count == capacity:
        if not value < values[count - 1]:
            return count
        count -= 1
    position = count
    while position > 0 and values[position - 1] > value:
        values[position] = values[position - 1]
        index[position] = index[position - 1]
        position -= 1
    values[position] = value
    index[position] = j
    return count + 1


_LANES = 64  # values tested per vectorised step of the scan (a hit is rare once k values are in)


@numba.njit(cache=True, inline="always")
def _any_below(norms: np.ndarray, row: np.ndarray, start: int, stop: int, limit: float) -> bool:
    hit = False
    for j in range(start, stop):
        hit |= norms[j] - np.float32(2.0) * row[j] < limit
    return hit


@numba.njit(cache=True)
def _compact(cand_index: np.ndarray, cand_value: np.ndarray, count: int, limit: float) -> int:
    """Drop the candidates at or above ``limit``; return how many are left."""
    kept = 0
    for c in range(count):
        if cand_value[c] < limit:
            cand_index[kept] = cand_index[c]
            cand_value[kept] = cand_value[c]
            kept += 1
    return kept


@numba.njit(cache=True, nogil=True)
def scan_tile(
    gram: np.ndarray,
    norms: np.ndarray,
    offset: int,
    margin: np.ndarray,
    best: np.ndarray,
    best_index: np.ndarray,
    counts: np.ndarray,
    cand_index: np.ndarray,
    cand_value: np.ndarray,
    n_cand: np.ndarray,
    overflow: np.ndarray,
) -> None:
    """Fold one (queries x point tile) GEMM block, still in cache, into each query's running state.

    ``partial = norms[j] - 2 gram[i, j]`` is ExactSearch's ranking value. ``best`` keeps the
    k smallest so far; every point below ``best[k-1] + 2 margin`` (the limit only falls) is
    kept as a candidate, so at the end the candidates hold every point within the margin
    of the final k-th value. More candidates than the buffer holds, even after dropping
    those above the current limit, set ``overflow`` (the caller ranks that query in full).
    """
    n_queries, n_points = gram.shape
    k = best.shape[1]
    capacity = cand_index.shape[1]
    for i in range(n_queries):
        if overflow[i]:
            continue
        row = gram[i]
        count, found = counts[i], n_cand[i]
        limit = best[i, k - 1] if count == k else np.float32(np.inf)
        wide = np.nextafter(np.float32(np.float64(limit) + 2.0 * margin[i]), np.float32(np.inf))
        for start in range(0, n_points, _LANES):
            stop = min(start + _LANES, n_points)
            if not _any_below(norms, row, start, stop, wide):
                continue
            for j in range(start, stop):
                value = norms[j] - np.float32(2.0) * row[j]
                if not value < wide:
                    continue
                if value < limit:
                    count = _insert(best[i], best_index[i], count, value, offset + j)
                    if count == k:
                        limit = best[i, k - 1]
                        wide = np.nextafter(np.float32(np.float64(limit) + 2.0 * margin[i]), np.float32(np.inf))
                if found == capacity:
                    found = _compact(cand_index[i], cand_value[i], found, wide)
                if found == capacity:
                    overflow[i] = True
                    break
                if value < wide:
                    cand_index[i, found] = offset + j
                    cand_value[i, found] = value
                    found += 1
            if overflow[i]:
                break
        counts[i], n_cand[i] = count, found


@numba.njit(cache=True, nogil=True)
def finish(
    best: np.ndarray,
    margin: np.ndarray,
    cand_index: np.ndarray,
    cand_value: np.ndarray,
    n_cand: np.ndarray,
    overflow: np.ndarray,
    queries: np.ndarray,
    points: np.ndarray,
    out: np.ndarray,
) -> None:
    """Write into ``out[i]`` the k candidates nearest by ``exact_l2``'s distance (float32 difference,
    float64 sum; ties: smaller index), ordered by their ranking value as ExactSearch orders them."""
    n_queries, k = best.shape
    dim = points.shape[1]
    for i in range(n_queries):
        if overflow[i]:
            continue
        wide = np.nextafter(np.float32(np.float64(best[i, k - 1]) + 2.0 * margin[i]), np.float32(np.inf))
        found = _compact(cand_index[i], cand_value[i], n_cand[i], wide)
        index = cand_index[i, :found]
        order = np.argsort(index)  # index order, for the tie rule
        exact = np.empty(found, dtype=np.float64)
        for c in range(found):
            row = index[order[c]]
            total = 0.0
            for t in range(dim):
                diff = np.float64(points[row, t] - queries[i, t])
                total += diff * diff
            exact[c] = total
        nearest = order[np.argsort(exact, kind="mergesort")[:k]]
        by_rank = np.argsort(cand_value[i, nearest], kind="mergesort")
        for c in range(k):
            out[i, c] = index[nearest[by_rank[c]]]
