"""edgecore.runtime — the slim, torch-free part that runs on the camera.

It imports numpy, Pillow, the index library and the inference backend, nothing
else; the workstation side reuses its preprocessing and scoring so both compute
the same thing.
"""
from edgecore.runtime.errors import BundleError, EdgecoreError, ImageError

__all__ = ["BundleError", "EdgecoreError", "ImageError"]
