"""The served model and its hot swap: verify → open → warm → swap, in-flight frames finish on the old.

A frame takes a *lease* on the current detector; a reload opens and warms the
new bundle off to the side, then replaces the pointer under a lock. The old
detector is closed only when its last lease is returned, so no frame is cut off
or scored twice; a bundle that fails anywhere before the swap is refused and the
old one keeps serving.
"""
from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecore.runtime.bundle import MANIFEST
from edgecore.runtime.detector import Detector
from edgecore.runtime.errors import BundleError


@dataclass
class Served:
    detector: Detector
    version: str  # short hash of the manifest: changes with every rewrite (threshold, engines)
    name: str
    leases: int = 0
    retired: bool = False


def model_version(bundle: Path) -> str:
    """sha256 of manifest.json (which lists every file's hash), first 12 hex digits."""
    path = bundle / MANIFEST if bundle.is_dir() else bundle
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def model_name(bundle: Path) -> str:
    return bundle.name.removesuffix(".tar").removesuffix(".edgecore") or "model"


def warm(detector: Detector) -> None:
    """One frame at the bundle's size through the whole pipeline: compiles lazily-built kernels now,
    and refuses a bundle whose scores are not finite (it would call every frame good)."""
    size = detector.preprocess_config.resize
    frame = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    result = detector.detect(frame)
    if not (np.isfinite(result.score) and np.isfinite(result.map).all()):
        raise BundleError(f"{detector.bundle.path}: warm-up frame scored {result.score!r} (not finite); refused")


class ModelSlot:
    """Holds the serving detector; thread-safe lease / swap."""

    def __init__(self, bundle: Path, **open_options) -> None:
        self.bundle = Path(bundle)
        self.open_options = open_options
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._current = self._open()

    def _open(self) -> Served:
        version = model_version(self.bundle)
        detector = Detector.open(self.bundle, **self.open_options)
        try:
            warm(detector)
        except BaseException:
            detector.close()
            raise
        return Served(detector, version, model_name(self.bundle))

    @property
    def current(self) -> Served:
        return self._current

    @contextmanager
    def lease(self):
        """The detector to score one frame with; it stays open until the frame is done."""
        with self._lock:
            served = self._current
            served.leases += 1
        try:
            yield served
        finally:
            self._release(served)

    def _release(self, served: Served) -> None:
        with self._lock:
            served.leases -= 1
            close = served.retired and served.leases == 0
        if close:
            served.detector.close()

    def reload(self) -> tuple[Served, Served]:
        """Open + warm the bundle now on disk and swap it in; returns (old, new).

        Raises (BundleError, …) with the old model still serving when anything fails.
        """
        with self._reload_lock:  # two reloads at once would open two engines for nothing
            new = self._open()
            with self._lock:
                old, self._current = self._current, new
                old.retired = True
                close = old.leases == 0
            if close:
                old.detector.close()
            return old, new

    def close(self) -> None:
        with self._lock:
            served = self._current
            served.retired = True
            close = served.leases == 0
        if close:
            served.detector.close()
