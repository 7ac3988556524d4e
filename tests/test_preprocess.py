"""The one preprocessing path: hand-computed pixels, geometry, mask alignment."""
import numpy as np
import pytest

from edgecore.runtime.preprocess import (
    PreprocessConfig,
    crop_map_to_original,
    preprocess,
    preprocess_mask,
)


def test_downscale_and_crop_match_hand_computed_pixels():
    # v(x) = floor(x / 2): a 2x bilinear antialiased reduction gives exactly column j = j
    # (triangle weights 1/4, 3/4, 3/4, 1/4 over source columns 2j-1 .. 2j+2, halved).
    row = (np.arange(512) // 2).astype(np.uint8)
    image = np.repeat(np.repeat(row[None, :, None], 512, axis=0), 3, axis=2)
    crop = preprocess(image, PreprocessConfig(resize=256, crop=224))
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    # offset (256 - 224) / 2 = 16 → crop column c is resized column c + 16
    assert crop[100, 0, 0] == 16
    assert crop[7, 100, 1] == 116
    np.testing.assert_array_equal(crop[50, 1:-1, 2], np.arange(17, 239))


def test_no_resize_when_already_square_at_size():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    crop = preprocess(image, PreprocessConfig(256, 224))
    np.testing.assert_array_equal(crop, image[16:240, 16:240])


def test_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((10, 10, 3), np.float32), PreprocessConfig())


@pytest.mark.parametrize("resize,crop", [(200, 224), (256, 8)])
def test_config_validation(resize, crop):
    with pytest.raises(ValueError):
        PreprocessConfig(resize=resize, crop=crop)


def test_mask_follows_image_geometry():
    mask = np.zeros((512, 512), bool)
    mask[100:140, 300:360] = True  # → resized rows 50:70, cols 150:180 → crop rows 34:54, cols 134:164
    cropped = preprocess_mask(mask, PreprocessConfig(256, 224))
    rows, cols = np.nonzero(cropped)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (34, 53, 134, 163)


def test_crop_map_back_to_original_places_the_hot_spot():
    config = PreprocessConfig(256, 224)
    crop_map = np.zeros((224, 224), np.float32)
    crop_map[100:120, 50:60] = 1.0  # resized rows 116:136 → original (×2) rows 232:272
    full = crop_map_to_original(crop_map, (512, 512), config)
    assert full.shape == (512, 512)
    peak_rows = np.nonzero(full.max(axis=1) > 0.9)[0]
    assert 228 <= peak_rows.min() <= 236 and 266 <= peak_rows.max() <= 274
    assert full[:20].max() == 0.0  # the cut-away margin never looks anomalous
