"""Two-stage search that holds only the quantized coreset: coarse candidates + exact re-rank + certified max.

Camera side, torch-free (numpy + hnswlib). Measured in ``benchmarks/INDEX_STUDY.md`` (§ "Search at the
hardware limit"):

* **Coarse.** A ``proj_dim``-dimensional PCA projection of the decoded coreset proposes ``candidates``
  points per query: by the native int8 brute force over the projections (``runtime.native.search``,
  see benchmarks/RESULTS.md) where the kernel loads — on the codes' own principal directions, so the
  projection is also the re-rank's PCA coordinates — else by the stored hnswlib graph over the stored projection.
  hnswlib keeps its own float32 copy of what it indexes, so at 32 dims that copy is 1/32 of the fp32
  coreset, and every graph hop costs 32 multiply-adds instead of 1024 (hnswlib's SSE build: no
  AVX-512 needed, see ``.ci/install``).
* **Re-rank.** The candidates are ranked on the int8 codes themselves (:meth:`CodeRows.rank_keys`, an
  integer dot product per candidate; natively where the kernel loads) and only the best are decoded and measured
  (:class:`CodeRows`: no fp32 copy of the coreset exists in memory, rows are decoded on demand, float64
  sums), so every distance returned is a true L2 distance to a stored row.
* **Certified maximum.** The image score is the largest nearest-neighbour distance, which is where an
  approximate search is least reliable. As in hnsw mode, the block's worst queries are re-searched
  exactly until the maximum is proven; here the exact search is pruned by the projection: an orthogonal
  projection never lengthens a vector, so ``‖P(x − y)‖ ≤ ‖x − y‖`` bounds every point from below and
  only points whose bound beats the current best are decoded. The bounds come from int8 codes of the
  projections (:class:`CodeBounds`: the native stage's own table, or one made for the graph), less their
  rounding, so no M×p float32 copy is held; natively (``Int8Kernel.exact_pruned``) the whole pruned search is
  one call.
"""
from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from edgecore.runtime import native
from edgecore.runtime.errors import NonFiniteError

# Orthogonal-projection lower bounds are shrunk by this relative margin before pruning: the stored
# basis is orthonormal only to float32 rounding, and the projections are float32.
_BOUND_SLACK = 1e-4
_MAX_STEP = 4096  # points decoded per step of the pruned exact search, at most


class CodeRows:
    """The pca+int8 coreset, decoded row by row (indexable like an M×D float32 array).

    value = offset + scale · (code + 128) + (coord_offset + coord_scale · coord_code) · basis,
    computed in float32 — the one decoding path (``runtime.index.decode`` uses it too).
    """

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self._codes = arrays["codes"]
        self._scale = arrays["scale"].astype(np.float32)
        self._offset = (arrays["offset"].astype(np.float64) + 128.0 * arrays["scale"].astype(np.float64)).astype(np.float32)
        self._basis = np.ascontiguousarray(arrays["basis"], dtype=np.float32)  # the native decode reads it raw
        self._coord_codes = arrays["coord_codes"]
        self._coord_offset = arrays["coord_offset"].astype(np.float32)
        self._coord_scale = arrays["coord_scale"].astype(np.float32)
        self.shape = self._codes.shape
        self.dtype = np.dtype(np.float32)
        self._norms = self._center = self._basis_t = self._center_coords = None  # prepare_ranking()

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        """Decoded rows: an int array of any shape → shape + (D,); a slice → a block of rows."""
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        ids = np.asarray(rows, dtype=np.int64)
        flat = ids.reshape(-1)
        out = self._codes[flat].astype(np.float32)
        out *= self._scale
        out += self._offset
        if self._basis.shape[0]:
            coords = self._coord_codes[flat].astype(np.float32)
            coords *= self._coord_scale
            coords += self._coord_offset
            out += coords @ self._basis
        return out.reshape(ids.shape + (self.shape[1],))

    def decode_tables(self) -> native.DecodeTables | None:
        """The decoding tables for the native kernel (None when it cannot read these arrays in place)."""
        if not native.DecodeTables.usable(self._codes, self._coord_codes):
            return None
        return native.DecodeTables(self._codes, self._scale, self._offset, self._basis, self._coord_codes,
                                   self._coord_scale, self._coord_offset)

    def rank_keys(self, queries: np.ndarray, index: np.ndarray, coords: np.ndarray | None = None) -> np.ndarray:
        """Q×K keys that order each query's candidates ``index`` (Q×K) like their L2 distances.

        ‖y − μ‖² − 2 (x − μ)·(y − μ) with y decoded on the fly, less a per-query constant: the int8 part is
        one product with the raw codes, the PCA part a k-wide one — no candidate row is decoded (natively
        where the kernel loads: ``runtime.native.Int8Kernel.rank_keys``). Centred on the coreset mean, as
        ``ExactSearch``, so near neighbours keep their order. ``coords``: the queries' PCA coordinates
        (x − μ) · basisⱼ (μ: :attr:`center`) where the caller has them. Needs :meth:`prepare_ranking` once.
        """
        found = _native_decoder(self)
        if found is not None:
            return found[0].rank_keys(queries, self.rank_tables(queries, coords), index)
        centred = queries - self._center
        # einsum reads the int8 codes directly (casting in small buffers): 4× faster than
        # converting the Q×K×D gather to float32 and calling a batched matmul.
        dots = np.einsum("qkd,qd->qk", self._codes[index], centred * self._scale, dtype=np.float32, casting="unsafe")
        if self._basis.shape[0]:
            dots += np.einsum("qkc,qc->qk", self._coord_codes[index].astype(np.float32),
                              self._coord_weights(queries, coords))
        return self._norms[index] - 2.0 * dots

    def rank_best(self, queries: np.ndarray, index: np.ndarray, keep: int,
                  coords: np.ndarray | None = None) -> np.ndarray:
        """Q×keep of each query's candidates ``index`` with the smallest :meth:`rank_keys`, ascending
        (ties by candidate position)."""
        found = _native_decoder(self)
        if found is not None:
            return found[0].rank_best(queries, self.rank_tables(queries, coords), index, keep)
        order = np.argsort(self.rank_keys(queries, index, coords), axis=1, kind="stable")[:, :keep]
        return np.take_along_axis(index, order, axis=1)

    def _coord_weights(self, queries: np.ndarray, coords: np.ndarray | None) -> np.ndarray:
        """Q×k ((x − μ) · basisⱼ) · coord_scaleⱼ; without ``coords`` as q · basisⱼ − μ · basisⱼ: one product with
        the raw queries (no Q×D centred copy; only the ranking uses it, and the winners are measured exactly)."""
        if coords is None:
            coords = queries @ self._basis_t - self._center_coords
        return coords * self._coord_scale

    def rank_tables(self, queries: np.ndarray, coords: np.ndarray | None) -> native.RankTables:
        """The native kernel's :class:`~edgecore.runtime.native.RankTables` for these queries (``coords``: as
        :meth:`rank_keys`)."""
        return native.RankTables(self._codes, self._coord_codes, self._center, self._scale, self._norms,
                                 self._coord_weights(queries, coords))

    def prepare_ranking(self) -> None:
        """The coreset mean and each row's centred squared norm (M floats), two passes over the codes."""
        center = np.zeros(self.shape[1], np.float64)
        for _, block in self.blocks():
            center += block.sum(axis=0, dtype=np.float64)
        self._center = (center / self.shape[0]).astype(np.float32)
        self._basis_t = np.ascontiguousarray(self._basis.T)
        self._center_coords = self._center @ self._basis_t
        norms = np.empty(self.shape[0], np.float32)
        for start, block in self.blocks():
            block -= self._center
            norms[start : start + len(block)] = np.einsum("md,md->m", block, block)
        self._norms = norms

    @property
    def basis(self) -> np.ndarray:
        """k×D principal directions of the codes' 16-bit coordinates."""
        return self._basis

    @property
    def center(self) -> np.ndarray:
        """The coreset mean μ (after :meth:`prepare_ranking`)."""
        return self._center

    def ranking_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(coreset mean D, centred squared norms M) of :meth:`prepare_ranking`, for engines that
        compute the same keys (``runtime.search_compiled``)."""
        if self._norms is None:
            self.prepare_ranking()
        return self._center, self._norms

    def blocks(self, rows: int = 2048):
        """(start, decoded block) over the whole coreset, ``rows`` at a time (bounded memory)."""
        for start in range(0, self.shape[0], rows):
            yield start, self[start : start + rows]

    def table_bytes(self) -> int:
        """Bytes of the float32 tables made at load (the codes themselves are the stored arrays)."""
        tables = [self._scale, self._offset, self._basis, self._coord_offset, self._coord_scale]
        if self._norms is not None:
            tables += [self._norms, self._center, self._basis_t, self._center_coords]
        return sum(a.nbytes for a in tables)


def _native_decoder(rows: CodeRows) -> tuple[native.Int8Kernel, native.DecodeTables] | None:
    """(kernel, tables) when the native kernel loads and reads these rows, else None (numpy decodes;
    the search modes that need the kernel warn about its absence themselves)."""
    tables = rows.decode_tables()
    if tables is None:
        return None
    try:
        return native.kernel(), tables
    except native.NativeUnavailable:
        return None


def direct_l2(queries: np.ndarray, rows: CodeRows, index: np.ndarray) -> np.ndarray:
    """Q×K true L2 distances from ``queries`` to coreset rows ``index`` (Q×K), by direct difference
    with float64 accumulation (the same rounding as ``runtime.search.exact_l2``; natively where the
    kernel loads: the same decode and accumulation, see ``runtime.native.Int8Kernel.l2``)."""
    found = _native_decoder(rows)
    if found is not None:
        return found[0].l2(queries, found[1], index)
    diff = rows[index] - queries[:, None, :]
    return np.sqrt(np.einsum("qkd,qkd->qk", diff, diff, dtype=np.float64)).astype(np.float32)


def rerank(queries: np.ndarray, rows: CodeRows, candidates: np.ndarray, k: int,
           coords: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's ``candidates`` by direct difference (true L2 of the stored rows,
    not a GEMM expansion), ascending; ties keep the earlier candidate.

    Candidates are ranked on the codes (:meth:`CodeRows.rank_keys`: an integer dot product with the codes) and only
    the best ``k`` decoded and measured (decoding costs ncoord + 2 per element), natively where the kernel
    loads. The float32 key orders candidates like their distances up to rounding: measuring the runner-up
    as well changed no bottle neighbour (recall@1 0.9983 WRN50 coarse, 0.9917 Lite0 int8 either way,
    RESULTS.md #11), and the image maximum is certified exact afterwards regardless. ``coords``: the
    queries' PCA coordinates (:meth:`CodeRows.rank_keys`), where the caller has computed them already.
    """
    found = _native_decoder(rows)
    if found is not None and candidates.shape[1] > k:  # ranked and measured in one pass over the queries
        return found[0].rank_measure(queries, rows.rank_tables(queries, coords), found[1], candidates, k)
    if candidates.shape[1] > k:
        candidates = rows.rank_best(queries, candidates, k, coords)
    if found is not None:
        return found[0].rerank(queries, found[1], candidates, k)
    distances = direct_l2(queries, rows, candidates)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(candidates, order, axis=1)


class CodeBounds:
    """Lower bounds of ‖x̂ − y_m‖ (projected query x̂, projected row y_m) from int8 codes of the projections:
    ŷ_m = mid + step ⊙ code_m, bound_m = (‖x̂ − ŷ_m‖ − margin) · (1 − slack), margin = ½ ‖step‖ (1 + slack) ≥
    ‖ŷ_m − y_m‖ (triangle inequality; the slack covers float32 rounding). The certified maximum prunes on them.

    Why codes, not the float32 projections: a quarter of the bytes (bottle WRN50: 0.47 vs 1.9 MB, read cold
    after the engine ran), and the native stage already holds them. They are looser (bottle WRN50: the certified
    query measures 92 rows instead of 55, 0.1 ms), which the native pruned search more than pays back.

    Args:
        table: M×W int8 codes (W ≥ width; contiguous rows), shared with its owner where it has one.
        mid, step: width float32; codes of a constant direction (step where it spans nothing) are exact.
        width: the projection's p.
        rounding: ≥ max ‖ŷ_m − y_m‖.
    """

    def __init__(self, table: np.ndarray, mid: np.ndarray, step: np.ndarray, width: int, rounding: float) -> None:
        self.table, self.width = table, int(width)
        self.mid = np.ascontiguousarray(mid, dtype=np.float32)
        self.step = np.ascontiguousarray(step, dtype=np.float32)
        self.tables = native.BoundTables(table, self.step, self.width, float(rounding * (1.0 + _BOUND_SLACK)),
                                         float(1.0 - _BOUND_SLACK))

    @classmethod
    def of_points(cls, points: np.ndarray) -> "CodeBounds":
        """Codes of M×p float32 ``points`` with each direction's full range in ±127 (the tightest bounds)."""
        lo, hi = points.min(axis=0), points.max(axis=0)
        mid = ((lo.astype(np.float64) + hi) / 2).astype(np.float32)
        half = (hi.astype(np.float64) - lo) / 2
        step = np.where(half > 0, half / 127.0, 1.0).astype(np.float32)
        codes = np.clip(np.rint((points - mid) / step), -127, 127).astype(np.int8)
        table = np.zeros((points.shape[0], (points.shape[1] + 3) // 4 * 4), np.int8)
        table[:, : points.shape[1]] = codes
        return cls(table, mid, step, points.shape[1], code_rounding(step, half))

    def offsets(self, projected: np.ndarray) -> np.ndarray:
        """mid − x̂: what the bounds add to step ⊙ code."""
        return self.mid - projected

    def __call__(self, projected: np.ndarray, rows: int = 2048) -> np.ndarray:
        """M bounds for one projected query (numpy; the native search computes the same inside its call)."""
        offsets = self.offsets(projected)
        out = np.empty(self.table.shape[0], np.float32)
        for start in range(0, len(out), rows):
            block = self.table[start : start + rows, : self.width].astype(np.float32)
            block *= self.step
            block += offsets
            np.einsum("md,md->m", block, block, out=out[start : start + rows])
        np.sqrt(out, out=out)
        out -= np.float32(self.tables.margin)
        out *= np.float32(self.tables.shrink)
        return out

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + self.mid.nbytes + self.step.nbytes


def code_rounding(step: np.ndarray, half: np.ndarray) -> float:
    """max ‖ŷ − y‖ of codes rounded to the nearest step (½ step a direction; a constant direction is exact)."""
    return float(0.5 * np.linalg.norm(np.where(half > 0, step, 0.0)))


class Proposer(Protocol):
    """Coarse mode's candidate stage over the projected coreset: projected queries → Q×k rows, and the
    :class:`CodeBounds` of every row's projection (the certified maximum's pruning)."""

    bounds: CodeBounds

    def propose(self, projected: np.ndarray, k: int) -> np.ndarray: ...

    def memory_bytes(self) -> int: ...


class GraphProposer:
    """hnswlib's graph over the projections (what coarse bundles store; the search without the native
    kernel's candidates). ``ef_search``: hnswlib's beam; ``nbytes``: the graph's resident bytes; ``points``: the
    M×p float32 projections, of which the bounds keep int8 codes (hnswlib keeps its own float32 copy)."""

    def __init__(self, graph, ef_search: int, nbytes: Callable[[object], int], points: np.ndarray) -> None:
        self.graph, self.ef_search, self._nbytes = graph, int(ef_search), nbytes
        self.bounds = CodeBounds.of_points(points)

    def propose(self, projected: np.ndarray, k: int) -> np.ndarray:
        self.graph.set_ef(max(self.ef_search, k))
        labels, _ = self.graph.knn_query(projected, k=k)
        return labels.astype(np.int64)

    def memory_bytes(self) -> int:
        return self._nbytes(self.graph) + self.bounds.nbytes


class CoarseSearch:
    """``NearestNeighbourSearch`` over :class:`CodeRows` with a projected candidate stage.

    Args:
        rows: the quantized coreset.
        basis: p×D orthonormal projection; ``center``: D vector subtracted first. None: the codes' own
            principal directions and the coreset mean, so the projection is the queries' PCA coordinates
            and the re-rank's ranking reuses it (one Q×D×p product per image instead of two).
        make_proposer: projected M×p float32 points → the candidate stage over them (the native int8
            brute force, or hnswlib's graph: :class:`GraphProposer`).
        candidates: points re-ranked exactly per query.
        certify_block: queries per image (the block whose maximum is made exact).
        kernel: the native kernel, which then projects (``Int8Kernel.project``: on its threads, the same bits on
            every path; bottle WRN50's 784 queries 0.51 vs 0.97 ms with numpy on the detector's one BLAS
            thread); None: numpy.
    """

    def __init__(self, rows: CodeRows, basis: np.ndarray | None, center: np.ndarray | None,
                 make_proposer: Callable[[np.ndarray], Proposer], candidates: int, certify_block: int,
                 kernel: native.Int8Kernel | None = None) -> None:
        self.rows = rows
        self.size, self.dim = rows.shape
        rows.prepare_ranking()
        self._projects_coords = basis is None
        if basis is None:
            basis, center = rows.basis, rows.center
        self._basis_t = np.ascontiguousarray(basis.T, dtype=np.float32)  # D×p
        self._center = center.astype(np.float32)
        self.candidates = min(int(candidates), self.size)
        self.certify_block = int(certify_block)
        self._kernel = kernel
        self.proposer = make_proposer(self.project_rows())  # it keeps what it needs of the M×p projections

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """(vectors − center) @ basisᵀ, rows and queries alike (their bounds compare the two)."""
        if self._kernel is not None:
            return self._kernel.project(vectors, self._center, self._basis_t)
        return (vectors - self._center) @ self._basis_t

    def project_rows(self) -> np.ndarray:
        out = np.empty((self.size, self._basis_t.shape[1]), np.float32)
        for start, block in self.rows.blocks():
            out[start : start + len(block)] = self.project(block)
        return out

    def nbytes(self) -> int:
        return self._basis_t.nbytes + self._center.nbytes + self.proposer.memory_bytes()

    @property
    def checks_queries(self) -> bool:
        """Whether :meth:`search` refuses non-finite queries itself: the native projection computes every term,
        so a NaN or infinite coordinate makes every output of its query non-finite, and checking the Q×p
        projections replaces the caller's pass over the Q×D queries (bottle WRN50: 0.15–0.3 ms a frame)."""
        return self._kernel is not None

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), self.size)
        projected = self.project(queries)
        if self._kernel is not None and not np.isfinite(projected).all():
            raise NonFiniteError("index search: the query features contain NaN or infinite values "
                                 "(or overflow float32 in their projection)")
        candidates = self.proposer.propose(projected, max(self.candidates, k))
        distances, indices = rerank(queries, self.rows, candidates, k, projected if self._projects_coords else None)
        for start in range(0, queries.shape[0], self.certify_block):
            stop = min(start + self.certify_block, queries.shape[0])
            self._certify_max(queries, projected, distances, indices, start, stop)
        return distances, indices

    def _certify_max(self, queries, projected, distances, indices, start: int, stop: int) -> None:
        """Make the block's largest nearest-neighbour distance exact, in place (see the module doc):
        queries in decreasing re-ranked distance are searched exactly until the next one's distance,
        an upper bound of its true one, is below the largest exact distance found."""
        order = start + np.argsort(-distances[start:stop, 0], kind="stable")
        best = -np.inf
        for row in order:
            if distances[row, 0] <= best:
                return
            d, i = self.exact(queries[row], projected[row], distances[row, 0], int(indices[row, 0]), indices.shape[1])
            distances[row], indices[row] = d, i
            best = max(best, float(d[0]))

    def exact(self, query: np.ndarray, projected: np.ndarray, bound: float, holder: int, k: int = 1,
              batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Exact k nearest of one query, pruned by projection lower bounds.

        ``bound``: a distance already reached (to point ``holder``); points whose lower bound is above
        the current k-th best are never decoded. ``batch``: points decoded in the first step, doubled in each
        next one (bottle WRN50's certified query needs 66 on average, and 256 per step decoded four times that;
        Lite0's needs about a thousand, which 64-point steps took in 16 calls: 1.9 vs 0.9 ms per frame). Each
        step stops at the first point whose bound is above the k-th best. Returns (k distances, k indices),
        nearest first (ties by index: the same whatever the steps).
        """
        bounds = self.proposer.bounds
        found = _native_decoder(self.rows)
        if found is not None:  # the same rows in the same order (the steps' sizes do not change the result)
            d, i, _ = found[0].exact_pruned(query, found[1], bounds.tables, bounds.offsets(projected), float(bound),
                                            int(holder), k)
            return d, i
        lower = bounds(projected)
        order = _ascending_first(lower, batch)
        best_d = np.empty(0, np.float32)
        best_i = np.empty(0, np.int64)
        kth = np.inf if k > 1 else float(bound)
        if k == 1:
            best_d, best_i = np.array([bound], np.float32), np.array([holder], np.int64)
        start = 0
        while start < self.size:
            if start == len(order):  # past the partially sorted head: append the rest that can still win, sorted
                rest = np.ones(self.size, bool)
                rest[order] = False
                rest = np.flatnonzero(rest & (lower <= kth))
                if rest.size == 0:
                    break
                order = np.concatenate([order, rest[np.argsort(lower[rest], kind="stable")]])
            ids = order[start : start + batch]
            start += len(ids)
            ids = ids[: int(np.searchsorted(lower[ids], kth, side="right"))]  # ascending: the rest cannot win
            if ids.size == 0:
                break
            batch = min(2 * batch, _MAX_STEP)
            d = direct_l2(query[None], self.rows, ids[None])[0]
            best_d = np.concatenate([best_d, d])
            best_i = np.concatenate([best_i, ids])
            keep = np.lexsort((best_i, best_d))[:k]
            best_d, best_i = best_d[keep], best_i[keep]
            if len(best_d) == k:
                kth = float(best_d[-1])
        return best_d, best_i


def _ascending_first(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest values in ascending order (all of them if fewer);
    a partial sort: the pruned exact search usually stops within the first batch."""
    if values.size <= count:
        return np.argsort(values, kind="stable")
    first = np.argpartition(values, count)[:count]
    return first[np.argsort(values[first], kind="stable")]
