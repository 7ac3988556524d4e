"""The native box reduction of preprocessing (``runtime/native/reduce.c``): byte for byte Pillow's
``Image.reduce``, so resample v2's pixels (host and camera alike) do not move with it."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
from PIL import Image

preprocess_module = importlib.import_module("edgecore.runtime.preprocess")
PreprocessConfig = preprocess_module.PreprocessConfig

pytestmark = pytest.mark.skipif(preprocess_module._reducer() is None,
                                reason="the _resample library is not built (no compiler at install): Pillow reduces")


def pillow_reduce(rows: np.ndarray, fx: int, fy: int, left: int, right: int) -> np.ndarray:
    return np.asarray(Image.fromarray(rows).reduce((fx, fy), box=(left, 0, right, rows.shape[0])))


def test_reduce_equals_pillow_on_random_frames_factors_and_boxes():
    """Every output byte, including blocks cut by the box's right and bottom edges and saturated frames."""
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(1500):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        fx, fy = (int(v) for v in rng.integers(1, 7, 2))
        if fx == fy == 1:
            continue
        rows = np.full((h, w, 3), 255, np.uint8) if trial % 5 == 0 else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        left = int(rng.integers(0, w))
        right = int(rng.integers(left + 1, w + 1))
        got = preprocess_module._reduce_native(rows, fx, fy, left, right)
        np.testing.assert_array_equal(got, pillow_reduce(rows, fx, fy, left, right), err_msg=f"{h}x{w} {fx}x{fy}")
        checked += 1
    assert checked > 1000
    rows = rng.integers(0, 256, (700, 600, 3), dtype=np.uint8)
    for fx, fy in ((16, 16), (9, 2), (1, 12), (13, 1), (256, 3)):  # large and one-sided factors
        np.testing.assert_array_equal(preprocess_module._reduce_native(rows, fx, fy, 5, 597),
                                      pillow_reduce(rows, fx, fy, 5, 597))


def test_reduce_leaves_strided_frames_to_pillow():
    """A frame whose pixels are not packed RGB (a BGR → RGB view) is not read natively."""
    frame = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert preprocess_module._reduce_native(frame[:, :, ::-1], 3, 3, 0, 60) is None
    assert preprocess_module._reduce_native(frame[:, ::2], 3, 3, 0, 30) is None
    assert preprocess_module._reduce_native(frame, 3, 3, 0, 60) is not None


@pytest.mark.parametrize("geometry", [{"resize": 256, "crop": 224}, {"aspect": "pad", "input_size": [224, 320]},
                                      {"aspect": "crop", "input_size": [224, 224]}])
@pytest.mark.parametrize("shape", [(900, 900, 3), (1080, 1920, 3), (481, 1301, 3)])
def test_preprocess_gives_the_same_bytes_with_or_without_the_native_reduction(monkeypatch, geometry, shape):
    config = PreprocessConfig.from_dict({"resize": 256, "crop": 224, "resample": "v2", **geometry})
    frame = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    native = preprocess_module.preprocess(frame, config)
    monkeypatch.setattr(preprocess_module, "_reduce_native", lambda *args: None)
    np.testing.assert_array_equal(native, preprocess_module.preprocess(frame, config))


def test_without_the_library_pillow_reduces_to_the_same_bytes(monkeypatch):
    from edgecore.runtime import native

    config = PreprocessConfig.from_dict({"resize": 256, "crop": 224, "resample": "v2"})
    frame = np.random.default_rng(7).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    want = preprocess_module.preprocess(frame, config)
    monkeypatch.setattr(native, "library_path", lambda stem="_int8search": None)
    preprocess_module._reducer.cache_clear()
    try:
        assert preprocess_module._reducer() is None and preprocess_module._reduce_native(frame, 3, 3, 0, 900) is None
        np.testing.assert_array_equal(preprocess_module.preprocess(frame, config), want)
    finally:
        monkeypatch.undo()
        preprocess_module._reducer.cache_clear()
    assert preprocess_module._reducer() is not None
