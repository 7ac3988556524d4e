"""The native int8 kernel (runtime/native) and the searches built on it ('int8' mode, coarse candidates).

Real compiled library, every ISA path this CPU runs; the numpy reference computes the same keys
(exact int64 dots, then the same two float32 operations) and the same (key, row) order. The fidelity
contract is checked as in test_search_compiled.py; the bottle numbers are in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import contract_data, contract_report, meets_contract

from edgecore.export.index_build import INT8_CANDIDATE_STEPS, build_index
from edgecore.runtime import native
from edgecore.runtime.index import NO_DOT_PRODUCT_PATHS, QuantizedIndex, coarse_takes_graph
from edgecore.runtime.native.search import Int8Search
from edgecore.runtime.search_coarse import GraphProposer

kernel = native.kernel()  # the package install builds it: a missing library fails here, loudly


def on_threads(counts, run):
    """``run()`` once per kernel thread count in ``counts``, in order (the kernel's own count restored after)."""
    saved = kernel.threads
    try:
        results = []
        for threads in counts:
            kernel.threads = threads
            results.append(run())
        return results
    finally:
        kernel.threads = saved


DIM, BLOCK, IMAGES = 256, 50, 40  # the int8 table: 256 codes + the PCA columns, not a multiple of 64


def reference_topk(queries, rows, bias, cq, k):
    """Keys in numpy (float32 multiply, then subtract, as the kernel) and the k smallest by (key, row)."""
    dots = queries.astype(np.int64) @ rows.astype(np.int64).T
    keys = bias[None, :] - cq[:, None] * dots.astype(np.float32)
    order = np.argsort(keys, axis=1, kind="stable")[:, :k]  # stable: equal keys keep the smaller row first
    return np.take_along_axis(keys, order, axis=1), order


def problem(rng, nq, m, width, ties=False):
    rows = rng.integers(-128, 128, (m, width), dtype=np.int8)
    queries = rng.integers(-127, 128, (nq, width), dtype=np.int8)
    bias = rng.normal(0.0, 3000.0, m).astype(np.float32)
    if ties:  # duplicated rows with equal bias: equal keys, settled by the row index
        rows[m // 2 :: 3] = rows[1]
        bias[m // 2 :: 3] = bias[1]
        rows[-1], bias[-1] = rows[0], bias[0]
    corr = (128 * rows.astype(np.int32).sum(axis=1)).astype(np.int32)
    cq = rng.uniform(1e-3, 1e-2, nq).astype(np.float32)
    return queries, rows, bias, corr, cq


@pytest.mark.parametrize("isa", kernel.available)
@pytest.mark.parametrize("nq,m,width,k,ties", [
    (1, 1, 4, 1, False), (37, 101, 12, 1, False), (16, 16, 4, 16, True), (50, 1003, 160, 8, True),
    (5, 33, 36, 5, False), (33, 517, 68, 33, True), (70, 2000, 1028, 3, False),
    (45, 1501, 32, 32, True), (200, 6151, 160, 16, False),  # the AVX-512 list driver's k <= 32, odd blocks
    (40, 1500, 96, 40, True), (64, 1500, 96, 8, False),  # AMX: a right-aligned last K step and a chunk's odd
    # 16 rows, with the scalar (k > 32) and the SIMD lists
])
def test_kernel_topk_equals_the_numpy_reference(isa, nq, m, width, k, ties):
    queries, rows, bias, corr, cq = problem(np.random.default_rng(nq * m + width), nq, m, width, ties)
    want_keys, want_idx = reference_topk(queries, rows, bias, cq, k)
    keys, idx = kernel.topk(queries, rows, bias, corr, cq, k, isa=isa)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(keys, want_keys)
    dots = queries.astype(np.int64) @ rows.astype(np.int64).T
    all_keys = kernel.keys(queries, rows, bias, corr, cq, isa=isa)
    np.testing.assert_array_equal(all_keys, bias[None, :] - cq[:, None] * dots.astype(np.float32))
    # one query (the certification's exact search) has its own AVX-512 loop: the same keys
    np.testing.assert_array_equal(kernel.keys(queries[-1:], rows, bias, corr, cq[-1:], isa=isa), all_keys[-1:])


def test_every_isa_path_gives_bit_identical_results_on_strided_rows():
    rng = np.random.default_rng(3)
    queries, table, bias, corr, cq = problem(rng, 200, 3001, 164, ties=True)
    rows = table[:, :152]  # a strided view, as the int8 mode's codes inside its wider table
    corr = (128 * rows.astype(np.int32).sum(axis=1)).astype(np.int32)
    results = {isa: kernel.topk(queries[:, :152], rows, bias, corr, cq, 12, isa=isa) for isa in kernel.available}
    first = results[kernel.available[0]]
    for isa, (keys, idx) in results.items():
        np.testing.assert_array_equal(idx, first[1], err_msg=isa)
        np.testing.assert_array_equal(keys, first[0], err_msg=isa)
    assert len(kernel.available) >= 2 or kernel.available == ("scalar",)
    dots = queries[:1, :152].astype(np.int64) @ rows.astype(np.int64).T
    for isa in kernel.available:  # one query on the strided rows
        np.testing.assert_array_equal(kernel.keys(queries[:1, :152], rows, bias, corr, cq[:1], isa=isa),
                                      bias[None, :] - cq[:1, None] * dots.astype(np.float32), err_msg=isa)


@pytest.mark.parametrize("width", [40, 160])  # 160: the AMX driver too, where the CPU has it
def test_thread_count_does_not_change_results(width):
    queries, rows, bias, corr, cq = problem(np.random.default_rng(4), 100, 777, width)
    one, three = on_threads((1, 3), lambda: kernel.topk(queries, rows, bias, corr, cq, 4))
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b)


def test_isa_is_forced_by_the_environment_and_unknown_paths_are_refused():
    code = "from edgecore.runtime import native; print(native.kernel().isa)"
    for isa in kernel.available:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**_env(), native.ENV_ISA: isa}).stdout.strip()
        assert out == isa
    with pytest.raises(native.NativeUnavailable):
        native.Int8Kernel(kernel._lib, "sse9")
    with pytest.raises(ValueError, match="k must be"):
        kernel.topk(*problem(np.random.default_rng(0), 2, 10, 8)[:5], 11)
    with pytest.raises(ValueError, match="multiple of 4"):
        q, rows, bias, corr, cq = problem(np.random.default_rng(0), 2, 10, 8)
        kernel.topk(q[:, :6], rows[:, :6], bias, corr, cq, 1)


def _env() -> dict:
    import os

    return {key: value for key, value in os.environ.items() if key != native.ENV_ISA}


# --- the search modes -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data() -> dict:
    return contract_data(DIM, BLOCK, IMAGES)


@pytest.fixture(scope="module")
def int8(data) -> QuantizedIndex:
    return build_index(data["points"], "int8", "int8", patches_per_image=BLOCK)


def test_int8_mode_meets_the_fidelity_contract(int8, data):
    assert int8.searcher.isa == kernel.path_for(int8.searcher._table.shape[1]) == kernel.isa
    assert int8.searcher._table.shape[1] % 64  # the AMX path's K tail is exercised
    dist, idx = int8.search(data["queries"], 1)
    report = contract_report(data, dist, idx)
    assert meets_contract(report), report
    _, want = build_index(data["points"], "int8", "exact").search(data["queries"], 1)
    assert np.mean(idx[:, 0] == want[:, 0]) >= 0.999  # what the int8 codes allow, nearly always


def test_int8_mode_certifies_each_blocks_max_even_with_one_candidate(data):
    """One candidate per query misses often; the image maximum (and its row) is still exact int8 search's."""
    crippled = build_index(data["points"], "int8", "int8", patches_per_image=BLOCK)
    crippled.searcher.candidates = 1
    exact = build_index(data["points"], "int8", "exact")
    ref_d, ref_i = exact.search(data["queries"], 1)
    dist, idx = crippled.search(data["queries"], 1)
    report = contract_report(data, dist, idx)
    assert report["recall"] < 0.99, report  # the re-rank alone is not enough here ...
    for start in range(0, len(dist), BLOCK):  # ... the certification is
        rows = slice(start, start + BLOCK)
        assert dist[rows, 0].max() == pytest.approx(ref_d[rows, 0].max(), rel=1e-5)
        assert idx[rows, 0][np.argmax(dist[rows, 0])] == ref_i[rows, 0][np.argmax(ref_d[rows, 0])]


def test_int8_exact_query_equals_exact_search_for_k_neighbours(int8, data):
    searcher: Int8Search = int8.searcher
    exact = build_index(data["points"], "int8", "exact")
    queries = data["queries"][[0, 7, 51, 99]]
    codes, cq, centred, coord_w, coords = searcher._weights(queries)
    want_d, want_i = exact.search(queries, 5)
    for row in range(len(queries)):
        constant = searcher._constant(centred[row], coords[row], coord_w[row])
        d, i = searcher.exact(queries[row], codes[row], cq[row], constant, coord_w[row], np.inf, k=5)
        np.testing.assert_array_equal(i, want_i[row])
        np.testing.assert_allclose(d, want_d[row], rtol=1e-5)


def test_int8_distances_are_true_l2_and_the_index_holds_one_copy(int8, data):
    dist, idx = int8.search(data["queries"][:200], 3)
    assert dist.dtype == np.float32 and idx.dtype == np.int64 and np.all(np.diff(dist, axis=1) >= 0)
    direct = np.linalg.norm(int8.points[idx].astype(np.float64) - data["queries"][:200, None, :], axis=2)
    np.testing.assert_allclose(dist, direct, rtol=1e-5)
    # the stored codes are a view of the kernel's table: the int8 coreset exists once in memory
    assert np.shares_memory(int8.arrays["codes"], int8.searcher._table)
    assert int8.memory_bytes() <= 0.35 * data["points"].nbytes, int8.memory_bytes() / data["points"].nbytes


def test_int8_round_trip_is_byte_identical_and_searches_the_same(int8, data, tmp_path):
    (tmp_path / "a").mkdir()
    description = json.loads(json.dumps(int8.save(tmp_path / "a")))
    assert description["mode"] == "int8" and description["search_params"] == {"candidates": int8.searcher.candidates,
                                                                            "certify_block": BLOCK}
    assert int8.searcher.candidates in INT8_CANDIDATE_STEPS  # tuned on the coreset at export
    loaded = QuantizedIndex.load(tmp_path / "a", description)
    for got, want in zip(loaded.search(data["queries"], 2), int8.search(data["queries"], 2)):
        np.testing.assert_array_equal(got, want)
    (tmp_path / "b").mkdir()
    build_index(data["points"], "int8", "exact").save(tmp_path / "b")  # same codes, whatever the mode
    for name in ("index_vectors_codes.npy", "index_vectors_coord_codes.npy"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_int8_mode_needs_int8_codes(data):
    with pytest.raises(ValueError, match="int8"):
        build_index(data["points"], "fp16", "int8")


def test_coarse_candidates_come_from_the_kernel_and_match_the_graph_fallback(data, monkeypatch):
    native_coarse = build_index(data["points"], "int8", "coarse", patches_per_image=BLOCK)
    path = kernel.path_for(32)  # 32-d projections: 32-byte rows
    if coarse_takes_graph(path, len(data["points"])):  # by design the graph proposes here (test_search_fallback_cpu.py)
        assert isinstance(native_coarse.searcher.proposer, GraphProposer)
        assert f"the kernel's {path} path has no int8 dot product" in native_coarse.searcher.candidate_stage
        pytest.skip(f"this CPU's kernel path ({path}) has no int8 dot product: coarse mode proposes from the graph")
    assert native_coarse.searcher.proposer.isa == path
    monkeypatch.setenv(native.ENV_ISA, "off")
    with pytest.warns(RuntimeWarning, match="hnswlib graph"):
        graph_coarse = build_index(data["points"], "int8", "coarse", patches_per_image=BLOCK)
    assert isinstance(graph_coarse.searcher.proposer, GraphProposer)
    for index in (native_coarse, graph_coarse):
        assert meets_contract(contract_report(data, *index.search(data["queries"], 1)))
    assert native_coarse.memory_bytes() < graph_coarse.memory_bytes()  # no hnswlib copy of the projections


def test_without_the_library_int8_mode_falls_back_to_exact_search(int8, data, tmp_path, monkeypatch):
    description = json.loads(json.dumps(int8.save(tmp_path)))
    monkeypatch.setattr(native, "library_path", lambda: None)  # as a package installed without a compiler
    native._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="not built.*exact search"):
            loaded = QuantizedIndex.load(tmp_path, description)
        assert loaded.mode == "int8" and not isinstance(loaded.searcher, Int8Search)
        exact = build_index(data["points"], "int8", "exact")
        for got, want in zip(loaded.search(data["queries"], 1), exact.search(data["queries"], 1)):
            np.testing.assert_array_equal(got, want)
    finally:
        monkeypatch.undo()
        native._load.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the library is back: no fallback warning (only, on AVX2, the path's note)
        assert isinstance(QuantizedIndex.load(tmp_path, description).searcher, Int8Search)
    assert not [w for w in caught if "not built" in str(w.message)]


def test_detector_scores_with_int8_search_as_with_exact(exported_bundle, synthetic_category):
    """Camera path end to end: an int8 bundle opened with --search int8 scores as exact search over the codes."""
    from edgecore.runtime.detector import Detector

    frames = sorted((synthetic_category / "test").rglob("*.png"))
    results = {}
    for mode in ("exact", "int8"):
        with Detector.open(exported_bundle, precision="fp32", search=mode) as detector:
            assert detector.index.mode == mode
            results[mode] = np.array([detector.detect(path).score for path in frames])
    np.testing.assert_allclose(results["int8"], results["exact"], rtol=1e-5)


# aarch64: the NEON sdot path, cross-compiled and run under qemu-user (Debian gcc-aarch64-linux-gnu,
# libc6-dev-arm64-cross, qemu-user; .ci/install installs them). Checks every key and the top-k against a
# plain-C int64 reference, and that a CPU without the dot-product extension refuses the NEON path.
AARCH64_HARNESS = r"""
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int ecs_topk(const int8_t *, int64_t, int64_t, const int8_t *, int64_t, int64_t, const float *, const int32_t *,
             const float *, int64_t, int32_t *, float *, int, int);
int ecs_keys(const int8_t *, int64_t, int64_t, const int8_t *, int64_t, int64_t, const float *, const int32_t *,
             const float *, float *, int, int);
int ecs_project(const float *, int64_t, int64_t, const float *, const float *, int64_t, float *, int, int);
int ecs_l2(const float *, int64_t, int64_t, const int8_t *, int64_t, const float *, const float *, const float *,
           int64_t, const uint16_t *, int64_t, const float *, const float *, const int64_t *, int64_t, float *, int, int);
int ecs_exact_pruned(const float *, int64_t, const int8_t *, int64_t, const float *, const float *, const float *,
                     int64_t, const uint16_t *, int64_t, const float *, const float *, int64_t, const int8_t *, int64_t,
                     int64_t, const float *, const float *, float, float, float, int64_t, int64_t, float *, int64_t *,
                     int64_t *, int);
int ecs_isa_supported(int);
int ecs_best_isa(void);
const char *ecs_isa_name(int);
static uint64_t s = 88172645463325252ull;
static uint32_t rnd(void) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return (uint32_t)s; }
int main(void) {
    printf("best %s neon %d\n", ecs_isa_name(ecs_best_isa()), ecs_isa_supported(4));
    int fails = 0;
    int64_t cases[][4] = {{37, 101, 3, 1}, {16, 16, 1, 16}, {50, 1003, 40, 8}, {5, 33, 9, 5}, {70, 2000, 257, 3}};
    for (int ci = 0; ci < 5; ci++) {
        int64_t nq = cases[ci][0], m = cases[ci][1], g = cases[ci][2], k = cases[ci][3], w = 4 * g;
        int8_t *q = malloc(nq * w), *r = malloc(m * w);
        float *bias = malloc(4 * m), *cq = malloc(4 * nq);
        int32_t *corr = malloc(4 * m);
        for (int64_t i = 0; i < nq * w; i++) q[i] = (int8_t)(rnd() % 255 - 127);
        for (int64_t i = 0; i < m * w; i++) r[i] = (int8_t)(rnd() % 256 - 128);
        for (int64_t i = 0; i < m; i++) bias[i] = (float)((int)(rnd() % 60000) - 30000) * 0.1f;
        for (int64_t i = m / 2; i < m; i += 3) { memcpy(r + i * w, r + w, w); bias[i] = bias[1]; }
        for (int64_t i = 0; i < m; i++) { int32_t t = 0; for (int64_t j = 0; j < w; j++) t += r[i * w + j]; corr[i] = 128 * t; }
        for (int64_t i = 0; i < nq; i++) cq[i] = 0.001f + (rnd() % 1000) * 1e-5f;
        int32_t *i0 = malloc(4 * nq * k), *i1 = malloc(4 * nq * k);
        float *k0 = malloc(4 * nq * k), *k1 = malloc(4 * nq * k), *a0 = malloc(4 * nq * m), *a1 = malloc(4 * nq * m);
        int rc0 = ecs_topk(q, nq, g, r, w, m, bias, corr, cq, k, i0, k0, 0, 2);
        int rc1 = ecs_topk(q, nq, g, r, w, m, bias, corr, cq, k, i1, k1, 4, 2);
        int rc2 = ecs_keys(q, nq, g, r, w, m, bias, corr, cq, a0, 0, 2);
        int rc3 = ecs_keys(q, nq, g, r, w, m, bias, corr, cq, a1, 4, 2);
        /* reference: brute force in plain C with int64 dots */
        int bad = rc0 || rc1 || rc2 || rc3;
        for (int64_t qq = 0; qq < nq && !bad; qq++) {
            for (int64_t mm = 0; mm < m; mm++) {
                int64_t dot = 0;
                for (int64_t j = 0; j < w; j++) dot += (int64_t)q[qq * w + j] * r[mm * w + j];
                float prod = cq[qq] * (float)dot, key = bias[mm] - prod;
                if (a0[qq * m + mm] != key || a1[qq * m + mm] != key) bad = 1;
            }
        }
        if (memcmp(i0, i1, 4 * nq * k) || memcmp(k0, k1, 4 * nq * k)) bad = 1;
        for (int64_t qq = 0; qq < nq && !bad; qq++)  /* top-k ascending by (key, row) and equal to the smallest keys */
            for (int64_t j = 1; j < k; j++) {
                float ka = k0[qq * k + j - 1], kb = k0[qq * k + j];
                if (ka > kb || (ka == kb && i0[qq * k + j - 1] > i0[qq * k + j])) bad = 1;
            }
        printf("case %d rc %d %d %d %d -> %s\n", ci, rc0, rc1, rc2, rc3, bad ? "FAIL" : "ok");
        fails += bad;
    }
    { /* the projection: the same bits as a plain loop of fused multiply-adds in the same order */
        int64_t nq = 11, dim = 37, p = 35;
        float *x = malloc(4 * nq * dim), *c = malloc(4 * dim), *bt = malloc(4 * dim * p), *o = malloc(4 * nq * p);
        for (int64_t i = 0; i < nq * dim; i++) x[i] = (float)((int)(rnd() % 2001) - 1000) * 0.00137f;
        for (int64_t i = 0; i < dim; i++) c[i] = (float)((int)(rnd() % 201) - 100) * 0.0021f;
        for (int64_t i = 0; i < dim * p; i++) bt[i] = (float)((int)(rnd() % 2001) - 1000) * 0.00093f;
        int bad = ecs_project(x, nq, dim, c, bt, p, o, 4, 2);
        for (int64_t q = 0; q < nq && !bad; q++)
            for (int64_t j = 0; j < p; j++) {
                float acc = 0.0f;
                for (int64_t d = 0; d < dim; d++) acc = __builtin_fmaf(x[q * dim + d] - c[d], bt[d * p + j], acc);
                if (acc != o[q * p + j]) bad = 1;
            }
        printf("projection -> %s\n", bad ? "FAIL" : "ok");
        fails += bad;
    }
    { /* the pruned exact search: rows y = 0.5 + 0.01 code, bounded by their own codes (exact, margin 0), k = 3,
       * against ecs_l2 over every row */
        int64_t m = 300, dim = 40, k = 3;
        int8_t *codes = malloc(m * dim);
        float scale[40], offset[40], query[40], c[40], step[40], all[300], d3[3];
        int64_t every[300], i3[3], measured = 0;
        for (int64_t i = 0; i < m * dim; i++) codes[i] = (int8_t)(rnd() % 256 - 128);
        for (int64_t i = 0; i < dim; i++) { scale[i] = step[i] = 0.01f; offset[i] = 0.5f; }
        for (int64_t i = 0; i < dim; i++) { query[i] = 0.5f + 0.01f * (float)codes[7 * dim + i] + 0.003f; c[i] = 0.5f - query[i]; }
        for (int64_t i = 0; i < m; i++) every[i] = i;
        int bad = ecs_l2(query, 1, dim, codes, dim, scale, offset, NULL, 0, NULL, 0, NULL, NULL, every, m, all, 4, 1);
        bad |= ecs_exact_pruned(query, dim, codes, dim, scale, offset, NULL, 0, NULL, 0, NULL, NULL, m, codes, dim, dim,
                                c, step, 1e-4f, 0.9999f, INFINITY, -1, k, d3, i3, &measured, 4);
        for (int64_t j = 0; j < k && !bad; j++) { /* the j-th smallest (distance, row) of all */
            int64_t best = -1;
            for (int64_t i = 0; i < m; i++) {
                int taken = 0;
                for (int64_t t = 0; t < j; t++) taken |= i3[t] == i;
                if (!taken && (best < 0 || all[i] < all[best])) best = i;
            }
            if (i3[j] != best || d3[j] != all[best]) bad = 1;
        }
        if (measured < k || measured >= m) bad = 1; /* pruned, but not to nothing */
        printf("exact pruned (%lld rows measured) -> %s\n", (long long)measured, bad ? "FAIL" : "ok");
        fails += bad;
    }
    return fails;
}
"""
CROSS_CC, QEMU_ARM = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")


@pytest.mark.skipif(CROSS_CC is None or QEMU_ARM is None, reason="needs aarch64-linux-gnu-gcc and qemu-aarch64 (.ci/install)")
def test_neon_path_on_emulated_aarch64_matches_the_reference(tmp_path):
    source = Path(native.__file__).with_name("int8search.c")
    (tmp_path / "harness.c").write_text(AARCH64_HARNESS)
    binary = tmp_path / "harness"
    subprocess.run([CROSS_CC, "-O3", "-ffp-contract=off", "-std=gnu11", "-static", "-pthread", "-o", str(binary),
                    str(source), str(tmp_path / "harness.c"), "-lm"], check=True, capture_output=True, timeout=120)
    dotprod = subprocess.run([QEMU_ARM, "-cpu", "max", str(binary)], capture_output=True, text=True, timeout=120)
    assert dotprod.returncode == 0 and dotprod.stdout.startswith("best neon neon 1"), dotprod.stdout
    assert dotprod.stdout.count("-> ok") == 7, dotprod.stdout
    plain = subprocess.run([QEMU_ARM, "-cpu", "cortex-a53", str(binary)], capture_output=True, text=True, timeout=120)
    assert plain.stdout.startswith("best scalar neon 0"), plain.stdout  # no dot product: the C path


def test_int8_mode_warns_where_the_cpu_has_no_int8_dot_products(int8, tmp_path, monkeypatch):
    description = json.loads(json.dumps(int8.save(tmp_path)))
    monkeypatch.setenv(native.ENV_ISA, "scalar")  # as an AVX2-only camera would run it ("avx2")
    with pytest.warns(RuntimeWarning, match="scalar path.*--search hnsw"):
        loaded = QuantizedIndex.load(tmp_path, description)
    assert loaded.searcher.isa == "scalar"


# ---- the native exact re-rank (ecs_l2 / ecs_rerank): true L2 to rows decoded as CodeRows does ----

def code_rows(rng, m, dim, ncoord, duplicates=False):
    """A random pca+int8 coreset (the stored array layout) and its CodeRows."""
    from edgecore.runtime.search_coarse import CodeRows

    basis = np.linalg.qr(rng.normal(size=(dim, max(ncoord, 1))))[0].T[:ncoord].astype(np.float32)
    arrays = {
        "codes": rng.integers(-128, 128, (m, dim), dtype=np.int8),
        "scale": rng.uniform(0.005, 0.05, dim).astype(np.float32),
        "offset": rng.normal(0.0, 1.0, dim).astype(np.float32),
        "basis": basis.reshape(ncoord, dim),
        "coord_codes": rng.integers(0, 65536, (m, ncoord), dtype=np.uint16),
        "coord_offset": rng.normal(0.0, 2.0, ncoord).astype(np.float32),
        "coord_scale": rng.uniform(1e-5, 1e-4, ncoord).astype(np.float32),
    }
    if duplicates:  # equal rows under different ids: equal distances, settled by candidate position
        arrays["codes"][m // 2 :: 5] = arrays["codes"][3]
        arrays["coord_codes"][m // 2 :: 5] = arrays["coord_codes"][3]
    rows = CodeRows(arrays)
    rows.prepare_ranking()
    return rows


def numpy_l2(queries, rows, index):
    diff = rows[index].astype(np.float64) - queries[:, None, :].astype(np.float64)
    return np.sqrt(np.einsum("qkd,qkd->qk", diff, diff))


@pytest.mark.parametrize("m,dim,ncoord,nq,ncand,k", [
    (50, 1, 0, 3, 1, 1), (300, 37, 3, 41, 9, 1), (500, 152, 5, 64, 16, 3), (400, 1031, 32, 23, 8, 8),
    (200, 24, 1, 17, 7, 2),
])
def test_native_rerank_equals_the_numpy_rerank(m, dim, ncoord, nq, ncand, k, monkeypatch):
    from edgecore.runtime.search_coarse import direct_l2, rerank

    rng = np.random.default_rng(m + dim + ncoord)
    rows = code_rows(rng, m, dim, ncoord, duplicates=True)
    queries = (rows[rng.integers(0, m, nq)] + rng.normal(0.0, 0.3, (nq, dim))).astype(np.float32)
    candidates = rng.integers(0, m, (nq, ncand))
    candidates[:, -1] = candidates[:, 0]  # the same row twice: the earlier position is kept
    candidates[::2, 1 % ncand] = 3  # and rows equal to row 3 under other ids
    candidates[::2, 2 % ncand] = m // 2 + 5
    got = rerank(queries, rows, candidates, k)
    l2 = direct_l2(queries, rows, candidates)
    monkeypatch.setenv(native.ENV_ISA, "off")
    want = rerank(queries, rows, candidates, k)
    want_l2 = direct_l2(queries, rows, candidates)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(l2, want_l2, rtol=1e-5)
    np.testing.assert_allclose(l2, numpy_l2(queries, rows, candidates), rtol=1e-5)  # float64 decode reference
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64 and np.all(np.diff(got[0], axis=1) >= 0)


def test_native_distances_are_bit_identical_on_every_path_and_thread_count():
    rng = np.random.default_rng(9)
    rows = code_rows(rng, 700, 203, 17)  # 203 dims: AVX-512 blocks of 16, AVX2 of 8, then the C tail
    tables = rows.decode_tables()
    # 1 300 × 13 pairs: enough work (≥ 3 × RR_MIN_WORK multiply-adds) that 3 threads really run.
    queries = rng.normal(0.0, 1.0, (1300, 203)).astype(np.float32)
    candidates = rng.integers(0, 700, (1300, 13))
    results = sum(on_threads((1, 3), lambda: [kernel.l2(queries, tables, candidates, isa=isa) for isa in kernel.available]
                                     + [kernel.rerank(queries, tables, candidates, 13, isa=isa)[0]
                                        for isa in kernel.available]), [])
    for got in results[1:]:
        np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(results[0], axis=1))
    np.testing.assert_array_equal(results[0], kernel.l2(queries, tables, candidates))  # candidate order
    np.testing.assert_allclose(results[0], numpy_l2(queries, rows, candidates), rtol=1e-5)


@pytest.mark.parametrize("nq,dim,p", [(784, 1024, 32), (37, 203, 45), (9, 7, 3), (1, 16, 16), (0, 8, 4)])
def test_projection_is_bit_identical_on_every_path_and_thread_count(nq, dim, p):
    """Coarse mode's PCA coordinates: each output summed over D in order (subtract, multiply, add), so AVX-512,
    AVX2 and the baseline loop agree to the bit, whatever the thread count; numpy's BLAS product to rounding."""
    rng = np.random.default_rng(nq + dim)
    vectors = (rng.normal(size=(nq, dim)) + 3.0).astype(np.float32)
    center = rng.normal(size=dim).astype(np.float32)
    basis_t = rng.normal(size=(dim, p)).astype(np.float32)
    results = sum(on_threads((1, 3), lambda: [kernel.project(vectors, center, basis_t, isa=isa)
                                              for isa in kernel.available]), [])
    for got in results:
        assert got.shape == (nq, p)
        np.testing.assert_array_equal(got, results[0])
    exact = (vectors.astype(np.float64) - center) @ basis_t.astype(np.float64)
    np.testing.assert_allclose(results[0], exact, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(exact).max(initial=0))))


def test_projection_and_distances_refuse_bad_arguments():
    with pytest.raises(ValueError, match="D center"):
        kernel.project(np.zeros((3, 8), np.float32), np.zeros(7, np.float32), np.zeros((8, 2), np.float32))


def test_native_rerank_refuses_bad_arguments():
    rows = code_rows(np.random.default_rng(1), 20, 8, 2)
    queries = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="candidate ids"):
        kernel.l2(queries, rows.decode_tables(), np.array([[0, 20], [1, 2]]))
    with pytest.raises(ValueError, match="k must be"):
        kernel.rerank(queries, rows.decode_tables(), np.array([[0, 1], [1, 2]]), 3)
    with pytest.raises(ValueError, match="queries"):
        kernel.l2(np.zeros((2, 7), np.float32), rows.decode_tables(), np.array([[0], [1]]))


def test_coarse_exact_search_with_native_distances_equals_exact_search(data):
    coarse = build_index(data["points"], "int8", "coarse", patches_per_image=BLOCK)
    exact = build_index(data["points"], "int8", "exact")
    queries = data["queries"][[0, 7, 51, 99]]
    want_d, want_i = exact.search(queries, 4)
    searcher = coarse.searcher
    for row, query in enumerate(queries):
        d, i = searcher.exact(query, searcher.project(query[None])[0], np.inf, -1, k=4)
        np.testing.assert_array_equal(i, want_i[row])
        np.testing.assert_allclose(d, want_d[row], rtol=1e-5)


# ---- rank keys (ecs_rank_keys / ecs_rank_best): the re-rank's order without decoding a row ----

def reference_rank_keys(queries, rows, candidates):
    """float64 ‖y − μ‖² − 2 (x − μ)·(y − μ) less the per-query constant (the kernel's key, exactly rounded)."""
    centred = queries.astype(np.float64) - rows._center
    codes = rows._codes[candidates].astype(np.float64)
    coords = rows._coord_codes[candidates].astype(np.float64)
    weights = (centred @ rows._basis.T.astype(np.float64)) * rows._coord_scale
    dots = np.einsum("qkd,qd->qk", codes, centred * rows._scale) + np.einsum("qkc,qc->qk", coords, weights)
    return rows._norms[candidates] - 2.0 * dots


@pytest.mark.parametrize("m,dim,ncoord", [(300, 203, 17), (120, 1024, 32), (90, 7, 0), (60, 64, 16)])
def test_rank_keys_are_bit_identical_on_every_path_and_order_candidates_like_their_distances(m, dim, ncoord):
    rng = np.random.default_rng(dim + ncoord)
    rows = code_rows(rng, m, dim, ncoord, duplicates=True)
    queries = (rows[rng.integers(0, m, 70)] + rng.normal(0.0, 0.3, (70, dim))).astype(np.float32)
    candidates = rng.integers(0, m, (70, 9))
    candidates[:, 4] = candidates[:, 1]  # equal keys: the earlier position ranks first
    tables = rows.rank_tables(queries, None)
    keys = [kernel.rank_keys(queries, tables, candidates, isa=isa) for isa in kernel.available]
    coords = (queries - rows.center) @ rows.basis.T  # a caller's own PCA coordinates give the same keys
    np.testing.assert_allclose(rows.rank_keys(queries, candidates, coords), keys[0], rtol=1e-5,
                               atol=1e-5 * np.abs(keys[0]).max())
    for got in keys[1:]:
        np.testing.assert_array_equal(got, keys[0])
    want = reference_rank_keys(queries, rows, candidates)
    np.testing.assert_allclose(keys[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the key is the squared distance to the decoded row less one constant per query
    gap = numpy_l2(queries, rows, candidates) ** 2 - want
    np.testing.assert_allclose(gap, np.repeat(gap[:, :1], gap.shape[1], axis=1), rtol=0, atol=1e-6 * np.abs(want).max())
    expected = np.take_along_axis(candidates, np.argsort(keys[0], axis=1, kind="stable")[:, :3], axis=1)
    for isa in kernel.available:
        np.testing.assert_array_equal(kernel.rank_best(queries, tables, candidates, 3, isa=isa), expected)
    with pytest.raises(ValueError, match="candidate ids"):
        kernel.rank_keys(queries, tables, np.full_like(candidates, m))
    with pytest.raises(ValueError, match="keep must be"):
        kernel.rank_best(queries, tables, candidates, 10)


@pytest.mark.parametrize("dim", [1024, 3000])
def test_rank_keys_integer_dot_does_not_overflow_at_the_extremes(dim):
    """Every code at -128 and every weight at its largest magnitude, one sign: the int32 dot of the int16
    weights is at its bound (RK_WQ_LIMIT shrinks with D) and the keys still match float64."""
    rng = np.random.default_rng(dim)
    rows = code_rows(rng, 40, dim, 8)
    rows._codes[:] = -128
    rows._codes[1::2] = 127
    rows.prepare_ranking()
    queries = np.repeat((rows.center + 50.0 / rows._scale)[None], 3, axis=0).astype(np.float32)  # w = 50 everywhere
    candidates = np.tile(np.arange(6), (3, 1))
    tables = rows.rank_tables(queries, None)
    want = reference_rank_keys(queries, rows, candidates)
    for isa in kernel.available:
        got = kernel.rank_keys(queries, tables, candidates, isa=isa)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("m,dim,ncoord,keep", [(300, 203, 17, 1), (120, 1024, 32, 3), (90, 7, 0, 2), (500, 64, 16, 1)])
def test_rank_measure_is_rank_best_then_rerank_bit_for_bit(m, dim, ncoord, keep):
    """One pass (rank, keep, measure while in cache) returns exactly what the two calls return, on every path and
    thread count, ties included (duplicate rows: equal keys and distances, settled by rank)."""
    rng = np.random.default_rng(dim + keep)
    rows = code_rows(rng, m, dim, ncoord, duplicates=True)
    queries = (rows[rng.integers(0, m, 70)] + rng.normal(0.0, 0.3, (70, dim))).astype(np.float32)
    candidates = rng.integers(0, m, (70, 9))
    candidates[:, 4] = candidates[:, 1]
    tables, decode = rows.rank_tables(queries, None), rows.decode_tables()
    for isa in kernel.available:
        if isa == "scalar" and dim > 256:
            continue  # the baseline's software FMA decode: covered at the smaller sizes
        kept = kernel.rank_best(queries, tables, candidates, keep, isa=isa)
        want = kernel.rerank(queries, decode, kept, keep, isa=isa)
        for got in on_threads((1, 3), lambda: kernel.rank_measure(queries, tables, decode, candidates, keep, isa=isa)):
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])
    with pytest.raises(ValueError, match="keep must be"):
        kernel.rank_measure(queries, tables, decode, candidates, 10)


def test_rank_keys_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(12)
    rows = code_rows(rng, 500, 1024, 32)
    queries = rng.normal(0.0, 1.0, (800, 1024)).astype(np.float32)
    candidates = rng.integers(0, 500, (800, 8))  # 6.6 M multiply-adds: three threads of RK_MIN_WORK
    tables = rows.rank_tables(queries, None)
    results = on_threads((1, 3), lambda: (kernel.rank_keys(queries, tables, candidates),
                                          kernel.rank_best(queries, tables, candidates, 2)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_rerank_measures_the_best_ranked_candidates_only(monkeypatch):
    """rerank decodes only the k best-ranked candidates per query (ranked on the codes), on every path,
    and they are the nearest ones."""
    from edgecore.runtime import search_coarse

    rng = np.random.default_rng(5)
    rows = code_rows(rng, 400, 96, 8)
    queries = (rows[rng.integers(0, 400, 30)] + rng.normal(0.0, 0.3, (30, 96))).astype(np.float32)
    candidates = rng.integers(0, 400, (30, 12))
    measured = []
    original = search_coarse.direct_l2
    monkeypatch.setattr(search_coarse, "direct_l2", lambda q, r, i: measured.append(i.shape) or original(q, r, i))
    for isa in ("auto", "off"):
        monkeypatch.setenv(native.ENV_ISA, isa)
        distances, indices = search_coarse.rerank(queries, rows, candidates, 1)
        true = numpy_l2(queries, rows, candidates)
        np.testing.assert_allclose(distances[:, 0], true.min(axis=1), rtol=1e-5)
    assert measured == [(30, 1)]  # the numpy path measured 1 of 12 (the native one: kernel.rerank)


# ---- the kernel's persistent thread pool (run_jobs) ----

def _pool_workload(rng):
    rows = code_rows(rng, 500, 1024, 32)
    queries = rng.normal(0.0, 1.0, (800, 1024)).astype(np.float32)
    candidates = rng.integers(0, 500, (800, 8))
    return rows, queries, candidates, rows.rank_tables(queries, None)


def test_pool_gives_the_same_results_to_concurrent_callers():
    """Python threads calling at once (ctypes releases the GIL): one holds the pool, the others start threads of
    their own; every caller gets what a lone call returns."""
    import concurrent.futures

    rows, queries, candidates, tables = _pool_workload(np.random.default_rng(21))
    saved = kernel.threads
    kernel.threads = 3
    try:
        want = kernel.rank_keys(queries, tables, candidates)
        with concurrent.futures.ThreadPoolExecutor(4) as workers:
            got = list(workers.map(lambda _: kernel.rank_keys(queries, tables, candidates), range(24)))
    finally:
        kernel.threads = saved
    for keys in got:
        np.testing.assert_array_equal(keys, want)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_pool_works_in_a_forked_child():
    """The parent's workers do not exist in a forked child: it starts its own instead of waiting on them forever."""
    rows, queries, candidates, tables = _pool_workload(np.random.default_rng(22))
    saved = kernel.threads
    kernel.threads = 2
    try:
        want = kernel.rank_keys(queries, tables, candidates)  # the parent's pool is running now
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report whether its threaded call matched, then leave without cleanup
            try:
                ok = np.array_equal(kernel.rank_keys(queries, tables, candidates), want)
                os.write(write, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.05)
        hung = time.monotonic() >= deadline
        if hung:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        answer = os.read(read, 1)
        os.close(read)
    finally:
        kernel.threads = saved
    assert not hung, "the forked child hung in the kernel's thread pool"
    assert answer == b"1"
