"""int8 bundles on a camera CPU without an int8 dot product: the stored hnsw graph searches instead.

The exporter measures on its own CPU and may pick 'int8' (runtime/native); on a CPU whose kernel path has no
int8 dot product (avx2, scalar) or no kernel at all, that mode loses to the graph (benchmarks/RESULTS.md #11).
Automatic exports therefore keep the hnsw graph (manifest ``index.fallback``), and the runtime opens it there
unless a mode was given explicitly. Real kernel paths forced with EDGECORE_NATIVE_ISA, real hnswlib, real
bundles; tests/test_portable_cpu.py runs the same bundle on an emulated AVX2-only CPU.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import contract_data, contract_report, int8_index_with_fallback, meets_contract, slow_graph

from edgecore.export import index_build
from edgecore.export.index_build import _prefer_native, build_index
from edgecore.runtime import native
from edgecore.runtime.errors import BundleError
from edgecore.runtime.index import NO_DOT_PRODUCT_PATHS, QuantizedIndex, coarse_takes_graph, int8_fallback_reason
from edgecore.runtime.native.search import PRUNE_MIN_ROWS, Int8Search
from edgecore.runtime.search_coarse import GraphProposer

kernel = native.kernel()
DIM, BLOCK, IMAGES = 256, 50, 40  # as tests/test_native_search.py (the contract data meets the codec there)
FORCED = [isa for isa in ("avx2", "scalar") if isa in kernel.available] + ["off"]


@pytest.fixture(scope="module")
def data() -> dict:
    return contract_data(DIM, BLOCK, IMAGES)


@pytest.fixture(scope="module")
def graph(data) -> QuantizedIndex:
    return build_index(data["points"], "int8", "hnsw", patches_per_image=BLOCK)


@pytest.fixture(scope="module")
def saved(data, graph, tmp_path_factory) -> tuple[Path, dict]:
    """An int8 index with its hnsw fallback, saved: (directory, description as JSON gives it back)."""
    return int8_index_with_fallback(data["points"], graph, BLOCK, tmp_path_factory.mktemp("fallback"))


def _dot_product_here() -> None:
    if kernel.path_for(DIM + 4) in NO_DOT_PRODUCT_PATHS:
        pytest.skip(f"this CPU's kernel path ({kernel.isa}) has no int8 dot product")


def test_export_keeps_the_graph_when_int8_replaces_hnsw(data, graph, tmp_path, monkeypatch):
    """_prefer_native, with the graph made slow (a beam over every point), picks int8 and stores that graph
    where coarse's projection cannot be the fallback (its probe agreement is made unreachable here;
    tests/test_coarse_fallback.py covers the other branch)."""
    monkeypatch.setattr(index_build, "FALLBACK_AGREEMENT", 1.01)
    slow = slow_graph(graph)  # int8 wins the timing
    chosen = _prefer_native(data["points"], slow, BLOCK)
    assert chosen.mode == "int8" and chosen.choice["probe_ms_int8"] < chosen.choice["probe_ms_hnsw"]
    assert chosen.fallback[0] is graph.graph and chosen.fallback[1] == graph.hnsw
    description = chosen.save(tmp_path)
    assert description["fallback"] == "hnsw" and description["hnsw"] == graph.hnsw
    graph_files = {key for key in description["files"] if key.startswith("graph.")}
    assert graph_files == {"graph.level0", "graph.upper", "graph.levels"}
    # the stored graph is the hnsw export's, byte for byte
    (tmp_path / "hnsw").mkdir()
    graph.save(tmp_path / "hnsw")
    for key in graph_files:
        name = description["files"][key]["file"]
        assert (tmp_path / name).read_bytes() == (tmp_path / "hnsw" / name).read_bytes()
    # an explicit --search int8 stores no graph
    (tmp_path / "explicit").mkdir()
    explicit = build_index(data["points"], "int8", "int8", patches_per_image=BLOCK).save(tmp_path / "explicit")
    assert "fallback" not in explicit and not any(key.startswith("graph.") for key in explicit["files"])


def test_sizes_on_disk_and_in_memory(data, saved):
    """Vectors stay within 0.27× fp32 on disk; on a dot-product CPU nothing of the graph is held in memory."""
    _dot_product_here()
    directory, description = saved
    fp32 = data["points"].nbytes
    vectors = sum(f["bytes"] for key, f in description["files"].items() if key.startswith("vectors."))
    assert vectors <= 0.27 * fp32, vectors / fp32
    loaded = QuantizedIndex.load(directory, description)
    plain = build_index(data["points"], "int8", "int8", patches_per_image=BLOCK)
    assert loaded.mode == "int8" and isinstance(loaded.searcher, Int8Search) and loaded.replaced is None
    assert loaded.graph is None and loaded.hnsw is None and loaded.fallback is None
    assert loaded.memory_bytes() == plain.memory_bytes() <= 0.35 * fp32, loaded.memory_bytes() / fp32
    for got, want in zip(loaded.search(data["queries"], 1), plain.search(data["queries"], 1)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", FORCED)
def test_without_a_dot_product_the_stored_graph_searches(data, graph, saved, isa, monkeypatch):
    directory, description = saved
    monkeypatch.setenv(native.ENV_ISA, isa)
    assert int8_fallback_reason(DIM, np.zeros((1, 0), np.uint16)) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the designed path: no warning
        loaded = QuantizedIndex.load(directory, description)
    assert loaded.mode == "hnsw" and loaded.replaced["mode"] == "int8"
    assert (isa if isa != "off" else "unavailable") in loaded.replaced["reason"]
    assert "replaced" in loaded.describe() and "hnsw" in loaded.describe()
    assert loaded.memory_bytes() == graph.memory_bytes()  # what hnsw mode holds, graph loaded now
    for got, want in zip(loaded.search(data["queries"], 1), graph.search(data["queries"], 1)):
        np.testing.assert_array_equal(got, want)  # hnsw mode itself: the same fidelity contract
    assert meets_contract(contract_report(data, *loaded.search(data["queries"], 1)))
    # an explicit mode is never replaced
    with pytest.warns(RuntimeWarning):
        explicit = QuantizedIndex.load(directory, description, automatic=False)
    assert explicit.mode == "int8" and explicit.replaced is None


def test_old_int8_bundles_open_unchanged_without_a_dot_product(data, tmp_path, monkeypatch):
    description = json.loads(json.dumps(build_index(data["points"], "int8", "int8", patches_per_image=BLOCK).save(tmp_path)))
    monkeypatch.setenv(native.ENV_ISA, FORCED[0])
    with pytest.warns(RuntimeWarning, match="dot-product|unavailable"):
        loaded = QuantizedIndex.load(tmp_path, description)
    assert loaded.mode == "int8" and loaded.replaced is None


def test_coarse_candidates_come_from_the_graph_without_a_dot_product(data, monkeypatch):
    """Bottle WRN50 on the avx2 path: search 30.6 ms with the kernel's candidates vs 19.6 ms with the graph."""
    if "avx2" not in kernel.available:
        pytest.skip("no avx2 path on this CPU")
    monkeypatch.setenv(native.ENV_ISA, "avx2")
    coarse = build_index(data["points"], "int8", "coarse", patches_per_image=BLOCK)
    assert isinstance(coarse.searcher.proposer, GraphProposer)
    assert "avx2" in coarse.searcher.candidate_stage and "graph" in coarse.describe()
    assert meets_contract(contract_report(data, *coarse.search(data["queries"], 1)))
    monkeypatch.delenv(native.ENV_ISA)
    if kernel.path_for(32) not in NO_DOT_PRODUCT_PATHS:
        native_coarse = build_index(data["points"], "int8", "coarse", patches_per_image=BLOCK)
        assert not isinstance(native_coarse.searcher.proposer, GraphProposer)
        assert f"native {kernel.path_for(32)}" in native_coarse.describe()


def test_avx2_coarse_takes_the_kernels_pruned_candidates_above_the_cluster_threshold(monkeypatch):
    """Above PRUNE_MIN_ROWS the avx2 path's native stage skips clusters of rows and beats the graph (RESULTS.md #11):
    the kernel proposes, with the same candidates as its full scan, and no hnswlib copy is held."""
    if "avx2" not in kernel.available:
        pytest.skip("no avx2 path on this CPU")
    assert coarse_takes_graph("avx2", PRUNE_MIN_ROWS - 1) and not coarse_takes_graph("avx2", PRUNE_MIN_ROWS)
    assert coarse_takes_graph("scalar", 10**6) and coarse_takes_graph(None, 10**6)
    assert not coarse_takes_graph("avxvnni", 10) and not coarse_takes_graph("neon", 10)
    big = contract_data(64, BLOCK, 4)
    points = np.concatenate([big["points"], big["points"][: PRUNE_MIN_ROWS - len(big["points"]) + 100] + 0.01])
    monkeypatch.setenv(native.ENV_ISA, "avx2")
    coarse = build_index(points, "int8", "coarse", patches_per_image=BLOCK)
    proposer = coarse.searcher.proposer
    assert not isinstance(proposer, GraphProposer) and "native avx2" in coarse.describe()
    assert proposer._clusters is not None
    projected = coarse.searcher.project(np.ascontiguousarray(big["queries"], np.float32))
    pruned = proposer.propose(projected, 8)
    proposer._clusters = None  # the full scan over every row
    np.testing.assert_array_equal(proposer.propose(projected, 8), pruned)


def _tampered(saved, tmp_path, edit) -> tuple[Path, dict]:
    directory, description = saved
    target = Path(shutil.copytree(directory, tmp_path / "index"))
    description = json.loads(json.dumps(description))
    edit(target, description)
    return target, description


def _rewrite(directory: Path, description: dict, key: str, array: np.ndarray) -> None:
    """Replace one graph file and re-list its hash: only the runtime's own checks can catch it."""
    from edgecore.runtime.fsutil import sha256_file

    path = directory / description["files"][key]["file"]
    np.save(path, array, allow_pickle=False)
    description["files"][key].update(sha256=sha256_file(path), bytes=path.stat().st_size)


BROKEN = {
    "fallback of another mode": (lambda d, desc: desc.update(fallback="exact"), "fallback"),
    "fallback declared by an hnsw index": (lambda d, desc: desc.update(mode="hnsw", fallback="hnsw"), "fallback"),
    "no hnsw parameters": (lambda d, desc: desc.pop("hnsw"), "hnsw"),
    "entry point out of range": (lambda d, desc: desc["hnsw"].update(entry_point=10**6), "entry_point"),
    "graph file not listed": (lambda d, desc: desc["files"].pop("graph.upper"), "lists no file"),
    "graph file missing": (lambda d, desc: (d / desc["files"]["graph.level0"]["file"]).unlink(), "missing"),
    "graph file corrupt": (lambda d, desc: (d / desc["files"]["graph.levels"]["file"]).write_bytes(b"x"), "corrupt"),
    "graph of another size": (lambda d, desc: _rewrite(d, desc, "graph.levels", np.zeros(7, np.uint8)), "graph"),
    "links out of range": (lambda d, desc: _rewrite(d, desc, "graph.level0", _bad_links(d, desc)), "out of range"),
}


def _bad_links(directory: Path, description: dict) -> np.ndarray:
    links = np.load(directory / description["files"]["graph.level0"]["file"]).copy()
    links[0, 1] = 1 << 30
    return links


@pytest.mark.parametrize("isa", [None, FORCED[0]])
@pytest.mark.parametrize("case", list(BROKEN))
def test_a_declared_graph_that_is_missing_or_inconsistent_is_refused(saved, tmp_path, monkeypatch, case, isa):
    """Fail closed on every CPU: whether the graph would be used (forced path) or stays on disk (None)."""
    if isa is not None:
        monkeypatch.setenv(native.ENV_ISA, isa)
    edit, message = BROKEN[case]
    directory, description = _tampered(saved, tmp_path, edit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(BundleError, match=message):
            QuantizedIndex.load(directory, description)


# --- the camera path, end to end ---------------------------------------------------------------------
def _scores(bundle: Path, frames: list[Path], search: str | None) -> tuple[str, str, np.ndarray]:
    from edgecore.runtime.detector import Detector, describe_index

    with Detector.open(bundle, precision="fp32", search=search) as detector:
        return detector.index.mode, describe_index(detector.index), np.array([detector.detect(p).score for p in frames])


def test_detector_on_a_cpu_without_dot_product(int8_fallback_bundle, synthetic_category, monkeypatch):
    frames = sorted((synthetic_category / "test").rglob("*.png"))
    _dot_product_here()
    mode, text, native_scores = _scores(int8_fallback_bundle, frames, None)
    assert mode == "int8" and "replaced" not in text
    exact = _scores(int8_fallback_bundle, frames, "exact")[2]
    monkeypatch.setenv(native.ENV_ISA, FORCED[0])
    mode, text, scores = _scores(int8_fallback_bundle, frames, None)
    assert mode == "hnsw" and "bundle's mode int8 replaced" in text, text
    np.testing.assert_allclose(scores, exact, rtol=1e-5)  # certified maxima: exact search's scores
    np.testing.assert_allclose(scores, native_scores, rtol=1e-5)
    np.testing.assert_array_equal(scores, _scores(int8_fallback_bundle, frames, "hnsw")[2])  # --search hnsw
    with pytest.warns(RuntimeWarning):
        assert _scores(int8_fallback_bundle, frames, "int8")[0] == "int8"  # explicit: never replaced
    with pytest.raises(BundleError, match="no coarse graph"):
        _scores(int8_fallback_bundle, frames, "coarse")


def test_verify_catches_a_deleted_graph_file(int8_fallback_bundle, tmp_path):
    from edgecore.runtime.bundle import verify_bundle

    bundle = Path(shutil.copytree(int8_fallback_bundle, tmp_path / "b"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / manifest["index"]["dir"] / manifest["index"]["files"]["graph.level0"]["file"]).unlink()
    with pytest.raises(BundleError):
        verify_bundle(bundle)
