"""Inference backends by name (timm-style registry: each entry owns its open AND its compile).

``open`` builds the runtime engine (imports its library only when asked). ``compile``
names the function that adds a compiled engine to a bundle, and ``compile_on`` says
where it must run: OpenVINO engines are compiled on the workstation (INT8 needs NNCF;
IR files run on any x86 CPU), TensorRT plans on the target itself (a plan only runs
on the GPU model and TensorRT version that built it). The runtime never imports a
host-side compile: the CLI resolves ``compile`` by name when a user asks for it.

Adding a backend: a module with a class meeting :class:`~edgecore.runtime.backends.base.Backend`,
one entry here, and its tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgecore.runtime.backends.base import Backend, EngineInfo


@dataclass(frozen=True)
class BackendEntry:
    name: str
    summary: str
    default_device: str
    precisions: tuple[str, ...]
    open: Callable[..., Backend]  # (bundle, device, precision, **options) -> Backend
    compile: str  # "module:function" building an engine into a bundle
    compile_on: str  # "host" (needs the extra below) or "target" (runs where the engine will run)
    compile_extra: str  # the pip extra the compile step needs


def _open_openvino(bundle, device: str, precision: str | None, **options) -> Backend:
    from edgecore.runtime.backends.openvino import OpenVINOBackend

    return OpenVINOBackend(bundle, device=device, precision=precision, **options)


def _open_tensorrt(bundle, device: str, precision: str | None, **options) -> Backend:
    from edgecore.runtime.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(bundle, device=device, precision=precision, **options)


BACKENDS: dict[str, BackendEntry] = {
    "openvino": BackendEntry(
        name="openvino", summary="Intel CPUs (OpenVINO)", default_device="CPU",
        precisions=("fp32", "bf16", "fp16", "int8"), open=_open_openvino,
        compile="edgecore.export.compile:compile_openvino", compile_on="host", compile_extra="host",
    ),
    "tensorrt": BackendEntry(
        name="tensorrt", summary="Jetson / NVIDIA GPUs (TensorRT, built on the device)", default_device="cuda:0",
        precisions=("fp16", "int8"), open=_open_tensorrt,
        compile="edgecore.runtime.backends.tensorrt:compile_tensorrt", compile_on="target", compile_extra="jetson",
    ),
}


def backend_entry(name: str) -> BackendEntry:
    """Args: name: a registry key. Returns: its entry (ValueError naming the choices otherwise)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose {' or '.join(BACKENDS)}")
    return BACKENDS[name]


def open_backend(name: str, bundle, device: str | None = None, precision: str | None = None, **options) -> Backend:
    """Open the engine of backend ``name`` for a verified bundle.

    Args:
        name: registry key (``openvino``, ``tensorrt``).
        bundle: a :class:`~edgecore.runtime.bundle.VerifiedBundle`.
        device: backend device (default: the entry's).
        precision: engine precision (default: the backend's automatic choice).
        **options: backend knobs (OpenVINO: ``threads``, ``streams``, ``cache_dir``).

    Returns:
        the open backend; ``backend.info`` says what executes.
    """
    entry = backend_entry(name)
    return entry.open(bundle, device=device or entry.default_device, precision=precision, **options)


__all__ = ["BACKENDS", "Backend", "BackendEntry", "EngineInfo", "backend_entry", "open_backend"]
