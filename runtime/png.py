"""A fast reader for the PNG frames cameras and datasets actually write, pixel-identical to Pillow's.

Why: decoding a 900×900 RGB PNG was 40 % of the flash path's time per frame (17 of 43 ms on the AMX Xeon,
benchmarks/RESULTS.md § "PNG decode"). Pillow spends it in zlib 1.2 and a scalar, branchy Paeth filter.
Here the IDAT stream is inflated with zlib-ng where it is installed (a dependency; the same bytes as
zlib, about twice as fast) and the rows are reconstructed by ``native/pngfilter.c``.

Only the plain case takes this path: 8-bit gray, gray+alpha, RGB or RGBA, not interlaced, no EXIF, no
transparency chunk, nothing Pillow would read differently. :func:`plain_png` and :meth:`PlainPng.decode`
return None for everything else and for anything malformed, and :mod:`edgecore.runtime.imageio` then decodes with Pillow,
which decodes or refuses it exactly as before. So the pixels and the errors are Pillow's, with one
exception that fails closed: a stream that ends rows early is an error here, where Pillow fills them black.
Torch-free (camera side): numpy, stdlib, and the optional zlib-ng.
"""
from __future__ import annotations

import ctypes
import os
import queue
import struct
import threading
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image

try:  # zlib-ng's Python binding: the same API and output as zlib, inflates about twice as fast
    from zlib_ng import zlib_ng as _zlib
except ImportError:  # pragma: no cover - the dependency is missing: the stdlib's zlib, slower
    import zlib as _zlib

from edgecore.runtime import native
from edgecore.runtime.errors import ImageError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 8-bit colour types this reader takes → channels per pixel (0 gray, 2 RGB, 4 gray+alpha, 6 RGBA).
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
# Ancillary chunks that change neither the pixels edgecore reads nor their orientation (colour
# management and metadata that ``load_image`` ignores). Any other chunk (eXIf, tRNS, APNG's acTL, a
# private one) sends the file to Pillow.
_IGNORED = frozenset({b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"pHYs", b"tIME", b"sBIT", b"bKGD", b"hIST", b"sPLT",
                      b"tEXt", b"zTXt", b"iTXt"})
BLOCK_BYTES = 1 << 18  # inflated bytes handed to the unfilter at a time (97 rows of a 900-wide RGB frame)
ENV_THREADS = "EDGECORE_DECODE_THREADS"
_TEXT = frozenset({b"tEXt", b"zTXt", b"iTXt"})
# Pillow reads EXIF (hence the orientation it applies) from a text chunk of this keyword too.
_EXIF_TEXT_KEY = b"Raw profile type exif"


def is_png(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts with the PNG signature."""
    return bytes(head[:8]) == SIGNATURE


class PlainPng(NamedTuple):
    """A PNG this reader decodes (see the module doc), from its chunks alone: nothing inflated yet."""

    data: memoryview
    width: int
    height: int
    channels: int  # bytes per pixel: 1 gray, 2 gray+alpha, 3 RGB, 4 RGBA
    idat: tuple[tuple[int, int], ...]  # (start, stop) of each IDAT chunk's data in ``data``

    def decode(self, name: str = "<bytes>") -> np.ndarray | None:
        """The H×W×3 uint8 RGB pixels, a fresh C-contiguous array equal to Pillow's decode, or None
        (a stream that is truncated, too long or corrupt, or a bad filter byte: Pillow names the problem).

        The rows are inflated in blocks of about ``BLOCK_BYTES``; with ``EDGECORE_DECODE_THREADS`` ≥ 2 (the
        default where this process may use two CPUs) a second thread reconstructs each block while the next
        one inflates (bottle's 900×900 frames: 5.0–5.5 instead of 7.0–7.4 ms).

        Raises:
            ImageError: a complete zlib stream that holds fewer rows than the header says. Pillow returns
                such a frame with the missing rows black; a camera must not score pixels that are not there.
        """
        unfilter = _unfilter()
        if unfilter is None:
            return None
        step = self.width * self.channels + 1
        pixels = np.empty((self.height, self.width, self.channels), np.uint8)
        threaded = self.height * step >= 2 * BLOCK_BYTES and decode_threads() > 1
        rows = _Rows(unfilter, pixels, _worker() if threaded else None)
        block = max(1, BLOCK_BYTES // step) * step if threaded else self.height * step  # serial: one block
        try:
            inflated = self._inflate(rows, step, block)
        finally:
            reconstructed = rows.finish()  # every block is done (or failed) before ``pixels`` can be dropped
        if inflated is None or not reconstructed:
            return None
        if inflated < self.height:
            raise ImageError(f"{name}: truncated image data (the compressed rows end after {inflated} of "
                             f"{self.height} rows)")
        if self.channels == 3:
            return pixels
        if self.channels == 4:  # Pillow's RGBA → RGB drops alpha
            return np.ascontiguousarray(pixels[:, :, :3])
        return np.ascontiguousarray(np.repeat(pixels[:, :, :1], 3, axis=2))  # gray (+ alpha): R = G = B

    def _inflate(self, rows: "_Rows", step: int, block: int) -> int | None:
        """Inflate the IDAT stream into ``rows``, ``block`` bytes (whole rows) at a time.

        Returns the number of whole rows of a well-formed stream (fewer than the height when it ends early),
        or None: a zlib error, more data than the header allows, a stream without its end, data after it,
        or a partial last row."""
        expected = self.height * step
        inflater = _zlib.decompressobj()
        pieces: list[bytes] = []
        held = total = 0
        chunks = [self.data[start:stop] for start, stop in self.idat]
        if block == expected:  # one block: inflate the joined stream in one call (a fifth of the rows' bytes)
            chunks = [chunks[0] if len(chunks) == 1 else b"".join(chunks)]
        try:
            for data in chunks:
                while data:
                    if inflater.eof:
                        return None  # data after the end of the stream
                    piece = inflater.decompress(data, block - held)  # held < block, so never 0 ("no limit")
                    data = inflater.unconsumed_tail
                    total += len(piece)
                    if total > expected:
                        return None
                    pieces.append(piece)
                    held += len(piece)
                    if held == block:
                        rows.add(b"".join(pieces), block // step)
                        pieces, held = [], 0
        except _zlib.error:
            return None
        if not inflater.eof or inflater.unused_data or held % step:
            return None
        if held:
            rows.add(b"".join(pieces), held // step)
        return total // step


class _Rows:
    """Hands inflated blocks of rows to the native unfilter, in order: directly, or on the background
    ``worker``. Each block is reconstructed from the last row of the block before it."""

    def __init__(self, unfilter, pixels: np.ndarray, worker: "_Worker | None") -> None:
        self._unfilter, self._pixels, self._worker = unfilter, pixels, worker
        self._rowbytes = pixels.shape[1] * pixels.shape[2]
        self._next = self._blocks = 0
        self._codes: list[int] = []

    def add(self, data: bytes, count: int) -> None:
        """Rows ``count`` (each a filter byte + its row) in ``data``, following the rows added before."""
        first, self._next = self._next, self._next + count
        self._blocks += 1
        base, rowbytes = self._pixels.ctypes.data, self._rowbytes
        above = base + (first - 1) * rowbytes if first else None

        def run() -> None:  # holds ``data`` and, through self, ``pixels`` until it has run
            self._codes.append(self._unfilter(data, count * (rowbytes + 1), base + first * rowbytes, count, rowbytes,
                                              self._pixels.shape[2], above))

        if self._worker is None:
            run()
        else:
            self._worker.submit(run)

    def finish(self) -> bool:
        """Wait for every block; True when each was reconstructed (no bad filter byte)."""
        if self._worker is not None:
            self._worker.drain()
        return len(self._codes) == self._blocks and not any(self._codes)


class _Worker:
    """One background thread that runs the unfilter blocks, first in, first out (shared by every caller:
    a caller's :meth:`drain` returns once the blocks it submitted have run)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="edgecore-png", daemon=True).start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:  # noqa: BLE001 - a failed block is seen by its caller (no code recorded)
                pass

    def submit(self, job) -> None:
        self._jobs.put(job)

    def drain(self) -> None:
        done = threading.Event()
        self._jobs.put(done.set)
        done.wait()


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> _Worker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
        return _WORKER


def _forget_worker() -> None:
    """A forked child has no copy of the worker's thread: it starts its own when it needs one."""
    global _WORKER, _WORKER_LOCK
    _WORKER, _WORKER_LOCK = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker)


def decode_threads() -> int:
    """Threads a large PNG is decoded with: ``EDGECORE_DECODE_THREADS``, else 2 where this process may use
    two CPUs (1: inflate and unfilter in turn, as the camera emulation runs it)."""
    value = os.environ.get(ENV_THREADS)
    if value:
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{ENV_THREADS} must be a positive integer (1: one thread), got {value!r}")
        return int(value)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 if cpus >= 2 else 1


def plain_png(data: bytes | bytearray | memoryview) -> PlainPng | None:
    """The file ``data`` as a :class:`PlainPng`, or None when Pillow must decode it (another format, a
    chunk or colour type this reader leaves alone, a bad chunk CRC, no IEND, no native unfilter).

    Every chunk but IDAT has its CRC checked, as Pillow does; IDAT corruption is caught by zlib's own
    checksum. Pillow's decompression-bomb limit is honoured too, so Pillow refuses what it always refused.
    """
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError):  # a strided or multi-format buffer: Pillow reads its bytes() copy
        return None
    if len(view) < 8 + 25 + 12 or not is_png(view[:8]) or _unfilter() is None:
        return None
    found = _chunks(view)
    if found is None:
        return None
    width, height, channels, idat = found
    bomb = Image.MAX_IMAGE_PIXELS
    if bomb and width * height > 2 * bomb:
        return None
    return PlainPng(view, width, height, channels, idat)


def _chunks(view: memoryview) -> tuple[int, int, int, tuple[tuple[int, int], ...]] | None:
    """(width, height, channels, IDAT data spans) of a plain PNG, or None (see :func:`plain_png`)."""
    pos, end = 8, len(view)
    idat: list[tuple[int, int]] = []
    width = height = channels = 0
    after_idat = False
    while pos + 12 <= end:
        length, kind = struct.unpack_from(">I4s", view, pos)
        data_start, data_stop = pos + 8, pos + 8 + length
        if data_stop + 4 > end:
            return None
        if pos == 8:
            if kind != b"IHDR" or length != 13:
                return None
            width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", view, 16)
            if depth != 8 or colour not in _CHANNELS or compression or filtering or interlace or not width or not height:
                return None
            channels = _CHANNELS[colour]
        if kind == b"IDAT":
            if after_idat:
                return None  # IDAT chunks must be consecutive
            idat.append((data_start, data_stop))
        else:
            if idat:
                after_idat = True
            if (kind == b"IHDR") != (pos == 8) or (kind not in (b"IHDR", b"IEND") and kind not in _IGNORED):
                return None
            if kind in _TEXT and bytes(view[data_start : min(data_stop, data_start + 80)]).split(b"\0")[0] == _EXIF_TEXT_KEY:
                return None
            (crc,) = struct.unpack_from(">I", view, data_stop)
            if _zlib.crc32(view[pos + 4 : data_stop]) != crc:
                return None
            if kind == b"IEND":
                return (width, height, channels, tuple(idat)) if idat else None
        pos = data_stop + 4
    return None  # no IEND: truncated


@lru_cache(maxsize=1)
def _unfilter():
    """``ecp_unfilter`` from the built ``_pngfilter`` library, or None (Pillow decodes every PNG then)."""
    return native.load_function("_pngfilter", "ecp_unfilter", [ctypes.c_char_p, ctypes.c_int64, ctypes.c_void_p,
                                                               ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                                               ctypes.c_void_p])
