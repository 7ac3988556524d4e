"""Time k-center greedy coreset selection: plain fused loop vs edgecore's pruned sampler vs anomalib's loop.

Bank shapes worth running (N patches x d), all at ratio 0.1:

    163856 x 1024   MVTec bottle, WideResNet-50 layer2+3 (default)
     50000 x 1024   a smaller WRN-50 bank
    163856 x  152   MVTec bottle, EfficientNet-Lite0

    python benchmarks/bench_coreset.py --n 50000 --dim 1024
    python benchmarks/bench_coreset.py --features bank.npy

All methods run in the same process on the same features; on a shared machine
absolute seconds are noisy, the ratios within one run are what count. On an
oversubscribed machine multi-threaded BLAS/torch loops can stall badly; for a
per-core comparison run with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1. The
anomalib loop is slow, so it runs ``--anomalib-iters`` steps and its total is
extrapolated linearly (and labelled so). Coverage radii are exact, in the
original feature space.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgecore.coreset import KCenterGreedySampler, RandomSampler, coreset_size, coverage_radius, selection_space


@dataclass
class Result:
    method: str
    seconds: float
    selected: np.ndarray | None  # None when the run was capped (no full selection to measure)
    note: str = ""


def synthetic_bank(n_points: int, dim: int, seed: int) -> np.ndarray:
    """Clustered, low-rank, non-negative features: a stand-in for a CNN patch bank.

    Patches of one object form many tight groups (similar texture and place) that
    vary along few directions, with a variance spectrum that decays fast, and
    post-ReLU activations are non-negative with a large mean. Modelled as n/200
    Gaussian clusters in a 48-d latent space, each spread in its own 6-d subspace,
    latent axis i scaled by (1 + i)^-0.9, lifted to ``dim`` by a random linear map,
    plus isotropic noise, then ReLU. The spectrum was matched to a real
    EfficientNet-Lite0 bank of MVTec bottle (after the 128-d projection the top 16
    directions hold ~90 % of the variance); pruning gains depend on this, so prefer
    ``--features`` with a real bank.
    """
    rng = np.random.default_rng(seed)
    latent_dim, n_clusters = 48, max(1, n_points // 200)
    lift = rng.standard_normal((latent_dim, dim), dtype=np.float32) / np.float32(math.sqrt(latent_dim))
    axis_scale = 6 * (1.0 + np.arange(latent_dim, dtype=np.float32)) ** -0.9
    centres = rng.standard_normal((n_clusters, latent_dim), dtype=np.float32)
    spans = rng.standard_normal((n_clusters, 6, latent_dim), dtype=np.float32) * 0.3
    bank = np.empty((n_points, dim), dtype=np.float32)
    for start in range(0, n_points, 16384):
        rows = min(16384, n_points - start)
        label = rng.integers(n_clusters, size=rows)
        weights = rng.standard_normal((rows, 6), dtype=np.float32)
        latent = (centres[label] + np.einsum("nk,nkd->nd", weights, spans[label])) * axis_scale
        chunk = latent @ lift + 1.0 + rng.standard_normal((rows, dim), dtype=np.float32) * 0.1
        bank[start : start + rows] = np.maximum(chunk, 0)
    return bank


def plain_fused_greedy(features: np.ndarray, n_select: int, projection_dim: int | None, seed: int) -> np.ndarray:
    """The unpruned greedy loop done well in numpy: one gemv and in-place float32 updates per step.

    Same projection, start point, arithmetic and tie rule as KCenterGreedySampler, but
    every step streams all N rows (BLAS gemv, so rows may round differently by an ulp).
    """
    rng = np.random.default_rng(seed)
    first = int(rng.integers(features.shape[0]))
    points = selection_space(features, projection_dim, rng)
    sq_norms = np.einsum("ij,ij->i", points, points)
    min_sq = np.full(points.shape[0], np.inf, dtype=np.float32)
    dist_sq = np.empty_like(min_sq)
    selected = np.empty(n_select, dtype=np.int64)
    centre = first
    for step in range(n_select):
        selected[step] = centre
        np.matmul(points, points[centre], out=dist_sq)
        dist_sq *= -2
        dist_sq += sq_norms
        dist_sq += sq_norms[centre]
        np.maximum(dist_sq, 0, out=dist_sq)
        np.minimum(min_sq, dist_sq, out=min_sq)
        min_sq[centre] = -np.inf
        centre = int(np.argmax(min_sq))
    return selected


def anomalib_style_greedy(features: np.ndarray, n_select: int, projection_dim: int, seed: int, max_iters: int) -> tuple[np.ndarray, float, float]:
    """RE-IMPLEMENTATION (not anomalib's code) of anomalib's KCenterGreedy selection loop.

    Follows anomalib 2.x ``models/components/sampling/k_center_greedy.py``: project
    with its torch SparseRandomProjection (Li et al. very sparse matrix, stored
    dense), start from a random row, then per step
    ``torch.linalg.norm(features - center, ord=2, dim=1, keepdim=True)``,
    ``torch.minimum`` with the running distances, ``torch.max`` for the next index,
    and ``scatter_`` a 0 at it. anomalib sizes the projection by the JL bound with
    eps=0.9 (~300 dims at 164k rows); here it uses ``projection_dim`` so all methods
    work in the same dimension. Returns (indices of the steps run, projection
    seconds, loop seconds).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    start_time = time.perf_counter()
    embedding = torch.from_numpy(np.array(features, dtype=np.float32))  # a writable copy, as anomalib holds a tensor
    projected = embedding @ sparse_random_projection(embedding.shape[1], projection_dim, generator)
    projection_seconds = time.perf_counter() - start_time
    start_time = time.perf_counter()
    idx = torch.randint(high=embedding.shape[0], size=(1,), generator=generator).squeeze()
    selected = [idx]
    min_distances: torch.Tensor | None = None
    for _ in range(min(n_select, max_iters) - 1):
        distances = torch.linalg.norm(projected - projected[idx].squeeze(), ord=2, dim=1, keepdim=True)
        min_distances = distances if min_distances is None else torch.minimum(min_distances, distances)
        _, idx = torch.max(min_distances.squeeze(1), dim=0)
        min_distances.scatter_(0, idx.unsqueeze(0).unsqueeze(1), 0.0)
        selected.append(idx)
    return torch.stack(selected).numpy().astype(np.int64), projection_seconds, time.perf_counter() - start_time


def sparse_random_projection(dim: int, n_components: int, generator: object) -> object:
    """Achlioptas/Li sparse matrix (density 1/sqrt(dim), entries +-sqrt(1/(density k))), as a dense torch tensor."""
    import torch

    density = 1 / math.sqrt(dim)
    scale = math.sqrt(1 / (density * n_components))
    uniform = torch.rand((dim, n_components), generator=generator)
    signs = torch.where(torch.rand((dim, n_components), generator=generator) < 0.5, -scale, scale)
    return torch.where(uniform < density, signs, torch.zeros(()))


def agreement(plain: np.ndarray, pruned: np.ndarray) -> str:
    """Where the plain loop's selection departs from the pruned one, if it does."""
    if np.array_equal(plain, pruned):
        return "identical selection to pruned"
    first = int(np.argmax(plain != pruned))
    overlap = len(np.intersect1d(plain, pruned)) / len(plain)
    return f"same as pruned up to step {first} (near-tie broken differently by gemv rounding); {overlap:.0%} common"


def timed(function: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    selected = function()
    return selected, time.perf_counter() - start


def run(features: np.ndarray, ratio: float, projection_dim: int, seed: int, anomalib_iters: int) -> list[Result]:
    n_select = coreset_size(features.shape[0], ratio)
    results = []

    log(f"pruned sampler: {n_select} steps ...")
    selected, seconds = timed(lambda: KCenterGreedySampler(ratio, projection_dim, seed).select(features))
    results.append(Result("edgecore pruned (numpy, CPU)", seconds, selected))

    log("plain fused loop ...")
    plain, seconds = timed(lambda: plain_fused_greedy(features, n_select, projection_dim, seed))
    results.append(Result("plain fused loop (numpy gemv)", seconds, plain, agreement(plain, selected)))

    iters = min(n_select, anomalib_iters)
    log(f"anomalib-style loop: {iters} of {n_select} steps ...")
    partial, projection_seconds, loop_seconds = anomalib_style_greedy(features, n_select, projection_dim, seed, iters)
    name = "anomalib KCenterGreedy (re-impl., torch)"
    if iters < n_select:
        seconds = projection_seconds + loop_seconds * n_select / iters
        results.append(Result(name, seconds, None, f"EXTRAPOLATED: loop timed for {iters} steps, scaled linearly"))
    else:
        results.append(Result(name, projection_seconds + loop_seconds, partial))

    results.append(Result("random subset (baseline)", 0.0, RandomSampler(ratio, seed).select(features)))
    return results


def markdown_table(features: np.ndarray, results: list[Result], with_radius: bool) -> str:
    plain_seconds = next(r.seconds for r in results if r.method.startswith("plain"))
    anomalib_seconds = next(r.seconds for r in results if r.method.startswith("anomalib"))
    lines = [
        "| method | seconds | x vs plain | x vs anomalib | coverage radius (original space) | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    radius_cache: dict[bytes, float] = {}
    if with_radius:
        log("coverage radii in the original space (exact, chunked GEMM) ...")
    for result in results:
        radius = "-"
        if with_radius and result.selected is not None:
            key = result.selected.tobytes()
            if key not in radius_cache:
                radius_cache[key] = coverage_radius(features, result.selected)
            radius = f"{radius_cache[key]:.4g}"
        timing = [f"{result.seconds:.2f}", ratio_text(plain_seconds, result.seconds), ratio_text(anomalib_seconds, result.seconds)]
        if result.method.startswith("random"):
            timing = ["-", "-", "-"]
        lines.append(f"| {result.method} | " + " | ".join(timing) + f" | {radius} | {result.note} |")
    return "\n".join(lines)


def ratio_text(reference: float, seconds: float) -> str:
    return f"{reference / seconds:.1f}" if seconds > 0 else "-"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=163856, help="rows of the synthetic bank")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension of the synthetic bank")
    parser.add_argument("--features", help="a saved (N, d) .npy bank to use instead of synthetic features")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anomalib-iters", type=int, default=1000, help="steps of the anomalib loop to run before extrapolating")
    parser.add_argument("--no-radius", action="store_true", help="skip the exact coverage radii (N x K x d GEMMs)")
    args = parser.parse_args()

    if args.features:
        features = np.load(args.features, mmap_mode="r")
        source = args.features
    else:
        features = synthetic_bank(args.n, args.dim, args.seed)
        source = "synthetic clustered"
    log(f"bank: {features.shape[0]} x {features.shape[1]} ({source})")
    results = run(features, args.ratio, args.projection_dim, args.seed, args.anomalib_iters)
    table = markdown_table(features, results, with_radius=not args.no_radius)
    print(f"\n{features.shape[0]} x {features.shape[1]} {features.dtype} ({source}), ratio {args.ratio}, projection {args.projection_dim}-d\n")
    print(table)


if __name__ == "__main__":
    main()
