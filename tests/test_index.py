"""The quantized coreset index: fidelity, exactness of fp32, persistence, sizes, errors.

Real hnswlib on clustered synthetic data (no mocks); the bottle numbers are in
benchmarks/INDEX_STUDY.md.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edgecore.export.index_build import build_index, choose_search_mode
from edgecore.runtime.errors import BundleError
from edgecore.runtime.index import QuantizedIndex
from edgecore.runtime.search import ExactSearch

DIM = 48
BLOCK = 100  # patches per "image" for the certification


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """2 000 points in 40 anisotropic clusters; queries near points plus 10 % far outliers."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 6.0, (40, DIM))
    spread = rng.uniform(0.3, 2.0, DIM)  # unequal per-dimension ranges, as real features
    points = centers[rng.integers(0, 40, 2000)] + rng.normal(0.0, 1.0, (2000, DIM)) * spread
    near = points[rng.integers(0, 2000, 1800)] + rng.normal(0.0, 0.3, (1800, DIM)) * spread
    far = rng.normal(0.0, 12.0, (200, DIM))
    queries = np.concatenate([near, far])[rng.permutation(2000)]
    return points.astype(np.float32), queries.astype(np.float32)


@pytest.fixture(scope="module")
def reference(data) -> tuple[np.ndarray, np.ndarray]:
    points, queries = data
    return ExactSearch(points).search(queries, 1)


@pytest.fixture(scope="module")
def indexes(data) -> dict[tuple[str, str], QuantizedIndex]:
    points, _ = data
    return {
        (dtype, mode): build_index(points, dtype, mode, patches_per_image=BLOCK)
        for dtype in ("int8", "fp16", "fp32")
        for mode in ("hnsw", "exact")
    }


@pytest.mark.parametrize("mode", ["hnsw", "exact"])
@pytest.mark.parametrize("dtype", ["int8", "fp16"])
def test_recall_at_1(indexes, data, reference, dtype, mode):
    _, queries = data
    index = indexes[dtype, mode]
    assert (index.dtype, index.mode) == (dtype, mode)
    _, found = index.search(queries, 1)
    recall = np.mean(found[:, 0] == reference[1][:, 0])
    assert recall >= 0.99, f"{dtype}/{mode} recall@1 {recall:.4f}"


def test_fp32_exact_equals_exact_search(indexes, data, reference):
    _, queries = data
    dist, idx = indexes["fp32", "exact"].search(queries, 1)
    np.testing.assert_array_equal(idx, reference[1])
    np.testing.assert_allclose(dist, reference[0], rtol=1e-6, atol=0)
    # k > 1 as well (neighbour lists)
    d5, i5 = indexes["fp32", "exact"].search(queries[:50], 5)
    r5 = ExactSearch(data[0]).search(queries[:50], 5)
    np.testing.assert_array_equal(i5, r5[1])
    np.testing.assert_allclose(d5, r5[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", ["int8", "fp16", "fp32"])
def test_distances_are_true_l2(indexes, data, dtype):
    points, queries = data
    index = indexes[dtype, "hnsw"]
    dist, idx = index.search(queries[:300], 3)
    assert dist.dtype == np.float32 and idx.dtype == np.int64 and dist.shape == idx.shape == (300, 3)
    assert np.all(np.diff(dist, axis=1) >= 0)
    decoded = index.points[idx].astype(np.float64)
    direct = np.linalg.norm(decoded - queries[:300, None, :], axis=2)
    np.testing.assert_allclose(dist, direct, rtol=1e-5)
    # ... and off the distance to the original point by at most its quantization
    # error (triangle inequality), which is itself small
    original = points[idx].astype(np.float64)
    error = np.linalg.norm(decoded - original, axis=2)
    deviation = np.abs(dist - np.linalg.norm(original - queries[:300, None, :], axis=2))
    assert np.all(deviation <= error * (1 + 1e-5) + 1e-5)
    scale = np.linalg.norm(points.std(axis=0))
    assert error.max() <= {"int8": 0.02, "fp16": 1e-3, "fp32": 0.0}[dtype] * scale


def test_hnsw_certifies_each_blocks_max():
    """Even with a crippled search (ef=1, structureless data) each block's maximum
    distance and its match are exactly those of exact search."""
    rng = np.random.default_rng(2)
    points = rng.normal(size=(3000, 64)).astype(np.float32)
    queries = rng.normal(size=(1000, 64)).astype(np.float32)
    ref_dist, ref_idx = ExactSearch(points).search(queries, 1)
    index = build_index(points, "fp32", "hnsw", patches_per_image=BLOCK)
    index.hnsw["ef_search"] = 1
    dist, idx = index.search(queries, 1)
    assert np.mean(idx[:, 0] == ref_idx[:, 0]) < 0.9  # the crippled search does miss
    for start in range(0, len(queries), BLOCK):
        rows = slice(start, start + BLOCK)
        worst = np.argmax(dist[rows, 0])
        assert dist[rows, 0].max() == pytest.approx(ref_dist[rows, 0].max(), rel=1e-6)
        assert idx[rows, 0][worst] == ref_idx[rows, 0][worst]


@pytest.mark.parametrize("mode", ["hnsw", "exact"])
@pytest.mark.parametrize("dtype", ["int8", "fp16", "fp32"])
def test_save_load_round_trip(indexes, data, tmp_path, dtype, mode):
    _, queries = data
    index = indexes[dtype, mode]
    description = index.save(tmp_path)
    description = json.loads(json.dumps(description))  # what the bundle stores
    loaded = QuantizedIndex.load(tmp_path, description)
    for got, want in zip(loaded.search(queries, 3), index.search(queries, 3)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded.points, index.points)
    assert not any(path.suffix == ".pkl" for path in tmp_path.iterdir())


def test_build_is_deterministic(data, tmp_path):
    points, _ = data
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    build_index(points, "int8", "hnsw").save(first)
    build_index(points, "int8", "hnsw").save(second)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.parametrize("size, dim", [(2000, DIM), (500, 152), (3000, 256)])
def test_int8_vectors_fit_the_size_budget(tmp_path, size, dim):
    points = np.random.default_rng(3).gamma(2.0, 1.0, (size, dim)).astype(np.float32)
    description = build_index(points, "int8", "exact").save(tmp_path)
    on_disk = sum(f["bytes"] for key, f in description["files"].items() if key.startswith("vectors."))
    assert on_disk == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert on_disk <= 0.27 * points.nbytes, on_disk / points.nbytes
    assert description["quantization"]["pca_components"] > 0  # the budget buys some 16-bit coordinates


def test_choose_search_mode():
    def mode(size, dim, dtype="int8"):
        chosen, reason = choose_search_mode(size, dim, dtype)
        assert reason  # the manifest says why
        return chosen

    # the measured crossovers: ~9 000 points at D=152, ~4 500 at D=1024
    assert mode(8_000, 152) == "exact"
    assert mode(10_000, 152) == "hnsw"  # a 32-d projection loses too much at 152-d
    assert mode(4_000, 1024) == "exact"
    assert mode(5_000, 1024) == "coarse"  # int8 at large D: projected graph + re-rank on the codes
    assert mode(5_000, 1024, "fp16") == "hnsw"  # coarse searches int8 codes only
    assert mode(5_000, 4096) == "coarse"  # clamped beyond the measured dims
    assert mode(2_000, 64) == "exact"
    with pytest.raises(ValueError):
        choose_search_mode(0, 152)
    points = np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32)
    assert build_index(points).mode == "exact"
    assert build_index(points).choice["reason"].startswith("300 points is below")
    assert build_index(points, mode="hnsw").mode == "hnsw"


def test_automatic_coarse_choice_is_confirmed_on_the_coreset(monkeypatch):
    """Structureless data: the rule says coarse, the probe finds the 32-d projection useless → hnsw."""
    import edgecore.export.index_build as index_build

    monkeypatch.setattr(index_build, "CROSSOVER_POINTS", ((152, 500), (1024, 500)))
    monkeypatch.setattr(index_build, "COARSE_MIN_DIM", 64)
    points = np.random.default_rng(4).normal(size=(1_500, 96)).astype(np.float32)
    assert choose_search_mode(1_500, 96)[0] == "coarse"
    index = build_index(points)
    assert index.mode == "hnsw" and "probe recall" in index.choice["reason"]


def test_bad_arguments_raise_value_error(indexes, data):
    points, queries = data
    with pytest.raises(ValueError, match="queries must be"):
        indexes["int8", "hnsw"].search(queries[:, :-1], 1)
    with pytest.raises(ValueError, match="k must be"):
        indexes["int8", "exact"].search(queries, 0)
    with pytest.raises(ValueError, match="dtype"):
        build_index(points, "int4")
    with pytest.raises(ValueError, match="mode"):
        build_index(points, "int8", "ivf")
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.full((10, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="float16"):
        build_index(np.full((10, 4), 1e6, np.float32), "fp16")


@pytest.fixture()
def saved(indexes, tmp_path) -> tuple[Path, dict]:
    return tmp_path, indexes["int8", "hnsw"].save(tmp_path)


def test_missing_file_is_a_bundle_error(saved):
    directory, description = saved
    (directory / description["files"]["graph.level0"]["file"]).unlink()
    with pytest.raises(BundleError, match="missing"):
        QuantizedIndex.load(directory, description)


def test_corrupt_file_is_a_bundle_error(saved):
    directory, description = saved
    path = directory / description["files"]["vectors.codes"]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt"):
        QuantizedIndex.load(directory, description)


def _rewrite(directory: Path, entry: dict, data: bytes) -> None:
    """Replace a file *and* its checksum: the damage the SHA-256 cannot see."""
    (directory / entry["file"]).write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()


def test_garbage_file_with_matching_checksum_is_a_bundle_error(saved):
    directory, description = saved
    _rewrite(directory, description["files"]["vectors.scale"], b"not a numpy file")
    with pytest.raises(BundleError, match="unreadable"):
        QuantizedIndex.load(directory, description)


def test_out_of_range_graph_link_is_a_bundle_error(saved, tmp_path_factory):
    directory, description = saved
    entry = description["files"]["graph.level0"]
    links = np.load(directory / entry["file"])
    links[5, 1] = 10**6  # would make hnswlib read outside its memory
    scratch = tmp_path_factory.mktemp("npy") / "links.npy"
    np.save(scratch, links)
    _rewrite(directory, entry, scratch.read_bytes())
    with pytest.raises(BundleError, match="out of range"):
        QuantizedIndex.load(directory, description)


@pytest.mark.parametrize(
    "change",
    [
        {"dtype": "int4"},
        {"mode": "ivf"},
        {"format": "something/9"},
        {"size": 1999},
        {"hnsw": None},
    ],
)
def test_bad_description_is_a_bundle_error(saved, change):
    directory, description = saved
    with pytest.raises(BundleError):
        QuantizedIndex.load(directory, {**description, **change})
