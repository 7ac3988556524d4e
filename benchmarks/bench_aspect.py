"""Aspect-aware inspection (#15.1) on synthetic tall parts: what it buys and what it costs.

    python benchmarks/bench_aspect.py [--out DIR]

For each geometry: fit Lite0 (real weights) on the same tall-part set, evaluate
(image/pixel AUROC, recall and false alarms at the stored threshold), export an
fp32 bundle and time the camera Detector (OpenVINO ONNX fp32, exact search) on
the test frames, interleaved across geometries. Prints one JSON line per geometry.
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
    parser.add_argument("--out", type=Path, default=None, help="keep data, models and bundles here")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=560)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds over the test frames")
    args = parser.parse_args()

    from edgecore.aspect import resolve_preprocess
    from edgecore.data.datasets import ImageStream, test_samples, train_samples
    from edgecore.data.tall_parts import make_tall_parts_dataset
    from edgecore.evaluation import evaluate, load_test_set
    from edgecore.export.bundle import export_bundle
    from edgecore.model import FitConfig, fit
    from edgecore.runtime.detector import Detector
    from edgecore.runtime.preprocess import PreprocessConfig

    work = args.out or Path(tempfile.mkdtemp(prefix="bench-aspect-"))
    data = make_tall_parts_dataset(work / "data", n_train=60, n_test_good=20, n_test_per_defect=10,
                                   width=args.width, height=args.height)
    paths = [s.path for s in train_samples(data)]
    geometries = {
        "squash 256/224 (old default)": PreprocessConfig(256, 224),
        "auto (crop 224)": resolve_preprocess("auto", None, 256, 224, paths)[0],
        "pad, short side 128 (≈224² pixels)": resolve_preprocess("pad", None, 256, 128, paths)[0],
    }
    rows, detectors, frames = {}, {}, [str(s.path) for s in test_samples(data)]
    for name, pre in geometries.items():
        start = time.perf_counter()
        model = fit(ImageStream(train_samples(data)).images(), FitConfig(device="cpu", preprocess=pre))
        fit_s = time.perf_counter() - start
        result, _ = evaluate(model, load_test_set(data, pre))
        model_dir = model.save(work / "models" / name.split()[0].replace(",", "") / str(len(rows)))
        bundle = export_bundle(model_dir, work / "bundles" / f"{len(rows)}.edgecore", index_dtype="fp32", search="exact")
        size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
        at = result["at_threshold"]
        rows[name] = {
            "geometry": name, "input_hw": list(pre.input_hw), "grid": list(model.grid),
            "image_auroc": round(result["image_auroc"], 4), "pixel_auroc": round(result.get("pixel_auroc", float("nan")), 4),
            "recall_at_threshold": round(at["recall"], 3), "false_alarms": f"{at['fp']}/{at['fp'] + at['tn']}",
            "fit_s": round(fit_s, 1), "coreset": model.config["coreset"]["size"], "bundle_mb": round(size / 1e6, 2),
        }
        detectors[name] = Detector.open(bundle, precision="fp32")
    times = {name: [] for name in geometries}
    for _ in range(args.rounds):  # interleaved: the shared machine's load hits every geometry alike
        for name, detector in detectors.items():
            for frame in frames:
                times[name].append(detector.detect(frame).timings_ms["total"])
    for name, row in rows.items():
        row["camera_fp32_ms_p50"] = round(float(np.median(times[name])), 1)
        detectors[name].close()
        print(json.dumps(row))
    print(json.dumps({"load_average": os.getloadavg(), "frames": f"{args.width}x{args.height}",
                      "timed_frames_per_geometry": len(times[name])}))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
