"""Coreset selection on ONE bank: edgecore's KCenterGreedySampler vs anomalib's KCenterGreedy.

Runs with the project's python. The bank is anomalib's own training bank (dumped by
``anomalib_side.py fit --dump-bank``, N x 1536 for WRN-50 layer2+3) together with the
indices anomalib's KCenterGreedy picked on it inside ``Engine.fit`` (timed there);
``--rerun-anomalib VENV_PYTHON`` also re-runs anomalib's class, unchanged, on the same
bank in a fresh venv process right after edgecore's run (a second, same-conditions time).

Both selections are scored with ``edgecore.coreset.coverage_radius`` in the original
(unprojected) feature space; a uniform random subset of the same size is the baseline.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgecore.coreset import KCenterGreedySampler, RandomSampler, coverage_radius


def timed_radius(bank: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    start = time.perf_counter()
    radius = coverage_radius(bank, idx)
    return radius, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", required=True, help=".npy N x d float32")
    parser.add_argument("--anomalib-idx", required=True, help=".npy of the indices anomalib selected on --bank")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--projection-dim", type=int, default=128, help="edgecore's default")
    parser.add_argument("--rerun-anomalib", default="", help="venv python: re-time anomalib's KCenterGreedy here")
    parser.add_argument("--work", default="/tmp/peer")
    args = parser.parse_args()

    bank = np.load(args.bank)
    if bank.dtype != np.float32:
        bank = bank.astype(np.float32)
    anomalib_idx = np.load(args.anomalib_idx).astype(np.int64)
    out: dict = {"bank_shape": list(bank.shape), "anomalib_size": int(anomalib_idx.size)}

    sampler = KCenterGreedySampler(ratio=args.ratio, projection_dim=args.projection_dim, seed=args.seed, device="cpu")
    start, cpu_start = time.perf_counter(), time.process_time()
    edgecore_idx = sampler.select(bank)
    out["edgecore_s"] = time.perf_counter() - start
    out["edgecore_cpu_s"] = time.process_time() - cpu_start
    out["edgecore_size"] = int(edgecore_idx.size)
    out["edgecore_projection_dim"] = args.projection_dim

    if args.rerun_anomalib:
        idx_file = Path(args.work) / "anomalib_rerun_idx.npy"
        proc = subprocess.run(
            [args.rerun_anomalib, str(Path(__file__).with_name("anomalib_side.py")), "kcenter",
             "--bank", args.bank, "--ratio", str(args.ratio), "--seed", str(args.seed), "--out", str(idx_file)],
            capture_output=True, text=True, check=True,
        )
        rerun = json.loads(proc.stdout.strip().splitlines()[-1])
        out["anomalib_rerun_s"] = rerun["coreset_s"]
        out["anomalib_rerun_cpu_s"] = rerun["coreset_cpu_s"]
        out["anomalib_projection_dim"] = rerun["projected_dim"]
        rerun_idx = np.load(idx_file)
        out["anomalib_rerun_radius"], _ = timed_radius(bank, rerun_idx)

    random_idx = RandomSampler(ratio=args.ratio, seed=args.seed).select(bank)[: anomalib_idx.size]
    out["anomalib_radius"], out["radius_s"] = timed_radius(bank, anomalib_idx)
    out["edgecore_radius"], _ = timed_radius(bank, edgecore_idx)
    out["random_radius"], _ = timed_radius(bank, random_idx)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
