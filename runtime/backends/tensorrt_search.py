"""The compiled search's key graph on TensorRT (Jetson / NVIDIA GPUs), built on the target at load.

Same graph as ``runtime.search_compiled``'s OpenVINO one — (x − μ)·scale against the int8 codes plus the
PCA part, ‖y − μ‖² − 2·dots, TopK(min) — written with TensorRT's network API (8.5+ and 10.x: named
tensors, ``build_serialized_network``, ``execute_async_v3``; see ``backends/tensorrt.py``). The codes go in
as float constants (integers in [−128, 127] are exact in fp16), the FP16 builder flag lets TensorRT run the
GEMM in fp16; the host re-ranks the proposals exactly on the codes, as on the CPU. The plan is built at
load (seconds for one GEMM + TopK) because a plan only runs on the GPU and TensorRT version that built it.

Written against the documented TensorRT and pycuda APIs; not yet executed (no NVIDIA GPU on the
development machines): ``tests/test_search_compiled.py`` skips its GPU test with the reason.
"""
from __future__ import annotations

import threading

import numpy as np

from edgecore.runtime.backends.tensorrt import _Gpu, _libraries, _network_flags, _PlanResources
from edgecore.runtime.errors import EdgecoreError

MAX_QUERIES = 4096  # optimization profile: queries per call (one image's patches: 784 at 224 px)
MAX_TOPK = 3840  # TensorRT's TopK limit


def build_key_network(trt, builder, operands, k: int):
    """The key network: input ``queries`` (Q×D float32, Q dynamic) → output ``candidates`` (Q×k int32)."""
    network = builder.create_network(_network_flags(trt))
    size, dim = operands.codes.shape
    keep = []  # trt.Weights does not copy: the arrays must outlive the build

    def constant(array: np.ndarray):
        array = np.ascontiguousarray(array, dtype=np.float32)
        keep.append(array)
        return network.add_constant(array.shape, trt.Weights(array)).get_output(0)

    queries = network.add_input("queries", trt.float32, (-1, dim))
    centred = network.add_elementwise(queries, constant(operands.center[None]), trt.ElementWiseOperation.SUB).get_output(0)
    scaled = network.add_elementwise(centred, constant(operands.scale[None]), trt.ElementWiseOperation.PROD).get_output(0)
    mm = trt.MatrixOperation
    dots = network.add_matrix_multiply(scaled, mm.NONE, constant(operands.codes), mm.TRANSPOSE).get_output(0)
    if operands.basis_t.shape[1]:
        coords = network.add_matrix_multiply(centred, mm.NONE, constant(operands.basis_t), mm.NONE).get_output(0)
        pca = network.add_matrix_multiply(coords, mm.NONE, constant(operands.coords), mm.TRANSPOSE).get_output(0)
        dots = network.add_elementwise(dots, pca, trt.ElementWiseOperation.SUM).get_output(0)
    twice = network.add_elementwise(dots, constant(np.full((1, 1), -2.0)), trt.ElementWiseOperation.PROD).get_output(0)
    keys = network.add_elementwise(twice, constant(operands.norms[None]), trt.ElementWiseOperation.SUM).get_output(0)
    top = network.add_topk(keys, trt.TopKOperation.MIN, int(k), 1 << 1)
    candidates = top.get_output(1)
    candidates.name = "candidates"
    network.mark_output(candidates)
    return network, keep


class TensorRTSearchGraph(_PlanResources):
    """The key graph as a TensorRT engine on one CUDA device (a ``runtime.search_compiled.SearchGraph``).

    Args:
        operands: the index's constants (``KeyOperands``); k: proposals per query (fixed in the plan);
        device: CUDA device index; workspace_mb: builder workspace.
    """

    def __init__(self, operands, k: int = 8, device: int = 0, workspace_mb: int = 512) -> None:
        trt, cuda = _libraries()
        self._cuda, self._lock = cuda, threading.Lock()
        self.size, self.dim = operands.codes.shape
        self.k = min(int(k), self.size, MAX_TOPK)
        self._gpu: _Gpu | None = _Gpu(cuda, device)
        self._device_buffers: list = []
        try:
            with self._gpu.active():
                self._build(trt, operands, workspace_mb)
        except BaseException:
            self.close()
            raise
        self.info = {"engine": "tensorrt", "tensorrt": trt.__version__, "gpu": self._gpu.name, "fp16": True}

    def _build(self, trt, operands, workspace_mb: int) -> None:
        cuda = self._cuda
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network, _keep = build_key_network(trt, builder, operands, self.k)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        profile.set_shape("queries", (1, self.dim), (784, self.dim), (MAX_QUERIES, self.dim))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EdgecoreError("TensorRT could not build the compiled-search engine (see its log above)")
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        self._context = self._engine.create_execution_context()
        self._host_in = cuda.pagelocked_empty((MAX_QUERIES, self.dim), np.float32)
        self._host_out = cuda.pagelocked_empty((MAX_QUERIES, self.k), np.int32)
        for name, host in (("queries", self._host_in), ("candidates", self._host_out)):
            memory = cuda.mem_alloc(host.nbytes)
            self._device_buffers.append(memory)
            self._context.set_tensor_address(name, int(memory))
        self._stream = cuda.Stream()

    def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
        if k > self.k:
            raise ValueError(f"this TensorRT search plan proposes {self.k} candidates per query, {k} asked")
        cuda, out = self._cuda, np.empty((queries.shape[0], k), np.int64)
        with self._lock:
            if self._gpu is None:
                raise EdgecoreError("this TensorRT search graph is closed")
            with self._gpu.active():
                for start in range(0, queries.shape[0], MAX_QUERIES):
                    chunk = queries[start : start + MAX_QUERIES]
                    rows = len(chunk)
                    self._host_in[:rows] = chunk
                    self._context.set_input_shape("queries", (rows, self.dim))
                    cuda.memcpy_htod_async(self._device_buffers[0], self._host_in[:rows], self._stream)
                    if not self._context.execute_async_v3(self._stream.handle):
                        raise EdgecoreError("TensorRT failed to enqueue the search (see its log above)")
                    cuda.memcpy_dtoh_async(self._host_out[:rows], self._device_buffers[1], self._stream)
                    self._stream.synchronize()
                    out[start : start + rows] = self._host_out[:rows, :k]
        return out

    def memory_bytes(self) -> int:
        """Host side only (pinned buffers); the plan's weights live in GPU memory."""
        return int(self._host_in.nbytes + self._host_out.nbytes)

