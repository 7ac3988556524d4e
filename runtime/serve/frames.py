"""What travels through the service: a frame in, a result out."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgecore.runtime.detector import Detection


@dataclass
class Frame:
    """One image to score. ``image`` is a decoded H×W×3 array (video, camera: no re-encode),
    encoded bytes (HTTP push) or a file path (watched folder; opened through the allow-list)."""

    id: str
    source: str
    image: np.ndarray | bytes | Path
    name: str = ""
    t_in: float = field(default_factory=time.perf_counter)  # monotonic: latency is measured from here
    wall: float = field(default_factory=time.time)
    on_done: Callable[["Result"], None] | None = None  # e.g. journal + move of a watched file


@dataclass
class Result:
    frame: Frame
    model_name: str
    model_version: str
    detection: Detection | None = None
    rgb: np.ndarray | None = None  # the decoded frame (overlays, live view)
    normalization: object = None  # the model's Normalization, for maps
    threshold: float = float("nan")
    preprocess: object = None  # the model's PreprocessConfig (where the inspected crop lies)
    error: str | None = None
    t_done: float = field(default_factory=time.perf_counter)
    _row: dict | None = field(default=None, repr=False)

    @property
    def verdict(self) -> str:
        """``anomalous`` / ``good``, or ``error``: a frame that could not be scored is never called good."""
        if self.detection is None:
            return "error"
        return "anomalous" if self.detection.is_anomalous else "good"

    @property
    def is_anomalous(self) -> bool:
        return self.detection is not None and self.detection.is_anomalous

    def to_json(self) -> dict:
        """The result row every sink sends (built once: JSONL, MQTT, webhook and the live page share it)."""
        if self._row is None:
            self._row = self._build_row()
        return self._row

    def _build_row(self) -> dict:
        row = {
            "frame_id": self.frame.id,
            "source": self.frame.source,
            "name": self.frame.name,
            "time": round(self.frame.wall, 6),
            "verdict": self.verdict,
            "model": self.model_name,
            "model_version": self.model_version,
            "latency_ms": round((self.t_done - self.frame.t_in) * 1e3, 3),
        }
        if self.detection is not None:
            row.update(self.detection.to_json())
        else:
            row["error"] = self.error
        return row
