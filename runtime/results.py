"""The one scoring loop behind `infer` (camera) and `predict` (host): frames in, JSON lines out.

Every frame gets one JSON line (stdout and ``OUT/results.jsonl``) whether or not
an overlay is drawn; overlays (``all``, ``anomalous`` or ``none``) are named after
the frame's relative path (:func:`~edgecore.runtime.frames.output_names`), so no
two frames ever share a file.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgecore.runtime.errors import ImageError
from edgecore.runtime.frames import expand_images, output_names
from edgecore.runtime.imageio import load_image
from edgecore.runtime.overlay import OVERLAY_SUFFIX, render_overlay, save_overlay
from edgecore.runtime.scorer import ImageScorer

OVERLAY_CHOICES = ("all", "anomalous", "none")
RESULTS_FILE = "results.jsonl"


@dataclass
class RunSummary:
    images: int = 0
    anomalous: int = 0
    skipped: int = 0
    overlays: int = 0


def score_images(
    scorer: ImageScorer,
    inputs: list[Path],
    output: Path | None = None,
    overlays: str = "all",
    skip_bad: bool = False,
    emit: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
    extra: dict | None = None,
) -> RunSummary:
    """Score files and folders with ``scorer``.

    Args:
        scorer: a camera :class:`~edgecore.runtime.detector.Detector` or a host model.
        inputs: image files and/or folders.
        output: folder for ``results.jsonl`` and ``overlays/`` (None: stdout only).
        overlays: ``all``, ``anomalous`` or ``none`` (needs ``output``).
        skip_bad: skip unreadable images with a warning instead of failing.
        emit: receives each JSON line.
        warn: receives warnings.
        extra: fields added to every row (e.g. which engine ran).

    Returns:
        counts of images scored, anomalous, skipped and overlays written.
    """
    if overlays not in OVERLAY_CHOICES:
        raise ValueError(f"--overlays must be one of {', '.join(OVERLAY_CHOICES)}, got {overlays!r}")
    images = expand_images(inputs)
    names = output_names(images, suffix=OVERLAY_SUFFIX)
    summary = RunSummary()
    rows = None
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        partial = output / f".{RESULTS_FILE}.partial"
        rows = open(partial, "w")
    try:
        for path in images:
            start = time.perf_counter()
            try:
                rgb = load_image(path)
            except ImageError as exc:
                if not skip_bad:
                    raise
                summary.skipped += 1
                warn(f"warning: skipped {exc}")
                continue
            decode_ms = (time.perf_counter() - start) * 1e3
            result = scorer.detect(rgb)
            result.timings_ms["decode"] += decode_ms  # the file's decode, not only the array copy
            result.timings_ms["total"] += decode_ms
            summary.images += 1
            summary.anomalous += bool(result.is_anomalous)
            row = {"image": str(path), **result.to_json(), **(extra or {})}
            if output is not None and (overlays == "all" or (overlays == "anomalous" and result.is_anomalous)):
                target = output / "overlays" / names[path]
                image = render_overlay(
                    rgb, scorer.normalization(result.map), scorer.preprocess_config, result.score,
                    result.normalized_score, result.is_anomalous, scorer.threshold,
                )
                save_overlay(target, image)
                row["overlay"] = str(target)
                summary.overlays += 1
            line = json.dumps(row)
            if rows is not None:
                rows.write(line + "\n")
            emit(line)
    finally:
        if rows is not None:
            rows.close()
            os.replace(partial, output / RESULTS_FILE)  # complete or, after a crash, clearly .partial
    return summary
