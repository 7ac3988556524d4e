"""Image decoding shared by the workstation and the camera.

Everything that enters edgecore goes through :func:`load_image`, so training,
evaluation and the camera see the *same* pixels for the same file: RGB, uint8,
H x W x 3, EXIF orientation applied, C-contiguous and never aliasing the
caller's memory. Every failure is an :class:`ImageError` whose message starts
with the offending file (``<bytes>`` / ``<array>`` for in-memory input) and says
what is wrong, so an operator can act on it without a traceback.

Torch-free on purpose: this module runs on the camera (numpy, Pillow, stdlib).
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgecore.runtime import png
from edgecore.runtime.errors import DatasetError, ImageError

__all__ = [
    "ALLOWED_FORMATS", "MAX_ASPECT_RATIO", "MAX_PIXELS", "ImageSource", "check_geometry", "image_size", "load_image",
    "load_mask", "open_image",
]

#: Largest image (width * height) decoded by default. A 80 MP frame is ~240 MB
#: as RGB; anything larger is far more likely a corrupt or hostile header than
#: a real inspection image, and decoding it could exhaust a camera's memory.
MAX_PIXELS = 80_000_000

#: Largest long-side / short-side ratio. The anomaly map is resized back to the
#: frame's own size, so an 80000000x1 strip (80 MP, 233 KB as PNG) would cost
#: gigabytes there; no inspection frame is that thin (a 1024x2 strip is fine).
MAX_ASPECT_RATIO = 1024

#: The only Pillow decoders a frame may reach, in the runtime and on the host
#: alike (PPM covers PGM/PBM). Pillow would otherwise pick a plugin from the
#: file's bytes whatever its name: a PostScript file named ``frame.png`` makes the
#: EPS plugin run Ghostscript. Everything here decodes inside Pillow itself.
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "PPM", "WEBP", "GIF")

#: Float arrays may overshoot [0, 1] by this much (resampling round-off).
_FLOAT_TOLERANCE = 1e-6

ImageSource = Union[str, os.PathLike[str], bytes, bytearray, memoryview, np.ndarray]

_ACCEPTED_ARRAYS = (
    "accepted: uint8 or uint16 arrays shaped HxW, HxWx1, HxWx3 or HxWx4 (alpha dropped), "
    "or float32/float64 arrays of those shapes with values in [0, 1]"
)


def load_image(source: ImageSource, *, max_pixels: int = MAX_PIXELS, copy: bool = True) -> np.ndarray:
    """Return ``source`` as a C-contiguous uint8 H x W x 3 RGB array (a fresh copy).

    ``source`` is a path, the bytes of an encoded file, or a numpy array.
    ``max_pixels`` bounds encoded input only (checked from the header, before
    decoding); an array is already in memory, so there is nothing to guard.
    ``copy=False`` (for readers that never write, like ``detect``): an array that is
    already C-contiguous uint8 RGB comes back as it is, validated but not copied.
    """
    if isinstance(source, np.ndarray):
        if source.ndim in (2, 3) and source.size:
            check_geometry("<array>", source.shape[1], source.shape[0], max_pixels=None)
            if not copy and source.dtype == np.uint8 and source.shape[2:] == (3,) and source.flags.c_contiguous:
                return source
        return _array_to_rgb(source)
    name, opener = _opener(source)
    fast = _plain_png(name, source, max_pixels)
    if fast is not None:
        return fast
    return _decode(name, opener, max_pixels, _pil_to_rgb)


def load_mask(path: str | os.PathLike[str], expected_hw: tuple[int, int] | None) -> np.ndarray:
    """Return a ground-truth mask as bool H x W (any nonzero channel = defect).

    ``expected_hw`` (height, width), when given, must match the mask: a mask of
    another size would silently mislabel pixels, so it is a :class:`DatasetError`.
    Masks are decoded like images (same errors, EXIF orientation honoured so a
    mask stays aligned with its image).
    """
    name, opener = _opener(path)
    mask = _decode(name, opener, MAX_PIXELS, _pil_to_mask)
    if expected_hw is not None and mask.shape != tuple(expected_hw):
        raise DatasetError(
            f"{name}: mask is {_hw(mask.shape)} but its image is {_hw(expected_hw)}; "
            "a mask must have exactly the size of its image"
        )
    return mask


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return (height, width) from the file header without decoding the pixels.

    Cheap enough to scan a whole dataset; EXIF orientation is *not* applied
    (that needs the EXIF block, not the pixels, but callers use this to size
    buffers and bound memory, for which the stored size is what matters).
    """
    name, opener = _opener(path)
    with _pillow_errors(name):
        with opener() as img:
            width, height = img.size
    return height, width


# --------------------------------------------------------------------------- decoding


def _opener(source: object) -> tuple[str, Callable[[], Image.Image]]:
    """Return (name for messages, a function that opens the image lazily)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("<bytes>: empty input (0 bytes), not an image")
        return "<bytes>", lambda: open_image(io.BytesIO(data))
    if not isinstance(source, (str, os.PathLike)):
        raise ImageError(
            f"cannot load an image from {type(source).__name__}; "
            "expected a path, the bytes of an image file or a numpy array"
        )
    path = os.fsdecode(os.fspath(source))
    _check_file(path)
    return path, lambda: open_image(path)


def _plain_png(name: str, source: object, max_pixels: int) -> np.ndarray | None:
    """A plain PNG's pixels by :mod:`edgecore.runtime.png` (2.1× faster than Pillow on one thread, 2.9× on
    two; the same pixels), after the same header checks; None for every other file (Pillow decodes it)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = source
    else:
        try:
            with open(source, "rb") as file:
                if not png.is_png(file.read(8)):
                    return None
                file.seek(0)
                data = file.read()
        except OSError:
            return None  # Pillow's opener reports it
    plain = png.plain_png(data)
    if plain is None:
        return None
    check_geometry(name, plain.width, plain.height, max_pixels=max_pixels)
    return plain.decode(name)


def open_image(source: str | os.PathLike[str] | io.BytesIO) -> Image.Image:
    """``Image.open`` restricted to :data:`ALLOWED_FORMATS` (the one opener of every frame).

    Raises Pillow's UnidentifiedImageError for anything else, so no other plugin
    (EPS/Ghostscript, PDF, ICNS, ...) ever sees the bytes.
    """
    return Image.open(source, formats=ALLOWED_FORMATS)


def check_geometry(name: str, width: int, height: int, *, max_pixels: int | None = MAX_PIXELS) -> None:
    """Refuse a frame whose size would exhaust memory, from its header alone (before decoding).

    Args:
        name: the file (or ``<bytes>`` / ``<array>``) named in the error.
        width, height: the stored size in pixels.
        max_pixels: the pixel budget; None checks the aspect ratio only.
    """
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height} WxH)")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"{name}: image too large: {width}x{height} (WxH) = {width * height:,} pixels "
            f"exceeds the limit of {max_pixels:,} pixels"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"{name}: image too large: {width}x{height} (WxH) is a {ratio:,.0f}:1 strip, beyond the "
            f"{MAX_ASPECT_RATIO}:1 aspect limit (its anomaly map would not fit in memory)"
        )


def _check_file(path: str) -> None:
    """Turn the common file-system problems into plain-language errors."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{path}: cannot read file ({getattr(exc, 'strerror', None) or exc})") from None
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a folder, not an image file")
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes), not an image")


@contextmanager
def _pillow_errors(name: str) -> Iterator[None]:
    """Turn any decoder failure into an ImageError naming the file.

    Pillow signals bad input with OSError, SyntaxError, ValueError, EOFError,
    struct.error, ... depending on the plugin; for the caller they all mean
    "this file cannot be used", so we catch them broadly. Pillow's
    DecompressionBombWarning is silenced because our own ``max_pixels`` check
    (stricter by default) is the authoritative one; Pillow's
    DecompressionBombError (twice its own limit) still becomes an ImageError.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except (ImageError, DatasetError, MemoryError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"{name}: not an image, or not in an accepted format ({', '.join(ALLOWED_FORMATS)})"
        ) from exc
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise ImageError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    except OSError as exc:
        if "truncated" in str(exc):
            raise ImageError(f"{name}: truncated image data ({exc})") from exc
        raise ImageError(f"{name}: corrupt image data ({exc})") from exc
    except Exception as exc:
        raise ImageError(f"{name}: corrupt image data ({type(exc).__name__}: {exc})") from exc


def _decode(
    name: str,
    opener: Callable[[], Image.Image],
    max_pixels: int,
    to_array: Callable[[Image.Image, str], np.ndarray],
) -> np.ndarray:
    """Open, size-check from the header, fully decode, apply EXIF orientation, convert.

    Conversion happens while the file is open so no extra copy of a large image
    is needed.
    """
    with _pillow_errors(name), opener() as img:
        width, height = img.size
        check_geometry(name, width, height, max_pixels=max_pixels)
        img.load()  # decode everything now, so a truncated file fails here
        ImageOps.exif_transpose(img, in_place=True)
        return to_array(img, name)


def _pil_to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """Convert any Pillow mode to uint8 RGB with edgecore's fixed rules."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit data: 65535 -> 255. "I" (32-bit) is read as 16-bit-range data,
        # which is what it holds in practice (older Pillows open 16-bit PNGs as "I").
        return _gray_to_rgb(_scale_16bit(np.asarray(img)))
    if mode == "F":
        return _gray_to_rgb(np.rint(np.clip(np.asarray(img), 0.0, 255.0)).astype(np.uint8))
    if mode == "P":
        # Via RGBA: Pillow warns (and may mishandle) P -> RGB with an alpha table.
        img = img.convert("RGBA")
    try:
        rgb = img if mode == "RGB" else img.convert("RGB")  # convert() of an RGB image is one more copy
    except (ValueError, OSError) as exc:
        raise ImageError(f"{name}: unsupported image mode {mode!r} ({exc})") from exc
    return np.array(rgb, dtype=np.uint8, order="C")


def _pil_to_mask(img: Image.Image, name: str) -> np.ndarray:
    """Nonzero = defect, read at the file's native depth (no 16-bit rounding to 0)."""
    if img.mode in ("1", "L", "F") or img.mode.startswith("I"):
        return np.array(np.asarray(img) != 0, order="C")
    return _pil_to_rgb(img, name).any(axis=2)


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """round(v / 257) in exact integer arithmetic, so 65535 -> 255 and 257 * k -> k."""
    v = np.clip(values, 0, 65535).astype(np.uint32)
    return ((v * 2 + 257) // 514).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


# --------------------------------------------------------------------------- arrays


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Validate an in-memory image and return an RGB uint8 copy."""
    what = f"<array>: got shape {array.shape} dtype {array.dtype}"
    if array.size == 0:
        raise ImageError(f"{what}: empty array; {_ACCEPTED_ARRAYS}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"{what}: wrong shape; {_ACCEPTED_ARRAYS}")
    array = array[:, :, :3] if array.shape[2] == 4 else array
    if array.dtype == np.uint8:
        out = array
    elif array.dtype == np.uint16:
        out = _scale_16bit(array)
    elif array.dtype in (np.float32, np.float64):
        out = _float_to_uint8(array, what)
    else:
        raise ImageError(f"{what}: unsupported dtype; {_ACCEPTED_ARRAYS}")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)  # always a new array
    return np.array(out, dtype=np.uint8, order="C", copy=True)


def _float_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise ImageError(f"{what}: contains NaN or infinity; {_ACCEPTED_ARRAYS}")
    low, high = float(array.min()), float(array.max())
    if low < -_FLOAT_TOLERANCE or high > 1.0 + _FLOAT_TOLERANCE:
        raise ImageError(
            f"{what}: float values span [{low:g}, {high:g}], outside [0, 1] "
            f"(did you pass 0-255 floats? divide by 255); {_ACCEPTED_ARRAYS}"
        )
    return np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[1]} (HxW)"
