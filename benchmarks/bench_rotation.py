"""Rotation / flip robustness (#15 item 4): the bank with and without ``fit --augment``.

    python benchmarks/bench_rotation.py /work/shared/data/mvtec_bottle [--synthetic DIR] [--augment rot90,rot180,rot270]

For each data set (MVTec layout; ``--synthetic DIR`` first writes the tall-shaft set
of ``edgecore.data.tall_parts`` there): fit Lite0 plain (coreset 10 %) and with the
augmentation, once at the same ratio and once at the same coreset size (ratio / (1 + N):
same bundle, same latency). Reports image AUROC on the unrotated test set (what the
augmentation costs), the false-alarm rate at each model's stored threshold on the normal
test frames turned by 90° and 180° (what it buys), patches before the coreset, fit time
and bundle size. One JSON line per data set and model.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="*")
    parser.add_argument("--synthetic", type=Path, default=None, metavar="DIR")
    parser.add_argument("--augment", default="rot90,rot180,rot270")
    parser.add_argument("--skip-same-ratio", action="store_true", help="only the same-coreset-size augmented fit")
    args = parser.parse_args()

    from edgecore.aspect import resolve_preprocess
    from edgecore.augment import parse_augment
    from edgecore.data.datasets import ImageStream, test_samples, train_samples
    from edgecore.evaluation import evaluate, load_test_set
    from edgecore.export.bundle import export_bundle
    from edgecore.model import FitConfig, fit
    from edgecore.runtime.preprocess import preprocess

    augment = parse_augment(args.augment)
    data_sets = list(args.data)
    if args.synthetic is not None:
        from edgecore.data.tall_parts import make_tall_parts_dataset

        data_sets.append(make_tall_parts_dataset(args.synthetic, n_train=40, n_test_good=20, n_test_per_defect=10))
    work = Path(tempfile.mkdtemp(prefix="bench-rotation-"))
    for data in data_sets:
        samples = train_samples(data)
        pre, _ = resolve_preprocess("auto", None, 256, 224, [s.path for s in samples])
        train = [rgb for _, rgb in ImageStream(samples)]
        goods = [rgb for s, rgb in ImageStream(test_samples(data)) if s.label == 0]
        test = load_test_set(data, pre)
        base = FitConfig(device="cpu", preprocess=pre)
        variants = [("plain", base)]
        if not args.skip_same_ratio:
            variants.append((f"+{args.augment} (same ratio)", replace(base, augment=augment)))
        variants.append((f"+{args.augment} (same coreset size)",
                         replace(base, augment=augment, coreset_ratio=base.coreset_ratio / (1 + len(augment)))))
        for name, config in variants:
            start = time.perf_counter()
            model = fit(train, config)
            fit_s = time.perf_counter() - start
            result, _ = evaluate(model, test)
            rotated = {}
            for turn in (1, 2):
                crops = np.stack([preprocess(np.ascontiguousarray(np.rot90(g, turn)), pre) for g in goods])
                scores = model.score_crops(crops, 16).image
                rotated[f"false_alarms_rot{90 * turn}"] = f"{int((scores > model.threshold).sum())}/{len(goods)}"
            upright = model.score_crops(np.stack([preprocess(g, pre) for g in goods]), 16).image
            bundle = export_bundle(model.save(work / data.name / name.replace(" ", "_")), work / data.name / "b.edgecore")
            size_mb = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e6
            shutil.rmtree(bundle)
            print(json.dumps({
                "data": data.name, "model": name, "input_hw": list(pre.input_hw),
                "image_auroc": round(result["image_auroc"], 4),
                "recall_at_threshold": round(result["at_threshold"]["recall"], 3),
                "false_alarms_upright": f"{int((upright > model.threshold).sum())}/{len(goods)}", **rotated,
                "bank_patches": model.config["coreset"]["bank_patches"], "coreset": model.config["coreset"]["size"],
                "fit_s": round(fit_s, 1), "bundle_mb": round(size_mb, 2), "load": [round(v, 2) for v in os.getloadavg()],
            }), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
