"""The operating point on the camera (#15.8): fp32 host vs the INT8 engine with the fit threshold vs re-fitted.

    python benchmarks/bench_refit.py DATA [DATA ...] [--out DIR]

DATA: MVTec-layout categories (e.g. /work/shared/data/mvtec_bottle, or one made by
``edgecore.data.tall_parts``). For each: fit Lite0 (default --aspect auto, with
the held-out sources recorded), export, compile INT8 (--portable too, as most
cameras need it) once with ``--keep-threshold`` and once by default (re-fit on the
engine from the bundle's validation images); evaluate host and both engines at
their stored thresholds. One JSON line per data set and engine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--portable", action="store_true", help="7-bit INT8 (runs on AVX2-only cameras)")
    args = parser.parse_args()

    from edgecore.aspect import resolve_preprocess
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.evaluation import evaluate, load_test_set
    from edgecore.export.bundle import export_bundle
    from edgecore.export.compile import compile_openvino
    from edgecore.model import FitConfig, fit
    from edgecore.runtime.detector import Detector

    work = args.out or Path(tempfile.mkdtemp(prefix="bench-refit-"))
    for data in args.data:
        samples = train_samples(data)
        pre, _ = resolve_preprocess("auto", None, 256, 224, [s.path for s in samples])
        sources: list[str] = []
        model = fit(ImageStream(samples).images(sources), FitConfig(device="cpu", preprocess=pre), sources=sources)
        model_dir = model.save(work / data.name / "model")
        test = load_test_set(data, pre)

        def report(engine: str, scorer, extra: dict | None = None) -> None:
            result, _ = evaluate(scorer, test)
            at = result["at_threshold"]
            print(json.dumps({
                "data": data.name, "engine": engine, "input_hw": list(pre.input_hw),
                "image_auroc": round(result["image_auroc"], 4), "threshold": round(scorer.threshold, 5),
                "recall_at_threshold": round(at["recall"], 3), "false_alarms": f"{at['fp']}/{at['fp'] + at['tn']}",
                **(extra or {}),
            }), flush=True)

        report("host fp32", model)
        base = export_bundle(model_dir, work / data.name / "base.edgecore")
        for mode in ("keep", "refit"):
            bundle = Path(shutil.copytree(base, work / data.name / f"{mode}.edgecore"))
            manifest = compile_openvino(bundle, "int8", calib=data, num_calib=64, portable=args.portable,
                                        keep_threshold=mode == "keep")
            entry = manifest["engines"]["openvino-int8"]
            with Detector.open(bundle, precision="int8") as detector:
                report(f"int8 {'fit threshold' if mode == 'keep' else 're-fitted (default)'}", detector,
                       {"score_shift": entry.get("score_shift")} if mode == "refit" else None)
    print(json.dumps({"load_average": os.getloadavg(), "portable": args.portable}))
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
