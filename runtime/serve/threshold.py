"""`edgecore threshold`: move a bundle's decision boundary without refitting.

The bundle stores the held-out normal images' scores (top level, and per engine
where `compile --refit-threshold` scored them with that engine), so a new
false-alarm rate is re-derived from them with the same code as `fit`; a fixed
value just replaces it. The manifest is rewritten through the runtime's atomic
bundle swap, so a running `edgecore serve` sees the old or the new boundary,
never half of one, and picks it up on reload.
"""
from __future__ import annotations

from pathlib import Path

from edgecore.runtime.bundle import rewrite_bundle
from edgecore.runtime.errors import BundleError
from edgecore.runtime.thresholds import threshold_config


def _decisions(manifest: dict) -> list[tuple[str, dict]]:
    """Every decision boundary in the manifest: the bundle's and each engine's own."""
    found = [("threshold", manifest["threshold"])]
    for key, engine in sorted(manifest.get("engines", {}).items()):
        if "threshold" in engine:
            found.append((f"engines[{key!r}].threshold", engine["threshold"]))
    return found


def _from_rate(where: str, entry: dict, rate: float) -> dict:
    scores = entry.get("validation_scores")
    if not scores:
        raise BundleError(
            f"{where}: the bundle stores no validation scores (exported by an older edgecore); "
            "re-export it, or set a fixed value with --value"
        )
    updated = threshold_config(scores, rate, held_out=bool(entry.get("from_held_out_normals", True)))
    return {**{k: v for k, v in entry.items() if k == "source"}, **updated}


def _from_value(entry: dict, value: float) -> dict:
    normalization = {**entry["normalization"], "threshold": value}
    return {**entry, "value": value, "mode": "value", "normalization": normalization}


def set_threshold(bundle: str | Path, false_alarm_rate: float | None = None, value: float | None = None) -> dict:
    """Rewrite every decision boundary of a bundle directory atomically; returns the new manifest.

    Args:
        bundle: a bundle directory (an archive must be unpacked first: it is what gets flashed).
        false_alarm_rate: allowed share of normal images flagged, in [0, 1) — re-derived from the
            stored validation scores.
        value: a fixed raw-score threshold instead.
    """
    if (false_alarm_rate is None) == (value is None):
        raise ValueError("give exactly one of --false-alarm-rate R or --value V")
    if false_alarm_rate is not None and not 0.0 <= false_alarm_rate < 1.0:
        raise ValueError(f"--false-alarm-rate must be in [0, 1), got {false_alarm_rate}")
    if value is not None and not (value == value and abs(value) != float("inf")):
        raise ValueError(f"--value must be a finite number, got {value}")
    bundle = Path(bundle)
    if bundle.is_file():
        raise BundleError(f"{bundle}: an archive; `edgecore unpack` it and set the threshold on the directory")

    def change(staging: Path, manifest: dict) -> dict:
        for where, entry in _decisions(manifest):
            updated = _from_rate(where, entry, false_alarm_rate) if value is None else _from_value(entry, value)
            entry.clear()
            entry.update(updated)
        return manifest

    return rewrite_bundle(bundle, change)
