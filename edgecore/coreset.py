"""Coreset subsampling of the PatchCore memory bank.

PatchCore (Roth et al., CVPR 2022) keeps only a small "coreset" of the training
patch features: greedy k-center selection (farthest-first traversal) picks the
points that best cover the bank, so nearest-neighbour scores on the coreset stay
close to scores on the full bank. Selecting 10 % of a 50k-170k patch bank means
5 000-17 000 sequential greedy steps, which is the training bottleneck; this
module makes those steps cheap without changing which points are selected.

Samplers follow the small :class:`CoresetSampler` protocol so they can be
swapped (as in patchcore-inspection). :func:`coverage_radius` measures any
selection in the original feature space, so samplers can be compared.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "CoresetSampler",
    "KCenterGreedySampler",
    "RandomSampler",
    "coreset_size",
    "coverage_radius",
    "farthest_first",
    "max_distance_to_centres",
    "projection_matrix",
    "selection_space",
]

# Greedy steps run over the whole bank before the first blocking: while there are
# only a few centres every block is near every new centre, so pruning cannot help.
_FIRST_BLOCKING_AT = 64
# Re-block (group points by their nearest centre) each time the number of centres
# has grown by this factor: finer blocks have smaller radii and prune better ...
_REBLOCK_GROWTH = 4
# ... up to this many blocks, where the per-step centre-to-centre distances
# (blocks x dim) start to cost more than the points they let us skip.
_MAX_BLOCKS = 2048
# Above this fraction of affected rows, streaming the lower-bound coordinates of all
# rows is cheaper than gathering those of the affected ones.
_FULL_PASS_FRACTION = 0.2
# Coordinates of the cheap per-row distance lower bound used inside affected blocks.
_BOUND_DIM = 32
# Batched engine: most candidates per batch, fewest picks per batch while the coreset is small
# (b <= count keeps the first passes cheap), and cluster centres per GEMM chunk of its pass.
_BATCH_CANDIDATES = 4096
_MIN_BATCH = 16
_PASS_CLUSTERS = 2048
# Progress is reported every this many greedy steps (updating a bar is not free).
_PROGRESS_EVERY = 256


class CoresetSampler(Protocol):
    """Anything that picks a subset of memory-bank rows."""

    def select(self, features: np.ndarray) -> np.ndarray:
        """Return int64 row indices into ``features`` (N x d); the order is the sampler's to define."""
        ...


def coreset_size(n_points: int, ratio: float) -> int:
    """Number of points kept for ``ratio``: ``round(ratio * N)``, at least 1, at most N."""
    _check_ratio(ratio)
    return int(min(n_points, max(1, round(ratio * n_points))))


class RandomSampler:
    """Uniform random subset: the baseline that k-center greedy must beat on coverage."""

    def __init__(self, ratio: float = 0.1, seed: int = 0) -> None:
        _check_ratio(ratio)
        self.ratio = ratio
        self.seed = seed

    def select(self, features: np.ndarray) -> np.ndarray:
        """Return the sorted int64 indices of ``coreset_size(N, ratio)`` distinct random rows."""
        n_points = _check_features(features).shape[0]
        rng = np.random.default_rng(self.seed)
        chosen = rng.choice(n_points, size=coreset_size(n_points, self.ratio), replace=False)
        return np.sort(chosen).astype(np.int64)


class KCenterGreedySampler:
    """Greedy k-center coreset (minimax facility location), as in the PatchCore paper.

    Starts from a seeded random row, then repeatedly adds the row farthest from the
    rows selected so far (ties go to the smallest row index). ``default_rng(seed)``
    draws the start row first, then the projection matrix. As in the official
    implementation, distances are measured after a Gaussian (Johnson-Lindenstrauss)
    random projection to ``projection_dim`` dimensions, which makes each step
    cheaper while approximately preserving distances; ``projection_dim=None`` (or
    one >= the feature dimension) selects in the full feature space.

    ``select`` returns indices in selection order (every prefix is itself a greedy
    coreset). Afterwards ``coverage_radius_`` holds the achieved covering radius,
    max over all rows of the distance to the nearest selected row, measured in the
    space the selection was made in (the projected space when projecting; use
    :func:`coverage_radius` for the original space).

    On ``device="cpu"`` the greedy loop skips points that provably cannot change
    (see :class:`_PrunedFarthestFirst`) and still returns exactly the selection of
    the plain loop; memory is O(N x p). ``device="cuda"`` runs the plain fused loop
    in torch on the GPU.
    """

    def __init__(
        self,
        ratio: float = 0.1,
        projection_dim: int | None = 128,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = False,
    ) -> None:
        _check_ratio(ratio)
        if projection_dim is not None and projection_dim < 1:
            raise ValueError(f"projection_dim must be a positive integer or None, got {projection_dim}")
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.device = device
        self.progress = progress
        self.coverage_radius_: float | None = None

    def select(self, features: np.ndarray) -> np.ndarray:
        """Return the int64 indices of the greedy coreset, in selection order."""
        features = _check_features(features)
        n_points = features.shape[0]
        n_select = coreset_size(n_points, self.ratio)
        rng = np.random.default_rng(self.seed)
        first = int(rng.integers(n_points))
        points = selection_space(features, self.projection_dim, rng)
        with _progress_reporter(n_select, self.progress) as report:
            if self.device == "cpu":
                selected, radius_sq = _cpu_engine()(points, report).run(first, n_select)
            else:
                selected, radius_sq = _farthest_first_torch(points, first, n_select, self.device, report)
        self.coverage_radius_ = math.sqrt(max(radius_sq, 0.0))
        return selected


def selection_space(features: np.ndarray, projection_dim: int | None, rng: np.random.Generator) -> np.ndarray:
    """Rows as float32 (N x p, C-contiguous) in the space greedy selection works in.

    Projects with a Gaussian matrix scaled by 1/sqrt(p) (drawn from ``rng``) when
    ``projection_dim`` is smaller than the feature dimension, chunk by chunk so a
    float64 or strided input never needs a full float32 copy. The result is then
    centred: distances do not change, but the ||x||^2 + ||c||^2 - 2 x.c formula
    loses far less to float32 cancellation on features with a large mean, such as
    post-ReLU CNN activations.
    """
    n_points, dim = features.shape
    matrix = projection_matrix(dim, projection_dim, rng)
    if matrix is None:
        points = np.array(features, dtype=np.float32, order="C", copy=True)
    else:
        points = np.empty((n_points, projection_dim), dtype=np.float32)
        rows = max(1, (1 << 22) // dim)  # ~16 MB of float32 input per GEMM
        for start in range(0, n_points, rows):
            chunk = np.ascontiguousarray(features[start : start + rows], dtype=np.float32)  # same GEMM for any layout
            np.matmul(chunk, matrix, out=points[start : start + rows])
    if not np.isfinite(points).all():
        raise ValueError("features contain NaN or infinite values")
    points -= points.mean(axis=0, dtype=np.float64).astype(np.float32)
    return points


def projection_matrix(dim: int, projection_dim: int | None, rng: np.random.Generator) -> np.ndarray | None:
    """The Gaussian JL matrix (dim x p, scaled by 1/sqrt(p)) drawn from ``rng``; None when not projecting."""
    if projection_dim is None or projection_dim >= dim:
        return None
    matrix = rng.standard_normal((dim, projection_dim), dtype=np.float32)
    matrix *= np.float32(1.0 / math.sqrt(projection_dim))
    return matrix


def farthest_first(points: np.ndarray, first: int, n_select: int, progress: bool = False) -> tuple[np.ndarray, float]:
    """Exact greedy k-center on rows already in selection space (see :func:`selection_space`).

    The engine behind :class:`KCenterGreedySampler` on the CPU, for callers that
    shard the bank themselves (``edgecore.distributed``). Returns (row indices in
    selection order, squared coverage radius of the selection over ``points``).
    """
    with _progress_reporter(n_select, progress) as report:
        return _cpu_engine()(points, report).run(first, n_select)


def max_distance_to_centres(rows: np.ndarray, centres: np.ndarray, shift: np.ndarray, chunk: int = 1024) -> float:
    """Max over ``rows`` of the Euclidean distance to the nearest of ``centres``, both shifted by ``shift``.

    Chunked GEMMs, ||x||^2 + ||y||^2 - 2 x.y clamped at 0; the shift (any point near the
    data, e.g. its mean) leaves distances unchanged and keeps float32 cancellation small.
    """
    dtype = np.float64 if rows.dtype == np.float64 else np.float32
    centres = centres.astype(dtype) - shift.astype(dtype)
    centres_sq = np.einsum("ij,ij->i", centres, centres)
    worst = 0.0
    for start in range(0, rows.shape[0], chunk):
        block = rows[start : start + chunk].astype(dtype) - shift.astype(dtype)
        dist_sq = block @ centres.T
        dist_sq *= -2
        dist_sq += centres_sq
        dist_sq += np.einsum("ij,ij->i", block, block)[:, None]
        worst = max(worst, float(dist_sq.min(axis=1).max()))
    return math.sqrt(max(worst, 0.0))


def coverage_radius(features: np.ndarray, selected_idx: np.ndarray, chunk: int = 1024) -> float:
    """Max over all rows of the Euclidean distance to the nearest selected row.

    Computed exactly in the original feature space (no projection) with chunked
    GEMMs, ||x||^2 + ||y||^2 - 2 x.y clamped at 0: memory stays O(chunk x K), never
    N x N. Works in float64 for float64 input, float32 otherwise (after centring,
    which keeps the float32 cancellation error small).
    """
    features = _check_features(features)
    selected_idx = np.asarray(selected_idx)
    if selected_idx.ndim != 1 or selected_idx.size == 0 or not np.issubdtype(selected_idx.dtype, np.integer):
        raise ValueError("selected_idx must be a non-empty 1-D array of integer row indices")
    if selected_idx.min() < -features.shape[0] or selected_idx.max() >= features.shape[0]:
        raise ValueError(f"selected_idx out of range for {features.shape[0]} rows")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    mean = features.mean(axis=0, dtype=np.float64)
    return max_distance_to_centres(features, features[selected_idx], mean, chunk)


# ----------------------------------------------------------------------------- CPU


def _sq_dist_to_centre(points: np.ndarray, sq_norms: np.ndarray, centre: np.ndarray, centre_sq: np.float32) -> np.ndarray:
    """Float32 squared distances ||x||^2 + ||c||^2 - 2 x.c, clamped at 0; N-sized temporaries only.

    The dot product uses einsum because its per-row rounding does not depend on
    which rows are passed together (BLAS gemv's does, by up to a few ulps): that is
    what lets the pruned loop reproduce the unpruned selection bit for bit.
    """
    dist_sq = np.einsum("ij,j->i", points, centre)
    dist_sq *= -2
    dist_sq += sq_norms
    dist_sq += centre_sq
    return np.maximum(dist_sq, 0, out=dist_sq)


def _take_rows(array: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """Rows as a view for a slice, else gathered with np.take (several times faster than fancy indexing)."""
    return array[rows] if isinstance(rows, slice) else np.take(array, rows, axis=0)


def _float32_distance_error(dim: int) -> float:
    """Bound ``e`` with |fl32(||x||^2 + ||c||^2 - 2 x.c) - ||x - c||^2| <= e * (||x||^2 + ||c||^2).

    Worst-case float32 summation error of the two dot products plus the additions
    ((2 dim + 4) u), with slack for the rounding of the stored norms themselves.
    """
    return (2 * dim + 16) * 2.0**-24


def _lower_bound_coordinates(points: np.ndarray, dim: int) -> np.ndarray:
    """Rows mapped to ``dim`` coordinates whose distances lower-bound distances between rows.

    z = (P x, ||Q x||), with P the orthogonal projection onto the leading
    ``dim - 1`` principal directions and Q its complement: ||z_x - z_c||^2 =
    ||P(x - c)||^2 + (||Qx|| - ||Qc||)^2 <= ||x - c||^2. PatchCore features have most
    of their variance in few directions, so the bound is tight while costing
    ``dim`` instead of p flops per row. The basis only has to be orthonormal (eigh
    guarantees that to float64 precision), not accurate, so the Gram matrix is a
    float32 GEMM on at most ~16k evenly spaced rows; the coordinates themselves are
    computed in float64.
    """
    dim = min(dim, points.shape[1])
    sample = points[:: max(1, points.shape[0] // 16384)]
    _, eigenvectors = np.linalg.eigh((sample.T @ sample).astype(np.float64))
    leading = np.ascontiguousarray(eigenvectors[:, ::-1][:, : dim - 1])
    coords = np.empty((points.shape[0], dim), dtype=np.float32)
    rows = max(1, (1 << 20) // points.shape[1])
    for start in range(0, points.shape[0], rows):
        chunk = points[start : start + rows].astype(np.float64)
        projected = chunk @ leading
        coords[start : start + rows, : dim - 1] = projected
        rest_sq = np.einsum("ij,ij->i", chunk, chunk) - np.einsum("ij,ij->i", projected, projected)
        coords[start : start + rows, dim - 1] = np.sqrt(np.maximum(rest_sq, 0.0))
    return coords


@dataclass
class _Blocks:
    """Points grouped by nearest centre into contiguous row ranges, with what pruning needs."""

    starts: np.ndarray  # (B,) first row of each block
    sizes: np.ndarray  # (B,) rows per block
    centres: np.ndarray  # (B, dim) float32 lower-bound coordinates of each block's centre
    centre_bound_sq: np.ndarray  # (B,) float64 their shrunk squared norms (see bound_sq)
    radius: np.ndarray  # (B,) float64 upper bound on any member's distance to its centre
    norm_sq_max: np.ndarray  # (B,) float64 largest member squared norm (for rounding bounds)
    max_min_sq: np.ndarray  # (B,) float64 current largest min-distance^2 in the block


class _PrunedFarthestFirst:
    """Exact farthest-first traversal that computes full distances only where they can matter.

    Every point keeps ``min_sq``, its squared distance to the nearest selected
    centre (-inf once selected itself, so it is never picked again), and ``owner``,
    which centre that is. After ``_FIRST_BLOCKING_AT`` plain steps the rows are
    permuted so each centre's points form one contiguous block, whose radius
    rho_b bounds every member's distance to that block's centre. Each new centre c
    then goes through two filters:

    1. blocks: every member x has d(x, c) >= d(c, centre_b) - rho_b, so if that is
       >= the block's largest ``min_sq`` the whole block is skipped;
    2. rows of the remaining blocks: a ``_BOUND_DIM``-dimensional lower bound on
       d(x, c) (leading principal coordinates plus the residual norm) rejects
       most of the rest at a quarter of the cost of the p-dimensional distance.

    Only the survivors get the float32 distance of the plain loop, with the same
    per-row arithmetic. Both filters carry rigorous float32 rounding margins, so a
    skipped row is one whose value the plain loop would not have changed either:
    the selection is bit-for-bit the plain loop's. As centres accumulate, rows are
    re-blocked by their nearest centre, giving smaller radii. The next centre is
    the argmax over per-block maxima.
    """

    def __init__(self, points: np.ndarray, report: Callable[[int], None]) -> None:
        self.points = points
        self.sq_norms = np.einsum("ij,ij->i", points, points)
        self.min_sq = np.full(points.shape[0], np.inf, dtype=np.float32)
        self.owner = np.zeros(points.shape[0], dtype=np.int32)
        self.original = np.arange(points.shape[0], dtype=np.int64)
        self.error = _float32_distance_error(points.shape[1])
        self.bound_coords = _lower_bound_coordinates(points, _BOUND_DIM)
        bound_sq = np.einsum("ij,ij->i", self.bound_coords, self.bound_coords)
        # Two float32 distance evaluations can each be off by ``error`` x norms; 3x leaves slack.
        self.bound_sq = bound_sq * np.float32(1 - 3 * self.error)
        self.selected: list[int] = []
        self.blocks: _Blocks | None = None
        self.report = report

    def run(self, first: int, n_select: int) -> tuple[np.ndarray, float]:
        """Select ``n_select`` rows starting from row ``first``; return (indices, radius^2)."""
        position: int | None = first
        next_blocking = _FIRST_BLOCKING_AT
        while position is not None:
            self._add_centre(position)
            if len(self.selected) == n_select:
                break
            if len(self.selected) >= next_blocking and len(self.selected) <= _MAX_BLOCKS:
                self._reblock()
                next_blocking *= _REBLOCK_GROWTH
            position = self._farthest_position()
        else:  # every remaining point duplicates a centre: greedy takes them in index order
            self._take_covered(n_select - len(self.selected))
        self.report(len(self.selected))
        radius_sq = float(self.min_sq.max()) if len(self.selected) < self.points.shape[0] else 0.0
        return np.asarray(self.selected, dtype=np.int64), radius_sq

    def _add_centre(self, position: int) -> None:
        rank = len(self.selected)
        self.selected.append(int(self.original[position]))
        if self.blocks is None:
            self._absorb(slice(None), position, rank)
            self.min_sq[position] = -np.inf
        else:
            self._absorb_pruned(position, rank)
        if rank % _PROGRESS_EVERY == 0:
            self.report(rank)

    def _absorb(self, rows: slice | np.ndarray, position: int, rank: int) -> None:
        """Lower ``min_sq`` of ``rows`` to their distance from the centre at ``position``."""
        dist_sq = _sq_dist_to_centre(_take_rows(self.points, rows), self.sq_norms[rows], self.points[position], self.sq_norms[position])
        current = self.min_sq[rows]
        self.owner[rows] = np.where(dist_sq < current, rank, self.owner[rows])
        self.min_sq[rows] = np.minimum(current, dist_sq, out=current)
        self.owner[position] = rank

    def _absorb_pruned(self, position: int, rank: int) -> None:
        blocks = self.blocks
        assert blocks is not None
        affected = self._affected_blocks(position)
        if blocks.sizes[affected].sum() > _FULL_PASS_FRACTION * self.points.shape[0]:
            self._absorb(np.flatnonzero(self._may_get_closer(slice(None), position)), position, rank)
            self.min_sq[position] = -np.inf
            blocks.max_min_sq = np.maximum.reduceat(self.min_sq, blocks.starts).astype(np.float64)
            return
        sizes = blocks.sizes[affected]
        offsets = np.cumsum(sizes) - sizes
        rows = np.repeat(blocks.starts[affected] - offsets, sizes) + np.arange(offsets[-1] + sizes[-1])
        self._absorb(rows[self._may_get_closer(rows, position)], position, rank)
        self.min_sq[position] = -np.inf
        blocks.max_min_sq[affected] = np.maximum.reduceat(self.min_sq[rows], offsets)

    def _may_get_closer(self, rows: slice | np.ndarray, position: int) -> np.ndarray:
        """Mask of ``rows`` whose min-distance the new centre might lower, by a cheap lower bound.

        Uses ``_lower_bound_coordinates`` (``_BOUND_DIM`` instead of p flops per row);
        ``bound_sq`` holds their squared norms already shrunk by the float32 rounding
        margin of both this bound and the distance the unpruned loop would compute.
        """
        bound = _take_rows(self.bound_coords, rows) @ self.bound_coords[position]
        bound *= -2
        bound += self.bound_sq[rows]
        bound += self.bound_sq[position]
        return bound < self.min_sq[rows]

    def _affected_blocks(self, position: int) -> np.ndarray:
        """Blocks that may hold a point closer to the new centre than to all earlier ones.

        A block is skipped only if, even after adding float32 rounding bounds, the
        triangle inequality puts all its members at least as far from the new
        centre as the block's current largest min-distance.
        """
        blocks = self.blocks
        assert blocks is not None
        centre = self.bound_coords[position]
        centre_dist_sq = blocks.centre_bound_sq + float(self.bound_sq[position]) - 2.0 * (blocks.centres @ centre)
        gap = np.sqrt(np.maximum(centre_dist_sq, 0.0)) - blocks.radius
        np.maximum(gap, 0.0, out=gap)
        member_dist_sq_bound = gap * gap - self.error * (blocks.norm_sq_max + float(self.sq_norms[position]))
        return np.flatnonzero(member_dist_sq_bound < blocks.max_min_sq)

    def _reblock(self) -> None:
        """Permute rows so each current centre's points are contiguous; recompute block bounds."""
        order = np.lexsort((self.original, self.owner))  # by owner, then original index (tie rule)
        self.points = self.points[order]
        self.sq_norms = self.sq_norms[order]
        self.min_sq = self.min_sq[order]
        self.owner = self.owner[order]
        self.original = self.original[order]
        self.bound_coords = self.bound_coords[order]
        self.bound_sq = self.bound_sq[order]
        n_blocks = len(self.selected)
        bounds = np.searchsorted(self.owner, np.arange(n_blocks + 1))
        starts = bounds[:-1]
        position_of = np.empty_like(self.original)
        position_of[self.original] = np.arange(self.original.size)
        centre_rows = position_of[np.asarray(self.selected)]
        centre_sq = self.sq_norms[centre_rows].astype(np.float64)
        norm_sq_max = np.maximum.reduceat(self.sq_norms, starts).astype(np.float64)
        # min_sq is the float32 distance^2 to the owner; selected rows (-inf) sit at 0.
        member_dist_sq = np.maximum.reduceat(np.maximum(self.min_sq, 0), starts).astype(np.float64)
        self.blocks = _Blocks(
            starts=starts,
            sizes=np.diff(bounds),
            centres=np.ascontiguousarray(self.bound_coords[centre_rows]),
            centre_bound_sq=self.bound_sq[centre_rows].astype(np.float64),
            radius=np.sqrt(member_dist_sq + self.error * (norm_sq_max + centre_sq)),
            norm_sq_max=norm_sq_max,
            max_min_sq=np.maximum.reduceat(self.min_sq, starts).astype(np.float64),
        )

    def _farthest_position(self) -> int | None:
        """Row of the point farthest from all centres (smallest index on ties); None if all covered."""
        if self.blocks is None:
            position = int(np.argmax(self.min_sq))
            return position if self.min_sq[position] > 0 else None
        best_per_block = self.blocks.max_min_sq
        best_block = int(np.argmax(best_per_block))
        best = best_per_block[best_block]
        if best <= 0:
            return None
        tied_blocks = np.flatnonzero(best_per_block == best) if np.count_nonzero(best_per_block == best) > 1 else [best_block]
        candidates = [self._block_argmax(block) for block in tied_blocks]
        return min(candidates, key=lambda position: self.original[position])

    def _block_argmax(self, block: int) -> int:
        start = int(self.blocks.starts[block])  # type: ignore[union-attr]
        return start + int(np.argmax(self.min_sq[start : start + int(self.blocks.sizes[block])]))  # type: ignore[union-attr]

    def _take_covered(self, count: int) -> None:
        """Greedy order once every point is at distance 0: unselected rows by index."""
        unselected = np.sort(self.original[self.min_sq != -np.inf])[:count]
        self.selected.extend(int(index) for index in unselected)
        self.min_sq[np.isin(self.original, unselected)] = -np.inf


class _ClusterFarthestFirst:
    """Exact farthest-first traversal over the live clusters of the greedy itself (numba bookkeeping).

    Every row belongs to the cluster of its nearest centre (``owner``), kept as a
    linked list, and each cluster keeps an upper bound on its radius and its
    farthest member. A new centre c can only take over rows x with
    d(x, c) < d(x, z_owner), which the triangle inequality excludes for whole
    clusters with d(c, z_i) >= 2 radius_i and for single members with
    d(c, z_i) >= 2 d(x, z_i); the survivors then pass the 32-d row bound of
    :class:`_PrunedFarthestFirst`. Unlike that class's fixed blocks, the clusters
    shrink with the radius, so pruning stays tight up to the last step (at 10 % of a
    538k-patch bank: ~hundreds of distances per step instead of ~20 % of the rows).
    Only rows that pass all filters get the plain loop's float32 distance (numpy
    einsum, :func:`_sq_dist_to_centre`), so the selection is bit-for-bit the plain
    loop's; tests compare all three.
    """

    def __init__(self, points: np.ndarray, report: Callable[[int], None]) -> None:
        from edgecore import _coreset_kernels

        self.kernels = _coreset_kernels
        n_points = points.shape[0]
        self.points = points
        self.sq_norms = np.einsum("ij,ij->i", points, points)
        self.min_sq = np.full(n_points, np.inf, dtype=np.float32)
        self.owner = np.full(n_points, -1, dtype=np.int32)
        self.error = _float32_distance_error(points.shape[1])
        self.coords = _lower_bound_coordinates(points, _BOUND_DIM)
        bound_sq = np.einsum("ij,ij->i", self.coords, self.coords)
        self.bound_sq = bound_sq * np.float32(1 - 3 * self.error)  # as in _PrunedFarthestFirst
        self.head = np.full(0, -1, dtype=np.int64)
        self.next = np.full(n_points, -1, dtype=np.int64)
        self.prev = np.full(n_points, -1, dtype=np.int64)
        self.candidates = np.empty(n_points, dtype=np.int64)
        self.all_rows = np.arange(n_points, dtype=np.int64)
        self.original = np.arange(n_points, dtype=np.int64)
        self.report = report

    def run(self, first: int, n_select: int) -> tuple[np.ndarray, float]:
        """Select ``n_select`` rows starting from row ``first``; return (indices, radius^2)."""
        k = self.kernels
        self.head = np.full(n_select, -1, dtype=np.int64)
        centre_coords = np.zeros((n_select, self.coords.shape[1]), dtype=np.float32)
        centre_bound_sq = np.zeros(n_select, dtype=np.float64)
        centre_sq = np.zeros(n_select, dtype=np.float64)
        best = np.full(n_select, -np.inf, dtype=np.float32)
        best_row = np.full(n_select, -1, dtype=np.int64)
        radius = np.full(n_select, -1.0, dtype=np.float64)
        dirty = np.empty(n_select, dtype=np.int64)
        marked = np.full(n_select, -1, dtype=np.int64)
        selected = np.empty(n_select, dtype=np.int64)
        position, rank = first, 0
        next_reorder = _FIRST_BLOCKING_AT
        while True:
            selected[rank] = self.original[position]
            centre_coords[rank] = self.coords[position]
            centre_bound_sq[rank] = self.bound_sq[position]
            centre_sq[rank] = self.sq_norms[position]
            count = self.points.shape[0]
            if rank >= _FIRST_BLOCKING_AT:
                count = k.candidates(position, rank, self.coords, self.bound_sq, self.sq_norms, self.min_sq,
                                     centre_coords, centre_bound_sq, centre_sq, radius, self.head, self.next,
                                     self.error, self.candidates)
            rows: slice | np.ndarray = slice(None)
            if count <= _FULL_PASS_FRACTION * self.points.shape[0]:
                rows = self.candidates[:count]
            dist_sq = _sq_dist_to_centre(_take_rows(self.points, rows), self.sq_norms[rows], self.points[position],
                                         self.sq_norms[position])
            k.absorb(self.all_rows if isinstance(rows, slice) else rows, dist_sq, position, rank, self.original, self.min_sq,
                     self.owner, self.head, self.next, self.prev, self.sq_norms, centre_sq, best, best_row, radius,
                     dirty, marked, self.error)
            if rank % _PROGRESS_EVERY == 0:
                self.report(rank)
            rank += 1
            if rank == n_select:
                break
            if rank == next_reorder:
                best_row = self._reorder(rank, best_row)
                next_reorder *= _REBLOCK_GROWTH
            value, position = k.farthest(rank, self.original, best, best_row)
            if value <= 0:  # every remaining point duplicates a centre: greedy takes them in index order
                unselected = np.sort(self.original[self.min_sq != -np.inf])[: n_select - rank]
                selected[rank:] = unselected
                self.min_sq[np.isin(self.original, unselected)] = -np.inf
                break
        self.report(n_select)
        radius_sq = float(self.min_sq.max()) if n_select < self.points.shape[0] else 0.0
        return selected, radius_sq

    def _reorder(self, n_clusters: int, best_row: np.ndarray) -> np.ndarray:
        """Sort rows by owner so that walking a cluster reads memory in order (random access
        over a 500k-row bank costs more than all the arithmetic); returns ``best_row`` remapped."""
        order = np.lexsort((self.original, self.owner))
        for name in ("points", "sq_norms", "min_sq", "owner", "original", "coords", "bound_sq"):
            setattr(self, name, getattr(self, name)[order])
        position_of = np.empty_like(order)
        position_of[order] = np.arange(order.size)
        self.kernels.relink(self.owner, n_clusters, self.head, self.next, self.prev)
        return np.where(best_row >= 0, position_of[np.maximum(best_row, 0)], -1)


class _BatchedFarthestFirst:
    """Exact farthest-first traversal in batches: greedy steps among a few candidates, then one pruned pass.

    The B rows with the largest ``min_sq`` are the candidates; T is the largest value
    of any other row. Values outside the candidates only fall as centres are added,
    so while the best candidate's exact value stays above T it is the plain loop's
    next pick (ties: the candidates are in row order and no outside row can reach the
    value). Each pick updates the candidates with the plain loop's float32 distance
    (:func:`_sq_dist_to_centre`); candidates that drop to T or below leave the active
    set. When no candidate is above T the batch's b new centres go through the rest
    of the bank once: a GEMM of the current cluster centres against the batch prunes
    whole clusters (triangle inequality), the member and 32-d row bounds of
    :class:`_ClusterFarthestFirst` prune rows (numba), and only the surviving
    (row, centre) pairs get the exact distance, applied in pick order. Every bound
    carries a rigorous float32 rounding margin, so the selection is bit-for-bit the
    plain loop's; 53 861 memory-bound passes become ~a hundred cache-friendly ones.
    """

    def __init__(self, points: np.ndarray, report: Callable[[int], None]) -> None:
        from edgecore import _coreset_kernels

        self.kernels = _coreset_kernels
        self.points = points
        self.sq_norms = np.einsum("ij,ij->i", points, points)
        self.min_sq = np.full(points.shape[0], np.inf, dtype=np.float32)
        self.owner = np.zeros(points.shape[0], dtype=np.int64)
        # One margin for every float32 squared distance of this bank (see _float32_distance_error).
        self.margin = _float32_distance_error(points.shape[1]) * 2.0 * float(self.sq_norms.max(initial=0.0))
        self.coords = _lower_bound_coordinates(points, _BOUND_DIM)
        bound_sq = np.einsum("ij,ij->i", self.coords, self.coords)
        self.bound_sq = bound_sq * np.float32(1 - 3 * _float32_distance_error(points.shape[1]))
        self.report = report
        self.pairs = np.empty(1 << 20, dtype=np.int64), np.empty(1 << 20, dtype=np.int64)

    def run(self, first: int, n_select: int) -> tuple[np.ndarray, float]:
        """Select ``n_select`` rows starting from row ``first``; return (indices, radius^2)."""
        selected = np.empty(n_select, dtype=np.int64)
        self.centres = np.empty((n_select, self.points.shape[1]), dtype=np.float32)
        self.centre_sq = np.empty(n_select, dtype=np.float32)
        self.min_sq[:] = _sq_dist_to_centre(self.points, self.sq_norms, self.points[first], self.sq_norms[first])
        self.min_sq[first] = -np.inf
        selected[0], self.centres[0], self.centre_sq[0] = first, self.points[first], self.sq_norms[first]
        count = 1
        clusters = self.kernels.build_clusters(self.owner, self.min_sq, 1)
        while count < n_select:
            budget = min(n_select - count, _BATCH_CANDIDATES, max(_MIN_BATCH, count))
            batch = self._batch(budget, count)
            if batch is None:  # every remaining point duplicates a centre: greedy takes them in index order
                selected[count:] = np.flatnonzero(self.min_sq != -np.inf)[: n_select - count]
                self.min_sq[selected[count:]] = -np.inf
                count = n_select
                break
            old_min_sq, batch_rows = batch
            self._pass(clusters, count, old_min_sq, batch_rows)
            selected[count : count + batch_rows.size] = batch_rows
            self.centres[count : count + batch_rows.size] = self.points[batch_rows]
            self.centre_sq[count : count + batch_rows.size] = self.sq_norms[batch_rows]
            count += batch_rows.size
            clusters = self.kernels.build_clusters(self.owner, self.min_sq, count)
            self.report(count)
        self.report(n_select)
        radius_sq = float(self.min_sq.max()) if n_select < self.points.shape[0] else 0.0
        return selected, radius_sq

    def _batch(self, budget: int, count: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Greedy picks (ranks ``count`` ...) among the candidates, at most ``budget``; returns
        (min_sq before the batch, picked rows in order), or None if every row is covered."""
        old_min_sq = self.min_sq.copy()
        n_rows = self.min_sq.size
        top = np.argpartition(self.min_sq, n_rows - budget - 1)[n_rows - budget - 1 :] if budget + 1 < n_rows else np.arange(n_rows)
        threshold = float(self.min_sq[top].min()) if budget + 1 < n_rows else -np.inf
        rows = np.sort(top[self.min_sq[top] > threshold])
        if rows.size == 0:  # ties at the threshold: one plain step (global argmax, smallest index)
            rows = np.array([int(np.argmax(self.min_sq))])
            threshold = -np.inf
        if self.min_sq[rows].max() <= 0:
            return None
        values, owners = self.min_sq[rows], self.owner[rows]
        block, block_sq = np.take(self.points, rows, axis=0), self.sq_norms[rows]
        active = np.arange(rows.size)
        picks: list[int] = []
        while len(picks) < budget and active.size:
            live = values[active]
            best = int(np.argmax(live))
            if not live[best] > threshold:
                break
            position = int(rows[active[best]])
            dist_sq = _sq_dist_to_centre(block, block_sq, self.points[position], self.sq_norms[position])
            closer = dist_sq < live
            owners[active[closer]] = count + len(picks)
            live = np.minimum(live, dist_sq)
            live[best] = -np.inf
            values[active] = live
            picks.append(position)
            keep = live > threshold
            if np.count_nonzero(keep) < 0.75 * active.size:  # compact: dropped rows wait for the pass
                active, block, block_sq = active[keep], block[keep], block_sq[keep]
        self.min_sq[rows], self.owner[rows] = values, owners
        return old_min_sq, np.asarray(picks, dtype=np.int64)

    def _pass(self, clusters: tuple, count: int, old_min_sq: np.ndarray, batch_rows: np.ndarray) -> None:
        """Apply the batch's centres (ranks ``count`` ...) to every row they may bring closer."""
        offsets, members, largest = clusters
        batch_points = self.points[batch_rows]
        batch_sq = self.sq_norms[batch_rows].astype(np.float64)
        batch_coords = np.ascontiguousarray(self.coords[batch_rows])
        batch_bound_sq = self.bound_sq[batch_rows].astype(np.float64) - self.margin
        parts = self.kernels.numba.get_num_threads()
        while True:
            counts = np.zeros(parts, dtype=np.int64)
            for start in range(0, count, _PASS_CLUSTERS):
                dots = self.centres[start : min(count, start + _PASS_CLUSTERS)] @ batch_points.T
                self.kernels.batch_candidates(
                    start, dots, self.centre_sq, largest, offsets, members, batch_sq, batch_coords, batch_bound_sq,
                    old_min_sq, self.min_sq, self.coords, self.bound_sq, self.margin, self.pairs[0], self.pairs[1], counts)
            capacity = self.pairs[0].size // parts
            if counts.max() <= capacity:
                break
            size = 2 * int(counts.max()) * parts
            self.pairs = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
        taken = np.concatenate([np.arange(p * capacity, p * capacity + counts[p]) for p in range(parts)])
        pair_rows, pair_batch = self.pairs[0][taken], self.pairs[1][taken]
        # Batch positions fit in 16 bits (at most _BATCH_CANDIDATES), where numpy's stable sort is a radix sort.
        order = np.argsort(pair_batch.astype(np.int16 if batch_rows.size <= 1 << 15 else np.int64), kind="stable")
        pair_rows, pair_batch = pair_rows[order], pair_batch[order]
        bounds = np.searchsorted(pair_batch, np.arange(batch_rows.size + 1))
        for j, position in enumerate(batch_rows):  # in pick order, as the plain loop
            rows = pair_rows[bounds[j] : bounds[j + 1]]
            if rows.size:
                dist_sq = _sq_dist_to_centre(np.take(self.points, rows, axis=0), self.sq_norms[rows],
                                             self.points[position], self.sq_norms[position])
                current = self.min_sq[rows]
                closer = dist_sq < current
                self.min_sq[rows[closer]] = dist_sq[closer]
                self.owner[rows[closer]] = count + j
        self.owner[batch_rows] = count + np.arange(batch_rows.size)
        self.min_sq[batch_rows] = -np.inf


# ----------------------------------------------------------------------------- GPU


def _farthest_first_torch(
    points: np.ndarray, first: int, n_select: int, device: str, report: Callable[[int], None]
) -> tuple[np.ndarray, float]:
    """The plain fused greedy loop in torch, for a GPU; same arithmetic and tie rule as the CPU path.

    Selected rows are marked -inf so argmax (first maximum on ties) never repeats one and,
    once all remaining rows are at distance 0, takes them in index order, like the CPU path.
    There is no host synchronisation inside the loop.
    """
    import torch

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} requested but torch.cuda.is_available() is False")
    rows = torch.from_numpy(points).to(device)
    sq_norms = torch.einsum("ij,ij->i", rows, rows)
    min_sq = torch.full_like(sq_norms, math.inf)
    selected = torch.empty(n_select, dtype=torch.int64, device=rows.device)
    centre = torch.tensor(first, device=rows.device)
    for step in range(n_select):
        selected[step] = centre
        dist_sq = torch.addmv(sq_norms, rows, rows[centre], alpha=-2).add_(sq_norms[centre]).clamp_(min=0)
        torch.minimum(min_sq, dist_sq, out=min_sq)
        min_sq[centre] = -math.inf
        centre = torch.argmax(min_sq)
        if step % _PROGRESS_EVERY == 0:
            report(step)
    report(n_select)
    radius_sq = float(min_sq.max()) if n_select < points.shape[0] else 0.0
    return selected.cpu().numpy(), radius_sq


# ----------------------------------------------------------------------------- helpers


def _cpu_engine() -> type:
    """The batched engine where numba is installed (the host extra has it), else the block-pruned one.

    All engines are exact (bit-for-bit the plain float32 loop), so the choice only changes speed.
    """
    try:
        import numba  # noqa: F401
    except ImportError:
        return _PrunedFarthestFirst
    return _BatchedFarthestFirst



def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, numbers.Real) and 0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")


def _check_features(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D array (N patches x d), got shape {features.shape}")
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features must have at least one row and one column, got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        features = features.astype(np.float32)
    return features


@contextmanager
def _progress_reporter(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield ``report(done)`` feeding :func:`edgecore.progress.step` (a bar on a terminal, plain lines
    otherwise) when enabled, else doing nothing."""
    if not enabled:
        yield lambda done: None
        return
    from edgecore.progress import step

    with step(f"k-center greedy coreset ({total} centres)", total) as advance:
        reported = 0

        def report(done: int) -> None:
            nonlocal reported
            advance(done - reported)
            reported = done

        yield report
