"""Correctness of the fit's fast paths (#16): they must give today's results, only faster (no timing asserts)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from edgecore.knn import HostExactSearch
from edgecore.runtime.search import ExactSearch, neighbour_table


def _clustered(rng: np.random.Generator, n: int, dim: int, offset: float = 0.0) -> np.ndarray:
    """Rows around a few centres (near neighbours are close, as in a coreset), far from the origin."""
    centres = rng.normal(size=(12, dim)) * 3
    rows = centres[rng.integers(12, size=n)] + rng.normal(size=(n, dim)) * 0.3
    return (rows + offset).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_host_search_matches_exact_search(k: int) -> None:
    rng = np.random.default_rng(0)
    points = _clustered(rng, 3000, 48, offset=50.0)
    queries = _clustered(rng, 700, 48, offset=50.0)
    expected_d, expected_i = ExactSearch(points).search(queries, k)
    got_d, got_i = HostExactSearch(points, query_block=64, point_block=300).search(queries, k)
    np.testing.assert_array_equal(got_i, expected_i)
    np.testing.assert_array_equal(got_d, expected_d)


def test_host_search_is_exact_by_direct_difference() -> None:
    """Against a float64 brute force (not against ExactSearch's own GEMM ranking)."""
    rng = np.random.default_rng(1)
    points = _clustered(rng, 1500, 32)
    queries = points[rng.integers(1500, size=200)] + rng.normal(size=(200, 32)).astype(np.float32) * 1e-3
    _, got = HostExactSearch(points).search(queries, 5)
    diff = points[None].astype(np.float64) - queries[:, None].astype(np.float64)
    truth = np.argsort(np.einsum("qmd,qmd->qm", diff, diff), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(truth, axis=1))


def test_host_search_handles_many_duplicates() -> None:
    """More exact ties than the kernel's candidate buffer: the full-ranking fallback takes over."""
    rng = np.random.default_rng(2)
    points = np.concatenate([np.zeros((200, 16), np.float32), rng.normal(size=(300, 16)).astype(np.float32) + 5])
    distances, index = HostExactSearch(points).search(np.zeros((3, 16), np.float32), 9)
    np.testing.assert_array_equal(index, np.tile(np.arange(9), (3, 1)))
    assert (distances == 0).all()


def test_neighbour_table_with_host_search_matches_default() -> None:
    """Same table as ExactSearch's, except where its float32 GEMM ranking swapped two near-equal neighbours:
    there the host search has the truly nearer one (its distances are never larger)."""
    rng = np.random.default_rng(3)
    bank = _clustered(rng, 2500, 64, offset=20.0)
    bank[100] = bank[7]  # a duplicate: the point itself must still come first
    expected = neighbour_table(bank, 9)
    got = neighbour_table(bank, 9, search=HostExactSearch(bank))
    assert got.dtype == np.int32
    assert (got[:, 0] == np.arange(len(bank))).all()
    distance = lambda table: np.linalg.norm(bank[table] - bank[:, None], axis=2)  # noqa: E731
    got_d, expected_d = distance(got), distance(expected)
    assert (got_d <= expected_d).all()
    np.testing.assert_allclose(got_d, expected_d, rtol=1e-4)
    differ = (got != expected).any(axis=1)
    assert differ.sum() <= 5  # 7 and 100 tie for one row; two near-ties the GEMM misranked
    same_set = (np.sort(got, axis=1) == np.sort(expected, axis=1)).all(axis=1)
    assert (got_d[~same_set] < expected_d[~same_set]).any(axis=1).all()  # a different set only when it is nearer


# ----------------------------------------------------------------------------- features


@pytest.fixture(scope="module")
def lite0_features():
    import warnings

    from edgecore.backbones import create_backbone
    from edgecore.features import PatchCoreFeatures

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random init: the structure is what matters here
        backbone = create_backbone("efficientnet_lite0", random_init=True, image_size=(96, 128))
    features = PatchCoreFeatures(backbone.module, backbone.channels, backbone.spec.mean, backbone.spec.std, 1024)
    crops = np.random.default_rng(0).integers(0, 256, size=(10, 96, 128, 3), dtype=np.uint8)
    return features.eval(), crops


def test_inference_copy_is_bit_identical_and_leaves_the_module_alone(lite0_features) -> None:
    import torch

    from edgecore.features import inference_copy

    features, crops = lite0_features
    fast = inference_copy(features)
    folded = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)]
    assert folded  # Lite0's stride-1 depthwise convolutions
    assert all(isinstance(m, torch.nn.Conv2d) and m.padding == (0, 0) for m in features.modules()
               if hasattr(m, "static_padding"))  # the exported module keeps its explicit padding
    with torch.no_grad():
        expected = features(torch.from_numpy(crops)).numpy()
        got = fast(torch.from_numpy(crops)).numpy()
    np.testing.assert_array_equal(got, expected)


def _host_model(features):
    import torch

    from edgecore.model import PatchCoreModel

    model = PatchCoreModel.__new__(PatchCoreModel)  # only embed / embed_inputs are exercised
    model.features, model.device = features, torch.device("cpu")
    return model


def test_embed_inputs_matches_the_plain_embed_loop(lite0_features) -> None:
    import torch

    features, crops = lite0_features
    model = _host_model(features)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # two chunks side by side, whatever this machine has
    try:
        got = np.concatenate(list(model.embed_inputs(crops)))
        assert torch.get_num_threads() == 2  # restored after the concurrent run
        expected = np.concatenate([model.embed(crops[i : i + 4]) for i in range(0, len(crops), 4)])  # today's loop
    finally:
        torch.set_num_threads(previous)
    # oneDNN may block a convolution differently for one thread than for two, or for another batch size
    # (today's fit differs that way from one machine to the next); bit-identical on the 224 x 224 Lite0
    # tile fit (RESULTS § Distributed fit), and never more than float rounding
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_embed_inputs_numbers_do_not_depend_on_the_callers_batching(lite0_features) -> None:
    features, crops = lite0_features
    model = _host_model(features)
    whole = np.concatenate(list(model.embed_inputs(crops)))
    pieces = np.concatenate([np.concatenate(list(model.embed_inputs(crops[i : i + 3]))) for i in range(0, 10, 3)])
    np.testing.assert_array_equal(pieces, whole)  # every forward is one shape (short chunks padded)
