"""Fidelity of the camera path against the host fp32 model, per engine precision and index.

For one model directory and one MVTec category: host fp32 (torch, exact fp32 search) vs
bundles exported with each index dtype/search mode, run through the runtime with each
OpenVINO precision. Reports image/pixel AUROC, their drop, image-score Spearman and the
max relative score difference — the numbers the fidelity contract is stated in.

    python benchmarks/fidelity.py --data ../shared/data/mvtec_bottle --backbone efficientnet_lite0
    python benchmarks/fidelity.py --data ../shared/data/mvtec_bottle --backbone wide_resnet50_2 --random-init
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from edgecore import metrics
from edgecore.data.datasets import ImageStream, train_samples
from edgecore.evaluation import load_test_set
from edgecore.export.bundle import export_bundle
from edgecore.export.compile import compile_openvino
from edgecore.model import FitConfig, PatchCoreModel, fit
from edgecore.runtime.detector import Detector, describe_index


def scores_of(scorer, test_set) -> tuple[np.ndarray, np.ndarray]:
    scores = scorer.score_crops(test_set.crops)
    return scores.image, scores.maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--model", type=Path, help="reuse a fitted model directory")
    parser.add_argument("--work", type=Path, default=Path(tempfile.mkdtemp(prefix="edgecore-fidelity-")))
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    parser.add_argument("--indexes", default="fp32:exact,int8:exact,int8:hnsw,fp16:hnsw")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model_dir = args.model
    if model_dir is None:
        images = [rgb for _, rgb in ImageStream(train_samples(args.data))]
        model = fit(images, FitConfig(backbone=args.backbone, random_init=args.random_init, device="cpu"))
        model_dir = model.save(args.work / "model")
    host = PatchCoreModel.load(model_dir, device="cpu")
    test_set = load_test_set(args.data, host.preprocess_config)
    labels = np.array([s.label for s in test_set.samples])
    usable = test_set.has_mask
    host_image, host_maps = scores_of(host, test_set)
    ref_image_auroc = metrics.auroc(host_image, labels)
    ref_pixel_auroc = metrics.pixel_auroc(host_maps[usable], test_set.masks[usable])

    rows = [{"config": "host torch fp32 + exact fp32", "image_auroc": ref_image_auroc, "pixel_auroc": ref_pixel_auroc,
             "spearman": 1.0, "max_rel_diff": 0.0}]
    for spec in args.indexes.split(","):
        dtype, mode = spec.split(":")
        bundle = export_bundle(model_dir, args.work / f"b-{dtype}-{mode}.edgecore", index_dtype=dtype, search=mode)
        for precision in args.precisions.split(","):
            if precision == "int8":
                compile_openvino(bundle, "int8", calib=args.data, num_calib=64)
            elif precision != "fp32":
                compile_openvino(bundle, precision)
            start = time.perf_counter()
            with Detector.open(bundle, precision=precision) as detector:
                image, maps = scores_of(detector, test_set)
                executed = detector.engine.info.executed_precision
                index = describe_index(detector.index)
            image_auroc = metrics.auroc(image, labels)
            pixel_auroc = metrics.pixel_auroc(maps[usable], test_set.masks[usable])
            rows.append({
                "config": f"OpenVINO {precision} (executed {executed}) + {index}",
                "image_auroc": image_auroc,
                "pixel_auroc": pixel_auroc,
                "image_auroc_drop_pt": 100 * (ref_image_auroc - image_auroc),
                "pixel_auroc_drop_pt": 100 * (ref_pixel_auroc - pixel_auroc),
                "spearman": float(spearmanr(host_image, image).statistic),
                "max_rel_diff": float(np.max(np.abs(image - host_image) / np.abs(host_image))),
                "seconds": round(time.perf_counter() - start, 1),
            })
            print(json.dumps(rows[-1]), flush=True)

    print(f"\n{args.backbone}{' (random init)' if args.random_init else ''} on {args.data.name}, {len(labels)} test images\n")
    print("| configuration | image AUROC | pixel AUROC | Δ image (pt) | Δ pixel (pt) | Spearman | max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r.get('image_auroc_drop_pt', 0):.2f} | "
              f"{r.get('pixel_auroc_drop_pt', 0):.2f} | {r['spearman']:.4f} | {r['max_rel_diff']:.2e} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
