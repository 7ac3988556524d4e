"""Composable coreset on a real Ray cluster over memory-mapped feature shards (features only, no images).

Writes a synthetic clustered bank (``bench_coreset.synthetic_bank``) shard by shard
to disk (never all in memory), then runs the 2-round composable k-center with one
Ray task per shard and reports per round: wall time, and the peak RSS of every
worker process (``resource.getrusage`` inside the task) next to the shard size.

    python benchmarks/bench_distributed.py --n 2000000 --dim 152 --shards 8 --ratio 0.01 --cpus 2

``--compare-single`` also runs single-node greedy on the whole bank (it must fit in
memory) and prints both coverage radii.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_coreset import synthetic_bank  # noqa: E402

from edgecore.distributed.composable import composable_kcenter, shard_greedy, shard_radius  # noqa: E402
from edgecore.distributed.shards import shard_table, split_evenly, write_shard  # noqa: E402


def with_peak_rss(function):
    """Run ``function`` and return (its result, this process's peak RSS in MiB, seconds)."""

    def wrapped(*args):
        start = time.perf_counter()
        result = function(*args)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return result, peak, time.perf_counter() - start, os.getpid()

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=152)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--oversample", type=float, default=2.0)
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--compare-single", action="store_true")
    args = parser.parse_args()

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    try:
        start = time.perf_counter()
        paths = [write_shard(work, i, synthetic_bank(len(r), args.dim, seed=i))
                 for i, r in enumerate(split_evenly(args.n, args.shards))]
        shards = shard_table(paths)
        print(f"wrote {args.n} x {args.dim} in {len(shards)} shards in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        rounds: dict[str, list] = {"round1": [], "radius": []}

        def mapper(function, arguments):
            name = {shard_greedy: "round1", shard_radius: "radius"}[function]
            task = ray.remote(num_cpus=1)(with_peak_rss(function))
            begin = time.perf_counter()
            outputs = ray.get([task.remote(*a) for a in arguments])
            rounds[name] = [{"shard_rows": a[0].rows, "shard_mib": round(a[0].rows * args.dim * 4 / 2**20, 1),
                             "peak_rss_mib": round(rss, 1), "task_s": round(seconds, 2), "pid": pid}
                            for a, (_, rss, seconds, pid) in zip(arguments, outputs)]
            rounds[name + "_wall_s"] = round(time.perf_counter() - begin, 2)
            return [result for result, *_ in outputs]

        start = time.perf_counter()
        result = composable_kcenter(shards, args.ratio, args.projection_dim, seed=0, oversample=args.oversample,
                                    mapper=mapper)
        total = time.perf_counter() - start
        driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report = {
            "n": args.n, "dim": args.dim, "shards": len(shards), "ratio": args.ratio, "cpus": args.cpus,
            "total_s": round(total, 2), "driver_peak_rss_mib": round(driver_rss, 1),
            "round2_and_gather_s": round(total - rounds["round1_wall_s"] - rounds["radius_wall_s"], 2),
            **rounds, **result.summary(), "load_average": os.getloadavg(),
        }
        if args.compare_single:
            from edgecore.coreset import KCenterGreedySampler

            bank = np.concatenate([shard.open() for shard in shards])
            sampler = KCenterGreedySampler(args.ratio, args.projection_dim, seed=0)
            begin = time.perf_counter()
            sampler.select(bank)
            report["single_node"] = {"radius": sampler.coverage_radius_, "seconds": round(time.perf_counter() - begin, 2)}
            report["radius_ratio"] = result.radius / sampler.coverage_radius_
        print(json.dumps(report, indent=1, default=float))
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
