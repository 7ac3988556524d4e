"""Tiled inspection (#15.1b): camera latency per tile count, and what tiles buy on large tall parts.

    python benchmarks/bench_tiles.py [--out DIR] [--skip-quality]

Latency: Lite0 fitted per geometry on the same synthetic large tall-part frames, exported
(fp32 index, exact search), camera ``Detector.detect`` end to end with OpenVINO ONNX fp32,
1/2/4/6 tiles of 224², interleaved. Quality: image AUROC and recall / false alarms at the stored
threshold for squash, pad (``auto``) and tile on the same set. One JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=896)
    parser.add_argument("--frames", type=int, default=20, help="timed frames per tile count per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--random-init", action="store_true", help="latency only (quality needs real weights)")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()

    from edgecore.aspect import resolve_preprocess
    from edgecore.data.datasets import ImageStream, test_samples, train_samples
    from edgecore.data.tall_parts import make_tall_parts_dataset
    from edgecore.evaluation import evaluate, load_test_set
    from edgecore.export.bundle import export_bundle
    from edgecore.model import FitConfig, fit
    from edgecore.runtime.detector import Detector
    from edgecore.runtime.preprocess import PreprocessConfig

    work = args.out or Path(tempfile.mkdtemp(prefix="bench-tiles-"))
    data = make_tall_parts_dataset(work / "data", n_train=30, n_test_good=10, n_test_per_defect=8,
                                   width=args.width, height=args.height)
    paths = [s.path for s in train_samples(data)]
    fit_config = dict(device="cpu", random_init=args.random_init)
    print(json.dumps({"load_average_start": os.getloadavg(), "frames": f"{args.width}x{args.height}"}), flush=True)

    if not args.skip_quality:
        geometries = {
            "squash 256/224": PreprocessConfig(256, 224),
            "pad (auto)": resolve_preprocess("auto", None, 256, 224, paths)[0],
            "tile 224² (auto grid)": resolve_preprocess("tile", None, 256, 224, paths)[0],
        }
        for name, pre in geometries.items():
            start = time.perf_counter()
            model = fit(ImageStream(train_samples(data)).images(), FitConfig(preprocess=pre, **fit_config))
            fit_s = time.perf_counter() - start
            result, _ = evaluate(model, load_test_set(data, pre))
            at = result["at_threshold"]
            print(json.dumps({
                "geometry": name, "input_hw": list(pre.input_hw), "tiles": pre.tile_count, "map_hw": list(pre.map_hw),
                "image_auroc": round(result["image_auroc"], 4), "recall_at_threshold": round(at["recall"], 3),
                "false_alarms": f"{at['fp']}/{at['fp'] + at['tn']}", "fit_s": round(fit_s, 1),
                "coreset": model.config["coreset"]["size"],
            }), flush=True)

    grids = {1: (1, 1), 2: (2, 1), 4: (2, 2), 6: (3, 2)}
    detectors, frames = {}, [str(s.path) for s in test_samples(data)][: args.frames]
    for count, grid in grids.items():
        pre = PreprocessConfig(aspect="tile", input_size=(224, 224), tiles=grid, tile_overlap=(56, 56))
        model = fit(ImageStream(train_samples(data)[:10]).images(), FitConfig(preprocess=pre, **fit_config))
        model_dir = model.save(work / "models" / f"t{count}")
        bundle = export_bundle(model_dir, work / "bundles" / f"t{count}.edgecore", index_dtype="fp32", search="exact")
        detectors[count] = (Detector.open(bundle, precision="fp32"), model.config["coreset"]["size"])
    times = {count: [] for count in grids}
    for detector, _ in detectors.values():
        detector.detect(frames[0])  # warm-up
    for _ in range(args.rounds):  # interleaved: the shared machine's load hits every tile count alike
        for count, (detector, _) in detectors.items():
            for frame in frames:
                times[count].append(detector.detect(frame).timings_ms)
    base = None
    for count, (detector, coreset) in detectors.items():
        total = float(np.median([t["total"] for t in times[count]]))
        base = base or total
        print(json.dumps({
            "tiles": count, "grid": list(grids[count]), "coreset": coreset, "p50_total_ms": round(total, 1),
            "p50_engine_ms": round(float(np.median([t["engine"] for t in times[count]])), 1),
            "p50_search_ms": round(float(np.median([t["search"] for t in times[count]])), 1),
            "ratio_vs_1_tile": round(total / base, 2), "timed_frames": len(times[count]),
        }), flush=True)
        detector.close()
    print(json.dumps({"load_average_end": os.getloadavg()}))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
