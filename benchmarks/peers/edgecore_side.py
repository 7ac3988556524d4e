"""edgecore half of the peer benchmark's inference measurements (the project's own python).

    edgecore_side.py serve --bundle B [--precision P] [--search S]      # stdin/stdout latency worker
    edgecore_side.py rss   --bundle B [--precision P] --images I...     # fresh inference-only process

Only the camera runtime is imported (``edgecore.runtime``: numpy, Pillow, OpenVINO,
hnswlib; no torch), exactly what ``Detector.open(bundle).detect(path)`` needs. Each
command prints JSON lines; the orchestrator is ``anomalib_peer.py``.
"""
from __future__ import annotations

import argparse
import sys
import time


from _probe import emit, max_rss_mib, vm_hwm_mib  # shared by both sides (each runs as a script)


def open_detector(args):
    from edgecore.runtime.detector import Detector

    return Detector.open(args.bundle, precision=args.precision or None, search=args.search or None)


def describe(detector) -> dict:
    info = detector.engine.info
    return {
        "engine": f"{info.backend} {info.executed_precision} ({info.engine_key or info.source})",
        "index": f"{detector.index.dtype} {detector.index.mode} {detector.index.size}x{detector.index.dim}",
    }


def cmd_serve(args) -> None:
    detector = open_detector(args)
    emit({"ready": True, "rss_mib": vm_hwm_mib(), **describe(detector)})
    for line in sys.stdin:
        path = line.strip()
        if not path:
            break
        start = time.perf_counter()
        detection = detector.detect(path)
        ms = (time.perf_counter() - start) * 1e3
        emit({"ms": ms, "score": detection.score, "parts_ms": detection.timings_ms})
    emit({"done": True, "rss_mib": vm_hwm_mib(), "torch_imported": "torch" in sys.modules})


def cmd_rss(args) -> None:
    start = time.perf_counter()
    detector = open_detector(args)
    load_s = time.perf_counter() - start
    rss_loaded = vm_hwm_mib()
    scores = [detector.detect(path).score for path in args.images]
    emit(
        {
            "side": "edgecore",
            "cmd": "rss",
            "images": len(scores),
            "load_s": load_s,
            "maxrss_after_load_mib": rss_loaded,
            "maxrss_mib": max_rss_mib(),
            "vm_hwm_mib": vm_hwm_mib(),
            "torch_imported": "torch" in sys.modules,
            **describe(detector),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, func in (("serve", cmd_serve), ("rss", cmd_rss)):
        p = sub.add_parser(name)
        p.add_argument("--bundle", required=True)
        p.add_argument("--precision", default="")
        p.add_argument("--search", default="")
        if name == "rss":
            p.add_argument("--images", nargs="+", required=True)
        p.set_defaults(func=func)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
