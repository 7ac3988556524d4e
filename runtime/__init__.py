"""edgecore.runtime — the slim, torch-free part that runs on the camera.

It imports numpy, Pillow, the index library and the inference backend, nothing
else; the workstation side reuses its preprocessing and scoring so both compute
the same thing::

    from edgecore.runtime import Detector
    with Detector.open("bottle.edgecore") as det:
        result = det.detect("frame.png")

Public names load on first use, so ``import edgecore.runtime`` stays cheap (no OpenVINO).
"""
from __future__ import annotations

from importlib import import_module

from edgecore.runtime.errors import BundleError, EdgecoreError, ImageError

_LAZY = {
    "Detector": "edgecore.runtime.detector",
    "Detection": "edgecore.runtime.scorer",
    "Decision": "edgecore.runtime.scorer",
    "PatchScorer": "edgecore.runtime.scorer",
    "PreprocessConfig": "edgecore.runtime.preprocess",
    "preprocess": "edgecore.runtime.preprocess",
    "load_image": "edgecore.runtime.imageio",
    "verify_bundle": "edgecore.runtime.bundle",
    "BACKENDS": "edgecore.runtime.backends",
}

__all__ = ["BundleError", "EdgecoreError", "ImageError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgecore.runtime' has no attribute {name!r}")
