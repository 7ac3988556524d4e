"""Searches built on the native int8 kernel: the 'int8' mode, and coarse mode's candidate stage.

Camera side, torch-free. Two uses of one kernel (``edgecore.runtime.native.Int8Kernel``):

* :class:`Int8Search` ('int8' mode, for low-D backbones such as Lite0): brute force over the full-D int8
  codes themselves. Ranking key of row m for query x (centred x' = x − μ, as ``CodeRows.rank_keys``):
  ‖y_m − μ‖² − 2 [(x' ⊙ scale) · code_m + (B x' ⊙ coord_scale) · coord_m] + const. The 16-bit PCA
  coordinates enter as 8-bit columns appended to the codes (``coord ≈ 257 · (c8 + 128)``) and the query
  weights are quantized to int8 per query, so each key is one exact int32 dot. The ``candidates``
  smallest keys are re-ranked exactly on the codes (``search_coarse.rerank``), so every distance
  returned is a true L2 distance to a stored row.
  The appended columns share the codes' buffer: the codes are re-homed into an M×W array
  [codes | c8 | 0-pad], and ``arrays['codes']`` becomes its M×D view, so one copy of the coreset exists.
* :class:`ProjectedCandidates` (coarse mode): the same brute force over int8 codes of the PCA
  projections, in place of hnswlib's graph query.

Certified maximum (int8 mode). The key error has a bound per query and row: the query's int8 rounding
(≤ step/2 per weight, times the row's L1 norm) plus the coordinates' 8-bit rounding (≤ ½ Σ|weight|).
So the image's worst queries are searched exactly: every row whose key minus its bound could still beat
the best distance found is measured by direct difference — exact, and cheap because the kernel gives
all M keys of one query in one pass.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edgecore.runtime.native import Int8Kernel, RowClusters, quantize_queries
from edgecore.runtime.search_coarse import CodeBounds, CodeRows, code_rounding, direct_l2, rerank

INT8_CANDIDATES = 16  # untuned default (--search int8 on another mode's bundle); export tunes it per coreset
PROJECTED_STEP_EXPONENT = 0.5  # coarse mode: row code step × (σ_max / σ_d) ** this (see ProjectedCandidates)
# Coarse mode's candidate stage skips whole clusters of rows (Int8Kernel.topk_pruned) from this many rows, with about
# ROWS_PER_CLUSTER rows in each (bottle WRN50, RESULTS.md #11 "Clusters of rows").
PRUNE_MIN_ROWS = 4096
ROWS_PER_CLUSTER = 32
_CLUSTER_BLOCK = 2048  # rows per block of the assignment to the nearest seed
_COORD_STEP = 257  # uint16 coordinate code ≈ 257 · (int8 + 128): 0..65535 onto 0..255
_KEY_SLACK = 1e-4  # relative float32 rounding allowance on the key bounds (float32 norms summed over D terms)


def pad4(width: int) -> int:
    """The kernel's row width for ``width`` bytes of codes (a multiple of 4, zero-padded)."""
    return (width + 3) // 4 * 4


def _row_tables(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(128 · row sum, row L1 norm) of int8 rows, int32: the kernel's u8 correction and the error bound."""
    wide = rows.astype(np.int32)
    return (128 * wide.sum(axis=1)).astype(np.int32), np.abs(wide).sum(axis=1).astype(np.int32)


class Int8Search:
    """'int8' mode: native brute force over the int8 codes, exact re-rank, certified image maximum.

    Args:
        arrays: the stored int8 index arrays (``codes`` is re-homed, see the module doc).
        kernel: the loaded native kernel.
        candidates: keys re-ranked exactly per query; certify_block: queries per image.
    """

    def __init__(self, arrays: dict[str, np.ndarray], kernel: Int8Kernel, candidates: int = INT8_CANDIDATES,
                 certify_block: int = 784) -> None:
        codes = arrays["codes"]
        size, dim = codes.shape
        self._coords = arrays["coord_codes"].shape[1]
        width = pad4(dim + self._coords)
        table = np.zeros((size, width), np.int8)
        table[:, :dim] = codes
        coord8 = np.rint(arrays["coord_codes"].astype(np.float32) / _COORD_STEP)  # 0..255
        table[:, dim : dim + self._coords] = (coord8 - 128).astype(np.int8)
        arrays["codes"] = table[:, :dim]  # the one copy: the stored codes are this view from now on
        self._table = table
        self.rows = CodeRows(arrays)
        self.rows.prepare_ranking()
        self._center, self._norms = self.rows.ranking_tables()
        self._scale = arrays["scale"].astype(np.float32)
        self._basis = arrays["basis"].astype(np.float32)
        self._coord_weight = (arrays["coord_scale"].astype(np.float64) * _COORD_STEP).astype(np.float32)
        self._coord_offset = arrays["coord_offset"].astype(np.float32)
        self._offset_centred = (arrays["offset"].astype(np.float64) + 128.0 * arrays["scale"].astype(np.float64)
                                - self._center).astype(np.float32)
        self._corr, self._l1 = _row_tables(table)
        self.kernel = kernel
        self.shape = (size, dim)
        self.size = size
        self.candidates = min(int(candidates), size)
        self.certify_block = int(certify_block)

    @property
    def points(self) -> CodeRows:
        return self.rows

    @property
    def isa(self) -> str:
        return self.kernel.path_for(self._table.shape[1])

    def memory_bytes(self) -> int:
        """Beyond the stored arrays (whose codes are a view of the table): the appended columns and padding,
        the per-row tables and the decoding tables."""
        extra = self._table.nbytes - self._table[:, : self.shape[1]].size
        return extra + self._corr.nbytes + self._l1.nbytes + self.rows.table_bytes()

    def _weights(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(int8 query codes, cq = 2 · step, centred queries, coordinate weights Q×k, PCA coordinates Q×k)."""
        centred = queries - self._center
        coords = centred @ self._basis.T  # Q×k
        weights = np.empty((queries.shape[0], self.shape[1] + self._coords), np.float32)
        np.multiply(centred, self._scale, out=weights[:, : self.shape[1]])
        coord_w = np.multiply(coords, self._coord_weight, out=weights[:, self.shape[1] :])
        codes, step = quantize_queries(weights, self._table.shape[1])
        return codes, (2.0 * step).astype(np.float32), centred, coord_w, coords

    def _constant(self, centred: np.ndarray, coords: np.ndarray, coord_w: np.ndarray) -> float:
        """2·C_q of one query, the key's per-query constant (only the certified queries need it)."""
        return 2.0 * (centred.astype(np.float64) @ self._offset_centred + coords.astype(np.float64) @ self._coord_offset
                      + 128.0 * coord_w.astype(np.float64).sum())

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), self.size)
        codes, cq, centred, coord_w, coords = self._weights(queries)
        _, candidates = self.kernel.topk(codes, self._table, self._norms, self._corr, cq, max(self.candidates, k))
        distances, indices = rerank(queries, self.rows, candidates, k, coords)
        for start in range(0, queries.shape[0], self.certify_block):
            stop = min(start + self.certify_block, queries.shape[0])
            order = start + np.argsort(-distances[start:stop, 0], kind="stable")
            best = -np.inf
            for row in order:  # decreasing re-ranked distance, an upper bound of the true one
                if distances[row, 0] <= best:
                    break
                constant = self._constant(centred[row], coords[row], coord_w[row])
                distances[row], indices[row] = self.exact(queries[row], codes[row], cq[row], constant,
                                                          coord_w[row], float(distances[row, k - 1]), k)
                best = max(best, float(distances[row, 0]))
        return distances, indices

    def exact(self, query: np.ndarray, code: np.ndarray, cq: float, constant: float, coord_w: np.ndarray,
              bound: float, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest rows of one query (``bound``: a k-th distance already reached, e.g. by the
        re-ranked candidates). Rows whose key lower bound cannot beat it are never measured.

        Returns (k distances, k indices), nearest first, ties by index.
        """
        keys = self.kernel.keys(code[None], self._table, self._norms, self._corr, np.array([cq], np.float32))[0]
        centred = query.astype(np.float64) - self._center
        base = keys.astype(np.float64) - constant + float(centred @ centred)  # ≈ squared distance
        error = 0.5 * cq * self._l1 + float(np.abs(coord_w).sum())  # 2·(step/2·L1) + 2·(½ Σ|w|)
        slack = _KEY_SLACK * (float(self._norms.max()) + float(np.abs(keys).max()) + abs(constant) + float(centred @ centred))
        lower = base - error - slack
        ids = np.flatnonzero(lower <= bound * bound * (1 + _KEY_SLACK))
        if ids.size < k:  # the bound is always reached by the caller's own k rows; keep the k lowest anyway
            ids = np.argsort(lower, kind="stable")[:k]
        dist = np.concatenate([direct_l2(query[None], self.rows, chunk[None])[0]
                               for chunk in np.array_split(ids, max(1, ids.size // 4096))])
        keep = np.lexsort((ids, dist))[:k]
        return dist[keep], ids[keep]


class ProjectedCandidates:
    """Coarse mode's candidate stage: brute force over int8 codes of the PCA projections (replaces the
    hnswlib graph query; the re-rank and the certified maximum stay ``CoarseSearch``'s).

    Per-dimension symmetric codes of the projected rows, ŷ = mid + step ⊙ r; key = ‖ŷ_m‖² − 2 (x̂ ⊙ step) · r_m
    orders the rows like ‖x̂ − ŷ_m‖² up to the query's and the rows' int8 rounding, and the k smallest keys
    are proposed. The query weights x̂ ⊙ step get one int8 scale per query; with full-range row steps they
    span the projections' variance ratio squared, and the low-variance directions kept few query levels
    (the k smallest keys then found recall@1 0.9838 on bottle WRN50, so 4·k were taken and narrowed to k in
    float32 projected distance: 0.9983). The rows of direction d are therefore coded with
    step × (σ_max / σ_d) ** ``PROJECTED_STEP_EXPONENT``, which splits the precision between the two sides:
    the k smallest keys alone give 0.9974 (2·k narrowed: 0.9982), Spearman 0.99998, Δ AUROC 0.00 pt, and
    the search takes 5.7–5.9 instead of 7.1–7.4 ms per image (``bench_search_modes.py fidelity`` /
    ``latency``, RESULTS.md #11 "AMX").
    """

    def __init__(self, projected: np.ndarray, kernel: Int8Kernel) -> None:
        """``projected``: the M×p float32 projections (only their int8 codes are kept)."""
        lo, hi = projected.min(axis=0), projected.max(axis=0)
        self._mid = ((lo.astype(np.float64) + hi) / 2).astype(np.float32)
        half = (hi.astype(np.float64) - lo) / 2
        sigma = projected.std(axis=0, dtype=np.float64)
        gain = (sigma.max() / np.where(sigma > 0, sigma, 1.0)) ** PROJECTED_STEP_EXPONENT  # σ = 0: half = 0, step 1
        self._step = np.where(half > 0, half / 127.0 * gain, 1.0).astype(np.float32)
        codes = np.clip(np.rint((projected - self._mid) / self._step), -127, 127)
        self._table = np.zeros((projected.shape[0], pad4(projected.shape[1])), np.int8)
        self._table[:, : projected.shape[1]] = codes.astype(np.int8)
        decoded = self._mid + self._step * codes.astype(np.float32)
        self._bias = np.einsum("md,md->m", decoded, decoded).astype(np.float32)
        self._corr, _ = _row_tables(self._table)
        # |ŷ_d − y_d| ≤ step_d / 2 (the gain keeps every code inside ±127: no clipping): the certified maximum's
        # bounds read the same table
        self.bounds = CodeBounds(self._table, self._mid, self._step, projected.shape[1], code_rounding(self._step, half))
        self.kernel = kernel
        self._clusters = None
        if len(codes) >= PRUNE_MIN_ROWS:
            # the rows as the keys see them: ŷ = mid + step ⊙ code, exact in float64
            exact = self._mid.astype(np.float64) + self._step.astype(np.float64) * codes
            self._clusters = row_clusters(exact, max(1, len(codes) // ROWS_PER_CLUSTER))
            self._key_terms = _KeyTerms.of(exact, self._bias, self._mid)

    @property
    def isa(self) -> str:
        return self.kernel.path_for(self._table.shape[1])

    def propose(self, projected: np.ndarray, k: int) -> np.ndarray:
        """Q×k candidate rows for Q projected queries."""
        k = min(k, self._table.shape[0])
        if self._clusters is None:
            codes, step = quantize_queries(projected * self._step, self._table.shape[1])
            return self.kernel.topk(codes, self._table, self._bias, self._corr, (2.0 * step).astype(np.float32), k)[1]
        terms = self._key_terms
        codes, step, bounds = self.kernel.quantize_bounds(projected, self._step, self._table.shape[1], self._mid,
                                                          terms.bias_max, terms.reach, terms.bias_error)
        cq = (2.0 * step).astype(np.float32)
        return self.kernel.topk_pruned(codes, self._table, self._bias, self._corr, cq, k, self._clusters, bounds)[1]

    def memory_bytes(self) -> int:
        clusters = sum(a.nbytes for a in self._clusters) if self._clusters is not None else 0
        return (self._table.nbytes + self._bias.nbytes + self._corr.nbytes + self._mid.nbytes + self._step.nbytes
                + clusters)


def row_clusters(points: np.ndarray, count: int) -> RowClusters:
    """Rows in ``count`` clusters for :meth:`Int8Kernel.topk_pruned`: farthest-point seeds (from row 0, so the
    result depends on the rows alone), each row with its nearest seed, centred on the members' mean.

    Why farthest-point: a skipped cluster is one whose radius is small against its distance to the query, and
    farthest-point seeds bound the largest radius (the k-center criterion of the coreset itself). ``points``: M×p
    float64, the rows exactly as the keys see them; the radii are measured from the float32 centres the kernel
    reads and rounded up.
    """
    size = len(points)
    count = min(count, size)
    sq = np.einsum("md,md->m", points, points)
    seeds = np.zeros(count, np.int64)
    nearest = sq - 2.0 * points @ points[0] + sq[0]
    for i in range(1, count):
        seeds[i] = int(np.argmax(nearest))
        nearest = np.minimum(nearest, sq - 2.0 * points @ points[seeds[i]] + sq[seeds[i]])
    label = np.empty(size, np.int64)
    seed_points = points[seeds]
    seed_sq = sq[seeds]
    for start in range(0, size, _CLUSTER_BLOCK):
        block = slice(start, start + _CLUSTER_BLOCK)
        label[block] = np.argmin(seed_sq[None, :] - 2.0 * points[block] @ seed_points.T, axis=1)
    members = np.bincount(label, minlength=count)
    center = np.zeros((count, points.shape[1]), np.float64)
    np.add.at(center, label, points)
    center = (center / np.maximum(members, 1)[:, None]).astype(np.float32)
    distance = np.sqrt(np.sum((points - center[label].astype(np.float64)) ** 2, axis=1))
    radius = np.zeros(count, np.float64)
    np.maximum.at(radius, label, distance * (1.0 + 1e-9))
    radius = np.nextafter(radius.astype(np.float32), np.float32(np.inf))
    order = np.argsort(label, kind="stable")
    padded = (members + 7) // 8 * 8
    start = np.zeros(count + 1, np.int64)
    start[1:] = np.cumsum(padded)
    member = np.full(int(start[-1]), -1, np.int32)
    ends = np.cumsum(members)
    for j in range(count):
        member[start[j] : start[j] + members[j]] = order[ends[j] - members[j] : ends[j]]
    return RowClusters(start, member, center, radius)


class _KeyTerms(NamedTuple):
    """What the per-call :class:`QueryBounds` (``Int8Kernel.quantize_bounds``) need of the rows: the largest |bias|,
    the largest ‖ŷ − mid‖ and the largest |bias − ‖ŷ‖²| (the bias is float32)."""

    bias_max: float
    reach: float
    bias_error: float

    @classmethod
    def of(cls, exact: np.ndarray, bias: np.ndarray, mid: np.ndarray) -> "_KeyTerms":
        norms = np.einsum("md,md->m", exact, exact)
        reach = float(np.sqrt(np.max(np.sum((exact - mid.astype(np.float64)) ** 2, axis=1))))
        return cls(float(np.max(np.abs(bias))), reach, float(np.max(np.abs(bias.astype(np.float64) - norms))))
