"""What every inference backend provides; the conformance tests hold each one to it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class EngineInfo:
    """What actually ran — recorded in reports, because hints are not guarantees
    (OpenVINO silently runs bf16 on capable CPUs unless told otherwise)."""

    backend: str
    device: str
    requested_precision: str
    executed_precision: str
    library_version: str
    source: str  # the engine file it ran, or "compiled from ONNX"
    engine_key: str | None = None  # the manifest's engines entry it ran, if any
    details: dict = field(default_factory=dict)


class Backend(Protocol):
    info: EngineInfo
    batch: int

    def infer(self, crops: np.ndarray) -> np.ndarray:
        """N×H×W×3 uint8 crops (N == batch) → N×P×D float32 patch embeddings. Thread-safe."""
        ...

    def close(self) -> None:
        ...
