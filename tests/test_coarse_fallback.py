"""int8 bundles of low-D coresets store coarse's projection as their fallback: on every camera CPU without AMX
tiles or AVX-512 VNNI it searches instead of the full-D brute force (benchmarks/RESULTS.md #11, "Coarse for Lite0").

Bottle Lite0 search per frame in the detector: avxvnni 10.5 vs 14.0 ms, avx2 14.3 (graph candidates) vs 33.8
(int8) and 21.6 (the full-D hnsw fallback); avx512vnni (6.0 vs 5.8-5.9) and amx stay on int8. Real kernel paths
forced with EDGECORE_NATIVE_ISA, real hnswlib; the contract data of tests/conftest.py (256-d, < COARSE_MIN_DIM).
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from conftest import contract_data, contract_report, int8_index_with_fallback, meets_contract, slow_graph

from edgecore.export import index_build
from edgecore.export.index_build import _prefer_native, build_index
from edgecore.runtime import native
from edgecore.runtime.errors import BundleError
from edgecore.runtime.index import FULL_D_PATHS, QuantizedIndex, int8_fallback_reason
from edgecore.runtime.native.search import Int8Search, ProjectedCandidates
from edgecore.runtime.search_coarse import CodeBounds, GraphProposer

kernel = native.kernel()
DIM, BLOCK, IMAGES = 256, 50, 40
PATHS = [isa for isa in ("amx", "avx512vnni", "avxvnni", "neon", "avx2", "scalar") if isa in kernel.available] + ["off"]


@pytest.fixture(scope="module")
def data() -> dict:
    return contract_data(DIM, BLOCK, IMAGES)


@pytest.fixture(scope="module")
def coarse(data) -> QuantizedIndex:
    return build_index(data["points"], "int8", "coarse", patches_per_image=BLOCK)


@pytest.fixture(scope="module")
def saved(data, coarse, tmp_path_factory):
    """An int8 index with coarse's projection as its fallback, saved: (directory, description via JSON)."""
    return int8_index_with_fallback(data["points"], coarse, BLOCK, tmp_path_factory.mktemp("fallback"))


def test_low_dim_coarse_takes_more_candidates(coarse):
    assert coarse.hnsw["candidates"] == index_build.LOW_DIM_COARSE_CANDIDATES
    assert coarse.hnsw["ef_search"] == index_build.LOW_DIM_COARSE_EF_SEARCH


def test_export_stores_the_coarse_projection_when_it_agrees(data, tmp_path):
    graph = build_index(data["points"], "int8", "hnsw", patches_per_image=BLOCK)
    slow = slow_graph(graph)  # int8 wins the timing
    chosen = _prefer_native(data["points"], slow, BLOCK)
    assert chosen.mode == "int8" and chosen.fallback_mode == "coarse"
    assert chosen.choice["probe_agreement_coarse"] >= index_build.FALLBACK_AGREEMENT
    assert "without AMX tiles or AVX-512 VNNI" in chosen.choice["reason"]
    description = chosen.save(tmp_path)
    assert description["fallback"] == "coarse" and description["hnsw"]["candidates"] == 32
    assert {key for key in description["files"] if key.startswith("graph.")} == {
        "graph.level0", "graph.upper", "graph.levels", "graph.proj_basis", "graph.proj_center"}


@pytest.mark.parametrize("coarse_ms, want", [(5.0, "coarse"), (50.0, "hnsw")])
def test_where_int8_loses_the_export_takes_coarse_if_it_beats_the_graph(data, monkeypatch, coarse_ms, want):
    """An exporter without 512-bit dot products (AVX2: the int8 scan loses to the graph) still avoids the full-D
    graph's float32 copies when coarse agrees and is faster. Times are fixed here; the agreement is measured."""
    fixed = {"hnsw": 20.0, "int8": 40.0, "coarse": coarse_ms}
    monkeypatch.setattr(index_build, "_probe_ms", lambda indexes, queries: {name: fixed[name] for name in indexes})
    graph = build_index(data["points"], "int8", "hnsw", patches_per_image=BLOCK)
    chosen = _prefer_native(data["points"], graph, BLOCK)
    assert chosen.mode == want and chosen.fallback is None
    assert chosen.choice["probe_agreement_coarse"] >= index_build.FALLBACK_AGREEMENT
    assert chosen.choice["probe_ms_coarse"] == coarse_ms
    if want == "coarse":
        assert "coarse" in chosen.choice["reason"] and chosen.hnsw["candidates"] == 32
        assert meets_contract(contract_report(data, *chosen.search(data["queries"], 1)))


def test_where_int8_loses_a_disagreeing_coarse_is_not_taken(data, monkeypatch):
    fixed = {"hnsw": 20.0, "int8": 40.0, "coarse": 1.0}
    monkeypatch.setattr(index_build, "_probe_ms", lambda indexes, queries: {name: fixed[name] for name in indexes})
    monkeypatch.setattr(index_build, "FALLBACK_AGREEMENT", 1.01)
    graph = build_index(data["points"], "int8", "hnsw", patches_per_image=BLOCK)
    chosen = _prefer_native(data["points"], graph, BLOCK)
    assert chosen is graph and "probe_ms_coarse" not in chosen.choice


def test_export_checks_the_graph_stage_too(data, monkeypatch):
    """A graph stage that disagrees (here: one that always answers row 0) keeps the full-D hnsw fallback."""
    class WrongGraph(index_build.CoarseSearcher):
        def search(self, queries, k=1):
            distances, indices = super().search(queries, k)
            return distances, np.zeros_like(indices)

    monkeypatch.setattr(index_build, "CoarseSearcher", WrongGraph)
    graph = build_index(data["points"], "int8", "hnsw", patches_per_image=BLOCK)
    slow = slow_graph(graph)  # int8 wins the timing
    chosen = _prefer_native(data["points"], slow, BLOCK)
    assert chosen.fallback_mode == "hnsw" and chosen.choice["probe_agreement_coarse"] < 0.1


@pytest.mark.parametrize("isa", PATHS)
def test_every_path_without_512_bit_dot_products_searches_the_projection(data, saved, coarse, isa, monkeypatch):
    directory, description = saved
    monkeypatch.setenv(native.ENV_ISA, isa)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = QuantizedIndex.load(directory, description)
    # the designed path on every CPU: no warning, except that a package built without the kernel says so
    assert [str(w.message) for w in caught] == [] or isa == "off" and all("unavailable" in str(w.message) for w in caught)
    full_d = isa in FULL_D_PATHS
    assert (int8_fallback_reason(DIM, loaded.arrays["coord_codes"], "coarse") is None) == full_d
    if full_d:  # the tiles: int8 as exported, the projection stays on disk
        assert loaded.mode == "int8" and isinstance(loaded.searcher, Int8Search) and loaded.replaced is None
        assert loaded.graph is None
    else:
        assert loaded.mode == "coarse" and loaded.replaced["mode"] == "int8"
        assert (isa if isa != "off" else "unavailable") in loaded.replaced["reason"]
        graph_stage = isa in ("avx2", "scalar", "off")
        assert isinstance(loaded.searcher.proposer, GraphProposer) == graph_stage
        assert "replaced" in loaded.describe()
        for got, want in zip(loaded.search(data["queries"], 1), coarse.search(data["queries"], 1)):
            np.testing.assert_array_equal(got, want)  # coarse mode itself
    assert meets_contract(contract_report(data, *loaded.search(data["queries"], 1)))
    # an explicit mode is never replaced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert QuantizedIndex.load(directory, description, automatic=False).mode == "int8"


def test_the_native_stage_holds_under_0_35x_fp32(data, saved, monkeypatch):
    """Low D: the lower bounds come from the stage's own int8 projections, so no M×p float32 copy is held."""
    dot_product = [isa for isa in ("avxvnni", "neon") if isa in kernel.available]
    if not dot_product:
        pytest.skip("no kernel path here with an int8 dot product that searches the projection")
    monkeypatch.setenv(native.ENV_ISA, dot_product[0])
    directory, description = saved
    loaded = QuantizedIndex.load(directory, description)
    assert loaded.mode == "coarse"
    proposer = loaded.searcher.proposer
    assert isinstance(proposer, ProjectedCandidates) and proposer.bounds.table is proposer._table
    assert loaded.memory_bytes() <= 0.35 * data["points"].nbytes, loaded.memory_bytes() / data["points"].nbytes


def test_the_int8_lower_bounds_never_exceed_the_projected_distance(coarse):
    """‖x̂ − ŷ‖ − ½‖step‖ ≤ ‖x̂ − y‖ for every row, queries near and far (what the certified maximum prunes on):
    the native stage's codes (their step split with the query side) and the graph's own (full range)."""
    searcher = coarse.searcher
    rows = searcher.project_rows()
    staged = ProjectedCandidates(rows, kernel).bounds
    graph = CodeBounds.of_points(rows)
    rng = np.random.default_rng(11)
    for query in (rows[3], rows[17] + 1e-3, rng.normal(size=rows.shape[1]).astype(np.float32) * 5):
        true = np.sqrt(((rows.astype(np.float64) - query) ** 2).sum(axis=1))
        for bounds in (staged, graph):
            bound = bounds(query.astype(np.float32))
            assert np.all(bound <= true), float((bound - true).max())
            assert float(np.median(true - bound)) < 0.5 * float(np.median(true))  # and still a useful bound
        blocks = [staged(query.astype(np.float32), rows=r) for r in (1, 7, 2048, 10**6)]
        for got in blocks[1:]:  # blocks that do not divide the rows, and one block for all
            np.testing.assert_array_equal(got, blocks[0])


def test_a_coarse_fallback_with_a_bad_projection_is_refused(saved, tmp_path):
    from edgecore.runtime.fsutil import sha256_file

    directory, description = saved
    target = tmp_path / "index"
    target.mkdir()
    for entry in description["files"].values():
        (target / entry["file"]).write_bytes((directory / entry["file"]).read_bytes())
    description = json.loads(json.dumps(description))
    path = target / description["files"]["graph.proj_basis"]["file"]
    np.save(path, 2 * np.load(path), allow_pickle=False)  # no longer orthonormal: its bounds would be wrong
    description["files"]["graph.proj_basis"].update(sha256=sha256_file(path), bytes=path.stat().st_size)
    for isa in (None, "avx2" if "avx2" in kernel.available else "off"):
        with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
            warnings.simplefilter("ignore", RuntimeWarning)
            if isa:
                patch.setenv(native.ENV_ISA, isa)
            with pytest.raises(BundleError, match="orthonormal"):
                QuantizedIndex.load(target, description)
    description["hnsw"].pop("candidates")
    with pytest.raises(BundleError, match="candidates"):
        QuantizedIndex.load(target, description)
