"""The native box reduction and bilinear passes of preprocessing (``runtime/native/reduce.c``): byte for byte
Pillow's ``Image.reduce`` and ``Image.resize(..., BILINEAR, box=...)``, so resample v2's pixels (host and camera
alike) do not move with them."""
from __future__ import annotations

import importlib
from pathlib import Path

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


def test_bilinear_passes_equal_pillow_on_random_sizes_and_boxes():
    """Every output byte of one axis' pass: up- and downscaling (1 to 7 taps), fractional and whole boxes,
    posterised and random pixels; a box Pillow refuses is refused too."""
    import random

    rng, pick = np.random.default_rng(3), random.Random(3)
    checked = 0
    for trial in range(2000):
        h, w = pick.randint(1, 70), pick.randint(1, 70)
        rows = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if trial % 3 == 0:
            rows = (rows // 64 * 85).astype(np.uint8)
        axis = pick.randint(0, 1)
        length = w if axis == 0 else h
        lo = pick.uniform(0, 0.6 * length) if trial % 4 else float(pick.randint(0, length - 1))
        hi = pick.uniform(lo + 0.01, length) if trial % 4 else float(length)
        size = pick.randint(1, 3 * length)
        image = Image.fromarray(rows)
        want = np.asarray(image.resize((size, h), Image.Resampling.BILINEAR, box=(lo, 0, hi, h)) if axis == 0 else
                          image.resize((w, size), Image.Resampling.BILINEAR, box=(0, lo, w, hi)))
        got = preprocess_module._bilinear_native(rows, axis, [lo, hi], size)
        np.testing.assert_array_equal(got, want, err_msg=f"{h}x{w} axis {axis} box {lo}..{hi} → {size}")
        checked += 1
    assert checked == 2000
    rows = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    assert preprocess_module._bilinear_native(rows, 0, [0.0, 12.5], 5) is None  # past the row: Pillow's ValueError


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
    monkeypatch.setattr(preprocess_module, "_bilinear_native", lambda *args: None)
    np.testing.assert_array_equal(native, preprocess_module.preprocess(frame, config))  # Pillow's passes
    monkeypatch.setattr(preprocess_module, "_reduce_native", lambda *args: None)
    np.testing.assert_array_equal(native, preprocess_module.preprocess(frame, config))  # and Pillow's reduction


def test_without_the_library_pillow_reduces_and_resizes_to_the_same_bytes(monkeypatch):
    from edgecore.runtime import native

    config = PreprocessConfig.from_dict({"resize": 256, "crop": 224, "resample": "v2"})
    frame = np.random.default_rng(7).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    want = preprocess_module.preprocess(frame, config)
    monkeypatch.setattr(native, "library_path", lambda stem="_int8search": None)
    preprocess_module._reducer.cache_clear()
    preprocess_module._bilinear.cache_clear()
    try:
        assert preprocess_module._reducer() is None and preprocess_module._reduce_native(frame, 3, 3, 0, 900) is None
        assert preprocess_module._bilinear_native(frame, 0, [0.0, 900.0], 224) is None
        np.testing.assert_array_equal(preprocess_module.preprocess(frame, config), want)
    finally:
        monkeypatch.undo()
        preprocess_module._reducer.cache_clear()
        preprocess_module._bilinear.cache_clear()
    assert preprocess_module._reducer() is not None and preprocess_module._bilinear() is not None


# The same C file cross-compiled for aarch64 and run under qemu-aarch64, and built for x86-64 and run under
# qemu-x86_64 on a CPU without AVX2 (the default clones): the reduction and both bilinear passes give Pillow's bytes.
HARNESS = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
int ecp_reduce(const uint8_t *, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, uint8_t *,
               int64_t);
int ecp_bilinear(const uint8_t *, int64_t, int64_t, int64_t, int64_t, int, float, float, int64_t, uint8_t *, int64_t);
int main(int argc, char **argv) {
    int64_t h = atoll(argv[1]), w = atoll(argv[2]), f = atoll(argv[3]), ow = atoll(argv[6]), oh = atoll(argv[9]);
    float x0 = strtof(argv[4], 0), x1 = strtof(argv[5], 0), y0 = strtof(argv[7], 0), y1 = strtof(argv[8], 0);
    int64_t rh = (h + f - 1) / f, rw = (w + f - 1) / f;
    uint8_t *src = malloc(h * w * 3), *red = malloc(rh * rw * 3), *across = malloc(rh * ow * 3), *out = malloc(oh * ow * 3);
    if (fread(src, 1, h * w * 3, stdin) != (size_t)(h * w * 3)) return 3;
    if (ecp_reduce(src, w * 3, 3, 0, 0, w, h, f, f, red, rw * 3)) return 4;
    if (ecp_bilinear(red, rw * 3, 3, rw, rh, 0, x0, x1, ow, across, ow * 3)) return 5;
    if (ecp_bilinear(across, ow * 3, 3, ow, rh, 1, y0, y1, oh, out, ow * 3)) return 6;
    fwrite(out, 1, oh * ow * 3, stdout);
    return 0;
}
"""


@pytest.mark.parametrize("target", ["aarch64", "x86-64 without AVX2"])
def test_reduce_and_resize_on_an_emulated_cpu(target, tmp_path):
    import shutil
    import subprocess

    from edgecore.runtime import native

    compiler, runner = {
        "aarch64": ([shutil.which("aarch64-linux-gnu-gcc")], [shutil.which("qemu-aarch64")]),
        "x86-64 without AVX2": ([shutil.which("gcc")], [shutil.which("qemu-x86_64"), "-cpu", "Westmere"]),
    }[target]
    if None in compiler + runner:
        pytest.skip(f"needs a cross compiler and qemu-user for {target} (.ci/install)")
    (tmp_path / "harness.c").write_text(HARNESS)
    source = Path(native.__file__).with_name("reduce.c")
    binary = tmp_path / "harness"
    subprocess.run([*compiler, "-O3", "-std=gnu11", "-ffp-contract=off", "-static", "-o", str(binary), str(source),
                    str(tmp_path / "harness.c"), "-lm"], check=True, capture_output=True, timeout=120)
    rng = np.random.default_rng(11)
    for h, w, factor, box_x, out_w, box_y, out_h in ((90, 120, 2, (1.5, 58.25), 40, (0.0, 45.0), 30),
                                                     (61, 47, 3, (0.0, 16.0), 33, (2.75, 20.5), 9)):
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        reduced = Image.fromarray(frame).reduce(factor)
        across = reduced.resize((out_w, reduced.height), Image.Resampling.BILINEAR, box=(box_x[0], 0, box_x[1], reduced.height))
        want = np.asarray(across.resize((out_w, out_h), Image.Resampling.BILINEAR, box=(0, box_y[0], out_w, box_y[1])))
        done = subprocess.run([*runner, str(binary), str(h), str(w), str(factor), repr(box_x[0]), repr(box_x[1]), str(out_w),
                               repr(box_y[0]), repr(box_y[1]), str(out_h)], input=frame.tobytes(), capture_output=True,
                              timeout=120)
        assert done.returncode == 0, done.returncode
        assert done.stdout == want.tobytes(), f"{target}: {h}x{w}"
