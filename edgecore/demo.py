"""`edgecore demo`: the whole main job on generated data, offline, in one command.

synthetic data → fit (Lite0, real offline weights) → evaluate → export (ONNX +
int8 index) → verify → compile (OpenVINO) → infer on the test images through the
torch-free runtime, with heat-map overlays → bench against the 200 ms budget.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgecore.data.datasets import ImageStream, test_samples, train_samples
from edgecore.data.synthetic import make_synthetic_dataset
from edgecore.evaluation import evaluate, load_test_set, write_evaluation
from edgecore.model import FitConfig, fit


def run_demo(output: Path, quick: bool = False, log: Callable[[str], None] = print) -> dict:
    from edgecore.export.bundle import export_bundle
    from edgecore.export.compile import compile_openvino
    from edgecore.runtime.bench import BenchConfig, print_table, render_markdown, run_bench
    from edgecore.runtime.bundle import verify_bundle
    from edgecore.runtime.cli import engine_line
    from edgecore.runtime.detector import Detector
    from edgecore.runtime.results import score_images

    output = Path(output)
    started = time.perf_counter()
    sizes = dict(n_train=20, n_test_good=4, n_test_per_defect=2) if quick else dict(n_train=60, n_test_good=10, n_test_per_defect=5)
    log(f"[1/7] synthetic dataset → {output / 'data'}")
    shutil.rmtree(output / "data", ignore_errors=True)  # the demo owns this folder; start fresh
    category = make_synthetic_dataset(output / "data", seed=0, **sizes)

    log("[2/7] fit PatchCore (efficientnet_lite0, offline ImageNet weights)")
    streamed = list(ImageStream(train_samples(category)))
    sources = [str(sample.path) for sample, _ in streamed]
    model = fit([rgb for _, rgb in streamed], FitConfig(backbone="efficientnet_lite0", device="cpu"), sources=sources)
    model_dir = model.save(output / "model")

    log("[3/7] evaluate on the synthetic test split (host, torch)")
    test_set = load_test_set(category, model.preprocess_config)
    result, records = evaluate(model, test_set)
    write_evaluation(output / "report", result, records, title="edgecore demo (synthetic data, Lite0)",
                     test_set=test_set, scorer=model)

    log("[4/7] export: one ONNX graph + int8 coreset index → bundle")
    bundle = export_bundle(model_dir, output / "part.edgecore", log=log)
    verify_bundle(bundle)

    log("[5/7] compile for OpenVINO (bf16 where the CPU has it) + re-fit the threshold with that engine")
    # The camera's engine shifts scores by a few %: re-fit the decision boundary with it on the
    # same held-out normal images the host used, so host and camera agree on what is normal.
    held_out = output / "held_out_normals"
    shutil.rmtree(held_out, ignore_errors=True)
    held_out.mkdir(parents=True)
    for source in model.config["fit"]["validation_sources"]:
        shutil.copy(source, held_out / Path(source).name)
    compile_openvino(bundle, "bf16", refit=held_out, log=log)

    log(f"[6/7] infer with the torch-free runtime on the test images → overlays in {output / 'infer' / 'overlays'}")
    samples = test_samples(category)
    rows: list[dict] = []
    with Detector.open(bundle) as detector:
        log(engine_line(detector))
        score_images(detector, [s.path for s in samples], output / "infer", overlays="all",
                     emit=lambda line: rows.append(json.loads(line)), warn=log)
    labels = np.array([s.label for s in samples])
    flagged = np.array([row["is_anomalous"] for row in rows])
    camera_scores = np.array([row["score"] for row in rows])
    host_scores = model.score_crops(test_set.crops).image

    log("[7/7] bench against the 200 ms budget")
    report = run_bench(bundle, [BenchConfig()], iterations=10 if quick else 30, warmup=3)
    print_table(report)
    (output / "bench.md").write_text(render_markdown(report))
    return {
        "model": str(model_dir),
        "bundle": str(bundle),
        "report": str(output / "report" / "report.md"),
        "overlays": str(output / "infer" / "overlays"),
        "image_auroc": result.get("image_auroc"),
        "pixel_auroc": result.get("pixel_auroc"),
        "aupro": result.get("aupro"),
        "runtime_recall": float(flagged[labels == 1].mean()),
        "runtime_false_alarms": int(flagged[labels == 0].sum()),
        "runtime_vs_host_max_rel_diff": float(np.max(np.abs(camera_scores - host_scores) / np.abs(host_scores))),
        "bench_total_p50_ms": report["runs"][0]["stages_ms"]["total"]["p50"],
        "bench_pass": report["pass"],
        "fit_timings_s": model.config["fit"]["timings"],
        "total_s": round(time.perf_counter() - started, 2),
    }
