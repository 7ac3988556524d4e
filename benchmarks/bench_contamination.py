"""Contamination-robust coreset on bottle (#15.3): plain PatchCore vs ``fit --denoise`` on poisoned training sets.

    OMP_NUM_THREADS=2 python benchmarks/bench_contamination.py [DATA] [--modes off,auto,fraction]

Builds (symlinks in a /tmp folder, no image is copied) three training sets of the same size: clean, 5 % and
10 % of the train/good images replaced by defective test images (drawn round-robin over the defect types; the
5 % set is a prefix of the 10 % set). Every fit is evaluated on the test images NOT used for contamination
(the same test set for every row). Modes per training set, interleaved: ``off`` (plain), ``auto`` (no estimate)
and ``fraction`` (the true contamination rate; 0.05 on the clean set). One JSON line per fit, then the summary.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

RATES = (0.0, 0.05, 0.10)


def build_sets(data: Path, work: Path, seed: int = 0) -> tuple[dict[float, Path], Path, list[str]]:
    """Symlinked training folders per rate, the evaluation category, and the contaminating files' names."""
    from edgecore.data.datasets import test_samples, train_samples

    rng = np.random.default_rng(seed)
    train = [s.path for s in train_samples(data)]
    defects: dict[str, list[Path]] = {}
    for sample in test_samples(data):
        if sample.label:
            defects.setdefault(sample.defect_type, []).append(sample.path)
    pools = {kind: list(rng.permutation(paths)) for kind, paths in sorted(defects.items())}
    n_max = int(round(max(RATES) * len(train)))
    poison: list[Path] = []
    while len(poison) < n_max:  # round-robin over the defect types
        for kind in sorted(pools):
            if pools[kind] and len(poison) < n_max:
                poison.append(Path(pools[kind].pop()))
    replaced = list(rng.permutation(len(train)))
    folders = {}
    for rate in RATES:
        n = int(round(rate * len(train)))
        folder = work / f"train_{int(rate * 100):02d}"
        folder.mkdir(parents=True)
        for i in sorted(replaced[n:]):
            (folder / train[i].name).symlink_to(train[i])
        for path in poison[:n]:
            (folder / f"poison_{path.parent.name}_{path.name}").symlink_to(path)
        folders[rate] = folder
    used = set(poison)
    evaluation = work / "eval"
    for sample in test_samples(data):
        if sample.path not in used:
            target = evaluation / "test" / sample.defect_type / sample.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(sample.path)
    (evaluation / "ground_truth").symlink_to(data / "ground_truth")
    return folders, evaluation, [f"poison_{p.parent.name}_{p.name}" for p in poison]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="?", default="/work/shared/data/mvtec_bottle", type=Path)
    parser.add_argument("--modes", default="off,auto,fraction")
    args = parser.parse_args()
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.evaluation import evaluate, load_test_set
    from edgecore.model import FitConfig, fit

    work = Path(tempfile.mkdtemp(prefix="bench-contamination-"))
    folders, evaluation, poison_names = build_sets(args.data.resolve(), work)
    test_set = None
    rows = 0
    print(json.dumps({"work": str(work), "load_average_start": os.getloadavg()}), flush=True)
    for rate, folder in folders.items():
        for mode in args.modes.split(","):
            denoise = {"off": "off", "auto": "auto", "fraction": rate if rate > 0 else 0.05}[mode]
            config = FitConfig(device="cpu", denoise=denoise)
            sources: list[str] = []
            start = time.perf_counter()
            model = fit(ImageStream(train_samples(folder)).images(sources), config, sources=sources)
            fit_s = time.perf_counter() - start
            if test_set is None:
                test_set = load_test_set(evaluation, model.preprocess_config)
            result, _ = evaluate(model, test_set)
            record = model.config["coreset"].get("denoise", {})
            flagged = [Path(f["source"]).name for f in record.get("flagged", [])]
            screened = [Path(f["source"]).name for f in model.config["fit"].get("validation_screened", [])]
            held_out = {Path(s).name for s in model.config["fit"]["validation_sources"]} | set(screened)
            in_bank = {Path(s).name for s in sources} - held_out
            poison_in_bank = [n for n in poison_names if n in in_bank]
            row = {
                "contamination": rate, "denoise": denoise,
                "image_auroc": round(result["image_auroc"], 4), "pixel_auroc": round(result["pixel_auroc"], 4),
                "aupro": round(result["aupro"], 4), "recall_at_threshold": round(result["recall_at_threshold"], 3),
                "false_alarms": result["at_threshold"]["fp"],
                "poison_in_bank": len(poison_in_bank),
                "flagged": len(flagged), "flagged_poison": sum(n in poison_in_bank for n in flagged),
                "flagged_normal": [n for n in flagged if not n.startswith("poison_")],
                "poison_held_out": sum(n in held_out for n in poison_names),
                "validation_screened": len(screened), "screened_poison": sum(n.startswith("poison_") for n in screened),
                "fit_s": round(fit_s, 1), "denoise_s": model.config["fit"]["timings"].get("denoise_s", 0.0),
                "coreset_s": model.config["fit"]["timings"]["coreset_s"],
                "test_images": result["images"], "load_average": round(os.getloadavg()[0], 2),
            }
            rows += 1
            print(json.dumps(row), flush=True)
    print(json.dumps({"load_average_end": os.getloadavg(), "fits": rows}))


if __name__ == "__main__":
    main()
