"""The coreset as a compact on-disk index: quantized vectors + an hnswlib graph.

Camera side, torch-free (numpy + hnswlib + the native kernel in ``runtime.native``). Design, measured in
``benchmarks/INDEX_STUDY.md``:

* Vectors are stored quantized and decoded to float32 once at load, so every
  search runs on fp32 BLAS/SIMD and returns true L2 distances in the original
  feature space. ``int8`` is per-dimension affine uint8 (stored as int8) of the
  residual after the top ``k`` principal directions, whose coordinates are kept
  at 16 bit (``k`` fills the size budget; ``k = 0`` is plain per-dimension int8).
  Plain int8 reached recall@1 0.9896 (Lite0) / 0.9870 (WRN50) on bottle, below
  the 0.99 bar; the few 16-bit PCA coordinates carry most of the variance, so the
  residual's int8 steps shrink: 0.9916 / 0.9988 for +0.02 × the fp32 bytes. ``fp16`` and ``fp32`` store the values as they are;
  fp32 makes exact mode bit-identical to the host's ``ExactSearch``.
* ``mode="hnsw"`` keeps hnswlib's graph but stores only its links: hnswlib would
  save float32 vectors (4× the int8 codes), so we rebuild its state from the
  links plus the decoded vectors at load. ``mode="exact"`` is ``ExactSearch`` over
  the decoded vectors (the faster choice for small coresets).
* ``mode="coarse"`` (int8 only) holds no fp32 copy at all: a PCA projection of the
  coreset proposes candidates, which are re-ranked exactly on the int8 codes
  (``runtime.search_coarse``). Its graph arrays add the projection (``proj_basis``,
  ``proj_center``) to the hnsw links; where the native kernel loads
  (``runtime.native``) the candidates come from its int8 brute force over the
  projections instead, and the stored graph is only the fallback (no kernel, or a
  kernel path without an int8 dot product, where the graph is faster).
* ``mode="int8"`` (int8 only) is the native kernel's brute force over the
  full-D codes themselves, with an exact re-rank and a certified image maximum
  (``runtime.native.search``). Automatic exports also store a fallback for other
  camera CPUs (description ``"fallback"``), and a bundle opened without an explicit
  mode searches with it where :func:`int8_fallback_reason` says so; only then are its
  graph arrays read into memory. ``"coarse"`` (low-D exports now): the projection and
  32-d graph of coarse mode over the same codes, which searches on every kernel path but
  ``FULL_D_PATHS`` (and without the kernel): the full-D brute force needs 512-bit int8
  dot products to win (bottle Lite0 in the detector: avxvnni 10.5 vs 14.0 ms, avx2 14.3
  with the graph's candidates vs 33.8, and 21.6 for the full-D hnsw graph; avx512vnni
  6.0 vs 5.8–5.9 ms and amx keep int8).
  ``"hnsw"`` (older exports, or where coarse's probe failed): the full-D graph, used on
  the ``avx2`` / ``scalar`` paths and without the kernel. Without a stored fallback
  (``--search int8``) it runs as chosen, and without the kernel it falls back to
  exact mode.
* HNSW is least reliable far from the data, which is exactly where the image
  score comes from (the farthest patch). So hnsw mode certifies, per block of
  ``certify_block`` consecutive queries (one image's patches), that the largest
  nearest-neighbour distance is exact, by re-searching the worst patches exactly
  (see ``_certify_max``). Without it, image-score Spearman vs exact fell to
  0.998 at ef=128 and 0.992 at ef=64 on Lite0 (usearch f16: 0.89).

Everything is stored as ``.npy`` (``allow_pickle=False``) plus a JSON-able
description with a SHA-256 per file, so a corrupt file is caught at load.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from edgecore.runtime import native
from edgecore.runtime.errors import BundleError, NonFiniteError
from edgecore.runtime.fsutil import sha256_file
from edgecore.runtime.native.search import INT8_CANDIDATES, PRUNE_MIN_ROWS, Int8Search, ProjectedCandidates, pad4
from edgecore.runtime.search import ExactSearch, exact_l2
from edgecore.runtime.search_coarse import CodeRows, CoarseSearch, GraphProposer
from edgecore.runtime.search_compiled import CompiledSearch

DTYPES = ("int8", "fp16", "fp32")
FORMAT = "edgecore-index/1"
_HNSWLIB_STATE_VERSION = 1  # hnswlib's pickle-state layout we rebuild (hnswlib 0.8)

# Arrays each dtype stores, with their numpy dtype (shapes are checked against size/dim).
_VECTOR_ARRAYS: dict[str, dict[str, str]] = {
    "int8": {
        "codes": "int8",  # M×D residual codes, value = offset + scale · (code + 128)
        "offset": "float32",  # D
        "scale": "float32",  # D
        "basis": "float32",  # k×D orthonormal principal directions
        "coord_codes": "uint16",  # M×k coordinates along basis, value = coord_offset + coord_scale · code
        "coord_offset": "float32",  # k
        "coord_scale": "float32",  # k
    },
    "fp16": {"codes": "float16"},
    "fp32": {"codes": "float32"},
}
_GRAPH_ARRAYS = {
    "level0": "uint32",  # M×(1 + 2·m): hnswlib's level-0 link block (count word, then links)
    "upper": "uint32",  # links of levels ≥ 1, concatenated in id order (hnswlib layout)
    "levels": "uint8",  # M: top level of each element
}
_COARSE_ARRAYS = {
    **_GRAPH_ARRAYS,  # links over the projected points
    "proj_basis": "float32",  # p×D orthonormal projection the graph was built in
    "proj_center": "float32",  # D, subtracted before projecting
}
# Ranges a stored parameter must lie in (anything else is refused at load, never handed to hnswlib).
_PARAM_RANGES = {"m": (2, 1024), "ef_construction": (1, 1 << 20), "ef_search": (1, 1 << 16),
                 "certify_block": (1, 1 << 24), "max_level": (0, 255), "seed": (0, 1 << 62),
                 "candidates": (1, 4096), "proj_dim": (1, 4096)}
# Parameters of a mode without a graph (the description's "search_params"), range-checked the same way.
_SEARCH_PARAM_KEYS = ("candidates", "certify_block")
# Kernel paths without int8 dot-product instructions: there the stored hnsw graph of an int8 bundle is faster
# (benchmarks/RESULTS.md #11, bottle Lite0: avx2 160.8 vs hnsw 68.6 ms on Intel, 44.1 vs 41.9 on AMD; scalar 1 648
# vs 45.7 ms; no kernel: exact over the decoded codes 54.4 vs 42.3 ms).
NO_DOT_PRODUCT_PATHS = ("avx2", "scalar")
FALLBACK_MODES = ("hnsw", "coarse")  # what an int8 description may declare as "fallback" (that mode's graph)


def coarse_takes_graph(path: str | None, size: int) -> bool:
    """Whether coarse mode proposes from its stored graph on this kernel path (None: no kernel) for ``size`` rows.

    Always without the kernel or on its plain C path. On the avx2 path (no int8 dot-product instructions) only below
    ``PRUNE_MIN_ROWS``, where the native stage scans every row: bottle WRN50, 1 thread, 30.6 ms native vs 19.6 ms
    graph. Above it the native stage skips whole clusters of rows and is faster (4.9 vs 8.4 ms on 2 threads, 8.2 vs
    10.1 on 1, kernel forced to avx2 on the AMX VM), and it holds no hnswlib copy: 0.288 vs 0.361 × the fp32
    coreset (RESULTS.md #11, "The same pruning on the tile paths")."""
    return path is None or path == "scalar" or (path == "avx2" and size < PRUNE_MIN_ROWS)
# Kernel paths on which int8 mode's full-D brute force beats (or ties) a stored coarse fallback in the detector
# (bottle Lite0, RESULTS.md #11 "Coarse for Lite0": avx512vnni 5.8-5.9 vs 6.0 ms, amx 4.1 vs 5.3 ms).
FULL_D_PATHS = ("amx", "avx512vnni")


class QuantizedIndex:
    """Nearest-neighbour search over a quantized coreset (``NearestNeighbourSearch``).

    Build it on the host with ``edgecore.export.index_build.build_index``; the camera
    gets it back with :meth:`load`. Memory after load (:meth:`memory_bytes`): the
    stored arrays, plus in exact and hnsw mode ``ExactSearch``'s two fp32 copies
    (points and centred points, 8·M·D bytes), plus in hnsw mode hnswlib's own fp32
    copy and links (4·D + 8·m + 12 bytes per point). Coarse mode holds the stored
    arrays and either the int8 codes of the projections for the native kernel (p + 8
    bytes per point; its lower bounds read the same codes) or, without the kernel,
    hnswlib's float32 copy of the projections, its links, and p-byte int8 codes of the
    projections for the lower bounds: no fp32 copy of the coreset. Int8
    mode holds the stored arrays (its codes share the kernel's table), the table's
    8-bit PCA columns and padding, and 12 bytes per point of row tables.
    """

    def __init__(
        self,
        dtype: str,
        arrays: dict[str, np.ndarray],
        mode: str,
        graph: dict[str, np.ndarray] | None = None,
        hnsw: dict | None = None,
        choice: dict | None = None,
        search_params: dict | None = None,
        placement: SearchPlacement | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {tuple(SEARCH_MODES)}, got {mode!r}")
        entry = SEARCH_MODES[mode]
        if entry.graph_arrays and (graph is None or hnsw is None):
            raise ValueError(f"mode={mode!r} needs the graph arrays and the hnsw parameters")
        if entry.int8_only and dtype != "int8":
            raise ValueError(f"mode={mode!r} searches the int8 codes; use dtype='int8'")
        self.dtype = dtype
        self.mode = mode
        self.choice = dict(choice or {"mode": mode})  # why the exporter chose this mode (manifest only)
        self.arrays = arrays
        self.graph = graph if entry.graph_arrays else None
        self.hnsw = dict(hnsw) if entry.graph_arrays and hnsw is not None else None
        self.search_params = dict(search_params) if entry.has_params and search_params is not None else None
        self.fallback: tuple[dict[str, np.ndarray], dict] | None = None  # int8 mode's stored graph (export side)
        self.fallback_mode: str | None = None  # that graph's mode, one of FALLBACK_MODES
        self.replaced: dict | None = None  # set by load: {"mode": the bundle's mode, "reason": why this mode runs}
        params = self.hnsw if entry.graph_arrays else self.search_params
        placed = (placement,) if entry.uses_placement else ()
        self.searcher: Searcher = entry.open(dtype, arrays, self.graph, params, *placed)
        self.size, self.dim = self.searcher.shape

    # --- search -------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Q×D float32 queries → (Q×k float32 L2 distances, Q×k int64 indices), nearest first.

        Raises ``NonFiniteError`` when a query or a result is not finite: a frame
        whose distances cannot be computed must never be scored (fail closed).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be Q×{self.dim}, got {queries.shape}")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not getattr(self.searcher, "checks_queries", False) and not np.isfinite(queries).all():
            raise NonFiniteError("index search: the query features contain NaN or infinite values")
        distances, indices = self.searcher.search(queries, int(k))
        if not np.isfinite(distances).all():
            raise NonFiniteError("index search: a nearest-neighbour distance is not finite")
        return distances, indices

    @property
    def points(self):
        """The memory bank as the camera sees it, indexable by row: M×D float32 (exact/hnsw), or
        the int8 codes decoded on access (coarse: :class:`CodeRows`, no fp32 copy exists)."""
        return self.searcher.points

    def store_fallback(self, graph_index: "QuantizedIndex") -> None:
        """Store ``graph_index``'s graph (hnsw or coarse) with this int8 index, for the CPUs where
        :func:`int8_fallback_reason` prefers it (see the module doc). Built on the same coreset: the graph is
        over the same decoded codes."""
        if self.mode != "int8" or graph_index.mode not in FALLBACK_MODES or graph_index.graph is None:
            raise ValueError(f"only an int8 index stores a fallback graph ({graph_index.mode!r} given)")
        if (graph_index.size, graph_index.dim, graph_index.dtype) != (self.size, self.dim, self.dtype):
            raise ValueError("the fallback graph must index the same coreset")
        self.fallback = (graph_index.graph, dict(graph_index.hnsw))
        self.fallback_mode = graph_index.mode

    def describe(self) -> str:
        """The mode that runs, and why when it is not the bundle's (info / bench output)."""
        text = f"{self.dtype} {self.mode} over {self.size}×{self.dim}"
        if isinstance(self.searcher, CoarseSearcher):
            text += f", candidates: {self.searcher.candidate_stage}"
        if self.replaced:
            text += f" (bundle's mode {self.replaced['mode']} replaced: {self.replaced['reason']})"
        return text

    # --- persistence --------------------------------------------------------
    def save(self, directory: str | Path) -> dict:
        """Write ``index_*.npy`` into an existing ``directory``; return the description.

        ``np.save`` output depends only on the arrays, so two exports of the same
        model (deterministic build) are byte-identical.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"{directory}: not an existing directory")
        files: dict[str, dict] = {}
        graph, hnsw = self.fallback if self.fallback is not None else (self.graph, self.hnsw)
        for group, arrays in (("vectors", self.arrays), ("graph", graph or {})):
            for key, array in arrays.items():
                name = f"index_{group}_{key}.npy"
                path = directory / name
                np.save(path, np.ascontiguousarray(array), allow_pickle=False)
                files[f"{group}.{key}"] = {"file": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        description = {
            "format": FORMAT,
            "dtype": self.dtype,
            "mode": self.mode,
            "size": self.size,
            "dim": self.dim,
            "files": files,
            "quantization": self.quantization_info(),
        }
        if hnsw is not None:
            description["hnsw"] = dict(hnsw)
        if self.fallback is not None:
            description["fallback"] = self.fallback_mode
        if self.search_params is not None:
            description["search_params"] = dict(self.search_params)
        description["choice"] = dict(self.choice)
        return description

    @classmethod
    def load(cls, directory: str | Path, description: dict, automatic: bool = True,
             placement: SearchPlacement | None = None) -> "QuantizedIndex":
        """Rebuild the index from the files ``save`` wrote; BundleError if anything is off.

        Every field and array is checked before hnswlib sees it: hnswlib trusts its
        links, levels and entry point, and a wrong one crashes the process natively.
        ``automatic``: the mode was not given explicitly, so an int8 bundle's declared fallback graph
        replaces the kernel where :func:`int8_fallback_reason` says so (``replaced`` records it).
        ``placement``: where a mode that runs on an inference engine runs (None: OpenVINO on the CPU).
        A declared fallback is checked on every load (parameters, SHA-256, shapes, links); its arrays are
        read into memory only when it is used (otherwise through a read-only map that is dropped).
        """
        directory = Path(directory)
        try:
            if description.get("format") != FORMAT:
                raise BundleError(f"index format {description.get('format')!r}, expected {FORMAT!r}")
            dtype, mode = description["dtype"], description["mode"]
            if dtype not in DTYPES:
                raise BundleError(f"index dtype {dtype!r} is not one of {DTYPES}")
            if mode not in SEARCH_MODES:
                raise BundleError(f"index mode {mode!r} is not one of {tuple(SEARCH_MODES)}")
            entry = SEARCH_MODES[mode]
            if entry.int8_only and dtype != "int8":
                raise BundleError(f"index mode {mode!r} needs dtype 'int8'")
            size, dim = _int_field(description, "size", 1, 1 << 31), _int_field(description, "dim", 1, 1 << 16)
            files = description["files"]
            hnsw = description.get("hnsw") if entry.graph_arrays else None
            if entry.graph_arrays and not isinstance(hnsw, dict):
                raise BundleError(f"index mode {mode!r} but the description has no 'hnsw' parameters")
            search_params = description.get("search_params") if entry.has_params else None
            if search_params is not None:  # absent when another mode's bundle is opened with --search
                if not isinstance(search_params, dict):
                    raise BundleError("index field 'search_params' must be an object")
                search_params = {key: _int_field(search_params, key, *_PARAM_RANGES[key]) for key in _SEARCH_PARAM_KEYS}
            fallback = description.get("fallback")
            if fallback is not None:
                if mode != "int8" or fallback not in FALLBACK_MODES:
                    raise BundleError(f"index field 'fallback' {fallback!r}: only an int8 index may declare one, "
                                      f"of {FALLBACK_MODES} (this index: mode {mode!r})")
                hnsw = description.get("hnsw")
                if not isinstance(hnsw, dict):
                    raise BundleError("index declares a fallback graph but has no 'hnsw' parameters")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{directory}: malformed index description: {exc!r}") from exc
        arrays = {key: _read(directory, files, f"vectors.{key}", dt) for key, dt in _VECTOR_ARRAYS[dtype].items()}
        replaced = None
        if fallback is not None:
            stored = SEARCH_MODES[fallback]
            reason = int8_fallback_reason(dim, arrays["coord_codes"], fallback) if automatic else None
            if reason is None:  # the graph stays on disk: checked through a read-only map, then dropped
                mapped = {key: _read(directory, files, f"graph.{key}", dt, mmap=True)
                          for key, dt in stored.graph_arrays.items()}
                _check_shapes(directory, dtype, arrays, mapped, size, dim)
                _check_graph(directory, mapped, hnsw, stored.extra_params, size, dim)
                del mapped
                hnsw = None
            else:
                mode, entry, replaced = fallback, SEARCH_MODES[fallback], {"mode": "int8", "reason": reason}
        graph = None
        if entry.graph_arrays:  # read-only maps: every searcher builds its own structure from them (hnswlib copies the
            # links; the native candidate stage never reads them), so no second 2 MB copy stays in memory (bottle WRN50)
            graph = {key: _read(directory, files, f"graph.{key}", dt, mmap=True) for key, dt in entry.graph_arrays.items()}
        _check_shapes(directory, dtype, arrays, graph, size, dim)
        _check_finite(directory, {**arrays, **(graph or {})})
        if graph is not None:
            _check_graph(directory, graph, hnsw, entry.extra_params, size, dim)
        try:
            index = cls(dtype, arrays, mode, graph, hnsw, search_params=search_params, placement=placement)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise BundleError(f"{directory}: inconsistent index files: {exc}") from exc
        index.replaced = replaced
        return index

    # --- sizes ---------------------------------------------------------------
    def quantization_info(self) -> dict:
        info: dict = {"kind": {"int8": "pca16+int8", "fp16": "float16", "fp32": "float32"}[self.dtype]}
        if self.dtype == "int8":
            info["pca_components"] = int(self.arrays["basis"].shape[0])
        return info

    def stored_bytes(self) -> dict[str, int]:
        """Array bytes by part (what ``save`` writes, less ~128 B of .npy header per file)."""
        parts = {"vectors": sum(a.nbytes for a in self.arrays.values())}
        graph = self.fallback[0] if self.fallback is not None else self.graph
        if graph is not None:
            parts["graph"] = sum(a.nbytes for a in graph.values())
        return parts

    def memory_bytes(self) -> int:
        """Resident bytes of everything the search holds (stored arrays, decoded copies, hnswlib's index).

        hnswlib's part is its serialised size (vectors, links, labels) plus its label
        hash map (~40 B per point, which ``index_file_size`` does not count)."""
        return sum(a.nbytes for a in self.arrays.values()) + self.searcher.memory_bytes()


_HNSWLIB_LABEL_MAP_BYTES = 40  # std::unordered_map<labeltype, tableint> node + bucket, per element


def _int_field(mapping: dict, key: str, low: int, high: int) -> int:
    """An integer field in [low, high]; bools and floats are refused (JSON 1.5 is not a count)."""
    value = mapping[key]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= int(value) <= high:
        raise BundleError(f"index field {key!r} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


# --- vectors -----------------------------------------------------------------
def decode(dtype: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Stored arrays → M×D float32 vectors (the only dequantization path, host and camera)."""
    if dtype == "fp32":
        return np.ascontiguousarray(arrays["codes"], dtype=np.float32)
    if dtype == "fp16":
        return arrays["codes"].astype(np.float32)
    rows = CodeRows(arrays)
    return rows[: len(rows)]


def _check_shapes(directory: Path, dtype: str, arrays: dict, graph: dict | None, size: int, dim: int) -> None:
    expected = {"codes": (size, dim)}
    if dtype == "int8":
        k = arrays["basis"].shape[0] if arrays["basis"].ndim == 2 else -1
        expected.update(
            offset=(dim,), scale=(dim,), basis=(k, dim), coord_codes=(size, k), coord_offset=(k,), coord_scale=(k,)
        )
    if graph is not None:
        if graph["levels"].shape != (size,) or graph["level0"].ndim != 2 or graph["level0"].shape[0] != size:
            raise BundleError(f"{directory}: index graph does not match {size} points")
        if graph["upper"].ndim != 1:
            raise BundleError(f"{directory}: index graph 'upper' must be one-dimensional")
        if "proj_basis" in graph:
            basis = graph["proj_basis"]
            if basis.ndim != 2 or basis.shape[1] != dim or not 1 <= basis.shape[0] <= dim:
                raise BundleError(f"{directory}: projection basis has shape {basis.shape}, expected p×{dim}")
            if graph["proj_center"].shape != (dim,):
                raise BundleError(f"{directory}: projection centre has shape {graph['proj_center'].shape}, expected ({dim},)")
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise BundleError(f"{directory}: index array {key!r} has shape {arrays[key].shape}, expected {shape}")


def _check_finite(directory: Path, arrays: dict[str, np.ndarray]) -> None:
    """One NaN in the vectors or their tables would make every distance NaN (and NaN ≥ threshold is False)."""
    for key, array in arrays.items():
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise BundleError(f"{directory}: index array {key!r} contains NaN or infinite values")
    scales = [arrays[key] for key in ("scale", "coord_scale") if key in arrays]
    if any(np.any(scale <= 0) for scale in scales):
        raise BundleError(f"{directory}: index quantization scales must be positive")


def _check_graph(directory: Path, graph: dict[str, np.ndarray], params: dict, extra_params: tuple[str, ...],
                 size: int, dim: int) -> None:
    """Everything hnswlib would trust: parameter ranges, levels, entry point, link counts and ids."""
    values = _graph_params(directory, params, extra_params, size)
    entry_point = values["entry_point"]
    m, levels = values["m"], graph["levels"]
    if graph["level0"].shape != (size, 1 + 2 * m):
        raise BundleError(f"{directory}: level-0 links have shape {graph['level0'].shape}, expected {(size, 1 + 2 * m)}")
    top = int(levels.max())
    if values["max_level"] != top:
        raise BundleError(f"{directory}: hnsw max_level {values['max_level']} but the levels array tops out at {top}")
    if int(levels[entry_point]) != top:
        raise BundleError(f"{directory}: hnsw entry point {entry_point} is on level {int(levels[entry_point])}, "
                          f"not on the top level {top}")
    if graph["upper"].size != (1 + m) * int(levels.astype(np.int64).sum()):
        raise BundleError(f"{directory}: upper-level links do not match the element levels")
    for name, links, width in (("level-0", graph["level0"], 2 * m), ("upper", graph["upper"].reshape(-1, 1 + m), m)):
        if links.size == 0:
            continue
        counts = links[:, 0].astype(np.int64)  # hnswlib's count word: the low 16 bits, the rest must be 0
        if counts.max() > width:
            raise BundleError(f"{directory}: {name} graph link count {int(counts.max())} exceeds {width}")
        used = np.arange(links.shape[1] - 1)[None, :] < counts[:, None]
        if used.any() and int(links[:, 1:][used].max()) >= size:
            raise BundleError(f"{directory}: {name} graph links out of range (point ids must be < {size})")
    if "proj_basis" in graph:
        basis = graph["proj_basis"].astype(np.float64)
        if not np.allclose(basis @ basis.T, np.eye(basis.shape[0]), atol=1e-4):
            raise BundleError(f"{directory}: projection basis is not orthonormal (its lower bounds would be wrong)")


def _graph_params(directory: Path, params: dict, extra_params: tuple[str, ...], size: int) -> dict:
    """The hnsw section's parameters, range-checked (integers, plus ``entry_point`` < size and a finite ``mult``)."""
    try:
        values = {key: _int_field(params, key, *_PARAM_RANGES[key])
                  for key in ("m", "ef_construction", "ef_search", "certify_block", "max_level", "seed")}
        values.update({key: _int_field(params, key, *_PARAM_RANGES[key]) for key in extra_params})
        values["entry_point"] = _int_field(params, "entry_point", 0, size - 1)
        mult = params["mult"]
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not (math.isfinite(mult) and mult > 0):
            raise BundleError(f"index field 'mult' must be a positive finite number, got {mult!r}")
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{directory}: malformed hnsw parameters: {exc!r}") from exc
    except BundleError as exc:
        raise BundleError(f"{directory}: {exc}") from None
    return values


def int8_fallback_reason(dim: int, coord_codes: np.ndarray, fallback: str = "hnsw") -> str | None:
    """Why an int8 bundle's stored ``fallback`` (hnsw or coarse) should search instead of the kernel's full-D
    brute force on this CPU, or None.

    The kernel's path for int8 mode's table (D codes + k coordinate columns, padded to 4 bytes) decides. A
    coarse fallback wins on every path but ``FULL_D_PATHS`` (its 32-byte projected rows need a fifth of the
    dot products; with 512-bit int8 dot products or tiles the full-D scan costs no more than coarse's re-rank);
    an hnsw fallback wins where the path has no int8 dot-product instructions (``NO_DOT_PRODUCT_PATHS``).
    Both win without the kernel.
    """
    try:
        kernel = native.kernel()
    except native.NativeUnavailable as exc:
        return f"native int8 kernel unavailable ({exc})"
    path = kernel.path_for(pad4(dim + coord_codes.shape[1]))
    if fallback == "coarse" and path not in FULL_D_PATHS:
        return (f"the kernel's {path} path has no AMX tiles or AVX-512 VNNI here; the stored coarse projection's "
                "candidates are faster than the full-D brute force")
    if fallback == "hnsw" and path in NO_DOT_PRODUCT_PATHS:
        return f"the kernel's {path} path has no int8 dot-product instructions here; the stored hnsw graph is faster"
    return None


def _read(directory: Path, files: dict, key: str, dtype: str, mmap: bool = False) -> np.ndarray:
    """The listed file for ``key`` (plain name, present, the description's SHA-256), as an array of ``dtype``."""
    try:
        entry = files[key]
        path = directory / entry["file"]
        expected_sha = entry["sha256"]
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{directory}: index description lists no file for {key!r}") from exc
    if Path(entry["file"]).name != entry["file"]:
        raise BundleError(f"{directory}: index file name {entry['file']!r} must be a plain file name")
    if not path.is_file():
        raise BundleError(f"{path}: index file missing")
    if sha256_file(path) != expected_sha:
        raise BundleError(f"{path}: index file corrupt (SHA-256 does not match the description)")
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable index file: {exc}") from exc
    if array.dtype != np.dtype(dtype):
        raise BundleError(f"{path}: dtype {array.dtype}, expected {dtype}")
    return array




# --- hnswlib graph -------------------------------------------------------------
def build_hnsw_graph(points: np.ndarray, m: int, ef_construction: int, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Build hnswlib's graph over ``points`` and keep only its links.

    Single-threaded with a fixed seed, so the same points give the same graph
    (and the same bytes) on every export. Returns (graph arrays, hnsw parameters).
    """
    import hnswlib

    size, dim = points.shape
    index = hnswlib.Index(space="l2", dim=dim)
    index.init_index(max_elements=size, M=m, ef_construction=ef_construction, random_seed=seed)
    index.set_num_threads(1)
    index.add_items(np.ascontiguousarray(points, dtype=np.float32), np.arange(size))
    state = index.__getstate__()[0]
    if state["ser_version"] != _HNSWLIB_STATE_VERSION or state["max_M0"] != 2 * m:
        raise RuntimeError(f"unsupported hnswlib state layout (ser_version {state['ser_version']})")
    if int(np.max(state["element_levels"])) > 255:
        raise RuntimeError("hnswlib produced a level above 255")
    per_element = state["data_level0"].view(np.uint8).reshape(size, state["size_data_per_element"])
    graph = {
        "level0": np.ascontiguousarray(per_element[:, : state["offset_data"]]).view(np.uint32),
        "upper": state["link_lists"].view(np.uint32).copy(),
        "levels": state["element_levels"].astype(np.uint8),
    }
    params = {
        "m": m,
        "ef_construction": ef_construction,
        "seed": seed,
        "max_level": int(state["max_level"]),
        "entry_point": int(state["enterpoint_node"]),
        "mult": float(state["mult"]),
    }
    return graph, params


def _hnswlib_index(graph: dict[str, np.ndarray], points: np.ndarray, params: dict):
    """hnswlib's state rebuilt from the stored links and the decoded vectors (no file round trip)."""
    import hnswlib

    size, dim = points.shape
    m = int(params["m"])
    link0 = (1 + 2 * m) * 4
    if graph["level0"].shape != (size, 1 + 2 * m):
        raise ValueError(f"level-0 links have shape {graph['level0'].shape}, expected {(size, 1 + 2 * m)}")
    size_links = (1 + m) * 4
    labels = np.arange(size, dtype=np.uint64)
    data = np.empty((size, link0 + 4 * dim + 8), dtype=np.uint8)
    data[:, :link0] = graph["level0"].view(np.uint8)
    data[:, link0 : link0 + 4 * dim] = np.ascontiguousarray(points, dtype=np.float32).view(np.uint8)
    data[:, link0 + 4 * dim :] = labels[:, None].view(np.uint8)
    state = {
        "ser_version": _HNSWLIB_STATE_VERSION,
        "space": "l2",
        "dim": dim,
        "index_inited": True,
        "ep_added": True,
        "normalize": False,
        "num_threads": 1,
        "seed": int(params["seed"]),
        "offset_level0": 0,
        "max_elements": size,
        "cur_element_count": size,
        "size_data_per_element": data.shape[1],
        "label_offset": link0 + 4 * dim,
        "offset_data": link0,
        "max_level": int(params["max_level"]),
        "enterpoint_node": int(params["entry_point"]),
        "max_M": m,
        "max_M0": 2 * m,
        "M": m,
        "mult": float(params["mult"]),
        "ef_construction": int(params["ef_construction"]),
        "ef": int(params["ef_search"]),
        "has_deletions": False,
        "size_links_per_element": size_links,
        "allow_replace_deleted": False,
        "label_lookup_external": labels,
        "label_lookup_internal": np.arange(size, dtype=np.uint32),
        "element_levels": graph["levels"].astype(np.int32),
        "data_level0": data.reshape(-1).view(np.int8),
        "link_lists": graph["upper"].view(np.int8),
    }
    index = hnswlib.Index.__new__(hnswlib.Index)
    index.__setstate__((state,))
    index.set_num_threads(len(os.sched_getaffinity(0)))  # queries are independent: results do not depend on it
    return index


# --- search modes (registry) -------------------------------------------------
class Searcher(Protocol):
    """What a search mode opens over the stored arrays (``QuantizedIndex`` delegates to it)."""

    shape: tuple[int, int]

    @property
    def points(self): ...  # the coreset rows as the search measures them (M×D, indexable by row)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def memory_bytes(self) -> int: ...  # resident bytes beyond the stored arrays


@dataclass(frozen=True)
class SearchMode:
    """One way to search the coreset, as a registry entry (like timm's: the entry owns its factory).

    Adding a mode: one ``register_search_mode`` call here, plus its graph builder in
    ``edgecore.export.index_build.GRAPH_BUILDERS`` (host code stays out of the camera runtime).

    Attributes:
        name: the manifest's ``index.mode``.
        graph_arrays: graph arrays the mode stores, with their dtypes ({} = vectors only).
        extra_params: hnsw-section parameters beyond the graph's own, range-checked at load.
        int8_only: the mode searches the int8 codes themselves.
        has_params: a mode without a graph that keeps ``search_params`` (candidates, certify_block).
        open: (dtype, vector arrays, graph arrays, hnsw parameters or search_params) → the in-memory searcher;
            with ``uses_placement``, a fifth argument: the :class:`SearchPlacement` (None: the host CPU).
        uses_placement: the mode runs on an inference engine, where the detector's engine runs.
    """

    name: str
    graph_arrays: dict[str, str]
    open: Callable[..., Searcher]
    extra_params: tuple[str, ...] = ()
    int8_only: bool = False
    has_params: bool = False
    uses_placement: bool = False


SEARCH_MODES: dict[str, SearchMode] = {}


@dataclass(frozen=True)
class SearchPlacement:
    """Where a search that runs on an inference engine (``compiled``) runs: the detector's own backend and
    device, so an Intel iGPU camera (OpenVINO ``GPU``) or a Jetson (TensorRT ``cuda:0``) searches there too."""

    backend: str = "openvino"
    device: str = "CPU"


def register_search_mode(mode: SearchMode) -> SearchMode:
    """Add (or replace) a search mode; ``QuantizedIndex`` and its loader pick it up by name."""
    SEARCH_MODES[mode.name] = mode
    return mode


class _ExactSearcher:
    """``ExactSearch`` over the decoded vectors: exact mode, and the graph mode's re-check."""

    def __init__(self, points: np.ndarray) -> None:
        self.exact = ExactSearch(points)
        self.shape = self.exact.points.shape

    @property
    def points(self) -> np.ndarray:
        return self.exact.points

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.exact.search(queries, k)

    def memory_bytes(self) -> int:
        exact = self.exact
        return exact.points.nbytes + exact.centered.nbytes + exact.norms.nbytes


class _HnswSearcher(_ExactSearcher):
    """hnswlib over the full-D decoded vectors, the image maximum certified exact per block."""

    def __init__(self, points: np.ndarray, graph: dict[str, np.ndarray], params: dict) -> None:
        super().__init__(points)
        self.params = params
        self.graph = _hnswlib_index(graph, self.exact.points, params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.shape[0])
        self.graph.set_ef(max(int(self.params["ef_search"]), k))
        labels, _ = self.graph.knn_query(queries, k=k)
        indices = labels.astype(np.int64)
        # hnswlib's float32 squared distances → the same direct-difference L2 as ExactSearch.
        distances = exact_l2(queries, self.exact.points, indices)
        order = np.argsort(distances, axis=1, kind="stable")
        distances = np.take_along_axis(distances, order, axis=1)
        indices = np.take_along_axis(indices, order, axis=1)
        block = int(self.params["certify_block"])
        for start in range(0, queries.shape[0], block):
            self._certify_max(queries, distances, indices, start, min(start + block, queries.shape[0]), k)
        return distances, indices

    def _certify_max(
        self, queries: np.ndarray, distances: np.ndarray, indices: np.ndarray, start: int, stop: int, k: int
    ) -> None:
        """Make the block's largest nearest-neighbour distance exact, in place.

        An HNSW answer is a real coreset point, so its distance is an upper bound
        on the true one. Re-searching the block's queries exactly in decreasing
        HNSW distance until the next bound is below the largest exact distance
        found proves that no other query can hold the maximum: the image score
        s* and its patch (Eq. 7) come out exactly as with exact search. Chunks
        grow 1, 2, 4, ...: usually the first query settles it, and one exact
        query costs a single pass over the coreset (~8 ms CPU at 16k×1024).
        """
        order = start + np.argsort(-distances[start:stop, 0], kind="stable")
        best, pos, chunk = -np.inf, 0, 1
        while pos < order.size and distances[order[pos], 0] > best:
            rows = order[pos : pos + chunk]
            distances[rows], indices[rows] = self.exact.search(queries[rows], k)
            best = max(best, float(distances[rows, 0].max()))
            pos, chunk = pos + chunk, chunk * 2

    def memory_bytes(self) -> int:
        return super().memory_bytes() + _hnswlib_bytes(self.graph, self.shape[0])


class CoarseSearcher(CoarseSearch):
    """``CoarseSearch`` over the int8 codes (no fp32 copy), with the registry's accounting. Candidates from
    the native int8 brute force over the projections where the kernel's path for them has an int8 dot
    product, or on avx2 above ``PRUNE_MIN_ROWS`` rows; else from hnswlib's stored graph (:func:`coarse_takes_graph`).
    ``candidate_stage`` says which.
    Public because the exporter builds one with ``graph_stage=True`` to check the stage other cameras run."""

    def __init__(self, arrays: dict[str, np.ndarray], graph: dict[str, np.ndarray], params: dict,
                 graph_stage: bool = False) -> None:
        """``graph_stage``: propose from the stored graph whatever the kernel (the exporter checks both stages)."""
        kernel = None if graph_stage else native.kernel_or_warn("coarse mode's stored hnswlib graph")
        size = arrays["codes"].shape[0]
        stored_basis = graph["proj_basis"]
        path = kernel.path_for(pad4(stored_basis.shape[0])) if kernel is not None else None
        native_stage = not coarse_takes_graph(path, size)
        if native_stage:
            self.candidate_stage = f"native {path}"
        elif graph_stage:
            self.candidate_stage = "stored hnswlib graph (requested)"
        elif path is not None:
            self.candidate_stage = (f"stored hnswlib graph (the kernel's {path} path has no int8 dot product"
                                    + (f" and {size} rows are too few to skip clusters of them)" if path == "avx2" else ")"))
        else:
            self.candidate_stage = "stored hnswlib graph (no native kernel)"

        def proposer(projected: np.ndarray):
            if native_stage:
                return ProjectedCandidates(projected, kernel)
            return GraphProposer(_hnswlib_index(graph, projected, params), params["ef_search"],
                                 lambda index: _hnswlib_bytes(index, size), projected)

        # The native stage projects on the codes' own principal directions when they have the stored
        # projection's width: the same subspace, and the projection then doubles as the re-rank's PCA
        # coordinates (RESULTS.md #11). The graph was built in the stored projection, so it keeps that one.
        own_basis = native_stage and arrays["basis"].shape == stored_basis.shape
        super().__init__(CodeRows(arrays), None if own_basis else stored_basis,
                         None if own_basis else graph["proj_center"], proposer,
                         candidates=params["candidates"], certify_block=params["certify_block"], kernel=kernel)
        self.shape = self.rows.shape

    @property
    def points(self) -> CodeRows:
        return self.rows

    def memory_bytes(self) -> int:
        return self.nbytes() + self.rows.table_bytes()


def _open_int8(dtype: str, arrays: dict[str, np.ndarray], params: dict | None) -> Searcher:
    """'int8' mode: the native brute force, or (no kernel) exact search over the decoded codes."""
    kernel = native.kernel_or_warn("exact search over the decoded codes")
    if kernel is None:
        return _ExactSearcher(decode(dtype, arrays))
    params = params or {}
    # Without stored parameters (another mode's bundle opened with --search int8) the whole call is one block.
    searcher = Int8Search(arrays, kernel, candidates=params.get("candidates", INT8_CANDIDATES),
                          certify_block=params.get("certify_block", _PARAM_RANGES["certify_block"][1]))
    if searcher.isa in NO_DOT_PRODUCT_PATHS:  # the path int8_fallback_reason judges (RESULTS.md #11)
        warnings.warn(f"int8 search runs the kernel's {searcher.isa} path here (no int8 dot-product instructions): "
                      "slower than the graph modes on this CPU; an automatic re-export stores the fallback the "
                      "runtime uses here instead (or re-export with --search hnsw)", RuntimeWarning, stacklevel=3)
    return searcher


def _open_compiled(arrays: dict[str, np.ndarray], placement: SearchPlacement) -> CompiledSearch:
    return CompiledSearch(arrays, engine=placement.backend, device=placement.device)


def _hnswlib_bytes(index, size: int) -> int:
    """hnswlib's serialised size (vectors, links, labels) plus its label hash map, which
    ``index_file_size`` does not count."""
    return index.index_file_size() + _HNSWLIB_LABEL_MAP_BYTES * size


register_search_mode(SearchMode(
    "exact", graph_arrays={}, open=lambda dtype, arrays, graph, params: _ExactSearcher(decode(dtype, arrays)),
))
register_search_mode(SearchMode(
    "hnsw", graph_arrays=_GRAPH_ARRAYS,
    open=lambda dtype, arrays, graph, params: _HnswSearcher(decode(dtype, arrays), graph, params),
))
register_search_mode(SearchMode(
    "coarse", graph_arrays=_COARSE_ARRAYS, extra_params=("candidates",), int8_only=True,
    open=lambda dtype, arrays, graph, params: CoarseSearcher(arrays, graph, params),
))
register_search_mode(SearchMode(
    "int8", graph_arrays={}, int8_only=True, has_params=True,  # no graph: the kernel scans the codes
    open=lambda dtype, arrays, graph, params: _open_int8(dtype, arrays, params),
))
register_search_mode(SearchMode(
    "compiled", graph_arrays={}, int8_only=True, uses_placement=True,  # its graph is built from the codes at load
    open=lambda dtype, arrays, graph, params, placement: _open_compiled(arrays, placement or SearchPlacement()),
))
