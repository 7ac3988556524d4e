"""Error types shared by the host and the camera runtime.

Every error names the offending file (or field) so that a user can act on it
without reading a traceback.
"""
from __future__ import annotations


class EdgecoreError(Exception):
    """Base class: anything edgecore raises on purpose."""


class ImageError(EdgecoreError):
    """An image (file, bytes or array) that cannot be decoded or used."""


class DatasetError(EdgecoreError):
    """A dataset folder that is missing, empty or inconsistent."""


class ModelError(EdgecoreError):
    """A model directory that is missing, incomplete or inconsistent."""


class BundleError(EdgecoreError):
    """A bundle or archive that fails verification."""


class WeightsError(EdgecoreError):
    """Pretrained weights that are missing or unusable (we never fall back to random init)."""


class NonFiniteError(EdgecoreError):
    """A frame whose engine output or score is NaN/infinite: an error, never a verdict
    (a NaN score compares False with the threshold and would read as "normal")."""
