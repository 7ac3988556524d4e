"""The manifest's ``coreset.augment`` record: which rotations/flips `fit --augment` added to the bank.

Provenance only (the camera scores with the bank it holds); still checked like every
field, so a record that contradicts itself is refused rather than trusted.
"""
from __future__ import annotations

from edgecore.runtime.errors import BundleError

NAMES = ("rot90", "rot180", "rot270", "hflip", "vflip")  # edgecore.augment.TRANSFORMS (host) keeps the same names


def validate_augment_record(record: object, where: str) -> None:
    """Raise BundleError unless ``record`` is a consistent ``coreset.augment`` object."""
    if not isinstance(record, dict):
        raise BundleError(f"{where}: expected an object")
    names = record.get("transforms")
    if (not isinstance(names, list) or not names or len(set(map(str, names))) != len(names)
            or any(n not in NAMES for n in names)):
        raise BundleError(f"{where}.transforms: expected distinct names from {', '.join(NAMES)}, got {names!r}")
    counts = [record.get(k) for k in ("bank_patches_unaugmented", "bank_patches")]
    if any(not isinstance(c, int) or isinstance(c, bool) or c <= 0 for c in counts):
        raise BundleError(f"{where}: bank patch counts must be positive integers, got {counts!r}")
    if counts[1] != counts[0] * (1 + len(names)):
        raise BundleError(f"{where}: bank_patches {counts[1]} != {counts[0]} × (1 + {len(names)} transforms)")
