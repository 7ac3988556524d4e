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


# --------------------------------------------------------------------------- resample versions (#11)
import json  # noqa: E402

from PIL import Image  # noqa: E402

from edgecore.runtime.bundle import MANIFEST  # noqa: E402
from edgecore.runtime.errors import BundleError  # noqa: E402
from edgecore.runtime.imageio import load_image  # noqa: E402
from edgecore.runtime.preprocess import RESAMPLE_DEFAULT, RESAMPLERS, _place  # noqa: E402

GEOMETRIES = [
    dict(resize=256, crop=224), dict(resize=320, crop=288), dict(resize=250, crop=224),
    dict(aspect="pad", input_size=(224, 320)), dict(aspect="crop", input_size=(224, 224)),
    dict(aspect="crop", input_size=(256, 192)), dict(aspect="tile", input_size=(64, 64), tiles=(2, 2), tile_overlap=(16, 16)),
]
FRAME_SIZES = [(900, 900), (1080, 1920), (480, 640), (257, 300), (511, 513), (100, 100), (256, 256), (1000, 333),
               (821, 526), (800, 526), (526, 821), (1024, 1024), (777, 1234), (250, 250)]


def _reference_v1(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """The implementation before #11, kept here verbatim: resize the WHOLE frame, then place it."""
    height, width = rgb.shape[:2]
    rh, rw, _, _ = config.placement(height, width)
    image = Image.fromarray(rgb)
    if (image.width, image.height) != (rw, rh):
        image = image.resize((rw, rh), Image.Resampling.BILINEAR)
    return _place(np.asarray(image, dtype=np.uint8), config, height, width, 0)


@pytest.mark.parametrize("size", FRAME_SIZES)
def test_v1_gives_the_bytes_of_the_old_implementation(size):
    # v1 resizes only the visible box where that is provably the same; every other case falls back.
    rgb = np.random.default_rng(size[0] * 7 + size[1]).integers(0, 256, (*size, 3), dtype=np.uint8)
    for geometry in GEOMETRIES:
        config = PreprocessConfig(**geometry, resample="v1")
        np.testing.assert_array_equal(preprocess(rgb, config), _reference_v1(rgb, config), err_msg=str(geometry))


@pytest.mark.parametrize("size", FRAME_SIZES)
def test_v2_has_the_geometry_of_v1_and_close_pixels_on_smooth_frames(size):
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    smooth = (128 + 90 * np.sin(xx * 20.0 / size[1]) * np.cos(yy * 15.0 / size[0])).astype(np.uint8)  # 2-3 periods
    rgb = np.ascontiguousarray(np.stack([smooth, 255 - smooth, smooth // 2], axis=2))
    for geometry in GEOMETRIES:
        v1 = preprocess(rgb, PreprocessConfig(**geometry, resample="v1"))
        v2 = preprocess(rgb, PreprocessConfig(**geometry, resample="v2"))
        assert v2.shape == v1.shape and v2.dtype == np.uint8 and v2.flags.c_contiguous and v2.flags.writeable
        error = np.abs(v2.astype(int) - v1)  # the same picture; other rounding and antialiasing
        assert error.mean() <= 0.5 and error.max() <= 6, (geometry, error.mean(), error.max())
        np.testing.assert_array_equal(v2, preprocess(rgb.copy(), PreprocessConfig(**geometry, resample="v2")))


def test_v2_reduces_by_whole_blocks_first_hand_computed():
    # 768² of constant 3×3 blocks → 256: v2 box-averages by 3 (exact block values), then the crop is a
    # 1:1 resize; v1's triangle filter spans neighbouring blocks and blends them.
    blocks = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    rgb = np.ascontiguousarray(blocks.repeat(3, axis=0).repeat(3, axis=1))
    v2 = preprocess(rgb, PreprocessConfig(256, 224, resample="v2"))
    np.testing.assert_array_equal(v2, blocks[16:240, 16:240])
    assert not np.array_equal(preprocess(rgb, PreprocessConfig(256, 224, resample="v1")), v2)


def test_resample_contract_new_configs_say_v2_old_ones_read_as_v1():
    assert RESAMPLE_DEFAULT == "v2" and PreprocessConfig().resample == "v2" and set(RESAMPLERS) == {"v1", "v2"}
    for config in (PreprocessConfig(resample="v1"), PreprocessConfig(aspect="pad", input_size=(96, 160)),
                   PreprocessConfig(aspect="tile", input_size=(64, 64), tiles=(2, 3), tile_overlap=(8, 8), resample="v1")):
        assert PreprocessConfig.from_dict(config.to_dict()) == config
    old = PreprocessConfig(256, 224).to_dict()
    del old["resample"]  # a config.json / manifest written before v2
    assert PreprocessConfig.from_dict(old).resample == "v1"


@pytest.mark.parametrize("value", ["v3", "V2", "", None, 2])
def test_unknown_resample_version_is_refused(value):
    with pytest.raises(ValueError, match="resample"):
        PreprocessConfig(resample=value)
    with pytest.raises(ValueError, match="resample"):
        PreprocessConfig.from_dict({**PreprocessConfig().to_dict(), "resample": value})


def _edit(bundle, change) -> None:
    from conftest import recompute_hashes

    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest["preprocess"])
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    recompute_hashes(bundle)


def test_bundle_with_an_unknown_resample_version_is_refused_at_open(bundle_copy):
    from edgecore.runtime.detector import Detector

    _edit(bundle_copy, lambda pre: pre.update(resample="v9"))
    with pytest.raises(BundleError, match=r"preprocess\.resample: 'v9'.*implements only v1, v2"):
        Detector.open(bundle_copy)


def test_bundle_without_the_field_keeps_scoring_with_v1(bundle_copy):
    # A bundle exported before v2 has no preprocess.resample: it must score exactly as it always did
    # (the old preprocessing, then the same engine and scoring), and differently from v2.
    from edgecore.runtime.detector import Detector

    frame = np.random.default_rng(5).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # resized to 128
    with Detector.open(bundle_copy) as new:
        assert new.preprocess_config.resample == "v2"
        v2_score = new.detect(frame).score
    _edit(bundle_copy, lambda pre: pre.pop("resample"))
    with Detector.open(bundle_copy) as old:
        assert old.preprocess_config.resample == "v1"
        expected = old.score_crops(_reference_v1(frame, old.preprocess_config)[None]).image[0]
        assert old.detect(frame).score == pytest.approx(float(expected), rel=1e-6)
    assert abs(v2_score - float(expected)) > 0


def test_raw_frame_entry_point_neither_decodes_nor_copies():
    frame = np.random.default_rng(6).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    assert load_image(frame, copy=False) is frame  # detect(array): validated, not copied
    copied = load_image(frame)
    assert copied is not frame and np.array_equal(copied, frame) and not np.shares_memory(copied, frame)
    rgba = np.zeros((64, 80, 4), np.uint8)
    assert load_image(rgba, copy=False).shape == (64, 80, 3)  # anything else is still converted
    assert load_image(np.asfortranarray(frame), copy=False).flags.c_contiguous
    with pytest.raises(Exception, match="empty"):
        load_image(np.zeros((0, 0, 3), np.uint8), copy=False)
