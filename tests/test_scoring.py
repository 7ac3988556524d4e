"""The one scoring path: Eq. 7, maps, normalisation, exact search."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgecore.runtime.scoring import Normalization, anomaly_maps, gaussian_kernel, image_scores
from edgecore.runtime.search import ExactSearch, neighbour_table


def test_eq7_hand_computed():
    bank = np.array([[0.0], [1.0], [3.0]], np.float32)
    table = np.array([[0, 1], [1, 0], [2, 1]], np.int32)
    features = np.array([[[0.5], [5.0]]], np.float32)  # one image, two patches
    search = ExactSearch(bank)
    dist, idx = search.search(features[0], k=1)
    patch_scores, nn = dist[:, 0][None], idx[:, 0][None]
    np.testing.assert_allclose(patch_scores, [[0.5, 2.0]])
    score = image_scores(patch_scores, nn, features, bank, table)
    # s* = 2 (patch 5.0 ↔ point 3.0); support {3.0, 1.0} at distances {2, 4};
    # w = 1 − e^2/(e^2 + e^4) = e^2/(1 + e^2)
    expected = 2.0 * math.exp(2) / (1 + math.exp(2))
    assert score[0] == pytest.approx(expected, rel=1e-9)


def test_eq7_with_one_neighbour_is_plain_max():
    patch_scores = np.array([[0.1, 0.7, 0.3]])
    nn = np.zeros((1, 3), np.int64)
    features = np.zeros((1, 3, 2), np.float32)
    bank = np.zeros((1, 2), np.float32)
    assert image_scores(patch_scores, nn, features, bank, np.zeros((1, 1), np.int32))[0] == pytest.approx(0.7)


def _torch_reference_maps(patch_scores, grid, crop, sigma):
    """anomalib's definition: F.interpolate bilinear, then Gaussian blur with reflect padding."""
    x = torch.from_numpy(patch_scores.reshape(-1, 1, *grid)).double()
    x = F.interpolate(x, size=(crop, crop), mode="bilinear", align_corners=False)
    k = torch.from_numpy(gaussian_kernel(sigma))
    r = len(k) // 2
    x = F.pad(x, (r, r, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0].numpy()


def test_maps_equal_torch_upsample_and_blur():
    rng = np.random.default_rng(0)
    scores = rng.random((2, 28 * 28)).astype(np.float32)
    ours = anomaly_maps(scores, (28, 28), 224, 4.0)
    ref = _torch_reference_maps(scores, (28, 28), 224, 4.0)
    assert ours.shape == (2, 224, 224)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_gaussian_kernel_size_and_blur_spreads_a_spike():
    assert len(gaussian_kernel(4.0)) == 33
    scores = np.zeros((1, 16 * 16), np.float32)
    scores[0, 8 * 16 + 8] = 1.0
    sharp = anomaly_maps(scores, (16, 16), 128, 0.0)
    blurred = anomaly_maps(scores, (16, 16), 128, 4.0)
    assert blurred.max() < sharp.max()
    assert blurred.sum() == pytest.approx(sharp.sum(), rel=1e-3)  # blur preserves mass away from borders
    peak = np.unravel_index(np.argmax(blurred[0]), blurred[0].shape)
    assert abs(peak[0] - 68) <= 4 and abs(peak[1] - 68) <= 4


def test_constant_scores_give_constant_map():
    maps = anomaly_maps(np.full((1, 49), 2.5, np.float32), (7, 7), 56, 4.0)
    np.testing.assert_allclose(maps, 2.5, rtol=1e-5)


def test_normalization_puts_threshold_at_half():
    norm = Normalization(threshold=3.0, min=1.0, max=3.5)
    assert float(norm(3.0)) == 0.5
    assert float(norm(100.0)) == 1.0 and float(norm(-100.0)) == 0.0
    assert Normalization.from_dict(norm.to_dict()) == norm


def test_exact_search_matches_brute_force():
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(500, 32)).astype(np.float32)
    queries = rng.normal(size=(300, 32)).astype(np.float32)
    search = ExactSearch(bank, chunk_elements=5000)  # force several chunks
    dist, idx = search.search(queries, k=3)
    full = np.sqrt(((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1))
    ref_idx = np.argsort(full, axis=1)[:, :3]
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, np.take_along_axis(full, ref_idx, 1), rtol=1e-5)


def test_exact_search_small_distances_are_accurate():
    # Large norms, tiny offsets: the GEMM form alone would lose these to cancellation.
    bank = np.full((4, 64), 100.0, np.float32) + np.arange(4, dtype=np.float32)[:, None] * 0.01
    query = bank[2:3] + 1e-3
    dist, idx = ExactSearch(bank).search(query)
    assert idx[0, 0] == 2
    assert dist[0, 0] == pytest.approx(1e-3 * 8.0, rel=1e-3)


def test_neighbour_table_starts_with_self_even_with_duplicates():
    bank = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.1, 5.0]], np.float32)
    table = neighbour_table(bank, 3)
    assert table.shape == (4, 3) and table.dtype == np.int32
    np.testing.assert_array_equal(table[:, 0], np.arange(4))
    assert set(table[0, 1:2]) == {1} and table[2, 1] == 3


# --------------------------------------------------------------------------- map cost (#11)
def _slow_reference_maps(patch_scores, grid, out_hw, sigma):
    """The map by its definition, pixel by pixel in float64: bilinear upsample (half-pixel centres,
    edge clamp), then a 1-D Gaussian along each axis with 'dcb|abcd|cba' reflection."""
    (h, w), (out_h, out_w) = grid, out_hw

    def upsample_axis(values, size_out):
        size_in, out = values.shape[0], np.empty((size_out, *values.shape[1:]))
        for i in range(size_out):
            src = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
            lo = min(int(math.floor(src)), size_in - 1)
            hi, frac = min(lo + 1, size_in - 1), src - lo
            out[i] = values[lo] * (1 - frac) + values[hi] * frac
        return out

    def blur_axis(values):
        kernel, size = gaussian_kernel(sigma), values.shape[0]
        radius, out = len(kernel) // 2, np.zeros_like(values)
        for i in range(size):
            for offset, weight in zip(range(-radius, radius + 1), kernel):
                j = i + offset
                while j < 0 or j >= size:
                    j = -j if j < 0 else 2 * (size - 1) - j
                out[i] += weight * values[j]
        return out

    maps = []
    for scores in patch_scores.reshape(-1, h, w).astype(np.float64):
        up = upsample_axis(upsample_axis(scores, out_h).T, out_w).T
        maps.append(blur_axis(blur_axis(up).T).T if sigma > 0 else up)
    return np.stack(maps)


@pytest.mark.parametrize("grid,out_hw,sigma", [((28, 28), (224, 224), 4.0), ((14, 20), (112, 160), 4.0),
                                               ((7, 7), (56, 56), 0.0), ((28, 8), (224, 64), 2.5)])
def test_maps_match_the_slow_definition_within_float32_rounding(grid, out_hw, sigma):
    scores = np.random.default_rng(1).gamma(2.0, 1.5, (2, grid[0] * grid[1])).astype(np.float32)
    ours = anomaly_maps(scores, grid, out_hw if out_hw[0] != out_hw[1] else out_hw[0], sigma)
    assert ours.dtype == np.float32 and ours.shape == (2, *out_hw) and ours.flags.writeable
    np.testing.assert_allclose(ours, _slow_reference_maps(scores, grid, out_hw, sigma), rtol=0, atol=2e-6 * scores.max())


def test_full_size_map_is_made_on_first_access_only_and_equals_the_eager_one():
    from edgecore.runtime.preprocess import PreprocessConfig, crop_map_to_original
    from edgecore.runtime.scorer import Detection

    config = PreprocessConfig(256, 224)
    crop_map = np.random.default_rng(2).random((224, 224)).astype(np.float32)
    detection = Detection(score=1.0, normalized_score=0.5, is_anomalous=False, map=crop_map, frame_hw=(900, 700),
                          preprocess_config=config)
    assert detection._map_original is None  # detect() never paid for it
    full = detection.map_original
    assert full.shape == (900, 700) and detection.map_original is full  # once, then cached
    np.testing.assert_array_equal(full, crop_map_to_original(crop_map, (900, 700), config))
    assert "map_original" not in detection.to_json()
