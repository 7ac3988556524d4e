"""Compiled bookkeeping of the cluster-pruned exact greedy (see ``coreset._ClusterFarthestFirst``).

These numba kernels only decide *which* rows could change and keep the cluster
lists; every distance that enters the selection is still computed by numpy's
einsum in ``coreset._sq_dist_to_centre`` (the arithmetic of the plain loop), so
the selection stays bit-for-bit that of the unpruned float32 loop.

All bounds are evaluated in float64 from float32 inputs and carry the float32
rounding margin ``error * (||x||^2 + ||c||^2)`` of the plain loop's distance, so
a row is skipped only if the plain loop would not have lowered its value either.
"""
from __future__ import annotations

import numba
import numpy as np

_FLAGS = {"reassoc", "contract"}  # vectorise the 32-term dot products; no NaN/inf assumptions


@numba.njit(cache=True, fastmath=_FLAGS)
def _dot32(a: np.ndarray, b: np.ndarray) -> float:
    total = 0.0
    for k in range(a.shape[0]):
        total += np.float64(a[k]) * np.float64(b[k])
    return total


@numba.njit(cache=True)
def candidates(
    centre_row: int,
    n_clusters: int,
    coords: np.ndarray,
    bound_sq: np.ndarray,
    sq_norms: np.ndarray,
    min_sq: np.ndarray,
    centre_coords: np.ndarray,
    centre_bound_sq: np.ndarray,
    centre_sq: np.ndarray,
    cluster_radius: np.ndarray,
    head: np.ndarray,
    nxt: np.ndarray,
    error: float,
    out: np.ndarray,
) -> int:
    """Write into ``out`` the rows whose min-distance the centre at ``centre_row`` might lower; return their count.

    Three filters, cheapest first, each a lower bound on d(x, c):
    cluster  d(c, z_i) - radius_i >= radius_i  (triangle inequality, whole cluster skipped);
    member   d(c, z_i) - d(x, z_i), with d(x, z_i) known from ``min_sq`` (x's owner is z_i);
    row      the 32-d principal-coordinate bound of ``_lower_bound_coordinates``.
    """
    c_coords = coords[centre_row]
    c_bound_sq = np.float64(bound_sq[centre_row])
    c_sq = np.float64(sq_norms[centre_row])
    count = 0
    for cluster in range(n_clusters):
        radius = cluster_radius[cluster]
        if radius < 0:  # no member other than the centre itself
            continue
        lb_sq = centre_bound_sq[cluster] + c_bound_sq - 2.0 * _dot32(centre_coords[cluster], c_coords)
        lb_sq -= error * (centre_sq[cluster] + c_sq)
        lb = np.sqrt(lb_sq) if lb_sq > 0 else 0.0
        if lb >= 2.0 * radius:
            continue
        z_sq = centre_sq[cluster]
        row = head[cluster]
        while row >= 0:
            current = np.float64(min_sq[row])
            if current > 0:  # selected rows are -inf, duplicates of a centre 0: nothing can lower them
                x_sq = np.float64(sq_norms[row])
                to_owner = np.sqrt(current + error * (x_sq + z_sq))
                gap = lb - to_owner
                if gap <= 0 or gap * gap - error * (x_sq + c_sq) < current:
                    bound = np.float64(bound_sq[row]) + c_bound_sq - 2.0 * _dot32(coords[row], c_coords)
                    if bound < current:
                        out[count] = row
                        count += 1
            row = nxt[row]
    return count


@numba.njit(cache=True)
def _unlink(row: int, cluster: int, head: np.ndarray, nxt: np.ndarray, prv: np.ndarray) -> None:
    before, after = prv[row], nxt[row]
    if before >= 0:
        nxt[before] = after
    else:
        head[cluster] = after
    if after >= 0:
        prv[after] = before


@numba.njit(cache=True)
def _link(row: int, cluster: int, head: np.ndarray, nxt: np.ndarray, prv: np.ndarray) -> None:
    first = head[cluster]
    nxt[row] = first
    prv[row] = -1
    if first >= 0:
        prv[first] = row
    head[cluster] = row


@numba.njit(cache=True)
def _refresh_cluster(
    cluster: int,
    original: np.ndarray,
    head: np.ndarray,
    nxt: np.ndarray,
    min_sq: np.ndarray,
    sq_norms: np.ndarray,
    centre_sq: np.ndarray,
    cluster_best: np.ndarray,
    cluster_best_row: np.ndarray,
    cluster_radius: np.ndarray,
    error: float,
) -> None:
    """Largest ``min_sq`` in the cluster (smallest original index on ties) and an upper bound on its radius."""
    best = -np.inf
    best_row = -1
    norm_max = 0.0
    row = head[cluster]
    while row >= 0:
        value = min_sq[row]
        if value > best or (value == best and original[row] < original[best_row]):
            best = value
            best_row = row
        if value != -np.inf and sq_norms[row] > norm_max:
            norm_max = np.float64(sq_norms[row])
        row = nxt[row]
    cluster_best[cluster] = best
    cluster_best_row[cluster] = best_row
    if best == -np.inf:
        cluster_radius[cluster] = -1.0
    else:
        cluster_radius[cluster] = np.sqrt(max(np.float64(best), 0.0) + error * (norm_max + centre_sq[cluster]))


@numba.njit(cache=True)
def absorb(
    rows: np.ndarray,
    dist_sq: np.ndarray,
    centre_row: int,
    rank: int,
    original: np.ndarray,
    min_sq: np.ndarray,
    owner: np.ndarray,
    head: np.ndarray,
    nxt: np.ndarray,
    prv: np.ndarray,
    sq_norms: np.ndarray,
    centre_sq: np.ndarray,
    cluster_best: np.ndarray,
    cluster_best_row: np.ndarray,
    cluster_radius: np.ndarray,
    dirty: np.ndarray,
    marked: np.ndarray,
    error: float,
) -> None:
    """Apply the plain loop's update to ``rows`` (strictly closer rows move to cluster ``rank``), then
    mark the new centre selected and refresh the statistics of every cluster that changed."""
    n_dirty = 0
    for k in range(rows.shape[0]):
        row = rows[k]
        if dist_sq[k] < min_sq[row]:
            min_sq[row] = dist_sq[k]
            old = owner[row]
            if old >= 0:
                _unlink(row, old, head, nxt, prv)
                if marked[old] != rank:
                    marked[old] = rank
                    dirty[n_dirty] = old
                    n_dirty += 1
            owner[row] = rank
            _link(row, rank, head, nxt, prv)
    old = owner[centre_row]
    if old != rank:
        if old >= 0:
            _unlink(centre_row, old, head, nxt, prv)
            if marked[old] != rank:
                marked[old] = rank
                dirty[n_dirty] = old
                n_dirty += 1
        owner[centre_row] = rank
        _link(centre_row, rank, head, nxt, prv)
    min_sq[centre_row] = -np.inf
    dirty[n_dirty] = rank
    n_dirty += 1
    for k in range(n_dirty):
        _refresh_cluster(dirty[k], original, head, nxt, min_sq, sq_norms, centre_sq, cluster_best, cluster_best_row,
                         cluster_radius, error)


@numba.njit(cache=True)
def farthest(
    n_clusters: int, original: np.ndarray, cluster_best: np.ndarray, cluster_best_row: np.ndarray
) -> tuple[float, int]:
    """(largest min_sq, its row), the smallest original index among equal maxima."""
    best = -np.inf
    best_row = -1
    for cluster in range(n_clusters):
        value = cluster_best[cluster]
        if value > best or (value == best and original[cluster_best_row[cluster]] < original[best_row]):
            best = value
            best_row = cluster_best_row[cluster]
    return best, best_row


@numba.njit(cache=True)
def relink(owner: np.ndarray, n_clusters: int, head: np.ndarray, nxt: np.ndarray, prv: np.ndarray) -> None:
    """Rebuild the cluster lists after the rows were sorted by owner: each list walks memory in order."""
    head[:n_clusters] = -1
    for row in range(owner.shape[0] - 1, -1, -1):
        _link(row, owner[row], head, nxt, prv)


# ------------------------------------------------------------------ batched engine (coreset._BatchedFarthestFirst)


@numba.njit(cache=True)
def build_clusters(owner: np.ndarray, min_sq: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counting sort of the rows by owner: (offsets (m+1), members, largest unselected ``min_sq`` per cluster)."""
    counts = np.zeros(n_clusters + 1, dtype=np.int64)
    for row in range(owner.shape[0]):
        counts[owner[row] + 1] += 1
    offsets = np.cumsum(counts)
    fill = offsets[:-1].copy()
    members = np.empty(owner.shape[0], dtype=np.int64)
    largest = np.full(n_clusters, -np.inf, dtype=np.float64)
    for row in range(owner.shape[0]):
        cluster = owner[row]
        members[fill[cluster]] = row
        fill[cluster] += 1
        value = np.float64(min_sq[row])
        if value > largest[cluster]:
            largest[cluster] = value
    return offsets, members, largest


@numba.njit(cache=True, parallel=True, fastmath=_FLAGS)
def batch_candidates(
    first_cluster: int,
    dots: np.ndarray,
    centre_sq: np.ndarray,
    largest: np.ndarray,
    offsets: np.ndarray,
    members: np.ndarray,
    batch_rows: np.ndarray,
    sq_norms: np.ndarray,
    old_min_sq: np.ndarray,
    min_sq: np.ndarray,
    coords: np.ndarray,
    bound_sq: np.ndarray,
    margin: float,
    out_rows: np.ndarray,
    out_batch: np.ndarray,
    counts: np.ndarray,
) -> None:
    """Append to part p of ``out_*`` the (row, batch centre) pairs whose exact distance might lower ``min_sq``.

    ``dots[i, j]`` is the float32 GEMM dot of cluster centre ``first_cluster + i`` with
    batch centre j; ``margin`` bounds the error of any float32 squared distance of the
    bank, so every test below is a rigorous lower bound on the plain loop's value.
    The clusters (``offsets``/``members``/``largest``) and ``old_min_sq`` are those of
    the batch's start: a pair skipped because it cannot go below the old value cannot
    go below the current one either. Filters, cheapest first:
    cluster  d(c, z) >= 2 r       (r bounds the distance of every member to its owner z)
    member   d(c, z) - d(x, z)    (x's owner is z)
    row      the 32-d principal-coordinate bound against the current value: one float32
             matrix-vector product per member over all surviving centres (vectorised;
             its rounding, < ``margin`` in any summation order, is subtracted).
    The clusters are split into ``counts.size`` parts run in parallel; part p writes
    from ``p * capacity`` on and adds its pairs to ``counts[p]`` (pairs beyond the
    capacity are counted, not written: the caller retries larger).
    """
    n_batch = batch_rows.shape[0]
    n_parts = counts.shape[0]
    capacity = out_rows.shape[0] // n_parts
    n_clusters = dots.shape[0]
    dim = coords.shape[1]
    for part in numba.prange(n_parts):
        survivors = np.empty(n_batch, dtype=np.int64)
        lower = np.empty(n_batch, dtype=np.float64)
        block = np.empty((dim, n_batch), dtype=np.float32)  # surviving centres' coordinates, transposed
        dots32 = np.empty(n_batch, dtype=np.float32)
        block_sq = np.empty(n_batch, dtype=np.float64)
        count = counts[part]
        base = part * capacity
        for i in range(part * n_clusters // n_parts, (part + 1) * n_clusters // n_parts):
            cluster = first_cluster + i
            if largest[cluster] <= 0:  # only selected rows or duplicates of the centre: nothing can drop
                continue
            four_r_sq = 4.0 * (largest[cluster] + margin)
            z_sq = np.float64(centre_sq[cluster])
            n_survivors = 0
            for j in range(n_batch):
                lb_sq = z_sq + np.float64(sq_norms[batch_rows[j]]) - 2.0 * np.float64(dots[i, j]) - 2.0 * margin
                if lb_sq < four_r_sq:
                    survivors[n_survivors] = j
                    lower[n_survivors] = np.sqrt(lb_sq) if lb_sq > 0 else 0.0
                    for k in range(dim):
                        block[k, n_survivors] = coords[batch_rows[j], k]
                    block_sq[n_survivors] = np.float64(bound_sq[batch_rows[j]]) - margin
                    n_survivors += 1
            for position in range(offsets[cluster], offsets[cluster + 1]):
                row = members[position]
                old = np.float64(old_min_sq[row])
                current = np.float64(min_sq[row])
                if old <= 0 or current <= 0:
                    continue
                to_owner = np.sqrt(old + margin)
                row_bound_sq = np.float64(bound_sq[row])
                dots32[:n_survivors] = 0
                for k in range(dim):
                    xk = coords[row, k]
                    for s in range(n_survivors):
                        dots32[s] += xk * block[k, s]
                for s in range(n_survivors):
                    if row_bound_sq + block_sq[s] - 2.0 * np.float64(dots32[s]) < current:
                        gap = lower[s] - to_owner
                        if gap <= 0 or gap * gap - margin < old:
                            if count < capacity:
                                out_rows[base + count] = row
                                out_batch[base + count] = survivors[s]
                            count += 1
        counts[part] = count
