"""The Python side of libedgecore.so, the C API (see edgecore.h and README.md).

`build.py` compiles the library with cffi's embedding mode; the init code frozen
into it imports this module and calls :func:`install`, which binds the Python
"twins" (declared with cffi's ``embedding_api``) that the exported C wrappers
call. Each twin:

* returns ``DONE | status``: cffi makes such a function return 0 when its own
  start-up failed, and 0 is EC_OK, so the C side only trusts a result carrying
  the DONE bit;
* catches every exception (BaseException included) and turns it into a status
  code plus a thread-local message stored on the C side (``_ec_set_error``):
  nothing Python ever unwinds into the C caller;
* never trusts the caller's width/height/stride: the span of memory it reads is
  validated and bounded before a buffer over the caller's pointer is made.

Handles are small integers (the C pointer is the id cast to a pointer), so a
stale or bogus handle is an error code, never a dereference.

Importing this module is cheap (no engine, no torch); ``Detector`` is imported
on the first ``ec_open``.
"""
from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgecore.runtime.imageio import MAX_PIXELS as IMAGE_MAX_PIXELS

HEADER = Path(__file__).with_name("edgecore.h")

# Mirrors of the header's enums (the C build checks them against edgecore.h:
# build.py feeds the header's declarations to cffi, which verifies the values).
EC_OK, EC_ERR_NULL_ARGUMENT, EC_ERR_INVALID_ARGUMENT, EC_ERR_BUFFER_TOO_SMALL = 0, 1, 2, 3
EC_ERR_BUNDLE, EC_ERR_IMAGE, EC_ERR_RUNTIME, EC_ERR_INVALID_HANDLE, EC_ERR_NONFINITE = 4, 5, 6, 7, 8
EC_PIXEL_RGB8, EC_PIXEL_BGR8, EC_PIXEL_GRAY8 = 0, 1, 2
_CHANNELS = {EC_PIXEL_RGB8: 3, EC_PIXEL_BGR8: 3, EC_PIXEL_GRAY8: 1}
_FORMAT_NAMES = "EC_PIXEL_RGB8=0, EC_PIXEL_BGR8=1, EC_PIXEL_GRAY8=2"
_MESSAGE_BYTES = 1000  # the C buffer is 1024 bytes; keep room for the NUL
MAX_PIXELS = IMAGE_MAX_PIXELS  # EC_MAX_PIXELS: the same cap as every decoded frame
MAX_FRAME_BYTES = 1 << 30  # EC_MAX_FRAME_BYTES


class ApiError(Exception):
    """An error with an explicit C status code (argument validation)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Registry:
    """Open detectors by integer id; the lock makes open/close/lookup atomic across C threads."""

    def __init__(self) -> None:
        self._items: dict[int, Any] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, detector: Any) -> int:
        with self._lock:
            handle = next(self._ids)
            self._items[handle] = detector
            return handle

    def get(self, handle: int) -> Any:
        with self._lock:
            detector = self._items.get(handle)
        if detector is None:
            raise ApiError(EC_ERR_INVALID_HANDLE, f"handle {handle:#x} is not open (never opened, or already closed)")
        return detector

    def pop(self, handle: int) -> Any | None:
        with self._lock:
            return self._items.pop(handle, None)


_registry = _Registry()


def status_for(exc: BaseException, during_open: bool = False) -> int:
    """The C status for an exception (the message is produced by :func:`describe`)."""
    from edgecore.runtime.errors import BundleError, ImageError, NonFiniteError

    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, NonFiniteError):
        return EC_ERR_NONFINITE
    if isinstance(exc, BundleError):
        return EC_ERR_BUNDLE
    if isinstance(exc, ImageError):
        return EC_ERR_IMAGE
    if during_open and isinstance(exc, (FileNotFoundError, NotADirectoryError, PermissionError)):
        return EC_ERR_BUNDLE
    if during_open and isinstance(exc, ValueError):
        return EC_ERR_INVALID_ARGUMENT  # open_backend: unknown backend / precision
    return EC_ERR_RUNTIME


def describe(where: str, exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if not isinstance(exc, ApiError) and type(exc).__module__ != "edgecore.runtime.errors":
        text = f"{type(exc).__name__}: {text}"  # unexpected errors: say what kind
    return f"{where}: {text}"


def frame_view(
    ffi: Any, pixels: Any, width: int, height: int, stride: int, fmt: int,
    max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_FRAME_BYTES,
) -> np.ndarray:
    """A read-only numpy view of the caller's frame, laid out as RGB (H×W×3) or gray (H×W).

    Only after validating every number do we wrap the pointer, and the wrapped
    span is exactly what the documented layout says is readable. The view is
    not copied here: ``load_image`` (called by ``Detector.detect``) reads a
    C-contiguous RGB frame in place during the call and makes one RGB copy of any
    other layout (BGR→RGB, GRAY→RGB, padded strides); nothing keeps the caller's
    memory after the call returns.
    """
    if fmt not in _CHANNELS:
        raise ApiError(EC_ERR_INVALID_ARGUMENT, f"unknown pixel format {fmt} (expected {_FORMAT_NAMES})")
    if width <= 0 or height <= 0:
        raise ApiError(EC_ERR_INVALID_ARGUMENT, f"width and height must be > 0, got {width}x{height}")
    if width * height > max_pixels:
        raise ApiError(EC_ERR_INVALID_ARGUMENT, f"frame {width}x{height} has more than EC_MAX_PIXELS={max_pixels} pixels")
    channels = _CHANNELS[fmt]
    row = width * channels
    if stride < row:
        raise ApiError(
            EC_ERR_INVALID_ARGUMENT,
            f"stride {stride} bytes is smaller than a row ({width} px x {channels} bytes = {row})",
        )
    span = stride * (height - 1) + row
    if span > max_bytes:
        raise ApiError(
            EC_ERR_INVALID_ARGUMENT,
            f"stride {stride} x height {height} spans {span} bytes, more than EC_MAX_FRAME_BYTES={max_bytes}",
        )
    flat = np.frombuffer(ffi.buffer(pixels, span), dtype=np.uint8)
    view = np.lib.stride_tricks.as_strided(
        flat, shape=(height, width, channels), strides=(stride, channels, 1), writeable=False
    )
    if fmt == EC_PIXEL_BGR8:
        return view[:, :, ::-1]
    if fmt == EC_PIXEL_GRAY8:
        return view[:, :, 0]  # load_image replicates gray into R = G = B
    return view


def _text(ffi: Any, value: Any) -> str | None:
    """A C string argument (NULL = None); paths keep undecodable bytes via surrogateescape."""
    return None if value == ffi.NULL else os.fsdecode(ffi.string(value))


def install(ffi: Any, lib: Any) -> None:
    """Bind the Python twins of the compiled library (called once by its init code)."""
    done = int(lib.EC__DONE)
    mirrors = {name: value for name, value in globals().items() if name.startswith(("EC_OK", "EC_ERR_", "EC_PIXEL_"))}
    mirrors.update(EC_MAX_PIXELS=MAX_PIXELS, EC_MAX_FRAME_BYTES=MAX_FRAME_BYTES)
    stale = {name: (value, getattr(lib, name)) for name, value in mirrors.items() if getattr(lib, name) != value}
    if stale:  # fails the library's start-up, which every C call then reports
        raise RuntimeError(f"edgecore.runtime.capi is out of sync with edgecore.h (python, C): {stale}")

    def set_error(message: str) -> None:
        data = message.encode("utf-8", "replace")[:_MESSAGE_BYTES]
        lib._ec_set_error(data.decode("utf-8", "ignore").encode("utf-8"))  # never cut a character in half

    def guarded(where: str, during_open: bool = False) -> Callable[[Callable[..., int]], Callable[..., int]]:
        """Run the body; map any exception to DONE | status with the message set for this thread."""

        def wrap(body: Callable[..., int]) -> Callable[..., int]:
            def call(*args: Any) -> int:
                try:
                    return done | body(*args)
                except BaseException as exc:  # noqa: BLE001 — nothing may cross the C boundary
                    try:
                        set_error(describe(where, exc))
                        return done | status_for(exc, during_open)
                    except BaseException:  # noqa: BLE001 — even describing failed (e.g. MemoryError)
                        return done | EC_ERR_RUNTIME

            call.__name__ = body.__name__
            return call

        return wrap

    def on_unexpected(exc_type: type, exc: BaseException, tb: Any) -> None:
        """cffi's last resort if an exception escaped `guarded` anyway (it returns `error=`)."""
        try:
            set_error(f"edgecore: internal error: {exc_type.__name__}: {exc}")
        except BaseException:  # noqa: BLE001
            pass

    extern = lambda: ffi.def_extern(error=done | EC_ERR_RUNTIME, onerror=on_unexpected)  # noqa: E731
    import edgecore

    version = ffi.new("char[]", edgecore.__version__.encode())  # kept alive by the closure below

    @ffi.def_extern(onerror=on_unexpected)
    def _ec_py_version() -> Any:
        return version

    @extern()
    @guarded("ec_open", during_open=True)
    def _ec_py_open(path: Any, backend: Any, device: Any, precision: Any, out_id: Any) -> int:
        from edgecore.runtime.detector import Detector

        detector = Detector.open(
            _text(ffi, path), backend=_text(ffi, backend) or "openvino",
            device=_text(ffi, device), precision=_text(ffi, precision),
        )
        out_id[0] = _registry.add(detector)
        return EC_OK

    @extern()
    @guarded("ec_map_size")
    def _ec_py_map_size(handle: int, width: Any, height: Any) -> int:
        map_h, map_w = _registry.get(int(handle)).preprocess_config.map_hw
        width[0], height[0] = int(map_w), int(map_h)
        return EC_OK

    @extern()
    @guarded("ec_detect")
    def _ec_py_detect(
        handle: int, pixels: Any, width: int, height: int, stride: int, fmt: int,
        out: Any, map_out: Any, capacity: int,
    ) -> int:
        detector = _registry.get(int(handle))
        frame = frame_view(ffi, pixels, width, height, stride, fmt)
        # The map covers the graph input: crop×crop, input_size (pad/crop), or a tile bundle's canvas_size.
        map_h, map_w = (int(v) for v in detector.preprocess_config.map_hw)
        if map_out != ffi.NULL and capacity < map_h * map_w:
            raise ApiError(
                EC_ERR_BUFFER_TOO_SMALL,
                f"map buffer holds {capacity} floats; this bundle's map is {map_w}x{map_h} = {map_h * map_w} "
                "(see ec_map_size)",
            )
        result = detector.detect(frame)
        if map_out != ffi.NULL:
            if result.map.shape != (map_h, map_w):
                raise RuntimeError(f"map shape {result.map.shape} is not the graph input {map_h}x{map_w}")
            target = np.frombuffer(ffi.buffer(map_out, map_h * map_w * 4), dtype=np.float32)
            target[:] = detector.normalization(result.map).reshape(-1)
        out.score = float(result.score)
        out.normalized_score = float(result.normalized_score)
        out.is_anomalous = 1 if result.is_anomalous else 0
        return EC_OK

    @extern()
    @guarded("ec_close")
    def _ec_py_close(handle: int) -> int:
        detector = _registry.pop(int(handle))
        if detector is None:
            raise ApiError(EC_ERR_INVALID_HANDLE, f"handle {int(handle):#x} is not open (never opened, or already closed)")
        detector.close()
        return EC_OK
