"""The manifest's ``coreset.denoise`` record: which training images `fit --denoise` left out of the bank.

The camera never acts on it (the bank it holds is already the cleaned one); it is
provenance an operator reads (`edgecore info`, the manifest) to review the flagged
images. It is still checked like every field: a record that contradicts itself
(counts vs the flagged list, an unknown mode) means the bundle was edited or
written by another tool, so it is refused rather than trusted.
"""
from __future__ import annotations

import math

from edgecore.runtime.errors import BundleError

MODES = ("auto", "fraction")


def _count(record: dict, key: str, where: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BundleError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
    return value


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_denoise_record(record: object, where: str) -> None:
    """Raise BundleError unless ``record`` is a consistent ``coreset.denoise`` object."""
    if not isinstance(record, dict):
        raise BundleError(f"{where}: expected an object")
    mode = record.get("mode")
    if mode not in MODES:
        raise BundleError(f"{where}.mode: {mode!r} is not one of {', '.join(MODES)}")
    fraction = record.get("fraction")
    if (mode == "fraction") != (fraction is not None) or (
        fraction is not None and not (_number(fraction) and 0.0 < fraction < 0.5)
    ):
        raise BundleError(f"{where}.fraction: {fraction!r} does not fit mode {mode!r} (a fraction in (0, 0.5))")
    scored, dropped = _count(record, "images_scored", where), _count(record, "images_dropped", where)
    _count(record, "patches_dropped", where)
    if dropped >= max(scored, 1):
        raise BundleError(f"{where}: images_dropped {dropped} leaves no image of the {scored} scored")
    flagged = record.get("flagged")
    if not isinstance(flagged, list) or len(flagged) != dropped:
        raise BundleError(f"{where}.flagged: expected a list of the {dropped} dropped images")
    for i, entry in enumerate(flagged):
        if not (isinstance(entry, dict) and isinstance(entry.get("source"), str)
                and _number(entry.get("score")) and _number(entry.get("z"))):
            raise BundleError(f"{where}.flagged[{i}]: expected {{source: str, score: number, z: number}}")
