"""Compiled exact search: the whole distance GEMM + TopK as one graph in the inference engine.

Camera side, torch-free. The int8 codes of the coreset are the graph's weight constant (shared with
the stored array); the engine's GEMM kernels (oneDNN: fp32, or AMX/AVX-512 bf16 on request) compute,
for every query x and coreset row y, the ranking key

    ‖y − μ‖² − 2 [ ((x − μ) · scale) · code_y + ((x − μ) Bᵀ) · coord_y ]

(``CodeRows.rank_keys`` without its per-query constant), and a TopK keeps the ``candidates`` smallest.
Those are re-ranked exactly on the int8 codes (``CodeRows.rank_keys``) and the winners' distances are
recomputed by direct difference, so every distance returned is a true L2 distance to a real coreset
point. Why a re-rank: the GEMM form in bf16 ranks the nearest neighbour first for only ~57 % of the
queries at 1024-d (issue #11); as a proposal of a few candidates it loses almost none
(``benchmarks/RESULTS.md`` § "Search at the hardware limit").

Nothing is stored for this mode beyond the int8 vectors: the graph is built at load from the verified
codes (a stored graph would duplicate the coreset on disk and could disagree with the codes). Engines
are a registry (:data:`SEARCH_GRAPH_ENGINES`): OpenVINO here, TensorRT in
``edgecore.runtime.backends.tensorrt_search``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from edgecore.runtime.errors import EdgecoreError
from edgecore.runtime.search_coarse import CodeRows, rerank

COMPILED_CANDIDATES = 4  # proposals re-ranked exactly per query (bottle, f32: recall@1 = exact int8's)
QUERY_CHUNK = 196  # queries per engine call: bounds the Q×M key matrix (bottle Lite0: 38 ms/img vs 47 at 784)
# Precision of the key GEMM. f32 by default: bf16 (AMX) is ~1.8× faster at 1024-d but, even with 16
# re-ranked candidates, finds the nearest neighbour for only 98.0 % of bottle WRN50 patches (below the
# 0.99 bar; 57 % without a re-rank); at 152-d bf16 with 8 candidates matches f32.
DEFAULT_PRECISION = "f32"


@dataclass(frozen=True)
class KeyOperands:
    """The constants of the key graph, taken from the int8 index (nothing decoded to M×D floats).

    center: D coreset mean; scale: D int8 step; codes: M×D int8; basis_t: D×k PCA directions;
    coords: M×k decoded PCA coordinates (float32, small); norms: M centred squared norms.
    """

    center: np.ndarray
    scale: np.ndarray
    codes: np.ndarray
    basis_t: np.ndarray
    coords: np.ndarray
    norms: np.ndarray

    @classmethod
    def from_rows(cls, rows: CodeRows, arrays: dict[str, np.ndarray]) -> "KeyOperands":
        center, norms = rows.ranking_tables()
        coords = arrays["coord_codes"].astype(np.float32) * arrays["coord_scale"] + arrays["coord_offset"]
        return cls(center=center, scale=arrays["scale"].astype(np.float32), codes=arrays["codes"],
                   basis_t=np.ascontiguousarray(arrays["basis"].T, dtype=np.float32),
                   coords=np.ascontiguousarray(coords, dtype=np.float32), norms=norms)

    def reference_keys(self, queries: np.ndarray) -> np.ndarray:
        """The same keys in float64 numpy (tests: what the engine must approximate)."""
        centred = queries.astype(np.float64) - self.center
        dots = (centred * self.scale) @ self.codes.T.astype(np.float64) + (centred @ self.basis_t) @ self.coords.T
        return self.norms[None, :] - 2.0 * dots


class SearchGraph(Protocol):
    """A compiled key graph: queries → indices of the ``k`` smallest keys (unordered is fine)."""

    info: dict

    def candidates(self, queries: np.ndarray, k: int) -> np.ndarray: ...  # Q×k int64

    def memory_bytes(self) -> int: ...


#: Key-GEMM precisions by OpenVINO device kind: the CPU plugin has bf16 (AMX / AVX-512), the GPU plugin f16
#: (and defaults to it, so f32 is always set explicitly).
DEVICE_PRECISIONS = {"CPU": ("f32", "bf16"), "GPU": ("f32", "f16")}


class OpenVINOSearchGraph:
    """The key graph as an OpenVINO model (the backend's one shared Core), on the CPU or an Intel GPU.

    Args:
        operands: the index's constants; precision: ``f32``, or ``bf16`` on the CPU / ``f16`` on a GPU
            (see :data:`DEFAULT_PRECISION`); threads: CPU engine threads (default: every core this process
            may use — queries are independent); device: an OpenVINO device (``CPU``, ``GPU``, ``GPU.1``).
    """

    def __init__(self, operands: KeyOperands, precision: str = DEFAULT_PRECISION, threads: int | None = None,
                 device: str = "CPU") -> None:
        import openvino as ov

        from edgecore.runtime.backends.openvino import executed_precisions, shared_core

        kind = device.split(".")[0]
        if kind not in DEVICE_PRECISIONS:
            raise ValueError(f"compiled search runs on an OpenVINO CPU or GPU device, got {device!r}")
        if precision not in DEVICE_PRECISIONS[kind]:
            raise ValueError(f"compiled search precision on {kind} must be one of {DEVICE_PRECISIONS[kind]}, "
                             f"got {precision!r}")
        self.precision, self.device = precision, device
        self.size, self.dim = operands.codes.shape
        core = shared_core()
        # With several GPUs OpenVINO lists GPU.0, GPU.1, … and still takes plain "GPU" (the first).
        if not any(name == device or name.startswith(device + ".") for name in core.available_devices):
            raise EdgecoreError(f"compiled search: OpenVINO has no {device} device here "
                                f"(available: {', '.join(core.available_devices)})")
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
        if kind == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads or len(os.sched_getaffinity(0)))
        self.compiled = core.compile_model(_openvino_key_model(operands), device, config)
        self._request = self.compiled.create_infer_request()
        self.info = {"engine": "openvino", "openvino": ov.get_version(), "device": device,
                     "precision_hint": self.precision, "layer_precisions": executed_precisions(self.compiled)}

    def kernels(self) -> dict[str, str]:
        """oneDNN primitive of each GEMM (e.g. ``brgemm_avx512_amx_bf16``): what really multiplied.
        Known only after the first call (the shapes are dynamic, kernels are picked then)."""
        found = {}
        for op in self.compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if {"layerType", "primitiveType"} <= set(info) and str(info["layerType"].astype(str)) in ("FullyConnected", "MatMul"):
                found[op.get_friendly_name()] = str(info["primitiveType"].astype(str))
        return found

    def candidates(self, queries: np.ndarray, k: int) -> np.ndarray:
        out = np.empty((queries.shape[0], k), np.int64)
        k_tensor = np.array(k, np.int64)
        for start in range(0, queries.shape[0], QUERY_CHUNK):
            chunk = np.ascontiguousarray(queries[start : start + QUERY_CHUNK])
            self._request.infer({"queries": chunk, "k": k_tensor})
            out[start : start + len(chunk)] = self._request.get_output_tensor(0).data
        return out

    def memory_bytes(self) -> int:
        """The plugin's weight copy in its execution precision (it folds the int8 → float Convert of
        the constant and repacks it) plus the Q×M key matrix of one chunk."""
        weight = 2 if self.precision == "bf16" else 4
        return self.size * self.dim * weight + QUERY_CHUNK * self.size * 4


def _openvino_key_model(operands: KeyOperands):
    import openvino as ov
    import openvino.opset13 as ops

    queries = ops.parameter([-1, operands.codes.shape[1]], np.float32, name="queries")
    k = ops.parameter([], np.int64, name="k")
    centred = ops.subtract(queries, ops.constant(operands.center))
    # One GEMM: query features [−2(x−μ)·scale, −2(x−μ)Bᵀ] against weights [int8 codes | PCA coords] (the
    # Convert and Concat of constants are folded at compile), the norms as its bias: the plugin fuses
    # the bias add, and no second Q×M matrix is made (bottle Lite0: 18.6 → 5.7 ms per 196 queries).
    features = ops.multiply(centred, ops.constant(-2.0 * operands.scale))
    weights = ops.convert(ops.constant(operands.codes), np.float32)
    if operands.basis_t.shape[1]:
        pca = ops.matmul(centred, ops.constant(-2.0 * operands.basis_t), False, False)
        features = ops.concat([features, pca], 1)
        weights = ops.concat([weights, ops.constant(operands.coords)], 1)
    keys = ops.add(ops.matmul(features, weights, False, True), ops.constant(operands.norms[None, :]))
    top = ops.topk(keys, k, 1, "min", "none", "i32")
    return ov.Model([top.output(1)], [queries, k], "edgecore_compiled_search")


def _tensorrt_graph(operands: KeyOperands, device: str = "cuda:0", **options) -> SearchGraph:
    from edgecore.runtime.backends.tensorrt import device_index
    from edgecore.runtime.backends.tensorrt_search import TensorRTSearchGraph

    return TensorRTSearchGraph(operands, device=device_index(device), **options)


# Engines that run the key graph, by name (the TensorRT one imports TensorRT only when asked for).
SEARCH_GRAPH_ENGINES: dict[str, Callable[..., SearchGraph]] = {
    "openvino": OpenVINOSearchGraph,
    "tensorrt": _tensorrt_graph,
}


class CompiledSearch:
    """``NearestNeighbourSearch`` over the int8 index: engine proposes, the codes decide.

    Args:
        arrays: the int8 index's vector arrays (``runtime.index`` layout).
        candidates: proposals per query re-ranked exactly.
        engine: a :data:`SEARCH_GRAPH_ENGINES` name; options: passed to it (device; OpenVINO: precision,
            threads).
    """

    def __init__(self, arrays: dict[str, np.ndarray], candidates: int = COMPILED_CANDIDATES,
                 engine: str = "openvino", **options) -> None:
        self.rows = CodeRows(arrays)
        self.rows.prepare_ranking()
        self.shape = self.rows.shape
        self.candidates = min(int(candidates), self.shape[0])
        self.operands = KeyOperands.from_rows(self.rows, arrays)
        self.graph = SEARCH_GRAPH_ENGINES[engine](self.operands, **options)

    @property
    def points(self) -> CodeRows:
        return self.rows

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), self.shape[0])
        proposed = self.graph.candidates(queries, max(self.candidates, k))
        return rerank(queries, self.rows, proposed, k)

    def memory_bytes(self) -> int:
        return self.rows.table_bytes() + self.operands.coords.nbytes + self.graph.memory_bytes()
