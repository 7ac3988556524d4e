"""A fast reader for the PNG frames cameras and datasets actually write, pixel-identical to Pillow's.

Why: decoding a 900×900 RGB PNG was 40 % of the flash path's time per frame (17 of 43 ms on the AMX Xeon,
benchmarks/RESULTS.md § "PNG decode"). Pillow spends it in zlib 1.2 and a scalar, branchy Paeth filter.
Here the IDAT stream is inflated in one call by libdeflate (the ``deflate`` wheel, a dependency; the same
bytes as zlib, about three times as fast) and the rows are reconstructed by ``native/pngfilter.c``.

Only the plain case takes this path: 8-bit gray, gray+alpha, RGB or RGBA, not interlaced, no EXIF, no
transparency chunk, nothing Pillow would read differently. :func:`plain_png` and :meth:`PlainPng.decode`
return None for everything else and for anything malformed, and :mod:`edgecore.runtime.imageio` then decodes with Pillow,
which decodes or refuses it exactly as before. So the pixels and the errors are Pillow's, with one
exception that fails closed: a stream that ends rows early is an error here, where Pillow fills them black.
Torch-free (camera side): numpy, stdlib, and the optional libdeflate binding.
"""
from __future__ import annotations

import ctypes
import struct
import zlib
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image

try:  # libdeflate's binding: whole-buffer inflate, the same bytes as zlib, about three times as fast
    import deflate as _libdeflate
except ImportError:  # pragma: no cover - the dependency is missing: the stdlib's zlib, slower
    _libdeflate = None

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

        Raises:
            ImageError: a complete zlib stream that holds fewer rows than the header says. Pillow returns
                such a frame with the missing rows black; a camera must not score pixels that are not there.
        """
        unfilter = _unfilter()
        if unfilter is None:
            return None
        step = self.width * self.channels + 1
        spans = self.idat
        stream = self.data[spans[0][0] : spans[0][1]] if len(spans) == 1 else b"".join(
            self.data[start:stop] for start, stop in spans)
        rows = inflate(stream, self.height * step)
        if rows is None or len(rows) % step:
            return None
        if len(rows) < self.height * step:
            raise ImageError(f"{name}: truncated image data (the compressed rows end after {len(rows) // step} of "
                             f"{self.height} rows)")
        pixels = np.empty((self.height, self.width, self.channels), np.uint8)
        source = np.frombuffer(rows, np.uint8)
        if unfilter(source.ctypes.data, source.size, pixels.ctypes.data, self.height, step - 1, self.channels):
            return None
        if self.channels == 3:
            return pixels
        if self.channels == 4:  # Pillow's RGBA → RGB drops alpha
            return np.ascontiguousarray(pixels[:, :, :3])
        return np.ascontiguousarray(np.repeat(pixels[:, :, :1], 3, axis=2))  # gray (+ alpha): R = G = B


def inflate(stream: bytes | memoryview, limit: int) -> bytes | bytearray | None:
    """The zlib ``stream`` inflated, or None: corrupt, without its end, or more than ``limit`` bytes.

    Bytes after the end of the stream are ignored, as Pillow ignores them. libdeflate inflates the whole
    buffer in one call (2.7 against zlib-ng's 5.2 ms for a bottle frame); the stdlib's zlib where it is missing.
    """
    if _libdeflate is not None:
        try:
            return _libdeflate.zlib_decompress(stream, limit)
        except _libdeflate.DeflateError:
            return None  # corrupt, truncated, or longer than limit (libdeflate: "insufficient space")
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(stream, limit)
        if not inflater.eof and (inflater.decompress(inflater.unconsumed_tail, 1) or not inflater.eof):
            return None  # more than limit bytes, or a stream without its end
    except zlib.error:
        return None
    return out


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
            if zlib.crc32(view[pos + 4 : data_stop]) != crc:
                return None
            if kind == b"IEND":
                return (width, height, channels, tuple(idat)) if idat else None
        pos = data_stop + 4
    return None  # no IEND: truncated


@lru_cache(maxsize=1)
def _unfilter():
    """``ecp_unfilter`` from the built ``_pngfilter`` library, or None (Pillow decodes every PNG then)."""
    return native.load_function("_pngfilter", "ecp_unfilter", [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                               ctypes.c_int64, ctypes.c_int64, ctypes.c_int])
