"""C API: libedgecore.so (cffi embedding) driven by the C examples must match the Python runtime.

The library and the two C programs are built once per module (~2 s); each C run
starts its own embedded Python and opens the bundle (~0.5-2 s). The
frame-conversion checks at the bottom need no compiler.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecore.runtime import capi

pytest.importorskip("cffi", reason="cffi is not installed: the C API is built (and runs) with cffi's embedding mode")

RTOL = 1e-6


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def capi_bundle(exported_bundle) -> Path:
    """The session's synthetic bundle (conftest), shared read-only with the other runtime tests."""
    return exported_bundle


@pytest.fixture(scope="module")
def images(synthetic_category, tmp_path_factory) -> list[dict]:
    """A few test frames (good and defective) as PNG, PPM (P6) and PGM (P5) with their arrays."""
    out = tmp_path_factory.mktemp("capi_frames")
    pngs = sorted((synthetic_category / "test").rglob("*.png"))
    chosen = pngs[:2] + pngs[-2:]
    frames = []
    for i, png in enumerate(chosen):
        rgb = np.asarray(Image.open(png).convert("RGB"))
        gray = np.asarray(Image.open(png).convert("L"))
        ppm, pgm = out / f"{i}.ppm", out / f"{i}.pgm"
        Image.fromarray(rgb).save(ppm)
        Image.fromarray(gray).save(pgm)
        frames.append({"png": png, "ppm": ppm, "pgm": pgm, "rgb": rgb, "gray": gray})
    return frames


@pytest.fixture(scope="module")
def detector(capi_bundle):
    from edgecore.runtime.detector import Detector

    with Detector.open(capi_bundle) as det:
        yield det


def run_detect(programs: dict[str, Path], *args: object) -> list[tuple[float, float, int]]:
    done = subprocess.run(
        [str(programs["detect"]), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    rows = []
    for line in done.stdout.splitlines():
        if line.startswith("#"):
            continue
        score, normalized, anomalous, _path = line.split(maxsplit=3)
        rows.append((float(score), float(normalized), int(anomalous)))
    return rows


def assert_rows_match(rows: list[tuple[float, float, int]], expected: list) -> None:
    assert len(rows) == len(expected)
    for (score, normalized, anomalous), want in zip(rows, expected):
        np.testing.assert_allclose(score, want.score, rtol=RTOL)
        np.testing.assert_allclose(normalized, want.normalized_score, rtol=RTOL, atol=1e-12)
        assert anomalous == int(want.is_anomalous)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_c_scores_and_maps_match_python_runtime(capi_programs, capi_bundle, images, detector, tmp_path):
    rows = run_detect(capi_programs, "--maps", tmp_path, capi_bundle, *(f["ppm"] for f in images))
    expected = [detector.detect(f["png"]) for f in images]
    assert_rows_match(rows, expected)
    assert {r[2] for r in rows} <= {0, 1}
    crop = detector.preprocess_config.crop
    for i, want in enumerate(expected):
        got = np.fromfile(tmp_path / f"map_{i}.f32", dtype=np.float32)
        assert got.size == crop * crop, "the C map is at crop size"
        np.testing.assert_allclose(got.reshape(crop, crop), detector.normalization(want.map), rtol=RTOL, atol=1e-6)
        assert got.min() >= 0.0 and got.max() <= 1.0


@pytest.mark.slow
def test_two_threads_on_one_handle_match_one_thread(capi_programs, capi_bundle, images, detector):
    frames = [f["ppm"] for f in images]
    rows = run_detect(capi_programs, "--threads", 2, capi_bundle, *frames)
    single = [detector.detect(f["rgb"]) for f in images]
    assert len(rows) == 2 * len(frames)
    assert_rows_match(rows[: len(frames)], single)
    assert_rows_match(rows[len(frames) :], single)


@pytest.mark.slow
def test_bgr_gray_and_padded_rows_match_rgb_converted_in_python(capi_programs, capi_bundle, images, detector):
    bgr = run_detect(capi_programs, "--bgr", "--pad", 7, capi_bundle, *(f["ppm"] for f in images))
    assert_rows_match(bgr, [detector.detect(f["rgb"]) for f in images])
    gray = run_detect(capi_programs, "--pad", 3, capi_bundle, *(f["pgm"] for f in images))
    assert_rows_match(gray, [detector.detect(np.repeat(f["gray"][:, :, None], 3, axis=2)) for f in images])


@pytest.mark.slow
def test_every_misuse_returns_its_code_and_a_message(capi_programs, capi_bundle):
    done = subprocess.run(
        [str(capi_programs["errors_test"]), str(capi_bundle)], capture_output=True, text=True, timeout=120
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr  # also catches a crash (negative returncode)
    assert not [line for line in lines if line.startswith("FAIL")], done.stdout
    checks = {line.split()[1]: line for line in lines if line.startswith("ok ")}
    for name, code in {
        "open_null_path": "EC_ERR_NULL_ARGUMENT",
        "open_missing_bundle": "EC_ERR_BUNDLE",
        "open_unknown_backend": "EC_ERR_INVALID_ARGUMENT",
        "detect_map_too_small": "EC_ERR_BUFFER_TOO_SMALL",
        "detect_stride_too_small": "EC_ERR_INVALID_ARGUMENT",
        "detect_unknown_format": "EC_ERR_INVALID_ARGUMENT",
        "detect_after_close": "EC_ERR_INVALID_HANDLE",
    }.items():
        assert code in checks[name], checks[name]
    assert "/nonexistent/part.edgecore" in checks["open_missing_bundle"]  # messages name the culprit
    assert "stride" in checks["detect_stride_too_small"]
    assert "map_size" in " ".join(lines)


@pytest.mark.slow
def test_nan_engine_output_is_ec_err_nonfinite_never_a_verdict(capi_programs, capi_bundle, nan_graph_bundle):
    done = subprocess.run(
        [str(capi_programs["errors_test"]), str(capi_bundle), str(nan_graph_bundle)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith(("ok ", "FAIL "))}
    assert lines["detect_nonfinite_score"].startswith("ok detect_nonfinite_score EC_ERR_NONFINITE"), done.stdout
    assert "NaN" in lines["detect_nonfinite_score"]
    assert lines["nonfinite_leaves_result_untouched"].startswith("ok")


@pytest.mark.slow
def test_embedded_version_is_the_runtime_version(capi_programs, capi_bundle):
    import edgecore

    done = subprocess.run(
        [str(capi_programs["errors_test"]), str(capi_bundle)], capture_output=True, text=True, timeout=120
    )
    assert f"version {edgecore.__version__} api 1." in done.stdout


@pytest.mark.slow
def test_a_broken_python_environment_is_an_error_code_not_a_crash(capi_programs, capi_bundle, images, tmp_path):
    frame = str(images[0]["ppm"])
    # 1. No standard library: Python's own start-up fails (a bare Py_InitializeEx would abort).
    env = dict(os.environ, PYTHONHOME=str(tmp_path / "no-python-here"))
    done = subprocess.run([str(capi_programs["detect"]), str(capi_bundle), frame], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "EC_ERR_RUNTIME" in done.stderr and "failed to start" in done.stderr
    # 2. Python starts but edgecore cannot be imported (shadowed by a broken package).
    fake = tmp_path / "shadow" / "edgecore"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated broken install')\n")
    env = dict(os.environ, PYTHONPATH=str(fake.parent))
    done = subprocess.run([str(capi_programs["detect"]), str(capi_bundle), frame], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "cannot load the edgecore runtime" in done.stderr and "simulated broken install" in done.stderr


# --------------------------------------------------------------------------- frame conversion (no compiler)


def _frame(array: np.ndarray, pad: int) -> tuple[object, np.ndarray, int]:
    """A padded copy of array in a plain byte buffer, as a camera would hand it over."""
    from cffi import FFI

    ffi = FFI()
    rows = array.reshape(array.shape[0], -1)
    stride = rows.shape[1] + pad
    buffer = np.full((rows.shape[0], stride), 0xEE, dtype=np.uint8)
    buffer[:, : rows.shape[1]] = rows
    return ffi, buffer, stride


def test_frame_view_converts_layouts_without_reading_padding():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ffi, buffer, stride = _frame(rgb, pad=4)
    view = capi.frame_view(ffi, ffi.from_buffer(buffer), 7, 5, stride, capi.EC_PIXEL_RGB8)
    np.testing.assert_array_equal(view, rgb)
    assert not view.flags.writeable

    ffi, buffer, stride = _frame(np.ascontiguousarray(rgb[:, :, ::-1]), pad=1)
    np.testing.assert_array_equal(capi.frame_view(ffi, ffi.from_buffer(buffer), 7, 5, stride, capi.EC_PIXEL_BGR8), rgb)

    gray = rgb[:, :, 0].copy()
    ffi, buffer, stride = _frame(gray, pad=3)
    np.testing.assert_array_equal(capi.frame_view(ffi, ffi.from_buffer(buffer), 7, 5, stride, capi.EC_PIXEL_GRAY8), gray)


@pytest.mark.parametrize(
    ("width", "height", "stride", "fmt", "words"),
    [
        (7, 5, 20, capi.EC_PIXEL_RGB8, "stride"),  # 20 < 7 * 3
        (0, 5, 21, capi.EC_PIXEL_RGB8, "width and height"),
        (7, -5, 21, capi.EC_PIXEL_RGB8, "width and height"),
        (7, 5, 21, 9, "pixel format"),
        (100_000, 100_000, 300_000, capi.EC_PIXEL_RGB8, "EC_MAX_PIXELS"),
        (7, 5, 1 << 29, capi.EC_PIXEL_RGB8, "EC_MAX_FRAME_BYTES"),
    ],
)
def test_frame_view_rejects_bad_geometry_before_touching_memory(width, height, stride, fmt, words):
    from cffi import FFI

    ffi = FFI()
    tiny = np.zeros(8, dtype=np.uint8)  # far too small for any of these frames: must never be read
    with pytest.raises(capi.ApiError, match=words) as info:
        capi.frame_view(ffi, ffi.from_buffer(tiny), width, height, stride, fmt)
    assert info.value.status == capi.EC_ERR_INVALID_ARGUMENT


def test_exceptions_map_to_status_codes():
    from edgecore.runtime.errors import BundleError, ImageError

    assert capi.status_for(BundleError("x")) == capi.EC_ERR_BUNDLE
    assert capi.status_for(ImageError("x")) == capi.EC_ERR_IMAGE
    assert capi.status_for(ValueError("unknown backend"), during_open=True) == capi.EC_ERR_INVALID_ARGUMENT
    assert capi.status_for(ValueError("inside detect")) == capi.EC_ERR_RUNTIME
    assert capi.status_for(KeyboardInterrupt()) == capi.EC_ERR_RUNTIME
    assert capi.describe("ec_detect", KeyError("k")).startswith("ec_detect: KeyError")
