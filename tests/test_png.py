"""The fast PNG reader (edgecore.runtime.png) gives Pillow's pixels and Pillow's errors, for every file.

Files are written here with every PNG filter type (Pillow's encoder picks its own), every 8-bit colour type,
odd widths and a row wider than the unfilter's static zero row; each is decoded by ``load_image`` (the fast
path, checked to be taken) and by the Pillow path, and must be equal. Everything the reader leaves alone
(16-bit, palette, interlaced, EXIF, transparency, unknown chunks) and everything malformed must come out as
Pillow decodes or refuses it. The unfilter also runs cross-compiled under qemu-aarch64.
"""
from __future__ import annotations

import io
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecore.runtime import native, png
from edgecore.runtime.errors import ImageError
from edgecore.runtime.imageio import MAX_PIXELS, _decode, _opener, _pil_to_rgb, load_image

pytestmark = pytest.mark.skipif(png._unfilter() is None, reason="the _pngfilter library is not built (no C compiler)")


@pytest.fixture(autouse=True, params=["libdeflate", "zlib"])
def decode_mode(request, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: inflated by libdeflate (the dependency), and by the stdlib's zlib (its fallback)."""
    if request.param == "libdeflate" and png._libdeflate is None:
        pytest.skip("the deflate wheel (libdeflate) is not installed")
    if request.param == "zlib":
        monkeypatch.setattr(png, "_libdeflate", None)
    return request.param

COLOURS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type → bytes per 8-bit pixel


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def filter_rows(pixels: np.ndarray, filters: list[int]) -> bytes:
    """PNG filtering (the encoder's side) of H×W×C uint8 rows, row y with filter ``filters[y]``."""
    height, width, bpp = pixels.shape
    rows = pixels.reshape(height, width * bpp).astype(np.int32)
    out = bytearray()
    for y in range(height):
        x, up = rows[y], rows[y - 1] if y else np.zeros_like(rows[y])
        left = np.concatenate([np.zeros(bpp, np.int32), x[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        kind = filters[y]
        if kind == 0:
            pred = np.zeros_like(x)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = up
        elif kind == 3:
            pred = (left + up) // 2
        else:
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        out.append(kind)
        out += ((x - pred) % 256).astype(np.uint8).tobytes()
    return bytes(out)


def write_png(pixels: np.ndarray, colour: int, filters: list[int] | None = None, *, before: bytes = b"",
              after: bytes = b"", idat_split: int = 1, depth: int = 8, interlace: int = 0,
              stream: bytes | None = None) -> bytes:
    """A PNG of ``pixels`` (H×W×C, C from the colour type); ``before``/``after``: extra chunks around IDAT."""
    height, width = pixels.shape[:2]
    filters = filters if filters is not None else [y % 5 for y in range(height)]
    compressed = stream if stream is not None else zlib.compress(filter_rows(pixels, filters), 6)
    size = -(-len(compressed) // idat_split)
    idat = b"".join(chunk(b"IDAT", compressed[i : i + size]) for i in range(0, len(compressed), size))
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return png.SIGNATURE + chunk(b"IHDR", header) + before + idat + after + chunk(b"IEND", b"")


def pillow_outcome(data: bytes):
    """What the Pillow path of load_image makes of ``data``: the array, or the ImageError's type."""
    name, opener = _opener(data)
    try:
        return _decode(name, opener, MAX_PIXELS, _pil_to_rgb)
    except ImageError as error:
        return error


def assert_same_as_pillow(data: bytes, *, fast: bool) -> None:
    """load_image(data) equals the Pillow path's outcome; ``fast``: whether the reader must take the file."""
    plain = png.plain_png(data)
    assert (plain is not None and plain.decode() is not None) == fast
    want = pillow_outcome(data)
    if isinstance(want, ImageError):
        with pytest.raises(ImageError):
            load_image(data)
        return
    got = load_image(data)
    assert got.dtype == np.uint8 and got.flags.c_contiguous and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("colour", sorted(COLOURS))
@pytest.mark.parametrize("width", [1, 2, 3, 5, 15, 16, 17, 1500])  # 1500 RGBA rows are wider than the 4 KiB zero row
def test_every_filter_and_colour_type_matches_pillow(colour: int, width: int) -> None:
    rng = np.random.default_rng(width * 10 + colour)
    height = 12
    pixels = rng.integers(0, 256, (height, width, COLOURS[colour]), dtype=np.uint8)
    pixels[height // 2 :] //= 7  # smooth rows too, where Paeth ties are common
    for filters in ([y % 5 for y in range(height)], [4] * height, [3] * height, [1, 0, 2, 4, 3] + [4] * (height - 5)):
        assert_same_as_pillow(write_png(pixels, colour, filters, idat_split=3), fast=True)


@pytest.mark.parametrize("channels", [3, 4])
def test_paeth_rows_side_by_side_match_row_by_row(channels: int) -> None:
    """Runs of Paeth rows (reconstructed eight at a time) of every length, among other filters, at widths
    around the wavefront's minimum (16 pixels); flat, extreme and noisy pixels, where Paeth's ties decide."""
    rng = np.random.default_rng(20 + channels)
    for width in (15, 16, 17, 18, 31, 257):
        height = 40
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        pixels[10:20] = rng.choice(np.array([0, 1, 127, 128, 254, 255], np.uint8), (10, width, channels))
        pixels[20:30] //= 37
        filters = [4 if rng.random() < 0.8 else int(rng.integers(0, 4)) for _ in range(height)]
        colour = 2 if channels == 3 else 6
        assert_same_as_pillow(write_png(pixels, colour, filters), fast=True)
        assert_same_as_pillow(write_png(pixels, colour, [4] * height), fast=True)


def test_bytes_after_the_stream_are_ignored_as_pillow_does() -> None:
    pixels = np.random.default_rng(13).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    stream = zlib.compress(filter_rows(pixels, [4] * 8))
    for tail in (b"garbage!", bytes(5), zlib.compress(b"another stream")):
        data = write_png(pixels, 2, stream=stream + tail)
        np.testing.assert_array_equal(pillow_outcome(data), pixels)
        assert_same_as_pillow(data, fast=True)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA"])
def test_pillows_own_encoder_matches(mode: str) -> None:
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (37, 41, len(mode)), dtype=np.uint8).squeeze(), mode)
    for optimize in (False, True):
        buffer = io.BytesIO()
        image.save(buffer, "PNG", optimize=optimize)
        assert_same_as_pillow(buffer.getvalue(), fast=True)


def test_metadata_chunks_are_read_past() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    before = chunk(b"gAMA", struct.pack(">I", 45455)) + chunk(b"pHYs", b"\0" * 9) + chunk(b"tEXt", b"Software\0edgecore")
    assert_same_as_pillow(write_png(pixels, 2, before=before, after=chunk(b"tEXt", b"Comment\0after")), fast=True)


def exif_orientation_6() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


@pytest.mark.parametrize("case", ["16-bit", "palette", "interlaced", "eXIf", "exif text", "tRNS", "private chunk"])
def test_files_it_leaves_alone_go_to_pillow(case: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    if case == "16-bit":
        Image.fromarray(rng.integers(0, 65536, (6, 10), dtype=np.uint16)).save(tmp_path / "x.png")
        data = (tmp_path / "x.png").read_bytes()
    elif case == "palette":
        Image.fromarray(rgb).convert("P").save(tmp_path / "x.png")
        data = (tmp_path / "x.png").read_bytes()
    elif case == "interlaced":  # a 1×1 Adam7 image is one pass of one row, so its rows are the plain ones
        data = write_png(rgb[:1, :1], 2, [0], interlace=1)
    elif case == "eXIf":  # the orientation must still be applied: Pillow decodes and rotates
        data = write_png(rgb, 2, before=chunk(b"eXIf", exif_orientation_6()))
        assert load_image(data).shape == (10, 6, 3)
    elif case == "exif text":
        text = b"Raw profile type exif\0\nexif\n" + str(len(exif_orientation_6())).encode() + b"\n" + exif_orientation_6().hex().encode()
        data = write_png(rgb, 2, after=chunk(b"tEXt", text))
    elif case == "tRNS":
        data = write_png(rgb, 2, before=chunk(b"tRNS", b"\0\1\0\2\0\3"))
    else:
        data = write_png(rgb, 2, before=chunk(b"prVt", b"anything"))
    assert png.plain_png(data) is None
    assert_same_as_pillow(data, fast=False)


def corrupt_cases() -> dict[str, bytes]:
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (8, 7, 3), dtype=np.uint8)
    rows = filter_rows(pixels, [4] * 8)
    good = write_png(pixels, 2, [4] * 8)
    bad_filter = bytearray(rows)
    bad_filter[3 * 22] = 5
    stream = zlib.compress(rows)
    return {
        "filter byte 5": write_png(pixels, 2, stream=zlib.compress(bytes(bad_filter))),
        "truncated file": good[: len(good) // 2],
        "truncated stream": write_png(pixels, 2, stream=stream[: len(stream) - 9]),
        "rows extra": write_png(pixels, 2, stream=zlib.compress(rows + rows[:22])),
        "bad adler32": write_png(pixels, 2, stream=stream[:-1] + bytes([stream[-1] ^ 1])),
        "not zlib": write_png(pixels, 2, stream=b"\x78\x9c" + bytes(40)),
        "bad IHDR crc": good[:29] + bytes([good[29] ^ 1]) + good[30:],
        "bad text crc": write_png(pixels, 2, before=chunk(b"tEXt", b"a\0b")[:-1] + b"\0"),
        "no IEND": good[:-12],
        "zero width": write_png(np.zeros((3, 0, 3), np.uint8), 2, stream=zlib.compress(b"\0" * 3)),
    }


@pytest.mark.parametrize("case", sorted(corrupt_cases()))
def test_malformed_files_get_pillows_outcome(case: str) -> None:
    data = corrupt_cases()[case]
    assert png.plain_png(data) is None or png.plain_png(data).decode() is None
    assert_same_as_pillow(data, fast=False)


def test_a_stream_that_ends_rows_early_is_refused(tmp_path: Path) -> None:
    pixels = np.random.default_rng(8).integers(0, 256, (8, 7, 3), dtype=np.uint8)
    data = write_png(pixels, 2, stream=zlib.compress(filter_rows(pixels, [4] * 8)[: -2 * 22]))
    assert isinstance(pillow_outcome(data), np.ndarray)  # Pillow fills the two missing rows black
    (tmp_path / "short.png").write_bytes(data)
    with pytest.raises(ImageError, match=r"short\.png: truncated image data .*after 6 of 8 rows"):
        load_image(tmp_path / "short.png")


def test_size_is_checked_from_the_header_before_inflating(tmp_path: Path) -> None:
    stream = zlib.compressobj()  # a 10 000 × 10 000 header (100 MP) over a tiny stream: refused, nothing inflated
    data = write_png(np.zeros((1, 1, 3), np.uint8), 2, stream=stream.compress(b"\0") + stream.flush())
    data = data[:16] + struct.pack(">II", 10_000, 10_000) + data[24:29] + struct.pack(">I", zlib.crc32(
        data[12:16] + struct.pack(">II", 10_000, 10_000) + data[24:29])) + data[33:]
    assert png.plain_png(data) is not None
    with pytest.raises(ImageError, match=r"image too large: 10000x10000"):
        load_image(data)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=r"big\.png: image too large"):
        load_image(path)


def test_without_the_native_unfilter_pillow_decodes_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_png(np.random.default_rng(5).integers(0, 256, (5, 6, 3), dtype=np.uint8), 2)
    want = load_image(data)
    monkeypatch.setattr(native, "library_path", lambda stem="_int8search": None)
    png._unfilter.cache_clear()
    try:
        assert png.plain_png(data) is None
        np.testing.assert_array_equal(load_image(data), want)
    finally:
        monkeypatch.undo()
        png._unfilter.cache_clear()
    assert png.plain_png(data) is not None


def test_paths_and_buffers_decode_alike(tmp_path: Path) -> None:
    data = write_png(np.random.default_rng(6).integers(0, 256, (7, 9, 3), dtype=np.uint8), 2)
    (tmp_path / "f.png").write_bytes(data)
    want = pillow_outcome(data)
    doubled = np.repeat(np.frombuffer(data, np.uint8), 2)
    for source in (tmp_path / "f.png", str(tmp_path / "f.png"), data, bytearray(data), memoryview(data),
                   memoryview(doubled)[::2]):  # the last one strided: Pillow reads its bytes() copy
        np.testing.assert_array_equal(load_image(source), want)


@pytest.mark.shared_data
def test_bottle_frames_decode_exactly_as_pillow(bottle: Path) -> None:
    files = sorted((bottle / "test").rglob("*.png"))[::4] + sorted((bottle / "train" / "good").glob("*.png"))[:5]
    for path in files:
        data = path.read_bytes()
        assert png.plain_png(data) is not None, path
        np.testing.assert_array_equal(load_image(path), pillow_outcome(data), err_msg=str(path))


def test_concurrent_callers_decode_alike() -> None:
    import threading

    rng = np.random.default_rng(9)
    files = [write_png(rng.integers(0, 256, (40, 30 + i, 3), dtype=np.uint8), 2) for i in range(6)]
    want = [pillow_outcome(f) for f in files]
    failures: list[str] = []

    def decode(i: int) -> None:
        for _ in range(20):
            if not np.array_equal(load_image(files[i]), want[i]):
                failures.append(f"file {i}")

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(files))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures and not any(t.is_alive() for t in threads)


# --- fuzz: mutated real and written PNGs give Pillow's pixels or an ImageError, never anything else ----------
def _chunk_spans(data: bytes) -> list[tuple[int, int, bytes]]:
    spans, pos = [], 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        spans.append((pos, length, data[pos + 4 : pos + 8]))
        pos += 12 + length
    return spans


def _with_crc(data: bytes, pos: int, length: int) -> bytes:
    crc = zlib.crc32(data[pos + 4 : pos + 8 + length])
    return data[: pos + 8 + length] + struct.pack(">I", crc) + data[pos + 12 + length :]


def mutate_png(data: bytes, rng) -> bytes:
    """One random mutation: bit flips, a cut, an IHDR field (CRC fixed), a chunk length, the inflated rows
    (filter bytes, cut or padded rows, recompressed), or an IDAT byte with its CRC fixed."""
    out = bytearray(data)
    spans = _chunk_spans(data)
    kind = rng.choice(["flip", "cut", "ihdr", "length", "rows", "idat"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "cut":
        out = out[: rng.randrange(8, len(out))]
    elif kind == "ihdr":
        offset, fmt = rng.choice([(16, ">I"), (20, ">I"), (24, "B"), (25, "B"), (28, "B")])
        value = rng.choice([0, 1, 2, 3, 4, 6, 8, 16, 255, 899, 901, 1 << 20, 0xFFFFFFFF])
        if fmt == ">I" or value < 256:
            struct.pack_into(fmt, out, offset, value)
        out = bytearray(_with_crc(bytes(out), 8, 13))
    elif kind == "length":
        pos, length, _ = rng.choice(spans)
        struct.pack_into(">I", out, pos, rng.choice([0, length - 1, length + 1, 2**31, 2**32 - 1]) % 2**32)
    elif kind == "rows":
        idat = b"".join(data[p + 8 : p + 8 + n] for p, n, k in spans if k == b"IDAT")
        raw = bytearray(zlib.decompress(idat))
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.choice([5, 6, 255, rng.randrange(256)])
        if rng.random() < 0.3:
            raw = raw[: rng.randrange(len(raw))]
        if rng.random() < 0.2:
            raw += bytes(rng.randrange(1, 5000))
        first = next(p for p, n, k in spans if k == b"IDAT")
        end = next(p for p, n, k in spans if k == b"IEND")
        out = bytearray(data[:first] + chunk(b"IDAT", zlib.compress(bytes(raw))) + data[end:])
    else:
        pos, length, _ = rng.choice([s for s in spans if s[2] == b"IDAT"])
        out[pos + 8 + rng.randrange(max(length, 1))] ^= 0xFF
        out = bytearray(_with_crc(bytes(out), pos, length))
    return bytes(out)


def fuzz_cases(seeds: list[bytes], cases: int, seed: int) -> dict[str, int | list]:
    """Decode ``cases`` mutations both ways; findings: anything but (Pillow's pixels | ImageError), or an
    ImageError where Pillow decoded, other than the short-stream refusal (Pillow fills those rows black)."""
    import random

    rng = random.Random(seed)
    counts: dict[str, int | list] = {"cases": 0, "equal": 0, "short_stream": 0, "findings": []}
    for _ in range(cases):
        data = mutate_png(rng.choice(seeds), rng)
        counts["cases"] += 1
        want = pillow_outcome(data)
        try:
            got = load_image(data)
        except ImageError as error:
            if not isinstance(want, ImageError):
                if "compressed rows end" in str(error):
                    counts["short_stream"] += 1
                else:
                    counts["findings"].append(f"refused what Pillow decoded: {error}")
            continue
        except Exception as error:  # noqa: BLE001 - exactly what the fuzz looks for
            counts["findings"].append(f"{type(error).__name__}: {error}")
            continue
        if isinstance(want, ImageError):
            counts["findings"].append(f"decoded what Pillow refused ({want})")
        elif not np.array_equal(got, want):
            counts["findings"].append("pixels differ from Pillow's")
        else:
            counts["equal"] += 1
    return counts


def fuzz_seeds() -> list[bytes]:
    rng = np.random.default_rng(12)
    seeds = []
    for colour in sorted(COLOURS):
        pixels = rng.integers(0, 256, (24, 40, COLOURS[colour]), dtype=np.uint8)
        pixels[12:] //= 5
        seeds.append(write_png(pixels, colour, [y % 5 for y in range(24)], idat_split=3))
    return seeds


def test_bounded_fuzz_gives_pillows_outcome(decode_mode: str) -> None:
    """400 mutations per mode (benchmarks/fuzz_png.py runs longer ones, bottle frames included)."""
    counts = fuzz_cases(fuzz_seeds(), 400, seed=1 if decode_mode == "libdeflate" else 2)
    assert counts["findings"] == [], counts["findings"][:5]
    assert counts["equal"] > 20  # the mutations still leave decodable files: the fast path is exercised


# The portable vector code: the same C file cross-compiled for aarch64 (NEON) and run under qemu-aarch64, and
# built for x86-64 and run under qemu-x86_64 on a CPU without AVX2 (its SSE2 path), reconstructs the rows
# filter_rows made: Paeth runs of every length among the other filters.
HARNESS = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
int ecp_unfilter(const uint8_t *, int64_t, uint8_t *, int64_t, int64_t, int);
int main(int argc, char **argv) {
    int64_t height = atoll(argv[1]), rowbytes = atoll(argv[2]);
    int bpp = atoi(argv[3]);
    int64_t n = height * (rowbytes + 1);
    uint8_t *src = malloc(n), *dst = malloc(height * rowbytes);
    if (fread(src, 1, n, stdin) != (size_t)n) return 3;
    int rc = ecp_unfilter(src, n, dst, height, rowbytes, bpp);
    if (rc) return 10 - rc;
    fwrite(dst, 1, height * rowbytes, stdout);
    return 0;
}
"""
CROSS_CC, QEMU_ARM = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
CC, QEMU_X86 = shutil.which("gcc"), shutil.which("qemu-x86_64")
EMULATED = {
    "aarch64": ([CROSS_CC], [QEMU_ARM]),
    "x86-64 without AVX2": ([CC], [QEMU_X86, "-cpu", "Westmere"]),  # SSE4.2, no AVX: the generic path
}


@pytest.mark.parametrize("target", sorted(EMULATED))
def test_unfilter_on_an_emulated_cpu(target: str, tmp_path: Path) -> None:
    compiler, runner = EMULATED[target]
    if None in compiler + runner:
        pytest.skip(f"needs {'aarch64-linux-gnu-gcc and qemu-aarch64' if target == 'aarch64' else 'gcc and qemu-x86_64'} (.ci/install)")
    (tmp_path / "harness.c").write_text(HARNESS)
    binary = tmp_path / "harness"
    source = Path(native.__file__).with_name("pngfilter.c")
    subprocess.run([*compiler, "-O2", "-std=gnu11", "-static", "-o", str(binary), str(source), str(tmp_path / "harness.c")],
                   check=True, capture_output=True, timeout=120)
    rng = np.random.default_rng(7)
    filters = [0, 1, 2, 3, 4, 4, 3, 2, 1, 4] + [4] * 17 + [2] + [4] * 8 + [1] + [4] * 7
    for bpp, width in ((3, 1501), (3, 16), (3, 15), (4, 17), (4, 9), (1, 5000), (2, 3)):
        pixels = rng.integers(0, 256, (len(filters), width, bpp), dtype=np.uint8)
        pixels[5:15] //= 9
        done = subprocess.run([*runner, str(binary), str(len(filters)), str(width * bpp), str(bpp)],
                              input=filter_rows(pixels, filters), capture_output=True, timeout=120)
        assert done.returncode == 0, done.returncode
        assert done.stdout == pixels.tobytes(), f"bpp {bpp}, width {width}"
