"""`edgecore demo`: the whole main job on generated data, offline, in one command."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from edgecore.data.datasets import ImageStream, train_samples
from edgecore.data.synthetic import make_synthetic_dataset
from edgecore.evaluation import evaluate, load_test_set, write_evaluation
from edgecore.model import FitConfig, fit


def run_demo(output: Path, quick: bool = False, log: Callable[[str], None] = print) -> dict:
    output = Path(output)
    started = time.perf_counter()
    sizes = dict(n_train=20, n_test_good=4, n_test_per_defect=2) if quick else dict(n_train=60, n_test_good=10, n_test_per_defect=5)
    log(f"[1/3] synthetic dataset → {output / 'data'}")
    shutil.rmtree(output / "data", ignore_errors=True)  # the demo owns this folder; start fresh
    category = make_synthetic_dataset(output / "data", seed=0, **sizes)

    log("[2/3] fit PatchCore (efficientnet_lite0, offline ImageNet weights)")
    images = [rgb for _, rgb in ImageStream(train_samples(category))]
    model = fit(images, FitConfig(backbone="efficientnet_lite0", device="cpu"))
    model_dir = model.save(output / "model")

    log("[3/3] evaluate on the synthetic test split")
    result, records = evaluate(model, load_test_set(category, model.preprocess_config))
    write_evaluation(output / "report", result, records, title="edgecore demo (synthetic data, Lite0)")
    return {
        "model": str(model_dir),
        "report": str(output / "report" / "report.md"),
        "image_auroc": result.get("image_auroc"),
        "pixel_auroc": result.get("pixel_auroc"),
        "aupro": result.get("aupro"),
        "fit_timings_s": model.config["fit"]["timings"],
        "total_s": round(time.perf_counter() - started, 2),
    }
