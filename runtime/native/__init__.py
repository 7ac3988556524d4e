"""The portable native int8 search kernel (``int8search.c``), loaded with ctypes.

Why native: the camera's nearest-neighbour search over the int8 coreset is the latency bottleneck
(issue #11), and numpy has no exact int8 GEMM. The library is plain C (no Python C-API), compiled for
the baseline ISA when the package is installed (``setup.py``); it picks AVX-512 VNNI, AVX-VNNI, AVX2,
NEON dot product or plain C at run time, and every path returns bit-identical results (exact int32
dots, the same two float32 operations per key).

``EDGECORE_NATIVE_ISA`` forces a path (``scalar``, ``avx2``, ``avxvnni``, ``avx512vnni``, ``amx``, ``neon``) or
turns the library off (``off``: the search modes fall back to numpy/hnswlib, with a warning).
``EDGECORE_SEARCH_THREADS`` sets the kernel's thread count (default: the CPUs this process may use).
"""
from __future__ import annotations

import ctypes
import importlib.machinery
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni", "neon", "amx")
ENV_ISA = "EDGECORE_NATIVE_ISA"
ENV_THREADS = "EDGECORE_SEARCH_THREADS"
_ERRORS = {-1: "bad arguments or unsupported ISA", -2: "out of memory", -3: "a search thread failed"}

_i8 = np.ctypeslib.ndpointer(np.int8, flags="C_CONTIGUOUS")
_f32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_i32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
_idx = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
_i64 = ctypes.c_int64
MAX_COORDS = 256  # RR_MAX_COORDS in int8search.c


class DecodeTables(NamedTuple):
    """What the kernel needs to decode pca+int8 rows as ``CodeRows`` does:
    y = (code · scale + offset) + (coord_code · coord_scale + coord_offset) @ basis, in float32.

    codes: M×D int8 (contiguous rows, any stride); scale, offset: D float32 (offset already holds the
    +128 shift); basis: k×D float32; coord_codes: M×k uint16 (contiguous rows); coord_scale,
    coord_offset: k float32 (k may be 0).
    """

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    basis: np.ndarray
    coord_codes: np.ndarray
    coord_scale: np.ndarray
    coord_offset: np.ndarray

    @staticmethod
    def usable(codes: np.ndarray, coord_codes: np.ndarray) -> bool:
        """Whether the kernel can read these arrays in place (else the caller decodes with numpy)."""
        return (codes.dtype == np.int8 and codes.ndim == 2 and codes.strides[1] == 1
                and coord_codes.dtype == np.uint16 and coord_codes.ndim == 2
                and coord_codes.shape[1] <= MAX_COORDS
                and (coord_codes.shape[1] == 0 or coord_codes.strides[1] == 2)
                and coord_codes.strides[0] % 2 == 0)


class RankTables(NamedTuple):
    """What the kernel needs for rank keys (``Int8Kernel.rank_keys``): the codes, the coreset mean
    ``center``, the per-dimension ``scale`` and each row's centred squared norm (``norms``, M), plus the
    call's per-query coordinate weights Q×k, ((x − μ) · basisⱼ) · coord_scaleⱼ."""

    codes: np.ndarray
    coord_codes: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    norms: np.ndarray
    coord_weights: np.ndarray


class BoundTables(NamedTuple):
    """Int8 codes of the rows' p-dimensional projections, for :meth:`Int8Kernel.exact_pruned`'s lower bounds:
    ŷ_m = mid + step ⊙ code_m, bound_m = (‖ŷ_m − x̂‖ − margin) · shrink. table: M×W int8 (contiguous rows, W ≥
    width); step: width float32; margin ≥ ‖ŷ − y‖ plus slack; shrink ≤ 1 (float32 rounding of the projection)."""

    table: np.ndarray
    step: np.ndarray
    width: int
    margin: float
    shrink: float


class RowClusters(NamedTuple):
    """Rows grouped for :meth:`Int8Kernel.topk_pruned`: cluster j's row ids are ``member[start[j]:start[j + 1]]``
    (a multiple of 8, padded with −1), its ``center`` (p float32) and ``radius`` (float32, at least every member's
    distance to the centre in the space the keys measure)."""

    start: np.ndarray
    member: np.ndarray
    center: np.ndarray
    radius: np.ndarray


class QueryBounds(NamedTuple):
    """One :meth:`Int8Kernel.topk_pruned` call's queries: ``xt`` Q×p float32, each query as its int8 codes and
    scale represent it in the clusters' space, so that key = ‖y − x̃‖² − N_q exactly for a row y; ``shift`` Q
    float32, N_q plus the float32 rounding of the key, rounded up; ``margin`` Q float32, the float32 rounding of a
    distance ‖c − x̃‖; ``lift`` Q float32, N_q less the key's rounding, rounded down."""

    xt: np.ndarray
    shift: np.ndarray
    margin: np.ndarray
    lift: np.ndarray


class NativeUnavailable(RuntimeError):
    """The library is missing, unloadable, or switched off (``EDGECORE_NATIVE_ISA=off``)."""


def library_path(stem: str = "_int8search") -> Path | None:
    """The built shared object ``stem`` next to this file (None when not built): ``_int8search``, the
    search kernel, ``_pngfilter``, the PNG unfilter of ``edgecore.runtime.png``, or ``_resample``, the box
    reduction of ``edgecore.runtime.preprocess``."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def load_function(stem: str, name: str, argtypes: list, restype=ctypes.c_int):
    """Function ``name`` of the built library ``stem`` (:func:`library_path`) with its ctypes signature, or None
    when the library is missing or does not load: the callers then use their Pillow/numpy path."""
    path = library_path(stem)
    if path is None:
        return None
    try:
        function = getattr(ctypes.CDLL(str(path)), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


class Int8Kernel:
    """Fused brute-force top-k over int8 rows: key[q, m] = bias[m] − cq[q] · dot(query_q, row_m).

    Rows are the caller's M×W int8 array (W a multiple of 4, zero-padded; any row stride), used in place.
    """

    def __init__(self, lib: ctypes.CDLL, isa: str | None = None) -> None:
        self._lib = lib
        lib.ecs_isa_name.restype = ctypes.c_char_p
        lib.ecs_isa_name.argtypes = [ctypes.c_int]
        lib.ecs_isa_supported.argtypes = [ctypes.c_int]
        lib.ecs_best_isa.argtypes = []
        lib.ecs_effective_isa.argtypes = [ctypes.c_int, ctypes.c_int64]
        common = [_i8, _i64, _i64, ctypes.c_void_p, _i64, _i64, _f32, _i32, _f32]
        lib.ecs_topk.argtypes = common + [_i64, _i32, _f32, ctypes.c_int, ctypes.c_int]
        lib.ecs_keys.argtypes = common + [_f32, ctypes.c_int, ctypes.c_int]
        lib.ecs_quantize_bounds.argtypes = [_f32, _i64, _i64, _f32, _i64, _i8, _f32, _f32, ctypes.c_double,
                                            ctypes.c_double, ctypes.c_double, _f32, _f32, _f32, _f32]
        lib.ecs_topk_pruned.argtypes = common + [_i64, _i32, _f32, ctypes.c_int, ctypes.c_int, _i64, _i64, _idx, _i32,
                                                 _f32, _f32, _f32, _f32, _f32, _f32]
        decode = [_f32, _i64, _i64, ctypes.c_void_p, _i64, _f32, _f32, ctypes.c_void_p, _i64, ctypes.c_void_p, _i64,
                  ctypes.c_void_p, ctypes.c_void_p, _idx, _i64]
        lib.ecs_l2.argtypes = decode + [_f32, ctypes.c_int, ctypes.c_int]
        lib.ecs_rerank.argtypes = decode + [_i64, _f32, _f32, _idx, ctypes.c_int, ctypes.c_int]
        rank = [_f32, _f32, _f32, _f32, _i64, _i64, ctypes.c_void_p, _i64, _i64, ctypes.c_void_p, _i64, _f32, _i64,
                _idx, _i64]
        lib.ecs_rank_keys.argtypes = rank + [_f32, ctypes.c_int, ctypes.c_int]
        lib.ecs_rank_best.argtypes = rank + [_i64, _idx, ctypes.c_int, ctypes.c_int]
        lib.ecs_rank_measure.argtypes = rank + [_i64, _f32, _f32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                _f32, _idx, ctypes.c_int, ctypes.c_int]
        lib.ecs_project.argtypes = [_f32, _i64, _i64, _f32, _f32, _i64, _f32, ctypes.c_int, ctypes.c_int]
        lib.ecs_exact_pruned.argtypes = [_f32, _i64, ctypes.c_void_p, _i64, _f32, _f32, ctypes.c_void_p, _i64,
                                         ctypes.c_void_p, _i64, ctypes.c_void_p, ctypes.c_void_p, _i64,
                                         ctypes.c_void_p, _i64, _i64, _f32, _f32, ctypes.c_float, ctypes.c_float,
                                         ctypes.c_float, _i64, _i64, _f32, _idx, ctypes.POINTER(ctypes.c_int64),
                                         ctypes.c_int]
        self.available = tuple(name for i, name in enumerate(ISAS) if lib.ecs_isa_supported(i))
        best = ISAS[lib.ecs_best_isa()]
        self.isa = best if isa in (None, "", "auto") else isa
        if self.isa not in self.available:
            raise NativeUnavailable(f"{ENV_ISA}={isa!r}: this CPU/build runs only {', '.join(self.available)}")
        self.threads = _default_threads()

    def topk(self, queries: np.ndarray, rows: np.ndarray, bias: np.ndarray, corr: np.ndarray, cq: np.ndarray,
             k: int, isa: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` smallest keys per query, ascending by (key, row).

        Args:
            queries: Q×W int8 query codes (W = rows' width).
            rows: M×W int8 row codes (rows may be a strided view; each row contiguous).
            bias: M float32; corr: M int32, 128 · the sum of each row's codes; cq: Q float32.
            k: candidates per query (1 ≤ k ≤ M); isa: force a path (default: this kernel's).

        Returns:
            (Q×k float32 keys, Q×k int64 row indices).
        """
        queries, g, m = self._check(queries, rows, bias, corr, cq)
        if not 1 <= k <= m:
            raise ValueError(f"k must be in [1, {m}], got {k}")
        keys = np.empty((queries.shape[0], k), np.float32)
        idx = np.empty((queries.shape[0], k), np.int32)
        rc = self._lib.ecs_topk(queries, queries.shape[0], g, rows.ctypes.data, rows.strides[0], m, bias, corr,
                                cq, k, idx, keys, self._isa_id(isa), self.threads)
        self._raise(rc)
        return keys, idx.astype(np.int64)

    def quantize_bounds(self, projected: np.ndarray, scale: np.ndarray, width: int, mid: np.ndarray,
                        bias_max: float, reach: float, bias_error: float) -> tuple[np.ndarray, np.ndarray, QueryBounds]:
        """:func:`quantize_queries` of ``projected * scale`` (the same bits) and the codes' :class:`QueryBounds`
        for rows ŷ = mid + scale ⊙ code, in one pass (see ``ecs_quantize_bounds``).

        Args:
            projected: Q×p float32; scale, mid: p float32; width: the codes' row width (≥ p);
            bias_max, reach, bias_error: the rows' largest |bias|, ‖ŷ − mid‖ and |bias − ‖ŷ‖²|.

        Returns:
            (Q×width int8 codes, Q float32 steps, bounds).
        """
        projected = np.ascontiguousarray(projected, dtype=np.float32)
        nq, p = projected.shape
        codes = np.empty((nq, width), np.int8)
        step = np.empty(nq, np.float32)
        xt = np.empty((nq, p), np.float32)
        shift, margin, lift = (np.empty(nq, np.float32) for _ in range(3))
        self._raise(self._lib.ecs_quantize_bounds(projected, nq, p, np.ascontiguousarray(scale, np.float32), width,
                                                  codes, step, np.ascontiguousarray(mid, np.float32), bias_max, reach,
                                                  bias_error, xt, shift, margin, lift))
        return codes, step, QueryBounds(xt, shift, margin, lift)

    def topk_pruned(self, queries: np.ndarray, rows: np.ndarray, bias: np.ndarray, corr: np.ndarray, cq: np.ndarray,
                    k: int, clusters: "RowClusters", bounds: "QueryBounds", isa: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`topk` with whole clusters of rows skipped where their bound shows no row can enter a query's k
        best (on every path: the AVX-512 list driver, or the tile driver): the same results, bit for bit.

        Args:
            clusters: the rows' :class:`RowClusters`; bounds: these queries' :class:`QueryBounds`.
        """
        queries, g, m = self._check(queries, rows, bias, corr, cq)
        if not 1 <= k <= m:
            raise ValueError(f"k must be in [1, {m}], got {k}")
        nq, (count, p) = queries.shape[0], clusters.center.shape
        if (clusters.start.shape != (count + 1,) or clusters.radius.shape != (count,)
                or clusters.member.shape != (int(clusters.start[-1]),)):
            raise ValueError(f"clusters must be {count} centres with {count + 1} starts into the member list")
        if bounds.xt.shape != (nq, p) or any(v.shape != (nq,) for v in (bounds.shift, bounds.margin, bounds.lift)):
            raise ValueError(f"query bounds must describe {nq} queries of {p} dims")
        keys = np.empty((nq, k), np.float32)
        idx = np.empty((nq, k), np.int32)
        rc = self._lib.ecs_topk_pruned(queries, nq, g, rows.ctypes.data, rows.strides[0], m, bias, corr, cq, k, idx,
                                       keys, self._isa_id(isa), self.threads, clusters.center.shape[0], p,
                                       clusters.start, clusters.member, clusters.center, clusters.radius, bounds.xt,
                                       bounds.shift, bounds.margin, bounds.lift)
        self._raise(rc)
        return keys, idx.astype(np.int64)

    def keys(self, queries: np.ndarray, rows: np.ndarray, bias: np.ndarray, corr: np.ndarray, cq: np.ndarray,
             isa: str | None = None) -> np.ndarray:
        """Every key, Q×M float32 (for a few queries: the certification of the image maximum)."""
        queries, g, m = self._check(queries, rows, bias, corr, cq)
        out = np.empty((queries.shape[0], m), np.float32)
        rc = self._lib.ecs_keys(queries, queries.shape[0], g, rows.ctypes.data, rows.strides[0], m, bias, corr, cq,
                                out, self._isa_id(isa), self.threads)
        self._raise(rc)
        return out

    def project(self, vectors: np.ndarray, center: np.ndarray, basis_t: np.ndarray,
                isa: str | None = None) -> np.ndarray:
        """(vectors − center) @ basis_t, each output summed over D in order (the same bits on every path and
        thread count; close to, not equal to, numpy's BLAS product).

        Args:
            vectors: Q×D float32; center: D float32; basis_t: D×p float32.

        Returns:
            Q×p float32.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        center = np.ascontiguousarray(center, dtype=np.float32)
        basis_t = np.ascontiguousarray(basis_t, dtype=np.float32)
        if vectors.ndim != 2 or center.shape != (vectors.shape[1],) or basis_t.ndim != 2 \
                or basis_t.shape[0] != vectors.shape[1]:
            raise ValueError(f"project needs Q×D vectors, a D center and a D×p basis, got {vectors.shape}, "
                             f"{center.shape}, {basis_t.shape}")
        out = np.empty((vectors.shape[0], basis_t.shape[1]), np.float32)
        self._raise(self._lib.ecs_project(vectors, vectors.shape[0], vectors.shape[1], center, basis_t,
                                          basis_t.shape[1], out, self._isa_id(isa), self.threads))
        return out

    def exact_pruned(self, query: np.ndarray, tables: DecodeTables, bounds: BoundTables, offsets: np.ndarray,
                     bound: float, holder: int, k: int, isa: str | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """The exact ``k`` nearest rows of one query (true L2 as :meth:`l2`, ties by row), measuring only the rows
        whose lower bound from ``bounds`` can still beat the k-th distance (the certified maximum's search).

        Args:
            query: D float32; tables: the coreset's :class:`DecodeTables`; bounds: the int8 codes of the rows'
                projections (:class:`BoundTables`); offsets: p float32, mid − the query's projection;
                bound, holder: a distance already reached and its row (k = 1), else +inf and −1.

        Returns:
            (k distances, k row ids) nearest first, and how many rows were decoded.
        """
        m, dim = tables.codes.shape
        args, _ = self._decode_args(np.asarray(query, np.float32).reshape(1, -1), tables, np.zeros((1, 0), np.int64))
        table, width = bounds.table, bounds.width
        if (table.dtype != np.int8 or table.ndim != 2 or table.shape[0] != m or table.strides[1] != 1
                or not 1 <= width <= min(table.shape[1], MAX_COORDS)):
            raise ValueError(f"bound table must be M×W int8 rows (M={m}) holding {width} codes")
        offsets = np.ascontiguousarray(offsets, dtype=np.float32)
        step = np.ascontiguousarray(bounds.step, dtype=np.float32)
        if offsets.shape != (width,) or step.shape != (width,):
            raise ValueError(f"offsets and step must hold {width} floats, got {offsets.shape}, {step.shape}")
        if not 1 <= k <= m or (k == 1 and not 0 <= holder < m):
            raise ValueError(f"k must be in [1, {m}] (and k = 1 needs a holder row), got k={k}, holder={holder}")
        dist = np.empty(k, np.float32)
        idx = np.empty(k, np.int64)
        measured = ctypes.c_int64(0)
        self._raise(self._lib.ecs_exact_pruned(
            args[0], dim, *args[3:13], m, table.ctypes.data, table.strides[0], width, offsets, step,
            bounds.margin, bounds.shrink, bound, holder, k, dist, idx, ctypes.byref(measured), self._isa_id(isa)))
        return dist, idx, int(measured.value)

    def l2(self, queries: np.ndarray, tables: DecodeTables, candidates: np.ndarray,
           isa: str | None = None) -> np.ndarray:
        """True L2 distances from each query to its candidate rows, decoded as ``CodeRows`` does and
        summed in float64 (as ``search_coarse.direct_l2``).

        Args:
            queries: Q×D float32; tables: the coreset's :class:`DecodeTables`; candidates: Q×K row ids.

        Returns:
            Q×K float32 distances, in candidate order.
        """
        args, shape = self._decode_args(queries, tables, candidates)
        out = np.empty(shape, np.float32)
        self._raise(self._lib.ecs_l2(*args, out, self._isa_id(isa), self.threads))
        return out

    def rerank(self, queries: np.ndarray, tables: DecodeTables, candidates: np.ndarray, k: int,
               isa: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest of each query's candidates by true L2 (:meth:`l2`), ascending by
        (distance, candidate position).

        Returns:
            (Q×k float32 distances, Q×k int64 row ids).
        """
        args, shape = self._decode_args(queries, tables, candidates)
        if not 1 <= k <= shape[1]:
            raise ValueError(f"k must be in [1, {shape[1]}], got {k}")
        scratch = np.empty(shape, np.float32)
        dist = np.empty((shape[0], k), np.float32)
        idx = np.empty((shape[0], k), np.int64)
        self._raise(self._lib.ecs_rerank(*args, k, scratch, dist, idx, self._isa_id(isa), self.threads))
        return dist, idx

    def rank_keys(self, queries: np.ndarray, ranking: RankTables, candidates: np.ndarray,
                  isa: str | None = None) -> np.ndarray:
        """Keys that order each query's candidates like their L2 distances, without decoding a row:
        ``norms[m] − 2 (w_q · code_m + coord_weights_q · coord_code_m)`` with w_q = (x_q − μ) ⊙ scale
        (``CodeRows.rank_keys`` less its per-query constant). The code part is an exact integer product
        with w_q rounded to int16 once per query (see ``int8search.c``), the rest float32 in one fixed order:
        bit-identical on every path.

        Args:
            queries: Q×D float32; ranking: the coreset's :class:`RankTables` with this call's Q×k
                ``coord_weights``; candidates: Q×K row ids.

        Returns:
            Q×K float32 keys, in candidate order.
        """
        args, shape = self._rank_args(queries, ranking, candidates)
        out = np.empty(shape, np.float32)
        self._raise_rank(self._lib.ecs_rank_keys(*args, out, self._isa_id(isa), self.threads))
        return out

    def rank_best(self, queries: np.ndarray, ranking: RankTables, candidates: np.ndarray, keep: int,
                  isa: str | None = None) -> np.ndarray:
        """The ``keep`` candidates of each query with the smallest :meth:`rank_keys`, ascending by
        (key, candidate position): Q×keep int64 row ids."""
        args, shape = self._rank_args(queries, ranking, candidates)
        if not 1 <= keep <= shape[1]:
            raise ValueError(f"keep must be in [1, {shape[1]}], got {keep}")
        out = np.empty((shape[0], keep), np.int64)
        self._raise_rank(self._lib.ecs_rank_best(*args, keep, out, self._isa_id(isa), self.threads))
        return out

    def rank_measure(self, queries: np.ndarray, ranking: RankTables, tables: DecodeTables, candidates: np.ndarray,
                     keep: int, isa: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rank_best` then :meth:`rerank` of the kept rows in one call (one pass over the queries, each
        query's winners measured while they are in cache): the same results, bit for bit.

        Returns:
            (Q×keep float32 true L2 distances, Q×keep int64 row ids), ascending by (distance, rank).
        """
        args, shape = self._rank_args(queries, ranking, candidates)
        if not 1 <= keep <= shape[1]:
            raise ValueError(f"keep must be in [1, {shape[1]}], got {keep}")
        decode, _ = self._decode_args(args[0], tables, np.zeros((shape[0], 0), np.int64))
        if tables.codes.ctypes.data != ranking.codes.ctypes.data or tables.codes.shape != ranking.codes.shape:
            raise ValueError("rank and decode tables must describe the same codes")
        dist = np.empty((shape[0], keep), np.float32)
        idx = np.empty((shape[0], keep), np.int64)
        # the checked decode arguments: scale, offset, basis; coord_scale, coord_offset (see _decode_args)
        self._raise_rank(self._lib.ecs_rank_measure(*args, keep, *decode[5:8], *decode[11:13], dist, idx,
                                                    self._isa_id(isa), self.threads))
        return dist, idx

    @staticmethod
    def _rank_args(queries: np.ndarray, r: "RankTables", candidates: np.ndarray) -> tuple[list, tuple[int, int]]:
        m, dim = r.codes.shape
        ncoord = r.coord_codes.shape[1]
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        weights = np.ascontiguousarray(r.coord_weights, dtype=np.float32)
        cand = np.ascontiguousarray(candidates, dtype=np.int64)
        if not DecodeTables.usable(r.codes, r.coord_codes) or r.coord_codes.shape[0] != m:
            raise ValueError("rank tables: codes M×D int8 and coord_codes M×k uint16 with contiguous rows")
        for name, array, size in (("center", r.center, dim), ("scale", r.scale, dim), ("norms", r.norms, m)):
            if array.dtype != np.float32 or array.shape != (size,) or not array.flags.c_contiguous:
                raise ValueError(f"{name} must be a contiguous float32 vector of {size}")
        if (queries.ndim != 2 or queries.shape[1] != dim or weights.shape != (queries.shape[0], ncoord)
                or cand.ndim != 2 or cand.shape[0] != queries.shape[0]):
            raise ValueError(f"queries Q×{dim}, coord_weights Q×{ncoord} and candidates Q×K, got {queries.shape}, "
                             f"{weights.shape}, {cand.shape}")
        coord_stride = r.coord_codes.strides[0] // 2 if ncoord else 0
        return [queries, r.center, r.scale, weights, queries.shape[0], dim, r.codes.ctypes.data, r.codes.strides[0],
                ncoord, r.coord_codes.ctypes.data, coord_stride, r.norms, m, cand, cand.shape[1]], cand.shape

    def _raise_rank(self, rc: int) -> None:
        if rc == -1:
            raise ValueError("candidate ids must be in [0, M)")
        self._raise(rc)

    @staticmethod
    def _decode_args(queries: np.ndarray, t: DecodeTables, candidates: np.ndarray) -> tuple[list, tuple[int, int]]:
        """ctypes arguments shared by ecs_l2/ecs_rerank, after checking every shape (the C side trusts them)."""
        m, dim = t.codes.shape
        ncoord = t.basis.shape[0]
        if not DecodeTables.usable(t.codes, t.coord_codes) or t.coord_codes.shape != (m, ncoord):
            raise ValueError("decode tables: codes M×D int8 and coord_codes M×k uint16 with contiguous rows")
        for name, array, shape in (("scale", t.scale, (dim,)), ("offset", t.offset, (dim,)),
                                   ("basis", t.basis, (ncoord, dim)), ("coord_scale", t.coord_scale, (ncoord,)),
                                   ("coord_offset", t.coord_offset, (ncoord,))):
            if array.dtype != np.float32 or array.shape != shape or not array.flags.c_contiguous:
                raise ValueError(f"{name} must be contiguous float32 of shape {shape}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        cand = np.ascontiguousarray(candidates, dtype=np.int64)
        if queries.ndim != 2 or queries.shape[1] != dim or cand.ndim != 2 or cand.shape[0] != queries.shape[0]:
            raise ValueError(f"queries must be Q×{dim} and candidates Q×K, got {queries.shape}, {cand.shape}")
        if cand.size and (cand.min() < 0 or cand.max() >= m):
            raise ValueError(f"candidate ids must be in [0, {m})")
        coord_stride = t.coord_codes.strides[0] // 2 if ncoord else 0
        args = [queries, queries.shape[0], dim, t.codes.ctypes.data, t.codes.strides[0], t.scale, t.offset,
                t.basis.ctypes.data, ncoord, t.coord_codes.ctypes.data, coord_stride, t.coord_scale.ctypes.data,
                t.coord_offset.ctypes.data, cand, cand.shape[1]]
        return args, cand.shape

    def path_for(self, width: int, isa: str | None = None) -> str:
        """The path that runs rows of ``width`` bytes (AMX hands tables narrower than 64 bytes to AVX-512)."""
        return ISAS[self._lib.ecs_effective_isa(self._isa_id(isa), width)]

    def _isa_id(self, isa: str | None) -> int:
        name = self.isa if isa is None else isa
        if name not in self.available:
            raise NativeUnavailable(f"ISA path {name!r} is not available here ({', '.join(self.available)})")
        return ISAS.index(name)

    @staticmethod
    def _check(queries, rows, bias, corr, cq) -> tuple[np.ndarray, int, int]:
        queries = np.ascontiguousarray(queries, dtype=np.int8)
        if rows.dtype != np.int8 or rows.ndim != 2 or rows.strides[1] != 1 or rows.shape[1] % 4:
            raise ValueError("rows must be M×W int8 with contiguous rows and W a multiple of 4")
        m, width = rows.shape
        if queries.ndim != 2 or queries.shape[1] != width:
            raise ValueError(f"queries must be Q×{width} int8, got {queries.shape}")
        for name, array, dtype, size in (("bias", bias, np.float32, m), ("corr", corr, np.int32, m),
                                         ("cq", cq, np.float32, queries.shape[0])):
            if array.dtype != dtype or array.shape != (size,) or not array.flags.c_contiguous:
                raise ValueError(f"{name} must be a contiguous {np.dtype(dtype).name} vector of {size}")
        return queries, width // 4, m

    @staticmethod
    def _raise(rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"native int8 search failed: {_ERRORS.get(rc, rc)}")


def _default_threads() -> int:
    value = os.environ.get(ENV_THREADS)
    if value:
        return max(1, int(value))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@lru_cache(maxsize=None)
def _load(isa: str | None) -> Int8Kernel:
    if isa == "off":
        raise NativeUnavailable(f"switched off ({ENV_ISA}=off)")
    path = library_path()
    if path is None:
        raise NativeUnavailable(f"{Path(__file__).parent}/_int8search*.so is not built (reinstall the package)")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailable(f"cannot load {path}: {exc}") from exc
    return Int8Kernel(lib, isa)


def kernel() -> Int8Kernel:
    """The process's kernel (ISA from ``EDGECORE_NATIVE_ISA``); NativeUnavailable when there is none."""
    return _load(os.environ.get(ENV_ISA) or None)


def kernel_or_warn(fallback: str) -> Int8Kernel | None:
    """The kernel, or None with a warning naming the ``fallback`` the caller searches with instead."""
    try:
        return kernel()
    except NativeUnavailable as exc:
        warnings.warn(f"native int8 search unavailable ({exc}); searching with {fallback} instead", RuntimeWarning,
                      stacklevel=2)
        return None


def quantize_queries(z: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Q×n float query weights → (Q×width int8 codes, zero-padded; Q float32 steps): z ≈ step · code.

    Symmetric per-query scale (max |z| → 127), so the row side needs no query-dependent offset.
    """
    z = np.asarray(z, dtype=np.float32)
    peak = np.max(np.abs(z), axis=1)
    step = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    codes = np.zeros((z.shape[0], width), np.int8)
    codes[:, : z.shape[1]] = np.clip(np.rint(z / step[:, None]), -127, 127).astype(np.int8)
    return codes, step
