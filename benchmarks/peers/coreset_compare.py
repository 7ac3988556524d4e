"""Coreset selection on ONE bank: edgecore's KCenterGreedySampler vs anomalib's KCenterGreedy.

Runs with the project's python; anomalib's class runs unchanged in its venv
(``anomalib_side.py kcenter``). The bank is anomalib's own training bank (dumped by
``anomalib_side.py fit --dump-bank``: N x 1536 for WRN-50 layer2+3).

Full bank:   edgecore's sampler (timed here) vs anomalib's KCenterGreedy (timed inside
             Engine.fit; ``--rerun-anomalib`` re-times it in a fresh venv process right
             after edgecore's run, with ``--rerun-steps K`` = K greedy steps extrapolated).
             Coverage radii with ``edgecore.coreset.coverage_radius`` in the original
             space, for anomalib's selection only when it ran in full (``--anomalib-idx``).
Subsample:   ``--subsample-every S`` takes every S-th row of the same bank and runs BOTH
             samplers in full on it (ratio 0.1), so their coverage radii can be compared
             even when anomalib's full-bank selection is too slow to run on this machine.
A uniform random subset of the same size is the baseline. Prints one JSON line.
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

SIDE = str(Path(__file__).with_name("anomalib_side.py"))


def edgecore_select(bank: np.ndarray, ratio: float, projection_dim: int, seed: int) -> tuple[np.ndarray, dict]:
    sampler = KCenterGreedySampler(ratio=ratio, projection_dim=projection_dim, seed=seed, device="cpu")
    start, cpu_start = time.perf_counter(), time.process_time()
    idx = sampler.select(bank)
    return idx, {"s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start, "size": int(idx.size),
                 "projection_dim": projection_dim}


def anomalib_select(venv_python: str, bank_file: str, ratio: float, seed: int, steps: int, out: Path) -> dict:
    proc = subprocess.run(
        [venv_python, SIDE, "kcenter", "--bank", bank_file, "--ratio", str(ratio), "--seed", str(seed),
         "--steps", str(steps), "--out", str(out)],
        capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"anomalib kcenter failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bank", required=True, help=".npy N x d float32")
    parser.add_argument("--anomalib-idx", default="", help="anomalib's full selection on --bank (omit if extrapolated)")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--projection-dims", default="128", help="edgecore projection dims to run (first = default)")
    parser.add_argument("--rerun-anomalib", default="", help="venv python: re-time anomalib's KCenterGreedy here")
    parser.add_argument("--rerun-steps", type=int, default=0, help="0 = full re-run; K = K steps, extrapolated")
    parser.add_argument("--subsample-every", type=int, default=0, help="also compare both in full on bank[::S]")
    parser.add_argument("--work", default="/tmp/peer")
    args = parser.parse_args()
    work = Path(args.work)
    dims = [int(d) for d in args.projection_dims.split(",") if d]

    bank = np.load(args.bank)
    if bank.dtype != np.float32:
        bank = bank.astype(np.float32)
    out: dict = {"bank_shape": list(bank.shape), "edgecore": [], "subsample": None}

    edgecore_idx = None
    for dim in dims:
        idx, info = edgecore_select(bank, args.ratio, dim, args.seed)
        info["radius"] = coverage_radius(bank, idx)
        out["edgecore"].append(info)
        edgecore_idx = idx if edgecore_idx is None else edgecore_idx
    if args.rerun_anomalib:
        rerun_file = work / "anomalib_rerun_idx.npy"
        rerun = anomalib_select(args.rerun_anomalib, args.bank, args.ratio, args.seed, args.rerun_steps, rerun_file)
        if not rerun["extrapolated"]:
            rerun["radius"] = coverage_radius(bank, np.load(rerun_file))
        out["anomalib_rerun"] = rerun
    if args.anomalib_idx:
        anomalib_idx = np.load(args.anomalib_idx).astype(np.int64)
        out["anomalib_radius"] = coverage_radius(bank, anomalib_idx)
    size = edgecore_idx.size
    out["random_radius"] = coverage_radius(bank, RandomSampler(ratio=args.ratio, seed=args.seed).select(bank)[:size])

    if args.subsample_every > 1:
        sub = np.ascontiguousarray(bank[:: args.subsample_every])
        del bank
        sub_file = work / "bank_subsample.npy"
        np.save(sub_file, sub)
        result: dict = {"every": args.subsample_every, "bank_shape": list(sub.shape), "edgecore": []}
        for dim in dims:
            idx, info = edgecore_select(sub, args.ratio, dim, args.seed)
            info["radius"] = coverage_radius(sub, idx)
            result["edgecore"].append(info)
        if args.rerun_anomalib:
            idx_file = work / "anomalib_subsample_idx.npy"
            info = anomalib_select(args.rerun_anomalib, str(sub_file), args.ratio, args.seed, 0, idx_file)
            info["radius"] = coverage_radius(sub, np.load(idx_file))
            result["anomalib"] = info
        n_sel = result["edgecore"][0]["size"]
        result["random_radius"] = coverage_radius(sub, RandomSampler(ratio=args.ratio, seed=args.seed).select(sub)[:n_sel])
        out["subsample"] = result
        sub_file.unlink(missing_ok=True)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
