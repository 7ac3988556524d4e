"""Inference backends behind one interface (OpenVINO on Intel CPUs, TensorRT on Jetson)."""
from __future__ import annotations

from edgecore.runtime.backends.base import Backend, EngineInfo


def open_backend(name: str, bundle, device: str | None = None, precision: str | None = None, **options) -> Backend:
    """Instantiate a backend by name; imports its library only when asked for."""
    if name == "openvino":
        from edgecore.runtime.backends.openvino import OpenVINOBackend

        return OpenVINOBackend(bundle, device=device or "CPU", precision=precision, **options)
    if name == "tensorrt":
        from edgecore.runtime.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(bundle, device=device or "cuda:0", precision=precision, **options)
    raise ValueError(f"unknown backend {name!r}; choose openvino or tensorrt")


__all__ = ["Backend", "EngineInfo", "open_backend"]
