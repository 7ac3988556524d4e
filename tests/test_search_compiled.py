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
from scipy.stats import spearmanr

from edgecore.export.index_build import build_index
from edgecore.metrics import auroc
from edgecore.runtime.errors import BundleError, EdgecoreError
from edgecore.runtime.index import QuantizedIndex
from edgecore.runtime.search import ExactSearch
from edgecore.runtime.search_compiled import CompiledSearch, KeyOperands, OpenVINOSearchGraph

DIM, BLOCK, IMAGES = 256, 50, 40  # 40 "images" of 50 patches; every other image holds defect patches


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    subspace = np.linalg.qr(rng.normal(size=(DIM, 24)))[0].T
    centers = rng.normal(0.0, 4.0, (60, 24)) * np.linspace(3.0, 0.5, 24)

    def sample(n: int) -> np.ndarray:
        latent = centers[rng.integers(0, 60, n)] + rng.normal(0.0, 1.0, (n, 24)) * np.linspace(2.0, 0.3, 24)
        return latent @ subspace + rng.normal(0.0, 0.15, (n, DIM))

    queries = sample(IMAGES * BLOCK)
    defect = np.zeros(IMAGES * BLOCK, bool)
    for image in range(1, IMAGES, 2):  # a few strong and weak defect patches per defective image
        rows = image * BLOCK + rng.choice(BLOCK, 6, replace=False)
        queries[rows] += rng.normal(0.0, rng.uniform(0.3, 1.5), (6, DIM))
        defect[rows] = True
    return {"points": sample(3000).astype(np.float32), "queries": queries.astype(np.float32),
            "defect": defect, "labels": (np.arange(IMAGES) % 2).astype(int)}


@pytest.fixture(scope="module")
def compiled(data) -> QuantizedIndex:
    return build_index(data["points"], "int8", "compiled", patches_per_image=BLOCK)


def fidelity(data: dict, distances: np.ndarray, indices: np.ndarray) -> dict[str, float]:
    """The contract's four numbers against exact fp32 search (patch scores stand in for pixels)."""
    ref_d, ref_i = ExactSearch(data["points"]).search(data["queries"], 1)
    ref_img, img = ref_d[:, 0].reshape(IMAGES, BLOCK).max(1), distances[:, 0].reshape(IMAGES, BLOCK).max(1)
    return {
        "recall": float(np.mean(indices[:, 0] == ref_i[:, 0])),
        "spearman": float(spearmanr(ref_img, img).statistic),
        "image_pt": 100 * abs(auroc(ref_img, data["labels"]) - auroc(img, data["labels"])),
        "pixel_pt": 100 * abs(auroc(ref_d[:, 0], data["defect"]) - auroc(distances[:, 0], data["defect"])),
    }


def meets_contract(report: dict[str, float]) -> bool:
    return (report["recall"] >= 0.99 and report["spearman"] >= 0.999
            and report["image_pt"] <= 0.2 and report["pixel_pt"] <= 0.2)


def test_compiled_search_meets_the_fidelity_contract(compiled, data):
    report = fidelity(data, *compiled.search(data["queries"], 1))
    assert meets_contract(report), report


def test_the_contract_check_fails_a_search_that_ranks_badly(compiled, data):
    """Without the exact re-rank the bar must trip: here one of the engine's 4 proposals is taken at random."""
    searcher = compiled.searcher
    proposed = searcher.graph.candidates(data["queries"], 4)
    rng = np.random.default_rng(0)
    picked = np.take_along_axis(proposed, rng.integers(0, 4, (len(proposed), 1)), axis=1)
    distances = np.linalg.norm(searcher.rows[picked[:, 0]] - data["queries"], axis=1)[:, None]
    assert not meets_contract(fidelity(data, distances, picked))


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
    with pytest.raises(ValueError, match="f32 or bf16"):
        OpenVINOSearchGraph(compiled.searcher.operands, precision="fp16")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EdgecoreError, match="TensorRT is not installed"):
            CompiledSearch(compiled.arrays, engine="tensorrt")


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
            results[mode] = np.array([detector.detect(path).score for path in frames])
    np.testing.assert_allclose(results["compiled"], results["exact"], rtol=1e-5)
