"""Tests for the k-center greedy coreset: greedy property, exactness of pruning, coverage, edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import edgecore.coreset as coreset
from edgecore.coreset import (
    KCenterGreedySampler,
    RandomSampler,
    coreset_size,
    coverage_radius,
    selection_space,
)


def clustered(n: int, dim: int, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Gaussian clusters, each spread in its own 4-d subspace: a caricature of patch features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (n_clusters, dim))
    spans = rng.normal(0, 1, (n_clusters, 4, dim))
    label = rng.integers(n_clusters, size=n)
    latent = rng.normal(0, 1, (n, 4))
    points = centres[label] + np.einsum("nk,nkd->nd", latent, spans[label]) + rng.normal(0, 0.05, (n, dim))
    return (points + 3.0).astype(np.float32)  # offset: exercise the centring


def noisy_clusters(n: int, dim: int, n_clusters: int, seed: int = 7) -> np.ndarray:
    """Clusters under isotropic noise as large as their spread: d(c, z) rarely reaches 2 d(x, z), so the
    batched engine's row bound and member buckets (not whole clusters) decide which pairs are kept."""
    noise = np.random.default_rng(seed).normal(0, 1.5, (n, dim)).astype(np.float32)
    return clustered(n, dim, n_clusters, seed=seed) + noise


def lattice(side: int, dim: int, seed: int = 0) -> np.ndarray:
    """Shuffled integer grid centred on 0: float32 distances are exact, so ties are everywhere."""
    half = side // 2
    grid = np.array(list(itertools.product(range(-half, half + 1), repeat=dim)), dtype=np.float32)
    return grid[np.random.default_rng(seed).permutation(len(grid))]


def reference_greedy(points: np.ndarray, first: int, n_select: int) -> np.ndarray:
    """Unpruned farthest-first traversal with the sampler's float32 arithmetic; ties -> smallest index."""
    sq_norms = np.einsum("ij,ij->i", points, points)
    min_sq = np.full(len(points), np.inf, dtype=np.float32)
    selected = []
    centre = first
    for _ in range(n_select):
        selected.append(centre)
        dist_sq = np.einsum("ij,j->i", points, points[centre])
        dist_sq *= -2
        dist_sq += sq_norms
        dist_sq += sq_norms[centre]
        np.maximum(dist_sq, 0, out=dist_sq)
        np.minimum(min_sq, dist_sq, out=min_sq)
        min_sq[centre] = -np.inf
        centre = int(np.argmax(min_sq))
    return np.array(selected, dtype=np.int64)


def points_and_start(features: np.ndarray, projection_dim: int | None, seed: int) -> tuple[np.ndarray, int]:
    """The float32 rows and first index the sampler uses (first draw, then the projection)."""
    rng = np.random.default_rng(seed)
    first = int(rng.integers(features.shape[0]))
    return selection_space(features, projection_dim, rng), first


def brute_min_dist(points: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Float64 distance of every row to its nearest selected row, by explicit differences."""
    points = points.astype(np.float64)
    centres = points[selected]
    nearest = [np.sqrt(((row - centres) ** 2).sum(axis=1)).min() for row in points]
    return np.array(nearest)


# ----------------------------------------------------------------------------- greedy property


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_each_selected_point_is_farthest_from_previous_ones(projection_dim: int | None) -> None:
    features = np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32)
    selected = KCenterGreedySampler(ratio=0.2, projection_dim=projection_dim, seed=3).select(features)
    points, first = points_and_start(features, projection_dim, seed=3)
    assert selected[0] == first
    for k in range(1, len(selected)):
        dist = brute_min_dist(points, selected[:k])
        assert dist[selected[k]] >= dist.max() * (1 - 1e-5), f"step {k} did not pick a farthest point"


@pytest.mark.parametrize(("n_points", "ratio"), [(300, 0.1), (301, 0.25), (10, 0.5), (1000, 0.013)])
def test_selection_count_and_uniqueness(n_points: int, ratio: float) -> None:
    features = np.random.default_rng(0).normal(size=(n_points, 5))
    selected = KCenterGreedySampler(ratio=ratio).select(features)
    assert selected.dtype == np.int64
    assert len(selected) == max(1, round(ratio * n_points)) == coreset_size(n_points, ratio)
    assert len(np.unique(selected)) == len(selected)


def test_deterministic_by_seed_and_seeds_differ() -> None:
    features = clustered(2000, 32, 20)
    first = KCenterGreedySampler(ratio=0.1, projection_dim=16, seed=7).select(features)
    again = KCenterGreedySampler(ratio=0.1, projection_dim=16, seed=7).select(features)
    other = KCenterGreedySampler(ratio=0.1, projection_dim=16, seed=8).select(features)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_smaller_ratio_is_a_prefix_and_radius_never_grows() -> None:
    features = clustered(3000, 24, 30)
    selections = [KCenterGreedySampler(ratio=r, projection_dim=None).select(features) for r in (0.01, 0.03, 0.1, 0.3)]
    radii = [coverage_radius(features, s) for s in selections]
    for short, long in itertools.pairwise(selections):
        np.testing.assert_array_equal(short, long[: len(short)])
    assert all(a >= b for a, b in itertools.pairwise(radii)), radii
    assert radii[-1] < radii[0] / 2


# ----------------------------------------------------------------------------- pruning is exact


@pytest.mark.parametrize("projection_dim", [None, 16])
def test_pruned_matches_unpruned_greedy_on_clustered_data(projection_dim: int | None) -> None:
    features = clustered(5000, 64, 60)
    sampler = KCenterGreedySampler(ratio=0.3, projection_dim=projection_dim, seed=2)
    selected = sampler.select(features)
    points, first = points_and_start(features, projection_dim, seed=2)
    np.testing.assert_array_equal(selected, reference_greedy(points, first, len(selected)))
    expected_radius = brute_min_dist(points, selected).max()
    assert sampler.coverage_radius_ == pytest.approx(expected_radius, rel=1e-4)


def test_pruned_matches_unpruned_greedy_with_exact_ties() -> None:
    features = lattice(7, 4)  # 2401 points, distances exact in float32
    selected = KCenterGreedySampler(ratio=0.6, projection_dim=None, seed=0).select(features)
    points, first = points_and_start(features, None, seed=0)
    np.testing.assert_array_equal(points, features)  # centred already: ties survive the centring
    np.testing.assert_array_equal(selected, reference_greedy(points, first, len(selected)))


def test_pruning_skips_most_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    rows_evaluated = 0
    full_distance = coreset._sq_dist_to_centre

    def counting(points: np.ndarray, *args: object) -> np.ndarray:
        nonlocal rows_evaluated
        rows_evaluated += len(points)
        return full_distance(points, *args)

    monkeypatch.setattr(coreset, "_sq_dist_to_centre", counting)
    features = clustered(5000, 64, 60)
    selected = KCenterGreedySampler(ratio=0.3, projection_dim=16).select(features)
    assert rows_evaluated < 0.1 * len(features) * len(selected)


def test_torch_loop_matches_reference_on_cpu() -> None:
    torch = pytest.importorskip("torch")
    del torch
    points = lattice(5, 3)
    selected, radius_sq = coreset._farthest_first_torch(points, 4, 80, "cpu", lambda done: None)
    np.testing.assert_array_equal(selected, reference_greedy(points, 4, 80))
    assert radius_sq == pytest.approx(brute_min_dist(points, selected).max() ** 2)


def test_cuda_matches_cpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False: no GPU on this machine")
    features = lattice(7, 4)
    cpu = KCenterGreedySampler(ratio=0.3, projection_dim=None, device="cpu")
    cuda = KCenterGreedySampler(ratio=0.3, projection_dim=None, device="cuda")
    np.testing.assert_array_equal(cuda.select(features), cpu.select(features))
    assert cuda.coverage_radius_ == pytest.approx(cpu.coverage_radius_)


# ----------------------------------------------------------------------------- coverage


def test_coverage_radius_matches_brute_force() -> None:
    features = np.random.default_rng(4).normal(5, 2, size=(700, 20))
    selected = np.random.default_rng(5).choice(700, 40, replace=False)
    expected = brute_min_dist(features, selected).max()
    assert coverage_radius(features, selected, chunk=64) == pytest.approx(expected, rel=1e-9)
    assert coverage_radius(features.astype(np.float32), selected, chunk=1000) == pytest.approx(expected, rel=1e-4)


def test_coverage_radius_attribute_is_in_selection_space() -> None:
    features = clustered(1500, 32, 15)
    sampler = KCenterGreedySampler(ratio=0.05, projection_dim=None)
    selected = sampler.select(features)
    assert sampler.coverage_radius_ == pytest.approx(coverage_radius(features, selected), rel=1e-4)


def test_greedy_covers_better_than_random() -> None:
    features = clustered(4000, 48, 40)
    greedy = coverage_radius(features, KCenterGreedySampler(ratio=0.05).select(features))
    random = coverage_radius(features, RandomSampler(ratio=0.05).select(features))
    assert greedy < 0.8 * random


# ----------------------------------------------------------------------------- edge cases


def test_single_point() -> None:
    sampler = KCenterGreedySampler(ratio=0.1)
    np.testing.assert_array_equal(sampler.select(np.ones((1, 8))), [0])
    assert sampler.coverage_radius_ == 0.0


def test_tiny_ratio_gives_one_point() -> None:
    assert len(KCenterGreedySampler(ratio=0.001).select(np.random.default_rng(0).normal(size=(100, 4)))) == 1


def test_ratio_one_selects_every_point() -> None:
    features = clustered(400, 8, 5)
    sampler = KCenterGreedySampler(ratio=1.0, projection_dim=None)
    selected = sampler.select(features)
    np.testing.assert_array_equal(np.sort(selected), np.arange(400))
    assert sampler.coverage_radius_ == 0.0


def test_duplicates_are_taken_last_in_index_order() -> None:
    distinct = np.random.default_rng(2).normal(size=(100, 6)).astype(np.float32)
    features = np.concatenate([distinct] * 3)  # rows i, i+100, i+200 are equal
    sampler = KCenterGreedySampler(ratio=0.6, projection_dim=None)
    selected = sampler.select(features)
    assert len(selected) == 180 and len(np.unique(selected)) == 180
    assert len(np.unique(features[selected[:100]], axis=0)) == 100  # every distinct row first
    unselected_so_far = np.setdiff1d(np.arange(300), selected[:100])
    np.testing.assert_array_equal(selected[100:], unselected_so_far[:80])  # then in index order
    assert sampler.coverage_radius_ == 0.0


def test_float64_and_non_contiguous_inputs_match_float32_contiguous() -> None:
    wide = clustered(1200, 40, 12).astype(np.float64)
    strided = wide[:, ::2]
    reference = KCenterGreedySampler(ratio=0.1, projection_dim=8).select(np.ascontiguousarray(strided, dtype=np.float32))
    np.testing.assert_array_equal(KCenterGreedySampler(ratio=0.1, projection_dim=8).select(strided), reference)
    fortran = np.asfortranarray(strided.astype(np.float32))
    np.testing.assert_array_equal(KCenterGreedySampler(ratio=0.1, projection_dim=8).select(fortran), reference)


def test_progress_bar_does_not_change_selection(capsys: pytest.CaptureFixture[str]) -> None:
    features = clustered(600, 16, 6)
    quiet = KCenterGreedySampler(ratio=0.5).select(features)
    np.testing.assert_array_equal(KCenterGreedySampler(ratio=0.5, progress=True).select(features), quiet)


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("sampler_class", [KCenterGreedySampler, RandomSampler])
def test_invalid_ratio_is_rejected(ratio: float, sampler_class: type) -> None:
    with pytest.raises(ValueError, match="ratio must be in"):
        sampler_class(ratio=ratio)


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4), (0, 5)])
@pytest.mark.parametrize("sampler", [KCenterGreedySampler(), RandomSampler()])
def test_non_2d_or_empty_features_are_rejected(shape: tuple[int, ...], sampler: object) -> None:
    with pytest.raises(ValueError, match="features must"):
        sampler.select(np.zeros(shape, dtype=np.float32))  # type: ignore[attr-defined]


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="projection_dim"):
        KCenterGreedySampler(projection_dim=0)
    with pytest.raises(ValueError, match="device"):
        KCenterGreedySampler(device="tpu")
    with pytest.raises(ValueError, match="NaN"):
        KCenterGreedySampler().select(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="selected_idx"):
        coverage_radius(np.zeros((3, 2)), np.array([], dtype=np.int64))


def test_random_sampler_is_sorted_unique_and_seeded() -> None:
    features = np.zeros((500, 3))
    selected = RandomSampler(ratio=0.2, seed=1).select(features)
    assert len(selected) == 100 and np.all(np.diff(selected) > 0)
    np.testing.assert_array_equal(selected, RandomSampler(ratio=0.2, seed=1).select(features))


# ----------------------------------------------------------------------------- both exact engines


ENGINES = [coreset._PrunedFarthestFirst, coreset._ClusterFarthestFirst, coreset._BatchedFarthestFirst]


@pytest.mark.parametrize("engine", ENGINES, ids=["blocks", "clusters", "batched"])
@pytest.mark.parametrize(
    ("make", "projection_dim", "ratio"),
    [
        (lambda: clustered(4000, 48, 50, seed=3), 16, 0.25),
        (lambda: lattice(7, 4), None, 0.5),  # exact ties everywhere
        (lambda: np.concatenate([np.random.default_rng(2).normal(size=(150, 6)).astype(np.float32)] * 2), None, 0.8),
        (lambda: np.random.default_rng(9).normal(size=(3000, 40)).astype(np.float32), None, 0.1),  # high intrinsic dim
        (lambda: noisy_clusters(8000, 96, 40), 64, 0.1),  # the weak-pruning regime of real patch banks
    ],
    ids=["clustered", "lattice", "duplicates", "isotropic", "noisy"],
)
def test_each_exact_engine_reproduces_the_plain_loop(engine: type, make, projection_dim: int | None, ratio: float) -> None:
    features = make()
    points, first = points_and_start(features, projection_dim, seed=1)
    n_select = coreset_size(len(features), ratio)
    selected, radius_sq = engine(points.copy(), lambda done: None).run(first, n_select)
    reference = reference_greedy(points, first, n_select)
    np.testing.assert_array_equal(selected, reference)
    expected = brute_min_dist(points, selected).max() if n_select < len(points) else 0.0
    assert math.sqrt(radius_sq) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_default_engine_is_the_batched_one_when_numba_is_installed() -> None:
    pytest.importorskip("numba")
    assert coreset._cpu_engine() is coreset._BatchedFarthestFirst


def test_farthest_first_is_the_samplers_engine() -> None:
    features = clustered(2500, 32, 25)
    sampler = KCenterGreedySampler(ratio=0.1, projection_dim=16, seed=4)
    expected = sampler.select(features)
    points, first = points_and_start(features, 16, seed=4)
    selected, radius_sq = coreset.farthest_first(points, first, len(expected))
    np.testing.assert_array_equal(selected, expected)
    assert math.sqrt(radius_sq) == pytest.approx(sampler.coverage_radius_)
