"""Composable greedy k-center over sharded banks: the 2-round MapReduce scheme.

Round 1 runs exact greedy k-center (:func:`edgecore.coreset.farthest_first`) on
every shard independently, keeping ``k_s`` centres of shard ``s``; round 2 runs
it again on the union of those centres, down to the target ``k``. This is the
composable-coreset k-center of Malkomes et al. (NeurIPS 2015) and Ceccarello,
Pietracaprina & Pucci (VLDB 2019). All shards share one random projection (drawn
from the seed exactly as :class:`~edgecore.coreset.KCenterGreedySampler` draws it),
so every distance lives in the same space.

Approximation bound. Let r_s be shard s's round-1 radius and rho the round-2
radius over the union. Every point is within r_s of a round-1 centre, which is
within rho of a final centre, so the final radius satisfies

    r_final <= max_s r_s + rho                                  (always; reported)

Greedy is a 2-approximation of the optimal k-center radius OPT_k (Gonzalez 1985),
so rho <= 2 OPT_k; when every shard keeps ``k_s >= k`` centres also
r_s <= 2 OPT_k, hence r_final <= 4 OPT_k <= 4 r_greedy (Malkomes et al., Thm. 1;
r_greedy >= OPT_k is the single-node greedy radius). Ceccarello et al. show that
larger per-shard coresets bring the factor towards 2 in low doubling dimension.
With the default ``k_s = oversample * k * |P_s| / N`` (the shards' share of the
target, times ``oversample``) only the a-posteriori bound holds, which is why it
is computed and stored with every fit, and benchmarks measure r_final / r_greedy.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgecore.coreset import coreset_size, farthest_first, max_distance_to_centres, projection_matrix
from edgecore.distributed.shards import Shard, gather_rows

# Round-1 centres per shard: this multiple of the shard's share of the target.
DEFAULT_OVERSAMPLE = 2.0

# map(function, list of argument tuples) -> list of results: serial here, Ray tasks on a cluster.
Mapper = Callable[[Callable[..., Any], Sequence[tuple]], list]


def serial_map(function: Callable[..., Any], arguments: Sequence[tuple]) -> list:
    return [function(*args) for args in arguments]


@dataclass(frozen=True)
class ComposableResult:
    """Final selection (global bank rows, in round-2 order) and the radii behind the bound."""

    selected: np.ndarray
    shard_centres: list[int]
    shard_radii: list[float]  # r_s, in selection space
    union_size: int
    union_radius: float  # rho, in selection space
    radius: float  # r_final over every bank row, in selection space (exact)
    bound: float  # max_s r_s + rho

    def summary(self) -> dict:
        data = asdict(self)
        del data["selected"]
        data["bound_holds"] = self.radius <= self.bound * (1 + 1e-5)
        return data


def _project(rows: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    """Rows in selection space (float32, centred on their own mean: distances unchanged)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    points = rows if matrix is None else rows @ matrix
    if not np.isfinite(points).all():
        raise ValueError("features contain NaN or infinite values")
    return points - points.mean(axis=0, dtype=np.float64).astype(np.float32)


def shard_greedy(shard: Shard, n_select: int, matrix: np.ndarray | None, seed: int) -> tuple[np.ndarray, float]:
    """Round 1 on one shard: (global rows of its greedy centres, its radius in selection space)."""
    points = _project(shard.open(), matrix)
    first = int(np.random.default_rng([seed, shard.index]).integers(points.shape[0]))
    local, radius_sq = farthest_first(points, first, min(n_select, points.shape[0]))
    return local + shard.first_row, math.sqrt(max(radius_sq, 0.0))


def shard_radius(shard: Shard, centres: np.ndarray, matrix: np.ndarray | None, shift: np.ndarray) -> float:
    """Max distance of the shard's rows to the final centres (``centres`` already in selection space)."""
    rows = np.asarray(shard.open(), dtype=np.float32)
    points = rows if matrix is None else rows @ matrix
    return max_distance_to_centres(points, centres, shift)


def composable_kcenter(
    shards: list[Shard],
    ratio: float,
    projection_dim: int | None,
    seed: int,
    oversample: float = DEFAULT_OVERSAMPLE,
    mapper: Mapper = serial_map,
) -> ComposableResult:
    """Select ``coreset_size(N, ratio)`` bank rows by 2-round composable greedy k-center.

    Args:
        shards: the bank as memory-mapped shards (see :mod:`edgecore.distributed.shards`).
        ratio: share of the N bank rows to keep.
        projection_dim: JL projection size (None: full feature space).
        seed: draws the projection (as the single-node sampler does) and the start rows.
        oversample: round-1 centres per shard, as a multiple of the shard's share of the target;
            ``oversample >= len(shards)`` keeps >= k per shard, where the a-priori 4-approximation holds.
        mapper: runs round 1 and the radius pass per shard (serially by default, Ray tasks on a cluster).

    Returns:
        the selection with its measured radii and bound.
    """
    if oversample < 1:
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    total = sum(shard.rows for shard in shards)
    n_select = coreset_size(total, ratio)
    dim = int(shards[0].open().shape[1])
    rng = np.random.default_rng(seed)
    rng.integers(total)  # the single-node sampler's start row comes first in the stream
    matrix = projection_matrix(dim, projection_dim, rng)

    per_shard = [min(shard.rows, max(1, math.ceil(oversample * n_select * shard.rows / total))) for shard in shards]
    round1 = mapper(shard_greedy, [(shard, count, matrix, seed) for shard, count in zip(shards, per_shard)])
    union = np.concatenate([rows for rows, _ in round1])
    shard_radii = [radius for _, radius in round1]

    raw = np.ascontiguousarray(gather_rows(shards, union), dtype=np.float32)
    projected = raw if matrix is None else raw @ matrix
    shift = projected.mean(axis=0, dtype=np.float64).astype(np.float32)
    first = int(np.random.default_rng([seed, len(shards)]).integers(union.size))
    order, union_radius_sq = farthest_first(projected - shift, first, min(n_select, union.size))
    selected = union[order]
    radii = mapper(shard_radius, [(shard, projected[order], matrix, shift) for shard in shards])
    union_radius = math.sqrt(max(union_radius_sq, 0.0))
    return ComposableResult(
        selected=selected.astype(np.int64),
        shard_centres=[int(rows.size) for rows, _ in round1],
        shard_radii=shard_radii,
        union_size=int(union.size),
        union_radius=union_radius,
        radius=max(radii),
        bound=max(shard_radii) + union_radius,
    )

