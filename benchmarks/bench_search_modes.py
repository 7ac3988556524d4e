"""Search modes side by side: end-to-end `edgecore bench` latency (interleaved) and fidelity on bottle.

Three parts, all written as Markdown to stdout (benchmarks/RESULTS.md § "Search at the hardware limit"):

* ``latency``: one interleaved ``run_bench`` over every (bundle, search mode) given, on real frames, with
  the index's resident bytes; the bundles are exports of the same model (one per graph mode; exact
  search runs on any of them).
* ``fidelity``: every mode the exporter may choose against exact fp32 search on cached bottle features
  (``benchmarks/bench_index.py --cache``): recall@1 over all test patches, image-score Spearman, image and
  pixel AUROC deltas, search time per image, index memory / fp32 coreset bytes.
* ``kernel``: the native int8 kernel alone (``edgecore.runtime.native``) on one image's queries, per ISA path
  and thread count, for the int8 mode's code table and coarse mode's projection table; then the exact
  re-rank of each mode's real candidates, native (per path) against numpy.

    python benchmarks/bench_search_modes.py latency --bundle /tmp/wrn_coarse.edgecore:coarse,exact \\
        --bundle /tmp/wrn_hnsw.edgecore:hnsw --precision int8 --images ../shared/data/mvtec_bottle/test
    python benchmarks/bench_search_modes.py fidelity --backbone wide_resnet50_2

Both report which path the native int8 kernel ran (``edgecore.runtime.native``: amx, avx512vnni, avx2, ...);
``EDGECORE_NATIVE_ISA`` forces one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def latency(args: argparse.Namespace) -> None:
    from edgecore.runtime.bench import BenchConfig, render_markdown, run_bench

    configs = []
    for spec in args.bundle:
        path, _, modes = spec.partition(":")
        for mode in (modes.split(",") if modes else [None]):
            configs.append(BenchConfig(precision=args.precision, search=mode, bundle=path))
    frames = [path.read_bytes() for path in sorted(args.images.rglob("*.png"))][: args.frames]  # every defect folder
    report = run_bench(configs[0].bundle, configs, frames=frames, iterations=args.iterations, warmup=3)
    print(f"load average before/after: {args.load_before} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{_native_path()}\n")
    print(render_markdown(report))
    print("| config | search p50 | engine p50 | search / engine | total − decode p50 | total p99 | index in memory / fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in report["runs"]:
        st = run["stages_ms"]
        search, engine = st["search"]["p50"], st["engine"]["p50"]
        fp32 = run["sizes"]["coreset_fp32_bytes"]
        print(f"| {run['config']} ({run['search']}) | {search:.1f} | {engine:.1f} | {search / engine:.2f} | "
              f"{st['total']['p50'] - st['decode']['p50']:.1f} | {st['total']['p99']:.1f} | "
              f"{run['index_memory_bytes'] / fp32:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def fidelity(args: argparse.Namespace) -> None:
    from scipy.stats import spearmanr
    from threadpoolctl import threadpool_limits

    from bench_index import CROP, GRID, SIGMA, load_data
    from edgecore.export.index_build import build_index
    from edgecore.metrics import auroc, pixel_auroc
    from edgecore.runtime.index import QuantizedIndex
    from edgecore.runtime.scoring import anomaly_maps, image_scores

    threadpool_limits(1, user_api="blas")  # as the camera runtime (Detector caps BLAS at 1 thread)
    data = load_data(args.data, args.backbone, args.cache)
    n, p, d = data.test.shape
    queries = data.test.reshape(-1, d)
    fp32_bytes = data.coreset.nbytes

    def evaluate(dist, idx, points):
        patch = dist.reshape(n, p)
        scores = image_scores(patch, idx.reshape(n, p), data.test, points, data.table)
        maps = anomaly_maps(patch, GRID, CROP, SIGMA)
        return scores, maps

    ref_scores, ref_maps = evaluate(data.ref_dist, data.ref_idx, data.coreset)
    usable = np.array([m.any() or label == 0 for m, label in zip(data.masks, data.labels)])
    ref_auroc = auroc(ref_scores, data.labels)
    ref_pixel = pixel_auroc(ref_maps[usable], data.masks[usable])
    print(f"{args.backbone}: coreset {data.coreset.shape[0]}×{d}, {n} test images × {p} patches; "
          f"exact fp32 image AUROC {ref_auroc:.4f}, pixel AUROC {ref_pixel:.4f}; load {os.getloadavg()[0]:.2f}; "
          f"{_native_path()}\n")
    print("| mode (int8 codes) | recall@1 vs exact fp32 | image Spearman | Δ image AUROC (pt) | Δ pixel AUROC (pt) "
          "| search ms / image (1 thread) | index in memory / fp32 | chosen by export |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    chosen = build_index(data.coreset, "int8").choice
    for mode in args.modes:
        index = build_index(data.coreset, "int8", mode)
        with tempfile.TemporaryDirectory() as tmp:
            index = QuantizedIndex.load(tmp, json.loads(json.dumps(index.save(tmp))))
        index.search(queries[:p], 1)
        start = time.perf_counter()
        dist, idx = index.search(queries, 1)
        per_image = (time.perf_counter() - start) / n * 1e3
        scores, maps = evaluate(dist[:, 0], idx[:, 0], index.points)
        recall = float(np.mean(idx[:, 0] == data.ref_idx))
        rho = spearmanr(ref_scores, scores).statistic
        d_img = 100 * (ref_auroc - auroc(scores, data.labels))
        d_pix = 100 * (ref_pixel - pixel_auroc(maps[usable], data.masks[usable]))
        print(f"| {mode} | {recall:.4f} | {rho:.5f} | {d_img:+.2f} | {d_pix:+.2f} | {per_image:.1f} | "
              f"{index.memory_bytes() / fp32_bytes:.3f} | {'yes' if mode == chosen['mode'] else ''} |", flush=True)
    print(f"\nexport's automatic choice: {json.dumps(chosen, ensure_ascii=False)}")


def kernel(args: argparse.Namespace) -> None:
    """The native kernel alone on one image's bottle queries: ms per top-k call by ISA path and threads
    (min of ``--repeats``), for the two tables the searches scan (int8 mode's codes, coarse's projections)."""
    from bench_index import load_data
    from edgecore.export.index_build import build_index
    from edgecore.runtime.native import kernel as native_kernel, quantize_queries

    data = load_data(args.data, args.backbone, args.cache)
    n, p, d = data.test.shape
    queries = data.test.reshape(-1, d)[:p]
    k = native_kernel()
    paths = [isa for isa in k.available if isa != "scalar" or args.scalar]  # plain C: seconds per call
    int8 = build_index(data.coreset, "int8", "int8", patches_per_image=p).searcher
    coarse = build_index(data.coreset, "int8", "coarse", patches_per_image=p).searcher
    codes, cq, *_ = int8._weights(queries)
    proposer = coarse.proposer
    pcodes, step = quantize_queries(coarse.project(queries) * proposer._step, proposer._table.shape[1])
    tables = {
        f"int8 mode {int8._table.shape[0]}×{int8._table.shape[1]} B": (codes, int8._table, int8._norms, int8._corr, cq),
        f"projections {proposer._table.shape[0]}×{proposer._table.shape[1]} B":
            (pcodes, proposer._table, proposer._bias, proposer._corr, (2 * step).astype(np.float32)),
    }
    print(f"{args.backbone}, {p} queries, k = {args.k}, load {os.getloadavg()[0]:.2f}\n")
    print("| table | threads | " + " | ".join(paths) + " |")
    print("|---|---:|" + "---:|" * len(paths))
    saved = k.threads
    for name, (q, table, bias, corr, scale) in tables.items():
        for threads in (1, 2):
            k.threads = threads
            cells = []
            for isa in paths:
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    k.topk(q, table, bias, corr, scale, args.k, isa=isa)
                    times.append(time.perf_counter() - start)
                ran = k.path_for(table.shape[1], isa)
                cells.append(f"{1e3 * min(times):.1f}" + ("" if ran == isa else f" ({ran})"))
            print(f"| {name} | {threads} | " + " | ".join(cells) + " |", flush=True)
    _rerank_times(args, queries, {"int8 mode": int8, "coarse": coarse}, k, paths)
    k.threads = saved


def _rerank_times(args, queries, searchers, k, paths) -> None:
    """ms per re-rank of one image's real candidates (``search_coarse.rerank``): native per path and
    thread count, and numpy (``EDGECORE_NATIVE_ISA=off``), min of ``--repeats``."""
    from edgecore.runtime.native import ENV_ISA
    from edgecore.runtime.search_coarse import rerank

    def best(call) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return 1e3 * min(times)

    print("\n| re-rank (1 image) | candidates × D | threads | " + " | ".join(paths) + " | numpy |")
    print("|---|---|---:|" + "---:|" * (len(paths) + 1))
    for name, searcher in searchers.items():
        candidates = _candidates(searcher, queries)
        tables = searcher.rows.decode_tables()
        for threads in (1, 2):
            k.threads = threads
            cells = [f"{best(lambda: k.rerank(queries, tables, candidates, 1, isa=isa)):.1f}" for isa in paths]
            os.environ[ENV_ISA] = "off"
            try:
                cells.append(f"{best(lambda: rerank(queries, searcher.rows, candidates, 1)):.1f}")
            finally:
                del os.environ[ENV_ISA]
            print(f"| {name} | {candidates.shape[1]} × {queries.shape[1]} | {threads} | " + " | ".join(cells) + " |",
                  flush=True)


def _candidates(searcher, queries: np.ndarray) -> np.ndarray:
    """The candidates the searcher re-ranks for these queries (int8 mode: the kernel's; coarse: proposed)."""
    if hasattr(searcher, "proposer"):
        return searcher.proposer.propose(searcher.project(queries), searcher.candidates)
    codes, cq, *_ = searcher._weights(queries)
    return searcher.kernel.topk(codes, searcher._table, searcher._norms, searcher._corr, cq, searcher.candidates)[1]


def _native_path() -> str:
    from edgecore.runtime import native

    try:
        k = native.kernel()
    except native.NativeUnavailable as exc:
        return f"native int8 kernel: unavailable ({exc})"
    return f"native int8 kernel: {k.isa} path, {k.threads} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--bundle", action="append", required=True, help="PATH[:mode,mode] (modes: exact,hnsw,coarse,int8,compiled)")
    lat.add_argument("--precision", default="int8")
    lat.add_argument("--images", type=Path, required=True)
    lat.add_argument("--frames", type=int, default=83)
    lat.add_argument("--iterations", type=int, default=60)
    lat.add_argument("--json")
    lat.add_argument("--load-before", default=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    fid = sub.add_parser("fidelity")
    fid.add_argument("--data", type=Path, default=Path("/work/shared/data/mvtec_bottle"))
    fid.add_argument("--backbone", default="wide_resnet50_2")
    fid.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgecore_index_bench")
    fid.add_argument("--modes", nargs="+", default=["exact", "hnsw", "coarse", "int8", "compiled"])
    ker = sub.add_parser("kernel")
    ker.add_argument("--data", type=Path, default=Path("/work/shared/data/mvtec_bottle"))
    ker.add_argument("--backbone", default="efficientnet_lite0")
    ker.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgecore_index_bench")
    ker.add_argument("--k", type=int, default=8)
    ker.add_argument("--repeats", type=int, default=7)
    ker.add_argument("--scalar", action="store_true", help="also time the plain C path (slow)")
    args = parser.parse_args()
    {"latency": latency, "fidelity": fidelity, "kernel": kernel}[args.part](args)


if __name__ == "__main__":
    main()
