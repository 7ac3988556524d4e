"""Evaluate any scorer (host model now, camera runtime later) with the same metric code.

A scorer only needs the preprocessing config, the decision rule and
``score_crops(crops) -> Scores``; so host and camera numbers come from one
function and can be compared line by line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from edgecore import metrics
from edgecore.data.datasets import ImageStream, Sample, test_samples
from edgecore.report import save_roc_png, write_report
from edgecore.runtime.preprocess import PreprocessConfig, preprocess, preprocess_mask
from edgecore.runtime.scoring import Normalization


class Scorer(Protocol):
    preprocess_config: PreprocessConfig
    threshold: float
    normalization: Normalization

    def score_crops(self, crops: np.ndarray, batch_size: int = 16):  # -> Scores(image, patches, maps)
        ...


@dataclass
class EvaluationData:
    """Decoded test set at crop resolution (small enough to keep: crops and masks)."""

    samples: list[Sample]
    crops: np.ndarray  # N×crop×crop×3 uint8
    masks: np.ndarray  # N×crop×crop bool (all False when unknown)
    has_mask: np.ndarray  # N bool: pixel metrics use only images whose mask is known
    skipped: list


def load_test_set(root: str | Path, config: PreprocessConfig, skip_bad: bool = False) -> EvaluationData:
    samples = test_samples(root)
    stream = ImageStream(samples, skip_bad=skip_bad)
    kept, crops, masks, has_mask = [], [], [], []
    for sample, rgb, mask in stream.with_masks():
        kept.append(sample)
        crops.append(preprocess(rgb, config))
        known = mask is not None or sample.label == 0
        has_mask.append(known)
        masks.append(preprocess_mask(mask, config) if mask is not None else np.zeros((config.crop, config.crop), bool))
    return EvaluationData(kept, np.stack(crops), np.stack(masks), np.array(has_mask), list(stream.skipped))


def evaluate(scorer: Scorer, data: EvaluationData, batch_size: int = 16) -> tuple[dict, dict]:
    """Returns (metrics, per-image records)."""
    scores = scorer.score_crops(data.crops, batch_size)
    labels = np.array([s.label for s in data.samples])
    result: dict = {
        "images": int(len(labels)),
        "anomalous_images": int(labels.sum()),
        "skipped_files": [[str(p), reason] for p, reason in data.skipped],
        "threshold": scorer.threshold,
    }
    if 0 < labels.sum() < len(labels):
        result["image_auroc"] = metrics.auroc(scores.image, labels)
        f1_threshold, f1 = metrics.f1_optimal_threshold(scores.image, labels)
        result["f1_optimal"] = {"threshold": f1_threshold, "f1": f1}
    result["at_threshold"] = metrics.confusion_at(scores.image, labels, scorer.threshold)
    usable = data.has_mask
    if data.masks[usable].any():
        maps, masks = scores.maps[usable], data.masks[usable]
        result["pixel_auroc"] = metrics.pixel_auroc(maps, masks)
        result["aupro"] = metrics.aupro(maps, masks, fpr_limit=0.3)
    normalise = scorer.normalization
    records = {
        "scores": scores,
        "labels": labels,
        "rows": [
            {
                "image": str(sample.path),
                "label": int(sample.label),
                "defect_type": sample.defect_type,
                "score": float(score),
                "normalized_score": float(normalise(score)),
                "is_anomalous": bool(score >= scorer.threshold),
            }
            for sample, score in zip(data.samples, scores.image)
        ],
    }
    return result, records


def write_evaluation(out_dir: str | Path, result: dict, records: dict, title: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = list(write_report(out_dir, result, title))
    rows_path = out_dir / "scores.jsonl"
    rows_path.write_text("".join(json.dumps(row) + "\n" for row in records["rows"]))
    written.append(rows_path)
    labels = records["labels"]
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = metrics.roc_curve(records["scores"].image, labels)
        roc_path = out_dir / "roc.png"
        save_roc_png(roc_path, {f"image (AUROC {result['image_auroc']:.3f})": (fpr, tpr)}, title)
        written.append(roc_path)
    return written
