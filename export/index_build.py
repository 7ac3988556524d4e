"""Host side of the coreset index: quantize, build the graph, pick the search mode.

numpy + hnswlib only (no torch). The camera reads the result with
``edgecore.runtime.index.QuantizedIndex.load``; every number below is measured in
``benchmarks/INDEX_STUDY.md`` (``benchmarks/bench_index.py``).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from edgecore.runtime import native
from edgecore.runtime.index import DTYPES, SEARCH_MODES, QuantizedIndex, CoarseSearcher, build_hnsw_graph, decode
from edgecore.runtime.native.search import INT8_CANDIDATES
from edgecore.runtime.search import ExactSearch

# Stored vectors (codes + quantization tables) may take at most this share of the
# fp32 coreset bytes; the requirement is 0.27, the rest is headroom for .npy headers.
VECTOR_BYTES_RATIO = 0.268
_NPY_HEADER = 128  # bytes np.save puts before each array (format 1.0, these shapes)
# HNSW parameters (bench_index.py): m=16 meets recall@1 >= 0.99 with the smallest
# graph (8·m+14 B/point keeps a 1024-d index at ~0.31 × fp32); ef_search=128 holds
# recall at the exact-search level; single-threaded build with this seed is deterministic.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
HNSW_SEED = 100
# Coreset size at which exact and hnsw search cost the same CPU time per image (784
# queries), measured on bottle at two dims (benchmarks/INDEX_STUDY.md, "Crossover").
# Exact grows ∝ M·D; hnsw (ef=128, plus ~1 certifying exact query) grows slowly with
# M; BLAS is more efficient at large D, hence the lower point count there.
CROSSOVER_POINTS = ((152, 9_000), (1024, 4_500))
# Coarse mode (runtime/search_coarse.py): graph over a PCA projection, exact re-rank on the int8 codes.
# Chosen on bottle (benchmarks/INDEX_STUDY.md, "Search at the hardware limit").
COARSE_PROJ_DIM = 32
COARSE_CANDIDATES = 8
COARSE_EF_SEARCH = 16
COARSE_MIN_DIM = 512  # below it the projection loses too much as an automatic mode (see choose_search_mode)
# Below COARSE_MIN_DIM coarse is int8 bundles' fallback for CPUs without AMX (runtime.index.int8_fallback_reason),
# with more candidates: bottle Lite0's real patches find int8 search's neighbour 0.9999 (native) / 0.9996 (graph,
# ef 64) of the time with 32, against 0.9985 / 0.9969 (ef 32) with 16 (RESULTS.md #11, "Coarse for Lite0").
LOW_DIM_COARSE_CANDIDATES = 32
LOW_DIM_COARSE_EF_SEARCH = 64
# A fallback must give the chosen int8 mode's answers (that mode passed the probe against exact fp32): its share of
# probe queries with int8 mode's nearest neighbour, the lower of its two candidate stages (native, graph). The
# probe's isotropic noise lies mostly outside a projection's subspace, so it is much harder for coarse than real
# patches: bottle Lite0 0.9974 on the probe, 0.9999 on the test patches (32 candidates); 16 read 0.978 / 0.9985.
FALLBACK_AGREEMENT = 0.995
COARSE_MIN_PROBE_RECALL = 0.99
PROBE_NOISE_GAPS = 3.0
# 'int8' (native brute force over the full-D codes) replaces an automatic 'hnsw' when the kernel runs
# here, passes the same probe-recall bar and searches the probe faster (timed, best of this many).
NATIVE_TIMING_REPEATS = 3
INT8_CANDIDATE_STEPS = (16, 32, 64)  # 'int8' mode's re-ranked candidates, tuned per coreset (8 missed on test data)
INT8_AGREEMENT = 0.999


def choose_search_mode(size: int, dim: int, dtype: str = "int8") -> tuple[str, str]:
    """The search mode for a coreset of ``size``×``dim`` stored as ``dtype``, and why (for the manifest).

    'exact' below the measured exact/graph crossover (interpolated log-linearly in
    ``dim`` between the two measured dims, clamped outside them; near it both cost
    the same and exact needs no approximation). Above it, int8 coresets of at
    least ``COARSE_MIN_DIM`` dims get 'coarse' (its graph hops are 32-d instead of
    D-d and it holds no fp32 copy); smaller dims keep 'hnsw', where a 32-d
    projection needs 32 re-ranked candidates (bottle Lite0, 152-d: recall@1 0.988
    with 16 and the graph's beam 16): there coarse is int8 mode's stored fallback
    for CPUs without AMX instead (see ``_prefer_native``).
    """
    if size < 1 or dim < 1:
        raise ValueError(f"need a non-empty coreset, got {size}×{dim}")
    (dim0, points0), (dim1, points1) = CROSSOVER_POINTS
    t = (math.log(min(max(dim, dim0), dim1)) - math.log(dim0)) / (math.log(dim1) - math.log(dim0))
    crossover = math.exp((1 - t) * math.log(points0) + t * math.log(points1))
    if size < crossover:
        return "exact", f"{size} points is below the measured exact/graph crossover ({crossover:.0f} at D={dim})"
    if dtype == "int8" and dim >= COARSE_MIN_DIM:
        return "coarse", (f"{size} points ≥ crossover {crossover:.0f} and D={dim} ≥ {COARSE_MIN_DIM}: "
                          f"{COARSE_PROJ_DIM}-d projection (native int8 candidates, hnswlib graph as fallback) + exact "
                          "re-rank on the codes was fastest on bottle WRN50")
    return "hnsw", (f"{size} points ≥ crossover {crossover:.0f}; D={dim} < {COARSE_MIN_DIM} or dtype {dtype}: "
                    "full-D graph (a 32-d projection needs 32 candidates here)")


def probe_recall(coreset: np.ndarray, index: QuantizedIndex, queries: int = 784, seed: int = 0) -> float:
    """recall@1 of ``index`` against exact fp32 search on perturbed coreset points (deterministic).

    The noise is ``PROBE_NOISE_GAPS`` × the coreset's median nearest-neighbour gap:
    at 3 gaps only ~88 % of the probes keep their own point as nearest neighbour,
    and the probe is harder than real patches (bottle Lite0, coarse 32-d, 8
    candidates: probe 0.939, real test patches 0.978). Used to confirm an
    automatic choice of an approximate mode on this very coreset.
    """
    probe = probe_queries(coreset, queries, seed)
    _, want = ExactSearch(coreset).search(probe, 1)
    _, got = index.search(probe, 1)
    return float(np.mean(got[:, 0] == want[:, 0]))


def probe_queries(coreset: np.ndarray, queries: int = 784, seed: int = 0) -> np.ndarray:
    """Coreset points perturbed by ``PROBE_NOISE_GAPS`` median nearest-neighbour gaps (see probe_recall)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(coreset), size=min(queries, len(coreset)), replace=False)
    gap = float(np.median(ExactSearch(coreset).search(coreset[rows], 2)[0][:, 1]))
    noise = PROBE_NOISE_GAPS * gap / math.sqrt(coreset.shape[1])
    return (coreset[rows] + rng.normal(0.0, noise, (len(rows), coreset.shape[1]))).astype(np.float32)


def tune_int8_candidates(index: QuantizedIndex, points: np.ndarray) -> int:
    """The fewest re-ranked candidates (of ``INT8_CANDIDATE_STEPS``) with which the int8 mode finds exact
    int8 search's nearest neighbour for ≥ ``INT8_AGREEMENT`` of the probe queries; set on ``index``.

    How many the query's int8 rounding needs depends on the spectrum of the features, so it is measured
    per coreset; the probe is easier than real patches (8 candidates passed it on the synthetic features
    of tests/test_native_search.py but found only 98.4 % of their test queries' neighbours), hence the
    steps start at 16 (bottle Lite0: 0.99155 recall@1 vs 0.99149 at 8). ``points``: the decoded coreset.
    """
    if len(points) <= INT8_CANDIDATE_STEPS[0]:  # every row is a candidate: the search is exact already
        index.searcher.candidates = len(points)
        index.search_params["candidates"] = len(points)
        return len(points)
    probe = probe_queries(points)
    _, want = ExactSearch(points).search(probe, 1)
    for candidates in INT8_CANDIDATE_STEPS:
        index.searcher.candidates = min(candidates, len(points))
        _, got = index.search(probe, 1)
        if np.mean(got[:, 0] == want[:, 0]) >= INT8_AGREEMENT:
            break
    index.search_params["candidates"] = index.searcher.candidates
    return index.searcher.candidates


def build_index(
    coreset: np.ndarray, dtype: str = "int8", mode: str | None = None, patches_per_image: int = 784
) -> QuantizedIndex:
    """Quantize ``coreset`` (M×D float32) and build its index.

    Args:
        coreset: M×D float32 memory bank.
        dtype: stored vectors, ``int8`` | ``fp16`` | ``fp32``.
        mode: ``exact`` | ``hnsw`` | ``coarse`` | ``int8`` | ``compiled`` (the exporter's ``--search``); None
            picks :func:`choose_search_mode`, confirms coarse with :func:`probe_recall`, and replaces
            hnsw by int8 where the native kernel runs, passes the probe and is faster on it (keeping the
            hnsw graph in the index for CPUs without an int8 dot product; an explicit int8 stores none).
        patches_per_image: the feature grid h·w, the block whose largest distance the
            graph modes certify exact.

    Returns:
        the index; ``index.choice`` says which mode and why (it goes into the manifest).
        Deterministic: the same coreset gives the same arrays, hence byte-identical files.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not isinstance(patches_per_image, int) or patches_per_image < 1:
        raise ValueError(f"patches_per_image must be a positive integer, got {patches_per_image!r}")
    if mode is not None and mode not in SEARCH_MODES:
        raise ValueError(f"mode must be one of {tuple(SEARCH_MODES)} or None, got {mode!r}")
    coreset = np.asarray(coreset)
    if coreset.ndim != 2 or coreset.shape[0] == 0 or coreset.shape[1] == 0:
        raise ValueError(f"coreset must be a non-empty M×D array, got shape {coreset.shape}")
    if not np.all(np.isfinite(coreset)):
        raise ValueError("coreset contains NaN or infinite values")
    coreset = np.ascontiguousarray(coreset, dtype=np.float32)
    size, dim = coreset.shape
    if mode is not None:
        return _build(coreset, dtype, mode, patches_per_image, {"mode": mode, "reason": "requested (--search)"})
    mode, reason = choose_search_mode(size, dim, dtype)
    index = _build(coreset, dtype, mode, patches_per_image, {"mode": mode, "reason": reason})
    if mode == "coarse":  # confirm on this coreset; the graph modes certify the image maximum either way
        recall = probe_recall(coreset, index)
        index.choice["probe_recall"] = round(recall, 4)
        if recall < COARSE_MIN_PROBE_RECALL:
            reason = f"coarse probe recall@1 {recall:.4f} < {COARSE_MIN_PROBE_RECALL}: full-D graph instead"
            return _build(coreset, dtype, "hnsw", patches_per_image, {"mode": "hnsw", "reason": reason})
    if mode == "hnsw" and dtype == "int8" and _native_available():  # the rule's low-D graph, not coarse's fallback
        index = _prefer_native(coreset, index, patches_per_image)
    return index


def _native_available() -> bool:
    """The exporter offers 'int8' only where the kernel runs here (the choice is measured with it)."""
    try:
        native.kernel()
    except native.NativeUnavailable:
        return False
    return True


def _prefer_native(coreset: np.ndarray, graph_index: QuantizedIndex, patches_per_image: int) -> QuantizedIndex:
    """'int8' instead of the automatic 'hnsw' when it passes the probe-recall bar and is faster on the
    probe queries (one image's worth, timed alternately), with coarse's projection stored as its fallback
    when that agrees with it; where int8 loses (a CPU without 512-bit int8 dot products, e.g. AVX2), 'coarse'
    itself when it agrees and beats the graph. The choice records every time either way."""
    candidate = _build(coreset, "int8", "int8", patches_per_image, {"mode": "int8"})
    probe = probe_queries(coreset)  # one probe, and int8's answers to it, for the recall and coarse's agreement
    int8_nn = candidate.search(probe, 1)[1][:, 0]
    recall = float(np.mean(int8_nn == ExactSearch(coreset).search(probe, 1)[1][:, 0]))  # as probe_recall
    queries = coreset[np.random.default_rng(1).choice(len(coreset), min(patches_per_image, len(coreset)), replace=False)]
    hnsw_ms, int8_ms = _probe_ms({"hnsw": graph_index, "int8": candidate}, queries).values()
    measured = {"probe_recall_int8": round(recall, 4), "probe_ms_hnsw": round(hnsw_ms, 2), "probe_ms_int8": round(int8_ms, 2)}
    int8_wins = recall >= COARSE_MIN_PROBE_RECALL and int8_ms < hnsw_ms
    coarse = _build(coreset, "int8", "coarse", patches_per_image, {"mode": "coarse"})
    agreement = _coarse_agreement(probe, coarse, int8_nn)
    agrees = agreement >= FALLBACK_AGREEMENT
    measured["probe_agreement_coarse"] = round(agreement, 4)
    if int8_wins:
        # The full-D brute force is fastest only with AMX tiles or AVX-512 VNNI; every other camera CPU searches
        # coarse's projection of the same codes (runtime.index.int8_fallback_reason, RESULTS.md #11). Where that
        # probe fails, the hnsw graph is kept for the paths without an int8 dot product, as before.
        stored = ("the coarse projection (32-d candidates, exact re-rank) is stored for cameras without AMX tiles "
                  "or AVX-512 VNNI" if agrees else
                  "the hnsw graph is stored for cameras whose kernel path has no int8 dot product")
        candidate.choice.update(measured, reason=(
            f"{graph_index.choice['reason']}; native int8 brute force ({candidate.searcher.isa}) passed the probe "
            f"(recall@1 {recall:.4f}) and searched it in {int8_ms:.1f} ms vs hnsw {hnsw_ms:.1f} ms; {stored}"))
        candidate.store_fallback(coarse if agrees else graph_index)
        return candidate
    if agrees:
        (coarse_ms,) = _probe_ms({"coarse": coarse}, queries).values()
        measured["probe_ms_coarse"] = round(coarse_ms, 2)
        if coarse_ms < hnsw_ms:
            coarse.choice.update(measured, reason=(
                f"{graph_index.choice['reason']}; native int8 brute force ({candidate.searcher.isa}) searched the "
                f"probe in {int8_ms:.1f} ms vs hnsw {hnsw_ms:.1f} ms, and coarse ({coarse.searcher.candidate_stage}) "
                f"in {coarse_ms:.1f} ms with int8 mode's neighbour for {agreement:.4f} of it: coarse, without the "
                "full-D graph's float32 copies"))
            return coarse
    graph_index.choice.update(measured)
    return graph_index


def _probe_ms(indexes: dict[str, QuantizedIndex], queries: np.ndarray) -> dict[str, float]:
    """Each index's best time (ms) over ``NATIVE_TIMING_REPEATS`` searches of ``queries``, taken alternately."""
    times: dict[str, list[float]] = {name: [] for name in indexes}
    for _ in range(NATIVE_TIMING_REPEATS):
        for name, index in indexes.items():
            start = time.perf_counter()
            index.search(queries, 1)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(values) for name, values in times.items()}


def _coarse_agreement(probe: np.ndarray, coarse: QuantizedIndex, want: np.ndarray) -> float:
    """Share of the ``probe`` queries for which coarse finds int8 mode's neighbour ``want``, the lower of its two
    candidate stages a camera may run: this CPU's, and the graph's (AVX2-only or library-less cameras)."""
    graph_stage = CoarseSearcher(coarse.arrays, coarse.graph, coarse.hnsw, graph_stage=True)
    return min(float(np.mean(searcher.search(probe, 1)[1][:, 0] == want)) for searcher in (coarse.searcher, graph_stage))


def _build_hnsw_graph(points: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    graph, params = build_hnsw_graph(points, HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_SEED)
    params["ef_search"] = HNSW_EF_SEARCH
    return graph, params


def _build_coarse_graph(points: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    basis, center = principal_projection(points, min(COARSE_PROJ_DIM, points.shape[1]))
    graph, params = build_hnsw_graph((points - center) @ basis.T, HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_SEED)
    graph.update(proj_basis=basis, proj_center=center)
    if points.shape[1] >= COARSE_MIN_DIM:
        params.update(ef_search=COARSE_EF_SEARCH, candidates=COARSE_CANDIDATES)
    else:
        params.update(ef_search=LOW_DIM_COARSE_EF_SEARCH, candidates=LOW_DIM_COARSE_CANDIDATES)
    return graph, params


# Host half of each entry in edgecore.runtime.index.SEARCH_MODES that stores a graph: decoded
# points (what the camera will search) → (graph arrays, hnsw parameters).
GRAPH_BUILDERS: dict[str, Callable[[np.ndarray], tuple[dict[str, np.ndarray], dict]]] = {
    "hnsw": _build_hnsw_graph,
    "coarse": _build_coarse_graph,
}


def _build(coreset: np.ndarray, dtype: str, mode: str, patches_per_image: int, choice: dict) -> QuantizedIndex:
    entry = SEARCH_MODES[mode]
    if entry.int8_only and dtype != "int8":
        raise ValueError(f"mode={mode!r} searches the int8 codes; use dtype='int8'")
    arrays = quantize(coreset, dtype)
    if not entry.graph_arrays:
        params = {"candidates": INT8_CANDIDATES, "certify_block": int(patches_per_image)} if entry.has_params else None
        index = QuantizedIndex(dtype, arrays, mode, choice=choice, search_params=params)
        if mode == "int8" and hasattr(index.searcher, "candidates"):  # not the exact fallback (no kernel)
            tune_int8_candidates(index, decode(dtype, arrays))
        return index
    graph, params = GRAPH_BUILDERS[mode](decode(dtype, arrays))  # built on what the camera will search
    params["certify_block"] = int(patches_per_image)
    return QuantizedIndex(dtype, arrays, mode, graph, params, choice=choice)


def principal_projection(points: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``dims`` principal directions (dims×D float32, orthonormal, sign-fixed) and the mean (D)."""
    x = points.astype(np.float64)
    mean = x.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x - mean, rowvar=False))
    basis = eigenvectors[:, np.argsort(eigenvalues)[::-1][:dims]].T
    # eigh's sign is arbitrary: fix it so the stored basis is reproducible
    signs = np.sign(basis[np.arange(dims), np.argmax(np.abs(basis), axis=1)])
    return (basis * signs[:, None]).astype(np.float32), mean.astype(np.float32)


def quantize(coreset: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """The arrays ``runtime.index.decode`` turns back into vectors (see its docstring)."""
    if dtype == "fp32":
        return {"codes": coreset.copy()}
    if dtype == "fp16":
        if np.max(np.abs(coreset)) > np.finfo(np.float16).max:
            raise ValueError("coreset values exceed the float16 range; use dtype='int8' or 'fp32'")
        return {"codes": coreset.astype(np.float16)}
    return _quantize_int8(coreset.astype(np.float64))


def pca_components(size: int, dim: int, ratio: float = VECTOR_BYTES_RATIO) -> int:
    """Largest k whose int8 files fit ``ratio`` × the fp32 bytes: M·D int8 codes,
    2·M·k coordinate codes, float32 tables (2·D + k·(D + 2)) and 7 .npy headers."""
    fixed = size * dim + 4 * 2 * dim + _NPY_HEADER * 7
    per_component = 2 * size + 4 * (dim + 2)
    return int(min(dim, max(0, (ratio * 4 * size * dim - fixed) // per_component)))


def _quantize_int8(x: np.ndarray) -> dict[str, np.ndarray]:
    """16-bit coordinates on the top-k principal directions + per-dimension int8 residual.

    The residual is taken after the *quantized* coordinates, so the int8 step also
    absorbs the 16-bit rounding. Tables are rounded to float32 before use so the
    host encodes against exactly the numbers the camera decodes with.
    """
    size, dim = x.shape
    k = pca_components(size, dim)
    mean = x.mean(axis=0)
    basis = principal_projection(x, k)[0] if k else np.zeros((0, dim), np.float32)
    basis64 = basis.astype(np.float64)
    coords = (x - mean) @ basis64.T
    coord_offset, coord_scale, coord_codes = _affine_codes(coords, 65535)
    coords_hat = coord_offset.astype(np.float64) + coord_scale.astype(np.float64) * coord_codes
    offset, scale, codes = _affine_codes(x - coords_hat @ basis64, 255)
    return {
        "codes": (codes.astype(np.int16) - 128).astype(np.int8),
        "offset": offset,
        "scale": scale,
        "basis": basis,
        "coord_codes": coord_codes.astype(np.uint16),
        "coord_offset": coord_offset,
        "coord_scale": coord_scale,
    }


def _affine_codes(values: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column min/max affine code in 0..top; returns float32 (offset, scale) and the codes."""
    lo = values.min(axis=0).astype(np.float32)
    span = values.max(axis=0) - lo.astype(np.float64)
    scale = np.where(span > 0, span / top, 1.0).astype(np.float32)
    codes = np.rint((values - lo.astype(np.float64)) / scale.astype(np.float64))
    return lo, scale, np.clip(codes, 0, top).astype(np.int64)

