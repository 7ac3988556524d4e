"""OpenVINO backend: the bundle's ONNX graph (or a compiled IR from `edgecore compile`) on CPU.

Precision is a request, not a guarantee: OpenVINO runs bf16 on CPUs that have
it unless told f32, and has no fp16 path on most CPUs. We ask explicitly and
record what the compiled model reports it executes.
"""
from __future__ import annotations

import os
import queue
import threading
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import openvino as ov

from edgecore.runtime.backends.base import EngineInfo
from edgecore.runtime.cpu import has_vnni, isa_capped_below_bf16
from edgecore.runtime.errors import BundleError

_core: ov.Core | None = None
_core_lock = threading.Lock()


def shared_core() -> ov.Core:
    """The process's one OpenVINO Core, never destroyed.

    The CPU plugin installs an alternate signal stack on the thread that compiles a model and
    frees it when its Core goes away. A Core per Detector meant a hot reload (new Detector
    opened on one thread, the old one closed on another) left the first thread's signal stack
    pointing at freed memory: the next SIGTERM crashed `edgecore serve` with SIGSEGV.
    """
    global _core
    with _core_lock:
        if _core is None:
            _core = ov.Core()
        return _core


PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# The hint applies to the layers that are not INT8-quantized; f32 keeps INT8 faithful.
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
_AUTO_ORDER = ("int8", "bf16", "fp16", "fp32")


def _not_runnable_why(entry: dict, precision: str) -> str | None:
    """Why this CPU cannot run a compiled engine (None: it can)."""
    if precision in ("bf16", "fp16") and isa_capped_below_bf16():
        return f"{precision} kernels unavailable under ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}"
    if entry.get("requires_vnni") and not has_vnni():
        return "compiled with full 8-bit weights for VNNI/AMX CPUs; this CPU has no VNNI"
    return None


def _stale_portable_why(entry: dict | None) -> str | None:
    """Why a portable INT8 engine should be compiled again (None: it need not). Engines compiled before the
    full-resolution and depthwise convolutions were kept fp32 carry no ``calibration.kept_fp32``: they still run, but
    their scores drift further from the workstation's (bottle Lite0 Spearman 0.984 vs 0.999, RESULTS.md #11)."""
    calibration = (entry or {}).get("calibration") or {}
    if not calibration.get("overflow_fix") or "kept_fp32" in calibration:
        return None
    return ("its portable INT8 engine rounds every convolution to 7-bit weights (compiled by an older edgecore), so "
            f"its scores drift further from the workstation's than the fidelity contract allows; {_portable_hint('int8')}")


def _portable_hint(precision: str) -> str:
    """The fix, on the machine that can do it (NNCF runs on the workstation, not the camera)."""
    return (f"on the workstation, compile an engine every x86 CPU runs — `edgecore compile BUNDLE --precision {precision} "
            "--portable --calib DIR` — and copy the bundle to the camera again")


def engine_key(precision: str) -> str:
    return f"openvino-{precision}"


def default_cache_dir() -> Path:
    """Compiled-model cache; kept apart per oneDNN ISA cap, whose blobs are not interchangeable."""
    base = os.environ.get("EDGECORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgecore")
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return Path(base) / ("openvino" if not cap else f"openvino-{cap.lower()}")


_COMPUTE_LAYERS = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}


def executed_precisions(compiled: ov.CompiledModel) -> dict[str, int]:
    """Runtime precision of every executed compute layer (convolutions, matmuls): what really ran.

    Data-movement layers (the uint8 input, reorders, constants) are left out, or
    a u8 input would read as "int8".
    """
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "runtimePrecision" in info and "layerType" in info and str(info["layerType"].astype(str)) in _COMPUTE_LAYERS:
            counts[str(info["runtimePrecision"].astype(str))] += 1
    return dict(counts)


def _summarise(counts: dict[str, int]) -> str:
    """One word for reports: int8 if any compute layer runs quantized, else the majority precision."""
    names = {"i8": "int8", "u8": "int8", "bf16": "bf16", "f16": "fp16", "f32": "fp32"}
    if counts.get("i8") or counts.get("u8"):
        return "int8"
    known = {names[k]: v for k, v in counts.items() if k in names}
    return max(known, key=known.get) if known else "unknown"


def _static_shape(port) -> tuple[int, ...] | None:
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic or not shape.is_static:
        return None
    return tuple(int(d) for d in shape.to_shape())


class OpenVINOBackend:
    def __init__(
        self,
        bundle,
        device: str = "CPU",
        precision: str | None = None,
        threads: int | None = None,
        streams: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}")
        manifest = bundle.manifest
        engines = manifest.get("engines", {})
        skipped: dict[str, str] = {}
        if precision is None:  # the best compiled engine this CPU (and any ISA cap) can run; say what was passed over
            for candidate in _AUTO_ORDER:
                found = engines.get(engine_key(candidate))
                if found is None:
                    continue
                why = _not_runnable_why(found, candidate)
                if why is None:
                    precision = candidate
                    break
                skipped[engine_key(candidate)] = why
        entry = engines.get(engine_key(precision)) if precision else None
        if precision == "int8" and entry is None:
            raise BundleError(
                f"{bundle.path}: no OpenVINO INT8 engine in this bundle; on the workstation run "
                "`edgecore compile BUNDLE --precision int8 --portable --calib DIR` first"
            )
        if entry is not None and entry.get("requires_vnni") and not has_vnni():
            raise BundleError(
                f"{bundle.path}: the {precision} engine was compiled for CPUs with VNNI/AMX (full 8-bit weights) and "
                f"would saturate on this CPU; {_portable_hint(precision)}"
            )
        stale = _stale_portable_why(entry)
        if stale:
            warnings.warn(f"{bundle.path}: {stale}", RuntimeWarning, stacklevel=2)
        core = shared_core()
        if entry is not None:
            model_path = Path(bundle.path) / entry["xml"]
            source = entry["xml"]
        else:
            model_path = Path(bundle.path) / manifest["graph"]["file"]
            source = f"{manifest['graph']['file']} (compiled from ONNX)"
        config: dict[str, object] = {
            "PERFORMANCE_HINT": "THROUGHPUT" if streams and streams > 1 else "LATENCY",
            "CACHE_DIR": str(Path(cache_dir) if cache_dir else default_cache_dir()),
        }
        if isa_capped_below_bf16():
            if precision in ("bf16", "fp16"):
                raise BundleError(f"{precision} kernels are unavailable under ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']}")
            config["INFERENCE_PRECISION_HINT"] = "f32"  # OpenVINO would default to bf16 from the CPU flags
        if precision is not None:
            config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[precision]
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if streams:
            config["NUM_STREAMS"] = int(streams)
        try:
            self.compiled = core.compile_model(core.read_model(str(model_path)), device, config)
        except RuntimeError as exc:
            raise BundleError(f"{model_path}: OpenVINO cannot compile it on {device}: {str(exc).splitlines()[0]}") from exc
        counts = executed_precisions(self.compiled)
        self.batch = int(manifest["graph"]["batch"])
        # What the graph really takes and gives (None where dynamic): the Detector checks the
        # manifest's batch, crop, grid and embed_dim against these before scoring anything.
        self.input_shape = _static_shape(self.compiled.inputs[0])
        self.output_shape = _static_shape(self.compiled.outputs[0])
        self.info = EngineInfo(
            backend="openvino",
            device=device,
            requested_precision=precision or "default",
            executed_precision=_summarise(counts),
            library_version=ov.get_version(),
            source=source,
            engine_key=engine_key(precision) if entry is not None else None,
            details={
                "layer_precisions": counts,
                "inference_precision_hint": str(self.compiled.get_property("INFERENCE_PRECISION_HINT")),
                "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
                "streams": int(self.compiled.get_property("NUM_STREAMS")),
                "skipped_engines": skipped,
            },
        )
        self._direct_output = self.output_shape is not None and self.compiled.outputs[0].get_element_type() == ov.Type.f32
        self._request_pool: queue.Queue = queue.Queue()
        for _ in range(max(1, self.info.details["streams"])):
            self._request_pool.put(self.compiled.create_infer_request())

    def infer(self, crops: np.ndarray) -> np.ndarray:
        if crops.dtype != np.uint8 or crops.shape[0] != self.batch:
            raise ValueError(f"expected {self.batch}×H×W×3 uint8 crops, got {crops.dtype} {crops.shape}")
        request = self._request_pool.get(block=True)  # one request per caller at a time: thread-safe
        try:
            if self._direct_output:  # the engine writes into a fresh array: no 3 MB copy per frame (WRN50)
                out = np.empty(self.output_shape, np.float32)
                own = request.get_output_tensor(0)
                request.set_output_tensor(0, ov.Tensor(out, shared_memory=True))
                try:
                    request.infer({0: np.ascontiguousarray(crops)})
                finally:  # the request never keeps a pointer into an array it does not own
                    request.set_output_tensor(0, own)
                return out
            request.infer({0: np.ascontiguousarray(crops)})
            return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)
        finally:
            self._request_pool.put(request)

    def close(self) -> None:
        while not self._request_pool.empty():
            self._request_pool.get_nowait()
        self.compiled = None
