"""The operating point on the camera (#15.8): fp32 host vs the INT8 engine with the fit threshold vs re-fitted.

    python benchmarks/bench_refit.py DATA [DATA ...] [--out DIR]
    python benchmarks/bench_refit.py --make-texture /tmp/woven   # writes a texture category, then runs it

DATA: MVTec-layout categories (e.g. /work/shared/data/mvtec_bottle, or one made by
``edgecore.data.tall_parts``). For each: fit Lite0 (default --aspect auto, with
the held-out sources recorded), export, compile INT8 (--portable too, as most
cameras need it) once with ``--keep-threshold`` and once by default (re-fit on the
engine from the bundle's validation images); evaluate host and both engines at
their stored thresholds. One JSON line per data set and engine.

``--make-texture DIR`` first writes a texture category (woven tiles of
``benchmarks/woven_tiles.py`` with broken-thread, stain and cut defects and their
masks) and adds it to the data sets: the contract must hold on textures too.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from woven_tiles import woven_tile

TEXTURE_DEFECTS = ("broken", "stain", "cut")


def texture_defect(tile: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A woven tile with one local defect; returns (image, uint8 0/255 mask)."""
    height, width = tile.shape
    y, x = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    image = tile.astype(np.float32)
    if kind == "broken":  # threads missing: the weave is replaced by a flat patch of backing
        mask = ((y - cy) / rng.uniform(10, 18)) ** 2 + ((x - cx) / rng.uniform(14, 26)) ** 2 <= 1
        image[mask] = 0.3 * image[mask] + 0.7 * 90
    elif kind == "stain":  # a darker smooth blot over the weave
        radius = rng.uniform(12, 22)
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2
        image[mask] *= 0.55
    else:  # a thin cut across a few threads
        angle = rng.uniform(0, np.pi)
        along = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
        across = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
        mask = (np.abs(along) <= rng.uniform(25, 40)) & (np.abs(across) <= 2.5)
        image[mask] = 245
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def make_texture_category(root: Path, train: int = 80, good: int = 20, per_defect: int = 7, seed: int = 0) -> Path:
    """An MVTec-layout texture category under ``root`` (train/good, test/*, ground_truth/*)."""
    def save(array: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for index in range(train):
        save(woven_tile(np.random.default_rng([seed, index])), root / "train" / "good" / f"{index:03d}.png")
    for index in range(good):
        save(woven_tile(np.random.default_rng([seed, 10_000 + index])), root / "test" / "good" / f"{index:03d}.png")
    for k, kind in enumerate(TEXTURE_DEFECTS):
        for index in range(per_defect):
            rng = np.random.default_rng([seed, 20_000 + 100 * k + index])
            image, mask = texture_defect(woven_tile(rng), kind, rng)
            save(image, root / "test" / kind / f"{index:03d}.png")
            save(mask, root / "ground_truth" / kind / f"{index:03d}_mask.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, nargs="*")
    parser.add_argument("--make-texture", type=Path, default=None, metavar="DIR",
                        help="write a woven-texture category with defects to DIR and add it to the data sets")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--portable", action="store_true", help="7-bit INT8 (runs on AVX2-only cameras)")
    args = parser.parse_args()
    if args.make_texture is not None:
        args.data.append(make_texture_category(args.make_texture))
    if not args.data:
        parser.error("give DATA or --make-texture DIR")

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
