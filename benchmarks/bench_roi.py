"""What an ROI mask buys and costs (#15.2): synthetic parts beside a clutter strip.

Fits the same training frames with and without ``--roi`` (Lite0, real weights, pad
geometry), then scores normal test frames with vivid clutter and spot defects on the
part at the stored threshold: false alarms, recall, AUROC, fit time, bank size and
host detect latency. Run: ``python benchmarks/bench_roi.py [--out DIR]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from edgecore.data.cluttered import make_cluttered_dataset
from edgecore.data.datasets import ImageStream, test_samples, train_samples
from edgecore.metrics import auroc
from edgecore.model import FitConfig, fit
from edgecore.roi import RoiSource
from edgecore.runtime.preprocess import PreprocessConfig


def run(out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    category = make_cluttered_dataset(out, n_train=40, n_test_good=20, n_test_spot=10, strip=64)
    frames = [rgb for _, rgb in ImageStream(train_samples(category))]
    tests = test_samples(category)
    test_frames = [rgb for _, rgb in ImageStream(tests)]
    labels = np.array([s.label for s in tests])
    config = FitConfig(device="cpu", preprocess=PreprocessConfig(aspect="pad", input_size=(96, 160)), val_ratio=0.2)
    # the part's ROI, and the same ROI kept 24 px (3 stride-8 cells, the receptive-field leak) off the clutter
    margin = out / "roi_margin.json"
    margin.write_text(json.dumps([[0, 0], [71, 0], [71, 95], [0, 95]]))
    rows = {}
    for name, roi in (("no ROI", None), ("ROI = part", RoiSource(category / "roi.json")),
                      ("ROI, 24 px margin", RoiSource(margin))):
        start = time.perf_counter()
        model = fit(frames, config, roi=roi)
        fit_s = time.perf_counter() - start
        latency, scores = [], []
        for frame in test_frames:
            start = time.perf_counter()
            scores.append(model.detect(frame).score)
            latency.append((time.perf_counter() - start) * 1e3)
        scores = np.array(scores)
        flagged = model.decision.is_anomalous(scores)
        rows[name] = {
            "false_alarms": f"{int(flagged[labels == 0].sum())}/{int((labels == 0).sum())}",
            "recall": round(float(flagged[labels == 1].mean()), 3),
            "image_auroc": round(float(auroc(scores, labels)), 4),
            "fit_s": round(fit_s, 2),
            "coreset": int(model.memory_bank.shape[0]),
            "bank_patches": int(model.config["coreset"]["bank_patches"]),
            "detect_p50_ms": round(float(np.median(latency)), 2),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_roi"))
    args = parser.parse_args()
    print(f"load {os.getloadavg()[0]:.2f}")
    print(json.dumps(run(args.out), indent=2))
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
