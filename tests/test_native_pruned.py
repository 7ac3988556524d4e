"""Coarse mode's candidate stage with the rows in clusters (``Int8Kernel.topk_pruned``): whole clusters are skipped
where a bound shows no row of them can enter a query's k best, on every ISA path, so the results must be ``topk``'s,
bit for bit.

Real compiled library; projected points drawn in clusters (as a coreset's projections are) and uniformly.
"""
from __future__ import annotations

import numpy as np
import pytest

from edgecore.runtime import native
from edgecore.runtime.native import RowClusters
from edgecore.runtime.native.search import PRUNE_MIN_ROWS, ProjectedCandidates, _KeyTerms, row_clusters

kernel = native.kernel()


def projected_points(rng, m: int, p: int, clustered: bool) -> np.ndarray:
    """M×p float32 points: Gaussian blobs of decaying scale per dimension (PCA-like), or plain Gaussian."""
    scale = np.linspace(3.0, 0.3, p)
    if not clustered:
        return (rng.standard_normal((m, p)) * scale).astype(np.float32)
    centres = rng.standard_normal((max(1, m // 40), p)) * scale * 4
    return (centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, p)) * scale * 0.3).astype(np.float32)


def stage(rng, m, p, clustered):
    points = projected_points(rng, m, p, clustered)
    return ProjectedCandidates(points, kernel), points


def both(candidates: ProjectedCandidates, queries: np.ndarray, k: int, clusters=None, isa=None):
    """(topk's, topk_pruned's) (keys, ids) of one candidate stage's queries."""
    t = candidates._key_terms
    width = candidates._table.shape[1]
    codes, step, bounds = kernel.quantize_bounds(queries, candidates._step, width, candidates._mid, *t)
    cq = (2.0 * step).astype(np.float32)
    args = (codes, candidates._table, candidates._bias, candidates._corr, cq, k)
    full = kernel.topk(*args, isa=isa)
    pruned = kernel.topk_pruned(*args, clusters if clusters is not None else candidates._clusters, bounds, isa=isa)
    return full, pruned


@pytest.mark.parametrize("m,p,nq,k,clustered", [
    (PRUNE_MIN_ROWS + 5, 32, 784, 8, True),  # bottle WRN50's shape: 32-d projections, 784 patches, 8 candidates
    (PRUNE_MIN_ROWS, 32, 33, 1, True),  # a lone query in the last block pair
    (6000, 30, 100, 16, False),  # widths padded to 32, no structure to prune
    (5000, 20, 64, 17, True),  # k past 16: the 32-entry lists
    (4500, 45, 50, 32, True),  # k past every cluster's size
])
def test_pruned_candidates_equal_the_full_scan(m, p, nq, k, clustered):
    rng = np.random.default_rng(m + k)
    candidates, points = stage(rng, m, p, clustered)
    assert candidates._clusters is not None and len(candidates._clusters.radius) == m // 32
    queries = points[rng.integers(0, m, nq)] + rng.standard_normal((nq, p)).astype(np.float32) * 0.5
    for isa in kernel.available:  # the AVX-512 list driver, and the tile driver on every other path
        (fk, fi), (pk, pi) = both(candidates, queries, k, isa=isa)
        np.testing.assert_array_equal(pi, fi, err_msg=isa)
        np.testing.assert_array_equal(pk, fk, err_msg=isa)
    np.testing.assert_array_equal(candidates.propose(queries, k), fi)


@pytest.mark.parametrize("isa", kernel.available)
def test_the_bound_decides_what_is_skipped(isa):
    """With every radius 0 the bound is wrong and whole clusters that hold neighbours are skipped: the answers change,
    so the test above sees the pruning at work on each path (not a full scan that ignores the clusters)."""
    rng = np.random.default_rng(3)
    candidates, points = stage(rng, 6000, 32, True)
    queries = points[rng.integers(0, 6000, 200)] + rng.standard_normal((200, 32)).astype(np.float32) * 0.5
    wrong = candidates._clusters._replace(radius=np.zeros_like(candidates._clusters.radius))
    (_, full), (_, pruned) = both(candidates, queries, 8, clusters=wrong, isa=isa)
    assert (pruned != full).any()


def test_ties_between_duplicate_rows_keep_the_smaller_row():
    rng = np.random.default_rng(5)
    points = projected_points(rng, 5000, 32, True)
    points[2500::7] = points[11]  # equal rows, equal keys: the (key, row) order decides
    candidates = ProjectedCandidates(points, kernel)
    queries = np.repeat(points[11:12], 40, axis=0) + rng.standard_normal((40, 32)).astype(np.float32) * 1e-3
    for isa in kernel.available:
        (fk, fi), (pk, pi) = both(candidates, queries, 16, isa=isa)
        np.testing.assert_array_equal(pi, fi, err_msg=isa)
        np.testing.assert_array_equal(pk, fk, err_msg=isa)


def test_clusters_rebuilt_from_the_codes_give_the_same_candidates():
    """row_clusters on the rows as the keys see them (ŷ = mid + step ⊙ code) is what the stage builds at load."""
    rng = np.random.default_rng(7)
    points = projected_points(rng, 4200, 32, True)
    candidates = ProjectedCandidates(points, kernel)
    exact = np.asarray(candidates._mid, np.float64) + candidates._step * candidates._table[:, :32].astype(np.float64)
    clusters = row_clusters(exact, 4200 // 32)
    np.testing.assert_array_equal(clusters.member, candidates._clusters.member)
    np.testing.assert_array_equal(clusters.radius, candidates._clusters.radius)
    assert _KeyTerms.of(exact, candidates._bias, candidates._mid) == candidates._key_terms
    queries = points[:70] + 0.1
    (fk, fi), (pk, pi) = both(candidates, queries, 8, clusters=clusters)
    np.testing.assert_array_equal(pi, fi)
    np.testing.assert_array_equal(pk, fk)


def test_small_coresets_keep_the_plain_scan():
    rng = np.random.default_rng(9)
    small = ProjectedCandidates(projected_points(rng, PRUNE_MIN_ROWS - 1, 32, True), kernel)
    assert small._clusters is None


@pytest.mark.parametrize("m,count", [(4096, 128), (1000, 7), (50, 50)])
def test_row_clusters_partition_the_rows_within_their_radius(m, count):
    rng = np.random.default_rng(m)
    points = projected_points(rng, m, 16, True).astype(np.float64)
    clusters = row_clusters(points, count)
    assert isinstance(clusters, RowClusters) and len(clusters.radius) == count == len(clusters.center)
    sizes = np.diff(clusters.start)
    assert clusters.start[0] == 0 and (sizes % 8 == 0).all()
    real = clusters.member[clusters.member >= 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(m))  # every row once
    for j in range(count):
        ids = clusters.member[clusters.start[j] : clusters.start[j + 1]]
        ids = ids[ids >= 0]
        distance = np.sqrt(((points[ids] - clusters.center[j].astype(np.float64)) ** 2).sum(axis=1))
        assert (distance <= clusters.radius[j]).all()


def test_native_query_codes_equal_quantize_queries():
    rng = np.random.default_rng(11)
    projected = (rng.standard_normal((300, 29)) * rng.uniform(0.01, 100, 29)).astype(np.float32)
    projected[5] = 0.0  # an all-zero query: step 1
    projected[6, 3] = 1e30
    scale = rng.uniform(0.1, 2.0, 29).astype(np.float32)
    codes, step, bounds = kernel.quantize_bounds(projected, scale, 32, np.zeros(29, np.float32), 1.0, 1.0, 0.0)
    ref_codes, ref_step = native.quantize_queries(projected * scale, 32)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(step, ref_step)
    xt = codes[:, :29].astype(np.float64) * (step.astype(np.float64)[:, None] / scale)
    np.testing.assert_allclose(bounds.xt, xt, rtol=1e-6)
    n_q = (xt * xt).sum(axis=1)
    assert (bounds.shift >= n_q).all() and (bounds.lift <= n_q).all() and (bounds.margin > 0).all()


def test_pruned_search_refuses_bad_clusters():
    rng = np.random.default_rng(13)
    candidates, points = stage(rng, PRUNE_MIN_ROWS, 32, True)
    clusters = candidates._clusters
    uneven = clusters.start.copy()
    uneven[1] += 1  # a cluster of 9 slots and one of 7: not whole groups of 8
    with pytest.raises(RuntimeError, match="bad arguments"):
        both(candidates, points[:10], 8, clusters=clusters._replace(start=uneven))
    with pytest.raises(ValueError, match="starts into the member list"):
        both(candidates, points[:10], 8, clusters=clusters._replace(member=clusters.member[:-8]))
    outside = clusters._replace(member=np.where(clusters.member >= 0, clusters.member + PRUNE_MIN_ROWS, -1).astype(np.int32))
    with pytest.raises(RuntimeError, match="bad arguments"):
        both(candidates, points[:10], 8, clusters=outside)
