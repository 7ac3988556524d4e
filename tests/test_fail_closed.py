"""Fail closed, round 2 (issue 12): a camera that cannot score a frame never calls it good.

Each case was a reproduced failure of the landed runtime: non-finite values that
became verdicts, manifest fields trusted against the graph and the arrays, frames
too thin to map, frames that reached Ghostscript, tar bombs, killed unpacks, two
compiles racing on one bundle, full disks. Everything runs for real: bundles
exported from a fitted model (hashes recomputed after crafting), real Pillow,
real OpenVINO, real processes, a real (tmpfs) full file system.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import weakref
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image
from typer.testing import CliRunner

from edgecore.cli import app
from edgecore.runtime import imageio
from edgecore.runtime.bundle import MANIFEST, bundle_lock, lock_path, unpack_archive, verify_path
from edgecore.runtime.detector import Detector
from edgecore.runtime.errors import BundleError, ImageError, NonFiniteError
from edgecore.runtime.imageio import ALLOWED_FORMATS, MAX_ASPECT_RATIO, load_image

from conftest import recompute_hashes

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::edgecore.data.datasets.SkippedImageWarning")


# =========================================================================== helpers


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _assert_one_clean_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = _error_lines(result.output)
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def good_frame(synthetic_category) -> Path:
    return sorted((synthetic_category / "test" / "good").glob("*.png"))[0]


# =========================================================================== non-finite values


def _scored_or_refused(bundle: Path, frame: Path) -> str:
    """'refused' (BundleError at open) or 'error' (NonFiniteError at detect); anything that
    returns a Detection is a verdict, which these bundles must never give."""
    try:
        detector = Detector.open(bundle)
    except BundleError:
        return "refused"
    with detector:
        with pytest.raises(NonFiniteError):
            detector.detect(frame)
    return "error"


@pytest.mark.parametrize("where", ["scale", "offset"])
def test_nan_in_the_index_arrays_is_never_a_verdict(bundle_copy, good_frame, where):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    names = [e["file"] for k, e in manifest["index"]["files"].items() if k.endswith(f".{where}")]
    if not names:
        pytest.skip(f"this index format stores no {where} array")
    path = bundle_copy / manifest["index"]["dir"] / names[0]
    values = np.load(path, allow_pickle=False)
    values.flat[0] = np.nan
    np.save(path, values, allow_pickle=False)
    recompute_hashes(bundle_copy)
    assert _scored_or_refused(bundle_copy, good_frame) in ("refused", "error")


def test_a_graph_that_outputs_nan_is_an_error_not_a_verdict(nan_graph_bundle, good_frame):
    with Detector.open(nan_graph_bundle) as detector:
        for _ in range(2):  # and it stays an error (no state flips it to "normal")
            with pytest.raises(NonFiniteError, match="NaN or infinite"):
                detector.detect(good_frame)


def test_infer_fail_on_anomaly_never_exits_0_on_nan_scores(nan_graph_bundle, synthetic_category, tmp_path):
    frames = str(synthetic_category / "test" / "scratch")
    result = runner.invoke(app, ["infer", str(nan_graph_bundle), frames, "--fail-on-anomaly", "-o", str(tmp_path / "o")])
    _assert_one_clean_error(result, "NaN")
    assert "NaN" not in "".join(line for line in result.output.splitlines() if line.startswith("{"))
    results = tmp_path / "o" / "results.jsonl"
    assert not results.exists() or "NaN" not in results.read_text()


def test_bench_strict_fails_on_nan_scores(nan_graph_bundle):
    result = runner.invoke(app, ["bench", str(nan_graph_bundle), "--iterations", "2", "--warmup", "0", "--strict", "--quiet"])
    assert result.exit_code != 0, result.output
    assert "PASS" not in result.output


def test_non_finite_score_from_the_shared_scorer_raises():
    from edgecore.runtime.scoring import score_patches

    patch_scores = np.array([[0.1, np.nan, 0.2, 0.3]], np.float32)
    nn_index = np.zeros((1, 4), np.int64)
    features = np.zeros((1, 4, 2), np.float32)
    with pytest.raises(NonFiniteError):
        score_patches(patch_scores, nn_index, features, np.zeros((1, 2), np.float32), np.zeros((1, 1), np.int32), (2, 2), 32, 0)


# =========================================================================== manifest vs graph and arrays


def _set_crop(m: dict, crop: int) -> None:
    m["preprocess"]["crop"] = crop
    m["graph"]["input"]["shape"][1:3] = [crop, crop]


def _set_batch(m: dict, batch: int) -> None:
    m["graph"]["batch"] = batch
    m["graph"]["input"]["shape"][0] = batch
    m["graph"]["output"]["shape"][0] = batch


def _set_grid(m: dict, grid: list[int]) -> None:
    m["features"]["grid"] = grid
    m["graph"]["output"]["shape"][1] = grid[0] * grid[1]


def _set_dim(m: dict, dim: int) -> None:
    m["features"]["embed_dim"] = dim
    m["graph"]["output"]["shape"][2] = dim


# Each changes every declared field consistently, so only the real graph or array can disagree.
GRAPH_MISMATCHES = {
    "crop-vs-graph-input": (lambda m: _set_crop(m, 96), r"preprocess\.crop say the graph's input is \[1, 96, 96, 3\]"),
    "batch-vs-graph": (lambda m: _set_batch(m, 2), r"graph\.batch.* input is \[2, "),
    "grid-vs-graph-output": (lambda m: _set_grid(m, [13, 13]), r"features\.grid.* output is \[1, 169, "),
    "grid-not-square": (lambda m: _set_grid(m, [7, 28]), r"features\.grid: \[7, 28\] is not square"),
    "embed-dim-vs-graph": (lambda m: _set_dim(m, 128), r"embed_dim 128 but the index holds|output is \[1, 196, 128\]"),
    "declared-input-shape": (lambda m: m["graph"]["input"].update(shape=[1, 96, 96, 3]), r"graph\.input\.shape"),
    "declared-output-shape": (lambda m: m["graph"]["output"].update(shape=[1, 196]), r"graph\.output\.shape"),
    "resize-60000": (lambda m: m["preprocess"].update(resize=60000), r"resize <= 4096"),
    "crop-below-32": (lambda m: _set_crop(m, 16), r"need 32 <= crop"),
    "num-neighbors-vs-table": (lambda m: m["scoring"].update(num_neighbors=5), r"neighbours\.npy: shape \(235, 9\), expected"),
    "table-shape-declared": (lambda m: m["neighbour_table"].update(shape=[235, 8]), r"neighbour_table\.shape"),
    "coreset-size-vs-index": (lambda m: m["coreset"].update(size=999), r"coreset\.size 999"),
    "distance-cosine": (lambda m: m["scoring"].update(distance="cosine"), r"scoring\.distance"),
    "interpolation-nearest": (lambda m: m["preprocess"].update(interpolation="nearest"), r"preprocess\.interpolation"),
    "input-dtype-float": (lambda m: m["graph"]["input"].update(dtype="float32"), r"graph\.input\.dtype"),
}


@pytest.mark.parametrize("case", list(GRAPH_MISMATCHES))
def test_manifest_field_that_disagrees_with_graph_or_arrays_is_refused_at_open(bundle_copy, case):
    change, pattern = GRAPH_MISMATCHES[case]
    edit_manifest(bundle_copy, change)
    started = time.perf_counter()
    with pytest.raises(BundleError, match=pattern):
        Detector.open(bundle_copy)
    assert time.perf_counter() - started < 30  # refused at open, not after a MemoryError


def _table_with(change):
    def craft(bundle: Path) -> None:
        table = np.load(bundle / "neighbours.npy", allow_pickle=False)
        np.save(bundle / "neighbours.npy", change(table.copy()), allow_pickle=False)
        recompute_hashes(bundle)

    return craft


def _poke(table: np.ndarray, value: int) -> np.ndarray:
    table[3, 4] = value
    return table


TABLE_CRAFTS = {
    "id-out-of-range": (_table_with(lambda t: _poke(t, t.shape[0])), r"ids must lie in \[0, 235\), found \[0, 235\]"),
    "id-negative": (_table_with(lambda t: _poke(t, -1)), r"ids must lie in \[0, 235\), found \[-1, "),
    "float-ids": (_table_with(lambda t: t.astype(np.float32)), r"expected a 2-D integer array of coreset ids, got float32"),
    "one-dimensional": (_table_with(lambda t: t[:, 0].copy()), r"2-D integer array"),
    "row-without-itself": (_table_with(lambda t: t[::-1].copy()), r"row i must start with coreset point i"),
    "missing-rows": (_table_with(lambda t: t[:-1].copy()), r"shape \(234, 9\), expected \(235, 9\)"),
}


@pytest.mark.parametrize("case", list(TABLE_CRAFTS))
def test_crafted_neighbour_table_is_refused_at_open(bundle_copy, case):
    craft, pattern = TABLE_CRAFTS[case]
    craft(bundle_copy)
    with pytest.raises(BundleError, match=pattern):
        Detector.open(bundle_copy)


# =========================================================================== frames: size, aspect, formats


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"".join(b"\0" + b"\0" * (width * 3) for _ in range(height)), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IDAT", raw
    ) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def strip_png(tmp_path_factory) -> Path:
    """A valid 80000000x1 RGB PNG: 80 MP (inside the pixel budget), ~233 KB."""
    path = tmp_path_factory.mktemp("strip") / "strip.png"
    path.write_bytes(_png_header(80_000_000, 1))
    return path


def test_an_80_megapixel_strip_is_refused_quickly_from_its_header(strip_png, exported_bundle):
    started = time.perf_counter()
    with pytest.raises(ImageError, match=rf"strip\.png: image too large: 80000000x1 .*{MAX_ASPECT_RATIO}:1 aspect limit"):
        load_image(strip_png)
    assert time.perf_counter() - started < 2.0  # not decoded (that alone takes seconds and 240 MB)
    with Detector.open(exported_bundle) as detector:
        with pytest.raises(ImageError, match="aspect limit"):
            detector.detect(strip_png)
        with pytest.raises(ImageError, match=r"<array>: image too large: 200000x1"):
            detector.detect(np.zeros((1, 200_000, 3), np.uint8))  # the C API hands arrays over


def test_infer_on_a_strip_gives_one_error_line(strip_png, exported_bundle):
    result = runner.invoke(app, ["infer", str(exported_bundle), str(strip_png)])
    _assert_one_clean_error(result, "strip.png", "aspect limit")


def test_the_widest_allowed_aspect_still_scores(exported_bundle, good_frame):
    rgb = np.ascontiguousarray(np.tile(load_image(good_frame)[:1], (1, 8, 1)))  # 1 x 1024
    assert max(rgb.shape[:2]) / min(rgb.shape[:2]) == MAX_ASPECT_RATIO
    with Detector.open(exported_bundle) as detector:
        assert np.isfinite(detector.detect(rgb).score)


def _encoded(fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    rgb = (np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3)
    image = Image.fromarray(rgb)
    image = image.convert("L") if fmt == "PGM" else image
    image.save(buffer, format="PPM" if fmt == "PGM" else fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "PPM", "PGM", "WEBP", "GIF"])
def test_allowed_formats_decode(fmt):
    rgb = load_image(_encoded(fmt))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8


@pytest.mark.parametrize("fmt", ["TGA", "PCX", "SGI", "ICO", "DDS", "QOI"])
def test_other_pillow_formats_are_refused_as_frames(tmp_path, fmt):
    try:
        data = _encoded(fmt)
    except (KeyError, OSError, ValueError) as exc:
        pytest.skip(f"this Pillow cannot write {fmt}: {exc}")
    assert Image.open(io.BytesIO(data)).format  # Pillow itself would decode it
    path = tmp_path / "frame.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=r"frame\.png: not an image, or not in an accepted format \(PNG, JPEG"):
        load_image(path)


POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nnewpath 0 0 moveto showpage\n"


@pytest.fixture
def fake_ghostscript(tmp_path, monkeypatch) -> Path:
    """A `gs` first on PATH that only records that it ran; Pillow's cached lookup is reset
    so the EPS plugin would really look for it."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "ghostscript-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


def test_postscript_named_png_never_runs_ghostscript_on_the_camera(fake_ghostscript, exported_bundle, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "frame.png").write_bytes(POSTSCRIPT)
    result = runner.invoke(app, ["infer", str(exported_bundle), str(frames / "frame.png")])
    _assert_one_clean_error(result, "frame.png", "not in an accepted format")
    with pytest.raises(ImageError):
        load_image(POSTSCRIPT)
    assert not fake_ghostscript.exists(), fake_ghostscript.read_text()


def test_postscript_named_png_never_runs_ghostscript_on_the_host(fake_ghostscript, synthetic_category, tmp_path):
    data = tmp_path / "normals"
    shutil.copytree(synthetic_category / "train" / "good", data)
    (data / "zz_frame.png").write_bytes(POSTSCRIPT)
    result = runner.invoke(app, ["fit", str(data), "-o", str(tmp_path / "m"), "--resize", "128", "--crop", "112"])
    _assert_one_clean_error(result, "zz_frame.png", "not in an accepted format")
    assert not fake_ghostscript.exists()
    assert not (tmp_path / "m").exists()


def test_host_and_camera_open_frames_with_the_one_opener():
    """The allow-list lives in one place: the host data code decodes through runtime.imageio."""
    from edgecore.data import datasets

    assert datasets.load_image is imageio.load_image
    source = (REPO / "edgecore" / "data" / "datasets.py").read_text()
    assert "Image.open" not in source and "PIL" not in source


# =========================================================================== fit streams its frames


def test_fit_holds_one_decoded_frame_at_a_time(synthetic_category, tmp_path, monkeypatch):
    """Full-size frames must not pile up while fit runs (they did: 3.3 GB for 8 strips)."""
    from edgecore.data import datasets

    alive, peak = [0], [0]

    def tracked(path, **kwargs):
        rgb = imageio.load_image(path, **kwargs)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(rgb, lambda: alive.__setitem__(0, alive[0] - 1))
        return rgb

    monkeypatch.setattr(datasets, "load_image", tracked)
    data = synthetic_category / "train" / "good"
    count = len(list(data.glob("*.png")))
    result = runner.invoke(
        app, ["fit", str(data), "-o", str(tmp_path / "m"), "--resize", "128", "--crop", "112", "--batch-size", "4",
              "--coreset-ratio", "0.05"],
    )
    assert result.exit_code == 0, result.output
    assert count >= 12
    assert peak[0] <= 2, f"{peak[0]} decoded frames alive at once (of {count})"


# =========================================================================== archives


def _bomb(tmp: Path, bundle: Path, extra: list[tuple[str, int]], listed_sizes: dict[str, int] | None = None) -> Path:
    """A gzip tar of a real bundle plus zero-filled members (``extra``: name, size), optionally
    with the manifest declaring other sizes: megabytes on disk, far more unpacked."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    for name, size in (listed_sizes or {}).items():
        manifest["files"][name] = {"size": size, "sha256": "0" * 64}
    archive = tmp / "bomb.edgecore.tar.gz"

    class Zeros(io.RawIOBase):
        def __init__(self, size: int) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            n = min(len(buffer), self.left)
            buffer[:n] = b"\0" * n
            self.left -= n
            return n

    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo(f"{bundle.name}/{MANIFEST}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name in sorted(json.loads((bundle / MANIFEST).read_text())["files"]):
            tar.add(bundle / name, f"{bundle.name}/{name}")
        for name, size in extra:
            info = tarfile.TarInfo(f"{bundle.name}/{name}")
            info.size = size
            tar.addfile(info, io.BufferedReader(Zeros(size)))
    return archive


def _written(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_tar_bomb_with_an_unlisted_member_is_refused_before_writing(exported_bundle, tmp_path):
    archive = _bomb(tmp_path, exported_bundle, [("payload.bin", 256 << 20)])
    assert archive.stat().st_size < 4 << 20
    destination = tmp_path / "dest"
    with pytest.raises(BundleError, match=r"payload\.bin' is not listed in its manifest; refused before unpacking"):
        unpack_archive(archive, destination)
    assert _written(destination) == 0 and list(destination.iterdir()) == []


def test_member_larger_than_its_declared_size_is_refused_before_writing(exported_bundle, tmp_path):
    archive = _bomb(tmp_path, exported_bundle, [("big.bin", 128 << 20)], listed_sizes={"big.bin": 10})
    with pytest.raises(BundleError, match=r"big\.bin' is 134,217,728 bytes, its manifest says 10"):
        unpack_archive(archive, tmp_path / "dest")
    assert _written(tmp_path / "dest") == 0


def test_declared_sizes_beyond_the_global_cap_are_refused(exported_bundle, tmp_path, monkeypatch):
    archive = _bomb(tmp_path, exported_bundle, [("big.bin", 64 << 20)], listed_sizes={"big.bin": 64 << 20})
    monkeypatch.setenv("EDGECORE_MAX_UNPACK_BYTES", str(32 << 20))
    with pytest.raises(BundleError, match=r"unpacks to more than 33,554,432 bytes .*refused before writing"):
        unpack_archive(archive, tmp_path / "dest")
    assert _written(tmp_path / "dest") == 0
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    with pytest.raises(BundleError, match="unpacks to more than"):
        verify_path(archive)
    assert _written(tmp_path / "scratch") == 0


_KILLED_UNPACK = textwrap.dedent(
    """
    import sys, time
    import edgecore.runtime.bundle as bundle

    copy = bundle._copy_exactly
    def slow(source, out, size):
        copy(source, out, size)
        out.flush()
        print("writing", flush=True)
        time.sleep(600)  # killed here, mid-unpack
    bundle._copy_exactly = slow
    bundle.unpack_archive(sys.argv[1], sys.argv[2])
    """
)


def _start_unpack(archive: Path, destination: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED_UNPACK, str(archive), str(destination)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "writing"
    return process


def test_a_sigkilled_unpack_leaves_staging_that_the_next_unpack_removes(exported_bundle, tmp_path):
    from edgecore.export.bundle import pack_bundle

    archive = pack_bundle(exported_bundle, tmp_path / "part.edgecore.tar")
    destination = tmp_path / "dest"
    killed = _start_unpack(archive, destination)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    live = _start_unpack(archive, tmp_path / "other")  # a live unpack elsewhere: its own folder
    (destination / ".unpack.mine").mkdir()  # not our name: never touched
    leftovers = [p for p in destination.iterdir() if p.name.startswith(".unpack.") and p.name != ".unpack.mine"]
    assert len(leftovers) == 1 and _written(leftovers[0]) > 0
    try:
        live_staging = [p for p in (tmp_path / "other").iterdir() if p.name.startswith(".unpack.")]
        bundle = unpack_archive(archive, destination)
        assert sorted(p.name for p in destination.iterdir()) == [".unpack.mine", bundle.name]
        # A second destination with a live writer: its staging survives another unpack there.
        shutil.rmtree(bundle)
        unpack_archive(archive, tmp_path / "other")
        assert all(p.exists() for p in live_staging) and live_staging
    finally:
        live.kill()
        live.wait()


# =========================================================================== concurrent writers


def _compile_process(bundle: Path, precision: str, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgecore.cli", "compile", str(bundle), "--precision", precision],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )


def test_two_compiles_on_one_bundle_both_keep_their_engines(bundle_copy):
    processes = [_compile_process(bundle_copy, p) for p in ("fp32", "fp16")]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    engines = sorted(verify_path(bundle_copy).manifest["engines"])
    assert engines == ["openvino-fp16", "openvino-fp32"]
    assert not lock_path(bundle_copy).exists()  # the lock file goes with its last writer
    with Detector.open(bundle_copy, precision="fp16") as a, Detector.open(bundle_copy, precision="fp32") as b:
        assert a.engine.info.engine_key == "openvino-fp16" and b.engine.info.engine_key == "openvino-fp32"


def test_a_second_writer_says_it_waits_then_gives_up_clearly(bundle_copy):
    with bundle_lock(bundle_copy):
        process = _compile_process(bundle_copy, "fp32", EDGECORE_LOCK_TIMEOUT="1")
        out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    assert f"waiting for another writer of {bundle_copy} (pid {os.getpid()})" in err
    errors = _error_lines(err)
    assert len(errors) == 1 and f"another process (pid {os.getpid()}) is writing this bundle; gave up after 1 s" in errors[0]
    assert "Traceback" not in err
    assert "engines" not in verify_path(bundle_copy).manifest or not verify_path(bundle_copy).manifest["engines"]


def test_threshold_rewrite_waits_for_the_writer_before_it(bundle_copy):
    from edgecore.runtime.bundle import rewrite_bundle

    def tag(value):
        def change(staging, manifest):
            manifest.setdefault("notes", []).append(value)
            return manifest

        return change

    def slow_writer():
        rewrite_bundle(bundle_copy, lambda s, m: (time.sleep(1.0), tag("first")(s, m))[1])

    first = threading.Thread(target=slow_writer)
    first.start()
    time.sleep(0.3)
    rewrite_bundle(bundle_copy, tag("second"))
    first.join()
    assert verify_path(bundle_copy).manifest["notes"] == ["first", "second"]


# =========================================================================== disk full


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of the given size (bytes); skipped where this process cannot mount."""
    mounted: list[Path] = []

    def mount(size: int, name: str = "full") -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _no_partials(root: Path) -> None:
    leftovers = [p.name for p in root.rglob("*") if ".partial" in p.name or p.name.startswith(".unpack.")]
    assert not leftovers, leftovers


def test_export_into_a_full_disk_is_one_error_line(fitted_model_dir, small_fs):
    full = small_fs(1 << 20)
    result = runner.invoke(app, ["export", str(fitted_model_dir), "-o", str(full / "b.edgecore")])
    _assert_one_clean_error(result, str(full / "b.edgecore"), "No space left on device")
    assert list(full.iterdir()) == []


def test_fit_into_a_full_disk_is_one_error_line(synthetic_category, small_fs):
    full = small_fs(64 << 10)
    result = runner.invoke(app, ["fit", str(synthetic_category), "-o", str(full / "m"), "--resize", "128", "--crop", "112"])
    _assert_one_clean_error(result, str(full / "m"), "No space left on device")
    assert list(full.iterdir()) == []


def test_compile_on_a_full_disk_is_one_error_line_and_keeps_the_bundle(exported_bundle, small_fs):
    size = sum(p.stat().st_size for p in exported_bundle.rglob("*") if p.is_file())
    full = small_fs(size + (256 << 10))
    bundle = Path(shutil.copytree(exported_bundle, full / exported_bundle.name))
    result = runner.invoke(app, ["compile", str(bundle), "--precision", "fp32"])
    _assert_one_clean_error(result, str(bundle), "No space left on device")
    assert verify_path(bundle).manifest["engines"] == {}
    _no_partials(full)


def test_infer_output_on_a_full_disk_is_one_error_line(exported_bundle, synthetic_category, small_fs):
    full = small_fs(64 << 10)
    frames = [str(synthetic_category / "test" / kind) for kind in ("good", "scratch", "spot")]
    result = runner.invoke(app, ["infer", str(exported_bundle), *frames, "-o", str(full / "out")])
    _assert_one_clean_error(result, str(full / "out"), "No space left on device")


def test_unpack_that_cannot_fit_is_refused_before_writing(exported_bundle, tmp_path, small_fs):
    from edgecore.export.bundle import pack_bundle

    archive = pack_bundle(exported_bundle, tmp_path / "part.edgecore.tar")
    full = small_fs(1 << 20)
    result = runner.invoke(app, ["unpack", str(archive), "-o", str(full)])
    _assert_one_clean_error(result, str(full), "bytes, only")
    assert list(full.iterdir()) == []


# =========================================================================== the shared CLI wrapper


@pytest.mark.parametrize(
    "raised,expected",
    [
        (OSError(28, "No space left on device", "/data/out/model"), "error: /data/out/model: No space left on device"),
        (PermissionError(13, "Permission denied", "/etc/x"), "error: /etc/x: Permission denied"),
        (OSError(18, "Invalid cross-device link", "/a", None, "/b"), "error: /a: Invalid cross-device link (while moving it to /b)"),
        (MemoryError(), "error: out of memory; nothing was written"),
    ],
    ids=["enospc", "eacces", "rename", "memory"],
)
def test_system_errors_become_one_error_line(raised, expected):
    import typer

    from edgecore.runtime.cliutil import friendly

    tiny = typer.Typer()

    @tiny.command()
    @friendly
    def run() -> None:
        raise raised

    result = runner.invoke(tiny, [])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [result.output.strip()] and result.output.startswith(expected)
