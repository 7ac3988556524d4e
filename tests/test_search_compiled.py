"""Compiled exact search (distance GEMM + TopK as an OpenVINO graph, exact re-rank on the int8 codes).

Real OpenVINO on synthetic features shaped like CNN patch embeddings (clusters in a low-dimensional
subspace plus isotropic noise); the bottle numbers are in benchmarks/RESULTS.md § "Search at the hardware
limit". The fidelity contract (recall@1 ≥ 0.99 vs exact fp32, image-score Spearman ≥ 0.999, image and
pixel AUROC within 0.2 pt) is checked by one function that a broken search demonstrably fails.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import contract_data, contract_report, meets_contract

from edgecore.export.index_build import build_index
from edgecore.runtime.errors import BundleError, EdgecoreError
from edgecore.runtime.index import QuantizedIndex, SearchPlacement
from edgecore.runtime.search_compiled import CompiledSearch, KeyOperands, OpenVINOSearchGraph

DIM, BLOCK, IMAGES = 256, 50, 40  # 40 "images" of 50 patches; every other image holds defect patches


@pytest.fixture(scope="module")
def data() -> dict:
    return contract_data(DIM, BLOCK, IMAGES)


@pytest.fixture(scope="module")
def compiled(data) -> QuantizedIndex:
    return build_index(data["points"], "int8", "compiled", patches_per_image=BLOCK)


def test_compiled_search_meets_the_fidelity_contract(compiled, data):
    report = contract_report(data, *compiled.search(data["queries"], 1))
    assert meets_contract(report), report


def test_the_contract_check_fails_a_search_that_ranks_badly(compiled, data):
    """Without the exact re-rank the bar must trip: here one of the engine's 4 proposals is taken at random."""
    searcher = compiled.searcher
    proposed = searcher.graph.candidates(data["queries"], 4)
    rng = np.random.default_rng(0)
    picked = np.take_along_axis(proposed, rng.integers(0, 4, (len(proposed), 1)), axis=1)
    distances = np.linalg.norm(searcher.rows[picked[:, 0]] - data["queries"], axis=1)[:, None]
    assert not meets_contract(contract_report(data, distances, picked))


def test_returned_distances_are_true_l2_to_the_returned_rows(compiled, data):
    queries = data["queries"][:300]
    distances, indices = compiled.search(queries, 3)
    assert np.all(np.diff(distances, axis=1) >= 0)
    direct = np.linalg.norm(compiled.points[indices] - queries[:, None, :], axis=2)
    np.testing.assert_allclose(distances, direct, rtol=1e-5)


def test_engine_keys_propose_the_reference_keys_nearest(data):
    index = build_index(data["points"], "int8", "exact")
    searcher = CompiledSearch(index.arrays)
    keys = searcher.operands.reference_keys(data["queries"])
    want = np.argsort(keys, axis=1)[:, :1]
    got = searcher.graph.candidates(data["queries"], 4)
    assert np.mean([w in g for w, g in zip(want[:, 0], got)]) >= 0.999
    assert searcher.graph.info["layer_precisions"] and searcher.graph.kernels()


def test_matches_exact_int8_and_round_trips_through_the_bundle_files(compiled, data, tmp_path):
    exact = build_index(data["points"], "int8", "exact")
    loaded = QuantizedIndex.load(tmp_path, json.loads(json.dumps(compiled.save(tmp_path))))
    assert loaded.mode == "compiled" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"index_vectors_{key}.npy" for key in compiled.arrays)  # nothing stored beyond the int8 vectors
    want_d, want_i = exact.search(data["queries"], 1)
    got_d, got_i = loaded.search(data["queries"], 1)
    assert np.mean(got_i == want_i) >= 0.995
    np.testing.assert_allclose(got_d[got_i == want_i], want_d[got_i == want_i], rtol=1e-6)
    assert loaded.memory_bytes() > loaded.stored_bytes()["vectors"]


def test_compiled_mode_needs_int8_and_refuses_other_dtypes(data, tmp_path):
    with pytest.raises(ValueError, match="int8"):
        build_index(data["points"], "fp16", "compiled")
    description = build_index(data["points"], "fp16", "exact").save(tmp_path)
    with pytest.raises(BundleError, match="int8"):
        QuantizedIndex.load(tmp_path, {**description, "mode": "compiled"})


def test_unknown_precision_and_missing_tensorrt_are_refused(compiled):
    with pytest.raises(ValueError, match="precision on CPU must be one of"):
        OpenVINOSearchGraph(compiled.searcher.operands, precision="fp16")
    with pytest.raises(ValueError, match="precision on GPU must be one of"):
        OpenVINOSearchGraph(compiled.searcher.operands, precision="bf16", device="GPU")
    with pytest.raises(ValueError, match="CPU or GPU device"):
        OpenVINOSearchGraph(compiled.searcher.operands, device="NPU")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EdgecoreError, match="TensorRT is not installed"):
            CompiledSearch(compiled.arrays, engine="tensorrt")


def _has_intel_gpu() -> bool:
    from edgecore.runtime.backends.openvino import shared_core

    return "GPU" in shared_core().available_devices


@pytest.mark.skipif(_has_intel_gpu(), reason="this machine has an OpenVINO GPU device")
def test_compiled_search_follows_the_detectors_placement(compiled, data, tmp_path):
    """The index opens the compiled mode on the detector's backend and device: an absent Intel GPU or a
    missing TensorRT is a clear error naming it, never a silent CPU search."""
    description = json.loads(json.dumps(compiled.save(tmp_path)))
    on_cpu = QuantizedIndex.load(tmp_path, description, placement=SearchPlacement("openvino", "CPU"))
    assert on_cpu.searcher.graph.device == "CPU" and on_cpu.searcher.graph.info["device"] == "CPU"
    with pytest.raises(EdgecoreError, match="no GPU device here.*available: CPU"):
        QuantizedIndex.load(tmp_path, description, placement=SearchPlacement("openvino", "GPU"))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EdgecoreError, match="TensorRT is not installed"):
            QuantizedIndex.load(tmp_path, description, placement=SearchPlacement("tensorrt", "cuda:0"))


def test_intel_gpu_key_graph_proposes_the_reference_nearest(compiled, data):
    if not _has_intel_gpu():
        pytest.skip("no OpenVINO GPU device (an Intel iGPU with its OpenCL driver) on this machine")
    graph = OpenVINOSearchGraph(compiled.searcher.operands, device="GPU")
    want = np.argmin(compiled.searcher.operands.reference_keys(data["queries"]), axis=1)
    got = graph.candidates(data["queries"], 8)
    assert np.mean([w in g for w, g in zip(want, got)]) >= 0.99


def test_tensorrt_key_graph_proposes_the_reference_nearest(compiled, data):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (Jetson/JetPack or an NVIDIA GPU host)")
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed")
    from edgecore.runtime.backends.tensorrt_search import TensorRTSearchGraph

    try:
        graph = TensorRTSearchGraph(compiled.searcher.operands)
    except EdgecoreError as exc:
        pytest.skip(f"no usable CUDA device: {exc}")
    try:
        want = np.argmin(compiled.searcher.operands.reference_keys(data["queries"]), axis=1)
        got = graph.candidates(data["queries"], 8)
        assert np.mean([w in g for w, g in zip(want, got)]) >= 0.99
    finally:
        graph.close()


def test_detector_scores_with_compiled_search_as_with_exact(exported_bundle, synthetic_category):
    """Camera path end to end (one preprocessing, one scorer): an int8 bundle opened with --search compiled
    scores its test images as exact search over the same codes does."""
    from edgecore.runtime.detector import Detector

    frames = sorted((synthetic_category / "test").rglob("*.png"))
    results = {}
    for mode in ("exact", "compiled"):
        with Detector.open(exported_bundle, precision="fp32", search=mode) as detector:
            assert detector.index.mode == mode
            if mode == "compiled":  # on the engine's device
                assert detector.index.searcher.graph.device == detector.engine.info.device == "CPU"
            results[mode] = np.array([detector.detect(path).score for path in frames])
    np.testing.assert_allclose(results["compiled"], results["exact"], rtol=1e-5)
