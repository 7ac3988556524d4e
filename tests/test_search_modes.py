"""Coarse search (projected candidates + exact re-rank on the int8 codes): fidelity, certified max, memory.

Real hnswlib on synthetic features shaped like CNN patch embeddings (clusters in a low-dimensional
subspace plus small isotropic noise, 256-d); the bottle numbers are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from edgecore.export.index_build import build_index
from edgecore.runtime.index import QuantizedIndex
from edgecore.runtime import search_coarse
from edgecore.runtime.search_coarse import CodeRows

DIM, BLOCK = 256, 100


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    subspace = np.linalg.qr(rng.normal(size=(DIM, 24)))[0].T  # 24×DIM orthonormal
    centers = rng.normal(0.0, 4.0, (60, 24)) * np.linspace(3.0, 0.5, 24)

    def sample(n: int) -> np.ndarray:
        latent = centers[rng.integers(0, 60, n)] + rng.normal(0.0, 1.0, (n, 24)) * np.linspace(2.0, 0.3, 24)
        return latent @ subspace + rng.normal(0.0, 0.15, (n, DIM))

    points = sample(3000)
    queries = np.concatenate([sample(1800), rng.normal(0.0, 3.0, (200, DIM))])[rng.permutation(2000)]
    return points.astype(np.float32), queries.astype(np.float32)


@pytest.fixture(scope="module")
def indexes(data) -> dict[str, QuantizedIndex]:
    points, _ = data
    return {mode: build_index(points, "int8", mode, patches_per_image=BLOCK) for mode in ("exact", "coarse")}


def test_coarse_recall_matches_exact_int8(indexes, data):
    _, queries = data
    _, want = indexes["exact"].search(queries, 1)
    _, got = indexes["coarse"].search(queries, 1)
    recall = np.mean(got[:, 0] == want[:, 0])
    assert recall >= 0.99, recall


@pytest.mark.parametrize("candidates", ["native", "graph"])
def test_coarse_certifies_each_blocks_max_even_with_a_crippled_graph(data, candidates, monkeypatch):
    points, queries = data
    exact = build_index(points, "int8", "exact")
    if candidates == "graph":  # the hnswlib fallback (no native kernel)
        monkeypatch.setenv("EDGECORE_NATIVE_ISA", "off")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        coarse = build_index(points, "int8", "coarse", patches_per_image=BLOCK)
    coarse.searcher.candidates = 1  # the candidate stage alone now misses often
    if candidates == "graph":
        coarse.searcher.proposer.ef_search = 1
    ref_d, ref_i = exact.search(queries, 1)
    dist, idx = coarse.search(queries, 1)
    assert np.mean(idx[:, 0] == ref_i[:, 0]) < 0.97
    for start in range(0, len(queries), BLOCK):
        rows = slice(start, start + BLOCK)
        worst = np.argmax(dist[rows, 0])
        assert dist[rows, 0].max() == pytest.approx(ref_d[rows, 0].max(), rel=1e-5)
        assert idx[rows, 0][worst] == ref_i[rows, 0][np.argmax(ref_d[rows, 0])]


def test_coarse_exact_query_is_exact_for_k_neighbours(indexes, data):
    """The pruned exact search (projection lower bounds) returns exact search's k nearest."""
    _, queries = data
    coarse, exact = indexes["coarse"], indexes["exact"]
    for row in (0, 5, 17):
        q = queries[row]
        want_d, want_i = exact.search(q[None], 5)
        for batch in (4, 64, 256):  # 4: the search runs past the partially sorted head of the bounds
            d, i = coarse.searcher.exact(q, coarse.searcher.project(q[None])[0], np.inf, -1, k=5, batch=batch)
            np.testing.assert_array_equal(i, want_i[0])
            np.testing.assert_allclose(d, want_d[0], rtol=1e-5)


@pytest.mark.parametrize("k", [1, 5])
def test_native_pruned_exact_search_equals_the_numpy_one_on_every_path(indexes, data, monkeypatch, k):
    """``Int8Kernel.exact_pruned`` (one call: bounds, order, steps) returns what the numpy loop returns, on every
    kernel path, having decoded fewer rows than the coreset holds."""
    from edgecore.runtime import native

    _, queries = data
    searcher = indexes["coarse"].searcher
    kernel = native.kernel()
    tables = searcher.rows.decode_tables()
    for row in (0, 5, 17):
        q = queries[row]
        projected = searcher.project(q[None])[0]
        seed_d, seed_i = (searcher.search(q[None], 1) if k == 1 else (np.full((1, 1), np.inf), np.full((1, 1), -1)))
        bound, holder = float(seed_d[0, 0]), int(seed_i[0, 0])
        with monkeypatch.context() as patch:
            patch.setattr(search_coarse, "_native_decoder", lambda rows: None)
            want_d, want_i = searcher.exact(q, projected, bound, holder, k=k)
        bounds = searcher.proposer.bounds
        counts = set()
        for isa in kernel.available:
            if isa == "scalar":
                continue  # the plain C decode is the reference of ecs_l2's own tests (slow: software FMA)
            d, i, measured = kernel.exact_pruned(q, tables, bounds.tables, bounds.offsets(projected), bound, holder, k,
                                                 isa=isa)
            np.testing.assert_array_equal(i, want_i)
            np.testing.assert_array_equal(d, want_d)
            assert 0 < measured < searcher.size, measured  # random test points prune little; bottle's 92 of 14 739
            counts.add(measured)
        assert len(counts) == 1, counts  # the bounds are the same bits on every path, so the same rows are measured


def test_native_pruned_exact_search_refuses_bad_arguments(indexes, data):
    from edgecore.runtime import native

    _, queries = data
    searcher = indexes["coarse"].searcher
    kernel, tables, bounds = native.kernel(), searcher.rows.decode_tables(), searcher.proposer.bounds
    offsets = bounds.offsets(searcher.project(queries[:1])[0])
    with pytest.raises(ValueError, match="holder"):
        kernel.exact_pruned(queries[0], tables, bounds.tables, offsets, 1.0, -1, 1)
    with pytest.raises(ValueError, match="offsets"):
        kernel.exact_pruned(queries[0], tables, bounds.tables, offsets[:-1], np.inf, -1, 2)
    with pytest.raises(ValueError, match="bound table"):
        kernel.exact_pruned(queries[0], tables, bounds.tables._replace(table=bounds.table[:-1]), offsets, np.inf, -1, 2)


def test_coarse_distances_are_true_l2_to_the_decoded_codes(indexes, data):
    _, queries = data
    index = indexes["coarse"]
    dist, idx = index.search(queries[:200], 3)
    assert dist.dtype == np.float32 and idx.dtype == np.int64 and np.all(np.diff(dist, axis=1) >= 0)
    direct = np.linalg.norm(index.points[idx].astype(np.float64) - queries[:200, None, :], axis=2)
    np.testing.assert_allclose(dist, direct, rtol=1e-5)
    # the rows the camera decodes on demand are the rows exact mode decodes once at load
    np.testing.assert_array_equal(index.points[idx], indexes["exact"].points[idx])


def test_coarse_holds_no_fp32_copy(indexes, data):
    points, _ = data
    coarse, exact = indexes["coarse"], indexes["exact"]
    assert isinstance(coarse.points, CodeRows)
    assert coarse.points[np.array([[1, 2]])].shape == (1, 2, DIM)
    # exact keeps two fp32 copies (+ the codes); coarse only the codes, a 32-d graph and projections
    # (at 256-d hnswlib's ~210 B of links and labels per point still weigh; at 1024-d see RESULTS.md)
    assert exact.memory_bytes() > 2 * points.nbytes
    assert coarse.memory_bytes() < min(0.75 * points.nbytes, exact.memory_bytes() / 3)


def test_coarse_round_trip_and_determinism(indexes, data, tmp_path):
    points, queries = data
    (tmp_path / "a").mkdir()
    description = json.loads(json.dumps(indexes["coarse"].save(tmp_path / "a")))
    loaded = QuantizedIndex.load(tmp_path / "a", description)
    for got, want in zip(loaded.search(queries, 2), indexes["coarse"].search(queries, 2)):
        np.testing.assert_array_equal(got, want)
    (tmp_path / "b").mkdir()
    build_index(points, "int8", "coarse", patches_per_image=BLOCK).save(tmp_path / "b")
    for path in (tmp_path / "a").iterdir():
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name


def test_coarse_needs_int8(data):
    points, _ = data
    with pytest.raises(ValueError, match="int8"):
        build_index(points, "fp16", "coarse")
