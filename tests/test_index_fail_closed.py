"""The index refuses every inconsistent field or array at load (issue #12), before hnswlib sees it.

hnswlib trusts its links, levels and entry point: a wrong one crashes the process natively
(SIGSEGV), so each case here must end in ``BundleError`` — never a crash, an IndexError or a
silent wrap. Crafted files get a recomputed SHA-256 so that only the validation can catch them.
Real hnswlib, small synthetic coresets (each test well under a second).
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from edgecore.export.index_build import build_index
from edgecore.runtime.errors import BundleError, NonFiniteError
from edgecore.runtime.index import QuantizedIndex


@pytest.fixture(scope="module")
def built() -> dict[str, QuantizedIndex]:
    rng = np.random.default_rng(7)
    points = (rng.normal(size=(600, 128)) * rng.uniform(0.5, 2.0, 128)).astype(np.float32)
    return {mode: build_index(points, "int8", mode, patches_per_image=50) for mode in ("hnsw", "coarse", "exact")}


@pytest.fixture(params=["hnsw", "coarse"])
def saved(request, built, tmp_path) -> tuple[Path, dict]:
    description = json.loads(json.dumps(built[request.param].save(tmp_path)))
    QuantizedIndex.load(tmp_path, description)  # the untouched files load
    return tmp_path, description


def _replace_array(directory: Path, description: dict, key: str, array: np.ndarray) -> None:
    """Write ``array`` in place of the file behind ``key`` and recompute its checksum."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    entry = description["files"][key]
    (directory / entry["file"]).write_bytes(buffer.getvalue())
    entry["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()


def _array(directory: Path, description: dict, key: str) -> np.ndarray:
    return np.load(directory / description["files"][key]["file"], allow_pickle=False)


def _refused(directory: Path, description: dict, match: str) -> None:
    with pytest.raises(BundleError, match=match):
        QuantizedIndex.load(directory, description)


def test_index_refuses_entry_point_not_on_top_level(saved):
    directory, description = saved
    levels = _array(directory, description, "graph.levels")
    description["hnsw"]["entry_point"] = int(np.flatnonzero(levels == 0)[0])  # crashed hnswlib with SIGSEGV
    _refused(directory, description, "not on the top level")


@pytest.mark.parametrize("entry_point", [-1, 10**6, 1.0, "0", None])
def test_index_refuses_entry_point_out_of_range(saved, entry_point):
    directory, description = saved
    description["hnsw"]["entry_point"] = entry_point
    _refused(directory, description, "entry_point")


@pytest.mark.parametrize("max_level", [50, 0, 256, -1])
def test_index_refuses_max_level_inconsistent_with_levels(saved, max_level):
    directory, description = saved
    top = int(_array(directory, description, "graph.levels").max())
    assert top not in (50, 0)  # 600 points at m=16 reach level 1 or 2
    description["hnsw"]["max_level"] = max_level
    _refused(directory, description, "max_level")


def test_index_refuses_levels_array_that_disagrees_with_upper_links(saved):
    directory, description = saved
    levels = _array(directory, description, "graph.levels")
    levels[np.flatnonzero(levels == 0)[:3]] = 1  # claims upper links that are not stored
    _replace_array(directory, description, "graph.levels", levels)
    _refused(directory, description, "upper-level links")


@pytest.mark.parametrize("key", ["graph.level0", "graph.upper"])
def test_index_refuses_link_ids_out_of_range(saved, key):
    directory, description = saved
    links = _array(directory, description, key)
    m = description["hnsw"]["m"]
    view = links.reshape(-1, 1 + (2 * m if key == "graph.level0" else m))
    row = int(np.flatnonzero(view[:, 0] > 0)[0])
    view[row, 1] = description["size"]  # one past the last point
    _replace_array(directory, description, key, links)
    _refused(directory, description, "out of range")


def test_index_refuses_negative_link_ids(saved):
    """uint32 cannot hold -1; an int32 file that does (hnswlib would wrap it to 4 294 967 295) is refused."""
    directory, description = saved
    links = _array(directory, description, "graph.level0").astype(np.int32)
    links[0, 1] = -1
    _replace_array(directory, description, "graph.level0", links)
    _refused(directory, description, "dtype")


@pytest.mark.parametrize("key", ["graph.level0", "graph.upper"])
def test_index_refuses_link_counts_too_large(saved, key):
    directory, description = saved
    links = _array(directory, description, key)
    m = description["hnsw"]["m"]
    view = links.reshape(-1, 1 + (2 * m if key == "graph.level0" else m))
    view[0, 0] = 2 * m + 1 if key == "graph.level0" else m + 1
    _replace_array(directory, description, key, links)
    _refused(directory, description, "link count")


@pytest.mark.parametrize("value", [0, -1, 1.5, "784", True, None, 10**9])
def test_index_refuses_bad_certify_block(saved, value):
    directory, description = saved
    description["hnsw"]["certify_block"] = value
    _refused(directory, description, "certify_block")


@pytest.mark.parametrize("value", [0, -5, 10**7, 2.5, "128"])
def test_index_refuses_ef_search_out_of_range(saved, value):
    directory, description = saved
    description["hnsw"]["ef_search"] = value
    _refused(directory, description, "ef_search")


@pytest.mark.parametrize("field, value", [("m", 1), ("m", 10**6), ("mult", -1.0), ("mult", float("nan")),
                                          ("seed", -3), ("ef_construction", 0)])
def test_index_refuses_bad_graph_parameters(saved, field, value):
    directory, description = saved
    description["hnsw"][field] = value
    _refused(directory, description, field)


def test_index_refuses_bad_rerank_candidates(built, tmp_path):
    description = json.loads(json.dumps(built["coarse"].save(tmp_path)))
    for value in (0, -1, 10**6, 3.0):
        broken = copy.deepcopy(description)
        broken["hnsw"]["candidates"] = value
        _refused(tmp_path, broken, "candidates")


@pytest.mark.parametrize("key", ["vectors.scale", "vectors.offset", "vectors.basis", "vectors.coord_offset",
                                 "vectors.coord_scale"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_index_refuses_non_finite_vector_tables(saved, key, value):
    directory, description = saved
    array = _array(directory, description, key)
    array.reshape(-1)[0] = value
    _replace_array(directory, description, key, array)
    _refused(directory, description, "NaN or infinite")


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_index_refuses_non_finite_stored_vectors(dtype, tmp_path):
    points = np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32)
    description = json.loads(json.dumps(build_index(points, dtype, "exact").save(tmp_path)))
    codes = _array(tmp_path, description, "vectors.codes")
    codes[5, 3] = np.nan  # one NaN coordinate made every frame "anomalous" with nonsense scores
    _replace_array(tmp_path, description, "vectors.codes", codes)
    _refused(tmp_path, description, "NaN or infinite")


def test_index_refuses_zero_quantization_scale(saved):
    directory, description = saved
    scale = _array(directory, description, "vectors.scale")
    scale[2] = 0.0
    _replace_array(directory, description, "vectors.scale", scale)
    _refused(directory, description, "positive")


@pytest.mark.parametrize("key", ["graph.proj_basis", "graph.proj_center"])
def test_index_refuses_non_finite_projection(built, tmp_path, key):
    description = json.loads(json.dumps(built["coarse"].save(tmp_path)))
    array = _array(tmp_path, description, key)
    array.reshape(-1)[1] = np.nan
    _replace_array(tmp_path, description, key, array)
    _refused(tmp_path, description, "NaN or infinite")


def test_index_refuses_projection_that_is_not_orthonormal(built, tmp_path):
    """The certified maximum rests on ‖P(x − y)‖ ≤ ‖x − y‖; a stretched basis would break it silently."""
    description = json.loads(json.dumps(built["coarse"].save(tmp_path)))
    basis = _array(tmp_path, description, "graph.proj_basis") * 1.5
    _replace_array(tmp_path, description, "graph.proj_basis", basis)
    _refused(tmp_path, description, "orthonormal")


@pytest.mark.parametrize("size", [0, -1, 2.0, True, 10**12])
def test_index_refuses_bad_size_field(saved, size):
    directory, description = saved
    description["size"] = size
    with pytest.raises(BundleError):
        QuantizedIndex.load(directory, description)


@pytest.mark.parametrize("mode", ["hnsw", "coarse", "exact"])
@pytest.mark.parametrize("value", [np.nan, np.inf, 3e38])
def test_index_search_with_non_finite_result_raises(built, mode, value):
    """A query that is NaN/inf, or so large its distance overflows float32, must raise — never return NaN/inf."""
    index = built[mode]
    queries = np.zeros((50, index.dim), np.float32)
    index.search(queries, 1)  # finite queries are fine
    queries[7, 3:5] = value  # two coordinates at 3e38: the distance, ~4.2e38, is beyond float32
    with pytest.raises(NonFiniteError):
        index.search(queries, 1)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_coarse_search_refuses_a_non_finite_coordinate_anywhere_from_its_projection(built, value):
    """With the native kernel, coarse mode checks the queries through their projections (no Q×D pass): one bad
    coordinate, first or last, in the first or the last query, still makes the search raise."""
    index = built["coarse"]
    if not getattr(index.searcher, "checks_queries", False):
        pytest.skip("no native kernel: the index checks the queries itself")
    for row, col in ((0, 0), (49, index.dim - 1), (20, index.dim // 2)):
        queries = np.zeros((50, index.dim), np.float32)
        queries[row, col] = value
        with pytest.raises(NonFiniteError, match="NaN or infinite"):
            index.search(queries, 1)
