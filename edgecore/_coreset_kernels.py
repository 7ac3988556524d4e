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


# Member rows whose 32-d bounds are evaluated together: each surviving centre's coordinates
# are loaded once per group, and the group's dot products stay in registers.
_ROW_GROUP = 4
# Buckets of the surviving centres by their distance to the cluster centre (see batch_candidates).
_BUCKETS = 32


@numba.njit(cache=True, fastmath=_FLAGS)
def _group_hits(
    coords: np.ndarray,
    group: np.ndarray,
    below: np.ndarray,
    block: np.ndarray,
    picked: np.ndarray,
    picked_sq: np.ndarray,
    n_picked: int,
    hit_row: np.ndarray,
    hit_pick: np.ndarray,
) -> int:
    """The (g, s) whose 32-d bound ``picked_sq[s] - 2 coords[group[g]] . block[picked[s]]`` is below ``below[g]``.

    For a group of ``_ROW_GROUP`` rows at once, so each centre's coordinates are loaded once
    for all of them and the dots stay in registers (float32, any summation order). Writes
    the pairs to ``hit_row``/``hit_pick`` in (s, g) order and returns their number.
    """
    r0, r1, r2, r3 = group[0], group[1], group[2], group[3]
    b0, b1, b2, b3 = below[0], below[1], below[2], below[3]
    n_hits = 0
    for s in range(n_picked):
        centre = picked[s]
        a0 = np.float32(0)
        a1 = np.float32(0)
        a2 = np.float32(0)
        a3 = np.float32(0)
        for k in range(block.shape[1]):
            b = block[centre, k]
            a0 += coords[r0, k] * b
            a1 += coords[r1, k] * b
            a2 += coords[r2, k] * b
            a3 += coords[r3, k] * b
        centre_sq = picked_sq[s]
        h0 = centre_sq - 2.0 * np.float64(a0) < b0
        h1 = centre_sq - 2.0 * np.float64(a1) < b1
        h2 = centre_sq - 2.0 * np.float64(a2) < b2
        h3 = centre_sq - 2.0 * np.float64(a3) < b3
        if h0 or h1 or h2 or h3:
            for g, hit in ((0, h0), (1, h1), (2, h2), (3, h3)):
                if hit:
                    hit_row[n_hits] = g
                    hit_pick[n_hits] = s
                    n_hits += 1
    return n_hits


@numba.njit(cache=True, parallel=True, fastmath=_FLAGS)
def batch_candidates(
    first_cluster: int,
    dots: np.ndarray,
    centre_sq: np.ndarray,
    largest: np.ndarray,
    offsets: np.ndarray,
    members: np.ndarray,
    batch_sq: np.ndarray,
    batch_coords: np.ndarray,
    batch_bound_sq: np.ndarray,
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
    member   d(c, z) >= 2 d(x, z) (x's owner is z): the surviving centres are bucketed by
             d(c, z), members taken farthest first in groups of ``_ROW_GROUP``, and a group
             only visits the bucket prefix that its farthest member can reach (about half
             of the (row, centre) pairs on a noisy bank); the exact test is applied to hits
    row      the 32-d principal-coordinate bound against the current value, for a group at
             once (:func:`_group_hits`: float32 dots whose rounding, < ``margin`` in any
             summation order, is subtracted; float64 rounding of the comparison is far
             below that margin).
    Which bound rejects a pair only changes how many exact distances the caller computes,
    never their values, so all of this is exact.
    The clusters are split into ``counts.size`` parts run in parallel; part p writes
    from ``p * capacity`` on and adds its pairs to ``counts[p]`` (pairs beyond the
    capacity are counted, not written: the caller retries larger).
    """
    n_batch = batch_sq.shape[0]
    n_parts = counts.shape[0]
    capacity = out_rows.shape[0] // n_parts
    n_clusters = dots.shape[0]
    for part in numba.prange(n_parts):
        survivors = np.empty(n_batch, dtype=np.int64)
        lower = np.empty(n_batch, dtype=np.float64)
        survivor_sq = np.empty(n_batch, dtype=np.float64)
        bucket = np.empty(n_batch, dtype=np.int64)
        bucket_end = np.empty(_BUCKETS + 1, dtype=np.int64)
        by_bucket = np.empty(n_batch, dtype=np.int64)
        sorted_lower = np.empty(n_batch, dtype=np.float64)
        sorted_sq = np.empty(n_batch, dtype=np.float64)
        below = np.empty(_ROW_GROUP, dtype=np.float64)
        hit_row = np.empty(_ROW_GROUP * n_batch, dtype=np.int64)
        hit_pick = np.empty(_ROW_GROUP * n_batch, dtype=np.int64)
        largest_size = 0
        for i in range(part * n_clusters // n_parts, (part + 1) * n_clusters // n_parts):
            largest_size = max(largest_size, offsets[first_cluster + i + 1] - offsets[first_cluster + i])
        live = np.empty(largest_size, dtype=np.int64)  # the cluster's members that can still drop
        group = np.empty(_ROW_GROUP, dtype=np.int64)
        count = counts[part]
        base = part * capacity
        for i in range(part * n_clusters // n_parts, (part + 1) * n_clusters // n_parts):
            cluster = first_cluster + i
            if largest[cluster] <= 0:  # only selected rows or duplicates of the centre: nothing can drop
                continue
            four_r_sq = 4.0 * (largest[cluster] + margin)
            z_sq = np.float64(centre_sq[cluster])
            n_survivors = 0
            for j in range(n_batch):  # branch-free compaction: most centres survive or most do not, unpredictably
                lb_sq = z_sq + batch_sq[j] - 2.0 * np.float64(dots[i, j]) - 2.0 * margin
                survivors[n_survivors] = j
                lower[n_survivors] = lb_sq
                n_survivors += lb_sq < four_r_sq
            if n_survivors == 0:
                continue
            for s in range(n_survivors):
                lower[s] = np.sqrt(lower[s]) if lower[s] > 0 else 0.0
                survivor_sq[s] = batch_bound_sq[survivors[s]]
            # Counting sort of the survivors by d(c, z) into buckets: a member x only needs those with
            # d(c, z) < 2 d(x, z) (the member filter), a prefix of the buckets.
            width = 2.0 * np.sqrt(largest[cluster] + margin) / _BUCKETS
            bucket_end[:] = 0
            for s in range(n_survivors):
                b = min(_BUCKETS - 1, int(lower[s] / width))
                bucket[s] = b
                bucket_end[b + 1] += 1
            for b in range(_BUCKETS):
                bucket_end[b + 1] += bucket_end[b]
            for s in range(n_survivors):
                b = bucket[s]
                at = bucket_end[b]
                by_bucket[at] = survivors[s]
                sorted_lower[at] = lower[s]
                sorted_sq[at] = survivor_sq[s]
                bucket_end[b] = at + 1
            for b in range(_BUCKETS - 1, 0, -1):  # back to bucket ends
                bucket_end[b] = bucket_end[b - 1]
            bucket_end[0] = 0
            n_live = 0
            for position in range(offsets[cluster], offsets[cluster + 1]):
                row = members[position]
                if old_min_sq[row] > 0 and min_sq[row] > 0:
                    live[n_live] = row
                    n_live += 1
            # Farthest members first, so each group of rows shares a similar bucket prefix.
            order = np.argsort(-old_min_sq[live[:n_live]])
            for start in range(0, n_live, _ROW_GROUP):
                size = min(_ROW_GROUP, n_live - start)
                for g in range(_ROW_GROUP):  # a short last group repeats its last row, with no hits
                    row = live[order[start + min(g, size - 1)]]
                    group[g] = row
                    below[g] = np.float64(min_sq[row]) - np.float64(bound_sq[row]) if g < size else -np.inf
                # Survivors in later buckets have d(c, z) > 2 sqrt(old + margin) for every row of the group.
                reach = 2.0 * np.sqrt(np.float64(old_min_sq[group[0]]) + margin) * (1.0 + 1e-9)
                n_reach = bucket_end[min(_BUCKETS - 1, int(reach / width)) + 1]
                n_hits = _group_hits(coords, group, below, batch_coords, by_bucket, sorted_sq, n_reach,
                                     hit_row, hit_pick)
                for h in range(n_hits):
                    row = group[hit_row[h]]
                    s = hit_pick[h]
                    old = np.float64(old_min_sq[row])
                    gap = sorted_lower[s] - np.sqrt(old + margin)
                    if gap <= 0 or gap * gap - margin < old:
                        if count < capacity:
                            out_rows[base + count] = row
                            out_batch[base + count] = by_bucket[s]
                        count += 1
        counts[part] = count
