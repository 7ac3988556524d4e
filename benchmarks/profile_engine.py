"""Where a bundle's engine and search spend a frame (issue #11): OpenVINO ``PERF_COUNT`` per op type, and the
coarse / int8 search's stages timed inside the detector loop.

* ``engine``: compiles an engine XML (or a bundle's ``model.onnx``) as the runtime does (LATENCY, 2 threads,
  ``INFERENCE_PRECISION_HINT`` as given: ``f32`` for int8 engines, as the runtime compiles them), infers a random
  uint8 crop, and prints p50 plus the ops' summed ``real_time`` by (type, kernel) and the slowest ops. This found
  the head's dense 1536 × 1024 reduction MatMul (9.1 of 21.4 ms, RESULTS.md § Search, "Channel pairs").
* ``search``: ``Detector.detect`` on real frames, with the searcher's stages wrapped by timers (projection,
  re-rank, certified maximum, the whole search), ms per frame; the engine runs between searches, as on the camera.

    python benchmarks/profile_engine.py engine /tmp/ec11/wrn_flash.edgecore/engines/openvino-int8/model.xml --hint f32
    python benchmarks/profile_engine.py search /tmp/ec11/wrn_auto.edgecore --images ../shared/data/mvtec_bottle/test
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np


def profile_engine(model: Path, hint: str | None, threads: int, iterations: int, top: int) -> None:
    import openvino as ov

    config = {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = ov.Core().compile_model(str(model), "CPU", config)
    request = compiled.create_infer_request()
    port = compiled.input(0)
    crop = np.random.default_rng(0).integers(0, 256, tuple(port.shape), dtype=np.uint8)
    for _ in range(10):
        request.infer({0: crop})
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        request.infer({0: crop})
        times.append(time.perf_counter() - start)
    by_kind: dict[tuple[str, str], float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    ops = []
    for info in request.profiling_info:
        us = info.real_time.total_seconds() * 1e6
        by_kind[(info.node_type, info.exec_type)] += us
        count[(info.node_type, info.exec_type)] += 1
        ops.append((us, info.node_name, info.node_type, info.exec_type))
    print(f"{model}: p50 {1e3 * np.median(times):.2f} ms over {iterations} inferences, hint {hint or 'default'}, "
          f"{threads} threads; ops' real_time sum {sum(by_kind.values()) / 1e3:.2f} ms (last inference)")
    print("\n| op type | kernel | ops | µs |\n|---|---|---:|---:|")
    for (kind, kernel), us in sorted(by_kind.items(), key=lambda item: -item[1]):
        if us > 0:
            print(f"| {kind} | {kernel} | {count[(kind, kernel)]} | {us:.0f} |")
    print(f"\nslowest {top} ops:\n")
    for us, name, kind, kernel in sorted(ops, reverse=True)[:top]:
        print(f"  {us:7.0f} µs  {name}  ({kind}, {kernel})")


def profile_search(bundle: Path, images: Path, frames: int, rounds: int) -> None:
    from edgecore.runtime import search_coarse
    from edgecore.runtime.detector import Detector

    spent: dict[str, float] = collections.defaultdict(float)

    def timed(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(search_coarse.CoarseSearch, "project", "projection")
    timed(search_coarse.CoarseSearch, "_certify_max", "certified maximum")
    timed(search_coarse.CoarseSearch, "search", "whole search")
    timed(search_coarse, "rerank", "re-rank (ranking + exact measure)")
    paths = sorted(p for p in images.rglob("*.png"))[:frames]
    with Detector.open(bundle) as detector:
        for path in paths[:5]:
            detector.detect(path)
        spent.clear()
        start = time.perf_counter()
        for _ in range(rounds):
            for path in paths:
                detector.detect(path)
        wall = time.perf_counter() - start
        print(f"{bundle}: {detector.index.describe()}; {len(paths) * rounds} frames, {1e3 * wall / (len(paths) * rounds):.2f} "
              "ms per frame end to end")
    for label, seconds in spent.items():
        print(f"  {label:36s} {1e3 * seconds / (len(paths) * rounds):6.2f} ms per frame")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    eng = sub.add_parser("engine", help="OpenVINO PERF_COUNT of one engine")
    eng.add_argument("model", type=Path, help="engine .xml or model.onnx")
    eng.add_argument("--hint", default=None, help="INFERENCE_PRECISION_HINT (f32 as the runtime runs int8 engines)")
    eng.add_argument("--threads", type=int, default=2)
    eng.add_argument("--iterations", type=int, default=50)
    eng.add_argument("--top", type=int, default=15)
    sea = sub.add_parser("search", help="the coarse search's stages inside the detector loop")
    sea.add_argument("bundle", type=Path)
    sea.add_argument("--images", type=Path, required=True)
    sea.add_argument("--frames", type=int, default=40)
    sea.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.command == "engine":
        profile_engine(args.model, args.hint, args.threads, args.iterations, args.top)
    else:
        profile_search(args.bundle, args.images, args.frames, args.rounds)


if __name__ == "__main__":
    main()
