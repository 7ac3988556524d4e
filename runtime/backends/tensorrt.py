"""TensorRT backend (Jetson / NVIDIA GPUs): the engine is built ON the target, run through pycuda.

Why on the target: a serialized TensorRT plan only runs on the GPU model and the
TensorRT version that built it (the builder picks kernels by timing them on that
GPU). So ``edgecore compile BUNDLE --target tensorrt`` runs on the camera itself,
engines are stored as ``engines/tensorrt-<precision>-<gpu slug>-<TensorRT version>/``,
and the backend refuses — with the rebuild command — a bundle whose engines were
built for another GPU or TensorRT version (``select_engine``).

TensorRT versions: 8.5+ (JetPack 5.1) and 10.x (JetPack 6). 8.5 is the floor
because it is the first release that takes uint8 network inputs (the graph casts
and normalises inside) and the first with the name-based tensor API
(``num_io_tensors``/``get_tensor_name``/``set_tensor_address``/``execute_async_v3``).
10.x removed the binding-index API (``execute_async_v2``, ``get_binding_*``), the
builder's ``build_engine`` and ``max_workspace_size``, so this module only calls
what both have: ``build_serialized_network``, ``set_memory_pool_limit``, named
tensors. The one call that must differ is network creation: 8.x needs the
EXPLICIT_BATCH flag, 10.x is explicit-batch only and deprecates it. INT8 uses the
implicit-quantization entropy calibrator (``IInt8EntropyCalibrator2``), deprecated
in 10.x in favour of Q/DQ graphs but still supported there.

Threads: one execution context behind a lock. On a Jetson the single GPU runs one
inference at a time anyway; a context per thread would multiply activation memory
for no throughput. CUDA contexts are current per *thread*, so every call pushes the
device's primary context (the one the CUDA runtime, and so TensorRT, uses) and pops
it afterwards: a Detector opened on one thread can be called from any other.

Index search stays on the CPU (the runtime's hnswlib/exact search): the coreset is
small (a few thousand vectors) and its search is a few ms on the Jetson's ARM cores,
far below the backbone. An exact GPU search could be faster on Orin's shared memory;
that is unmeasured here and left as future work.

Written against the documented TensorRT and pycuda APIs; not yet executed on real
TensorRT (no NVIDIA GPU on the development machines) — see docs/DEPLOY.md.
"""
from __future__ import annotations

import math
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgecore.runtime.backends.base import EngineInfo
from edgecore.runtime.bundle import add_engine, verify_bundle
from edgecore.runtime.errors import BundleError, EdgecoreError

PRECISIONS = ("fp16", "int8")
_AUTO_ORDER = ("int8", "fp16")  # fastest first, as the OpenVINO backend does
MIN_VERSION = (8, 5)


# --- pure helpers (tested without TensorRT) ---------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-z]+", "-", text.lower()).strip("-")


def engine_key(precision: str, gpu_name: str, trt_version: str) -> str:
    """``tensorrt-fp16-orin-10.3.0``: one engine per precision, GPU model and TensorRT version."""
    return f"tensorrt-{precision}-{_slug(gpu_name)}-{re.sub(r'[^0-9A-Za-z.]+', '-', trt_version)}"


def device_index(device: str) -> int:
    """``cuda``/``cuda:N`` → N."""
    match = re.fullmatch(r"cuda(?::(\d+))?", device.strip().lower())
    if not match:
        raise ValueError(f"TensorRT device must be cuda or cuda:N, got {device!r}")
    return int(match.group(1) or 0)


def _rebuild_hint(bundle: str, precision: str) -> str:
    calib = " --calib DIR" if precision == "int8" else ""
    return f"`edgecore compile {bundle} --target tensorrt --precision {precision}{calib}`"


def select_engine(
    engines: dict, gpu_name: str, trt_version: str, precision: str | None = None, bundle: str = "BUNDLE"
) -> tuple[str, dict]:
    """The manifest's TensorRT engine for THIS GPU model and TensorRT version.

    ``precision=None`` picks the fastest one built here (int8, then fp16). Refuses
    with a BundleError that names what the engines were built for, what this device
    is, and the command that rebuilds one here.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"TensorRT precision must be one of {PRECISIONS}, got {precision!r}")
    built = {k: e for k, e in engines.items() if isinstance(e, dict) and e.get("backend") == "tensorrt"}
    here = {
        k: e for k, e in built.items()
        if _slug(str(e.get("gpu", ""))) == _slug(gpu_name) and e.get("tensorrt_version") == trt_version
    }
    this_device = f"this device is {gpu_name} with TensorRT {trt_version}"
    wanted = precision or "fp16"
    if not built:
        raise BundleError(
            f"{bundle}: no TensorRT engine in this bundle ({this_device}); TensorRT engines are built on the "
            f"device that runs them: {_rebuild_hint(bundle, wanted)}"
        )
    if not here:
        elsewhere = "; ".join(sorted(
            {f"{e.get('precision')} on {e.get('gpu')} with TensorRT {e.get('tensorrt_version')}"
             for e in built.values()}
        ))
        raise BundleError(
            f"{bundle}: its TensorRT engines were built for {elsewhere}, but {this_device}. A TensorRT engine only "
            f"runs on the GPU model and TensorRT version that built it; rebuild here: {_rebuild_hint(bundle, wanted)}"
        )
    for candidate in (precision,) if precision else _AUTO_ORDER:
        for key, entry in sorted(here.items()):
            if entry.get("precision") == candidate:
                return key, entry
    available = ", ".join(sorted({str(e.get("precision")) for e in here.values()}))
    raise BundleError(
        f"{bundle}: no TensorRT {precision} engine for {gpu_name} with TensorRT {trt_version} (built here: "
        f"{available}); build it: {_rebuild_hint(bundle, wanted)}"
    )


# --- libraries and the GPU ---------------------------------------------------
def _libraries():
    """Import tensorrt and pycuda only when a TensorRT path is actually used."""
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgecoreError(
            "TensorRT is not installed: this backend runs on a Jetson/NVIDIA GPU with JetPack; "
            "on Intel cameras use --backend openvino"
        ) from None
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise EdgecoreError(
            "pycuda is not installed: `pip install pycuda` on the Jetson (it compiles against JetPack's CUDA), "
            "or use the docker/Dockerfile.jetson image"
        ) from None
    major, minor = (int(part) for part in trt.__version__.split(".")[:2])
    if (major, minor) < MIN_VERSION:
        raise EdgecoreError(
            f"TensorRT {trt.__version__} is too old: edgecore needs 8.5+ (JetPack 5.1+) for uint8 inputs "
            "and the named-tensor API"
        )
    return trt, cuda


class _Gpu:
    """One CUDA device and its primary context, made current on the calling thread by ``active()``."""

    def __init__(self, cuda, index: int) -> None:
        try:
            cuda.init()
            count = cuda.Device.count()
            if index >= count:
                raise EdgecoreError(f"no CUDA device {index}: this machine has {count}")
            self.device = cuda.Device(index)
            self.context = self.device.retain_primary_context()
        except cuda.Error as exc:
            raise EdgecoreError(f"CUDA is not usable here: {exc}") from None
        self._cuda = cuda
        self.index = index
        self.name: str = self.device.name()
        self.compute_capability = "%d.%d" % self.device.compute_capability()

    @contextmanager
    def active(self) -> Iterator[None]:
        self.context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def release(self) -> None:
        # Dropping pycuda's handle releases the retained primary context (as pycuda.autoprimaryctx does);
        # from a thread other than the opening one pycuda leaves it retained until the process exits.
        self.context = None


# --- building (on the target) -------------------------------------------------
def _network_flags(trt) -> int:
    if int(trt.__version__.split(".")[0]) >= 10:
        return 0  # explicit batch is the only mode; the flag is deprecated
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def builder_config(
    trt, builder, precision: str, workspace_mb: int, dla_core: int | None = None, calibrator=None,
    timing_cache: bytes = b"",
):
    """The IBuilderConfig for one engine: workspace pool, precision flags, optional DLA, timing cache.

    FP16 is enabled for INT8 engines too, so layers TensorRT cannot quantize run in
    fp16 rather than fp32. DLA gets GPU fallback: layers the DLA lacks run on the GPU
    instead of failing the build.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"TensorRT precision must be one of {PRECISIONS}, got {precision!r}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        if calibrator is None:
            raise ValueError("an INT8 engine needs a calibrator")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
    if dla_core is not None:
        if not 0 <= dla_core < builder.num_DLA_cores:
            raise ValueError(f"--dla {dla_core}: this device has {builder.num_DLA_cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    config.set_timing_cache(config.create_timing_cache(timing_cache), False)
    return config


def _entropy_calibrator(trt, cuda, crops: np.ndarray, batch: int):
    """An IInt8EntropyCalibrator2 fed with the graph's static batch of preprocessed uint8 crops."""
    if len(crops) < batch:  # fewer images than one batch: repeat them
        crops = np.concatenate([crops] * math.ceil(batch / len(crops)))
    batches = [np.ascontiguousarray(crops[i : i + batch]) for i in range(0, len(crops) - batch + 1, batch)]

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.device_input = cuda.mem_alloc(batches[0].nbytes)
            self.next = 0
            self.cache: bytes | None = None

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names):
            if self.next >= len(batches):
                return None
            cuda.memcpy_htod(self.device_input, batches[self.next])
            self.next += 1
            return [int(self.device_input)]

        def read_calibration_cache(self):
            return None  # always calibrate on the images given; the result is kept in the bundle

        def write_calibration_cache(self, cache) -> None:
            self.cache = bytes(cache)

    return EntropyCalibrator()


def _reusable_timing_cache(bundle: Path, engines: dict, gpu_name: str, trt_version: str) -> bytes:
    """A timing cache from an earlier build on this GPU model + TensorRT version makes rebuilds faster."""
    for entry in engines.values():
        if (
            entry.get("backend") == "tensorrt" and entry.get("timing_cache")
            and _slug(str(entry.get("gpu", ""))) == _slug(gpu_name) and entry.get("tensorrt_version") == trt_version
        ):
            return (bundle / entry["timing_cache"]).read_bytes()
    return b""


def pin_head_precision(trt, network) -> int:
    """Keep the PatchCore head out of INT8 in an INT8 build: every layer from the 3×3 average poolings to the
    output computes (and, but for the network's own output, emits) fp16. Returns how many layers were pinned.

    Why: implicit INT8 quantizes whatever it has scales for, and rounding the embeddings themselves to 256
    levels wrecked bottle's AUROC under NNCF (``calibration/int8.py`` keeps the same ops fp32 for OpenVINO).
    fp16 is what the fp16 engine already runs the head in (embedding cosine ≥ 0.999, the backend tests).
    """
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    consumers: dict[str, list] = {}
    for layer in layers:
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            if tensor is not None:
                consumers.setdefault(tensor.name, []).append(layer)
    pending = []
    for i, layer in enumerate(layers):
        if layer.type == trt.LayerType.POOLING:
            pooling = network.get_layer(i)
            pooling.__class__ = trt.IPoolingLayer  # the Python API's way to reach the subclass's fields
            if pooling.type == trt.PoolingType.AVERAGE:
                pending.append(layer)
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    pinned: set[str] = set()
    while pending:
        layer = pending.pop()
        if layer.name in pinned:
            continue
        pinned.add(layer.name)
        layer.precision = trt.float16
        for j in range(layer.num_outputs):
            tensor = layer.get_output(j)
            if tensor.name not in outputs:
                layer.set_output_type(j, trt.float16)
            pending.extend(consumers.get(tensor.name, []))
    return len(pinned)


def _build(
    trt, graph_path: Path, precision: str, workspace_mb: int, dla_core: int | None, calibrator, timing_cache: bytes
) -> tuple[bytes, bytes]:
    """ONNX → serialized plan (+ the updated timing cache), with the current CUDA context."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise BundleError(f"{graph_path}: TensorRT's ONNX parser refused it: {errors}")
    config = builder_config(trt, builder, precision, workspace_mb, dla_core, calibrator, timing_cache)
    if precision == "int8" and pin_head_precision(trt, network):
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)  # a constraint it cannot meet warns, not fails
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EdgecoreError(f"TensorRT could not build a {precision} engine from {graph_path} (see its log above)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def compile_tensorrt(
    bundle: str | Path,
    precision: str,
    calib: str | Path | None = None,
    num_calib: int | None = None,
    workspace_mb: int = 1024,
    dla_core: int | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Build a TensorRT engine for THIS device from the bundle's ONNX graph; returns the new manifest.

    Argument errors are raised before TensorRT is imported, so they read the same on
    a machine without it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"TensorRT precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and calib is None:
        raise ValueError("--precision int8 needs --calib DIR (normal images: the train set or a folder)")
    if workspace_mb < 1:
        raise ValueError(f"--workspace must be >= 1 MB, got {workspace_mb}")
    trt, cuda = _libraries()
    verified = verify_bundle(bundle)
    manifest = verified.manifest
    graph_path = verified.path / manifest["graph"]["file"]
    gpu = _Gpu(cuda, 0)
    version = trt.__version__
    key = engine_key(precision, gpu.name, version)
    timing_cache = _reusable_timing_cache(verified.path, manifest.get("engines", {}), gpu.name, version)
    description: dict = {
        "backend": "tensorrt", "precision": precision, "gpu": gpu.name,
        "compute_capability": gpu.compute_capability, "tensorrt_version": version,
        "builder": {
            "workspace_mb": int(workspace_mb), "fp16": True, "int8": precision == "int8",
            "dla_core": dla_core, "gpu_fallback": dla_core is not None, "timing_cache_reused": bool(timing_cache),
        },
    }
    calibrator = None
    try:
        with gpu.active():
            try:
                if precision == "int8":
                    from edgecore.runtime.frames import DEFAULT_NUM_CALIB, calibration_crops
                    from edgecore.runtime.preprocess import PreprocessConfig

                    config = PreprocessConfig.from_dict(manifest["preprocess"])
                    crops = calibration_crops(calib, config, num_calib or DEFAULT_NUM_CALIB)
                    calibrator = _entropy_calibrator(trt, cuda, crops, int(manifest["graph"]["batch"]))
                    description["calibration"] = {
                        "source": str(calib), "images": int(len(crops)), "algorithm": "entropy2"
                    }
                    log(f"compile: TensorRT INT8 entropy calibration on {len(crops)} normal images from {calib}")
                start = time.perf_counter()
                log(f"compile: building the TensorRT {precision} engine for {gpu.name} (TensorRT {version}); "
                    "minutes on a Jetson")
                plan_bytes, cache_bytes = _build(
                    trt, graph_path, precision, workspace_mb, dla_core, calibrator, timing_cache
                )
                description["seconds"] = round(time.perf_counter() - start, 1)
                calibration_cache = calibrator.cache if calibrator is not None else None
            finally:
                if calibrator is not None:
                    calibrator.device_input.free()
    finally:
        gpu.release()

    def write_engine(engine_dir: Path) -> dict:
        prefix = engine_dir.relative_to(engine_dir.parents[1]).as_posix()
        (engine_dir / "model.plan").write_bytes(plan_bytes)
        (engine_dir / "timing.cache").write_bytes(cache_bytes)
        extra = {"plan": f"{prefix}/model.plan", "timing_cache": f"{prefix}/timing.cache"}
        if calibration_cache:
            (engine_dir / "calibration.cache").write_bytes(calibration_cache)
            extra["calibration_cache"] = f"{prefix}/calibration.cache"
        return extra

    log(f"compile: engine built in {description['seconds']} s; stored as engines/{key}/")
    return add_engine(verified.path, key, write_engine, description)


# --- running ------------------------------------------------------------------
class _PlanResources:
    """``close()`` of an object that holds a TensorRT runtime/engine/context, pinned host buffers and
    CUDA buffers (``_device_buffers``) in one :class:`_Gpu` context, under ``_lock``: the engine
    backend and the compiled-search graph (``tensorrt_search``) free them the same way."""

    def close(self) -> None:
        """Free the TensorRT objects and CUDA buffers (inside the context that owns them); idempotent."""
        with self._lock:
            if self._gpu is None:
                return
            if self._gpu.context is not None:
                with self._gpu.active():
                    # TensorRT objects first, context before engine before runtime: they use the buffers
                    self._context = None
                    self._engine = None
                    self._runtime = None
                    for memory in self._device_buffers:
                        memory.free()
                    self._device_buffers = []
                    self._stream = self._host_in = self._host_out = None
            self._gpu.release()
            self._gpu = None


class TensorRTBackend(_PlanResources):
    """Runs the bundle's TensorRT engine built for this GPU; see the module docstring for threads."""

    def __init__(self, bundle, device: str = "cuda:0", precision: str | None = None) -> None:
        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"TensorRT precision must be one of {PRECISIONS}, got {precision!r}")
        trt, cuda = _libraries()
        self._cuda = cuda
        self._lock = threading.Lock()
        self._gpu: _Gpu | None = _Gpu(cuda, device_index(device))
        self._context = self._engine = self._runtime = None
        self._device_buffers: list = []
        try:
            self._open(bundle, trt, device, precision)
        except BaseException:
            self.close()
            raise

    def _open(self, bundle, trt, device: str, precision: str | None) -> None:
        cuda, gpu = self._cuda, self._gpu
        manifest = bundle.manifest
        version = trt.__version__
        key, entry = select_engine(manifest.get("engines", {}), gpu.name, version, precision, str(bundle.path))
        plan_path = Path(bundle.path) / entry["plan"]
        self.batch = int(manifest["graph"]["batch"])
        with gpu.active():
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
            dla_core = (entry.get("builder") or {}).get("dla_core")
            if dla_core is not None:
                self._runtime.DLA_core = int(dla_core)
            self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self._engine is None:
                raise BundleError(
                    f"{plan_path}: TensorRT {version} cannot load this engine; rebuild it here: "
                    f"{_rebuild_hint(str(bundle.path), entry['precision'])}"
                )
            engine = self._engine
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if n not in inputs]
            if len(inputs) != 1 or len(outputs) != 1:
                raise BundleError(f"{plan_path}: expected one input and one output tensor, got {names}")
            self._host_in = self._pinned(trt, engine, inputs[0], np.uint8)
            self._host_out = self._pinned(trt, engine, outputs[0], np.float32)
            self.input_shape: tuple[int, ...] = tuple(self._host_in.shape)
            if self.input_shape[0] != self.batch or self.input_shape[-1] != 3:
                raise BundleError(f"{plan_path}: input shape {self.input_shape} is not [{self.batch}, H, W, 3]")
            self._context = engine.create_execution_context()
            for name, host in ((inputs[0], self._host_in), (outputs[0], self._host_out)):
                memory = cuda.mem_alloc(host.nbytes)
                self._device_buffers.append(memory)
                self._context.set_tensor_address(name, int(memory))
            self._stream = cuda.Stream()
        self.info = EngineInfo(
            backend="tensorrt",
            device=gpu.name,
            requested_precision=precision or "default",
            executed_precision=entry["precision"],  # what the engine was built with
            library_version=version,
            source=entry["plan"],
            engine_key=key,
            details={
                "cuda_device": device,
                "compute_capability": gpu.compute_capability,
                "builder": entry.get("builder", {}),
                "execution_contexts": 1,  # calls are serialised by a lock
                "index_search": "cpu",
            },
        )

    def _pinned(self, trt, engine, name: str, expected: type) -> np.ndarray:
        """Page-locked host memory: required for truly asynchronous copies."""
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        if dtype != np.dtype(expected):
            raise BundleError(f"engine tensor {name!r} is {dtype}, expected {np.dtype(expected)}")
        return self._cuda.pagelocked_empty(tuple(engine.get_tensor_shape(name)), dtype)

    def infer(self, crops: np.ndarray) -> np.ndarray:
        if crops.dtype != np.uint8 or crops.shape != self.input_shape:
            raise ValueError(f"expected {self.input_shape} uint8 crops, got {crops.dtype} {crops.shape}")
        cuda = self._cuda
        with self._lock:
            if self._gpu is None:
                raise EdgecoreError("this TensorRT backend is closed")
            with self._gpu.active():  # this thread may not be the one that opened the backend
                np.copyto(self._host_in, crops)
                cuda.memcpy_htod_async(self._device_buffers[0], self._host_in, self._stream)
                if not self._context.execute_async_v3(self._stream.handle):
                    raise EdgecoreError("TensorRT failed to enqueue the inference (see its log above)")
                cuda.memcpy_dtoh_async(self._host_out, self._device_buffers[1], self._stream)
                self._stream.synchronize()
                return np.array(self._host_out, dtype=np.float32, copy=True)

