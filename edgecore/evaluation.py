"""Evaluate any scorer (host model or camera Detector) with the same metric code.

Both are :class:`~edgecore.runtime.scorer.ImageScorer`: the preprocessing config,
``score_crops(crops) -> Scores`` and the ONE :class:`~edgecore.runtime.scorer.Decision`;
so host and camera numbers come from one function and can be compared line by line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecore import metrics
from edgecore.data.datasets import ImageStream, Sample, test_samples
from edgecore.progress import step
from edgecore.report import save_roc_png, write_report
from edgecore.runtime.overlay import OVERLAY_SUFFIX, render_overlay, save_overlay
from edgecore.runtime.preprocess import PreprocessConfig, preprocess, preprocess_mask
from edgecore.runtime.scorer import ImageScorer
from edgecore.runtime.scoring import Scores

PLOT_POINTS = 4000  # a ROC over millions of pixels is drawn from this many of its points


@dataclass
class EvaluationData:
    """Decoded test set at crop resolution (small enough to keep: crops and masks)."""

    samples: list[Sample]
    crops: np.ndarray  # N×crop×crop×3 uint8
    masks: np.ndarray  # N×crop×crop bool (all False when unknown)
    has_mask: np.ndarray  # N bool: pixel metrics use only images whose mask is known
    skipped: list


def load_test_set(root: str | Path, config: PreprocessConfig, skip_bad: bool = False) -> EvaluationData:
    """Decode an MVTec-layout test split to crops and masks (one image in memory at a time)."""
    samples = test_samples(root)
    stream = ImageStream(samples, skip_bad=skip_bad)
    kept, crops, masks, has_mask = [], [], [], []
    for sample, rgb, mask in stream.with_masks():
        kept.append(sample)
        crops.append(preprocess(rgb, config))
        known = mask is not None or sample.label == 0
        has_mask.append(known)
        masks.append(preprocess_mask(mask, config) if mask is not None else np.zeros(config.map_hw, bool))
    return EvaluationData(kept, np.stack(crops), np.stack(masks), np.array(has_mask), list(stream.skipped))


def _score_with_progress(scorer: ImageScorer, crops: np.ndarray, batch_size: int, progress: bool) -> Scores:
    parts = []
    with step("evaluate: scoring", len(crops), progress) as advance:
        for start in range(0, len(crops), batch_size):
            parts.append(scorer.score_crops(crops[start : start + batch_size], batch_size))
            advance(len(parts[-1].image))
    return Scores.concatenate(parts)


def evaluate(scorer: ImageScorer, data: EvaluationData, batch_size: int = 16, progress: bool = False) -> tuple[dict, dict]:
    """Score a labelled test set and compute every metric.

    Args:
        scorer: a host :class:`~edgecore.model.PatchCoreModel` or a camera Detector.
        data: from :func:`load_test_set`.
        batch_size: crops per engine call.
        progress: report progress (rich bar on a terminal, plain lines otherwise).

    Returns:
        (metrics, records): metrics for ``metrics.json``; records hold the Scores,
        labels and one row per image for ``scores.jsonl``.
    """
    scores = _score_with_progress(scorer, data.crops, batch_size, progress)
    labels = np.array([s.label for s in data.samples])
    flagged = np.asarray(scorer.decision.is_anomalous(scores.image), dtype=bool)
    result: dict = {
        "images": int(len(labels)),
        "anomalous_images": int(labels.sum()),
        "skipped_files": [[str(p), reason] for p, reason in data.skipped],
        "threshold": scorer.threshold,
    }
    point = metrics.confusion_at(scores.image, labels, scorer.threshold)
    if 0 < labels.sum() < len(labels):
        result["image_auroc"] = metrics.auroc(scores.image, labels)
    # What the line sees, next to the ranking quality: defects caught and normal parts flagged at the stored threshold.
    if labels.sum():
        result["recall_at_threshold"] = point["recall"]
    if (labels == 0).any():
        result["false_alarms_per_1000_at_threshold"] = 1000.0 * point["fp"] / (point["fp"] + point["tn"])
    if 0 < labels.sum() < len(labels):
        f1_threshold, f1 = metrics.f1_optimal_threshold(scores.image, labels)
        result["f1_optimal"] = {"threshold": f1_threshold, "f1": f1}
    result["at_threshold"] = point
    result["per_defect_type"] = _per_defect(data.samples, scores.image, flagged)
    usable = data.has_mask
    if data.masks[usable].any():
        maps, masks = scores.maps[usable], data.masks[usable]
        result["pixel_auroc"] = metrics.pixel_auroc(maps, masks)
        result["aupro"] = metrics.aupro(maps, masks, fpr_limit=0.3)
    normalise = scorer.normalization
    rows = [
        {
            "image": str(sample.path),
            "label": int(sample.label),
            "defect_type": sample.defect_type,
            "score": float(score),
            "normalized_score": float(normalise(score)),
            "is_anomalous": bool(flag),
        }
        for sample, score, flag in zip(data.samples, scores.image, flagged)
    ]
    result["false_alarms"] = [row["image"] for row in rows if row["is_anomalous"] and not row["label"]]
    result["misses"] = [row["image"] for row in rows if row["label"] and not row["is_anomalous"]]
    return result, {"scores": scores, "labels": labels, "rows": rows}


def _per_defect(samples: list[Sample], image_scores: np.ndarray, flagged: np.ndarray) -> dict:
    """Per defect type: count, flagged share (recall; false-alarm rate for ``good``) and AUROC vs good."""
    types = sorted({s.defect_type for s in samples})
    kinds = np.array([s.defect_type for s in samples])
    good = kinds == "good"
    table = {}
    for kind in types:
        chosen = kinds == kind
        entry = {"images": int(chosen.sum()), "flagged": int(flagged[chosen].sum())}
        entry["flagged_rate"] = entry["flagged"] / entry["images"]
        if kind != "good" and good.any():
            both = chosen | good
            entry["auroc_vs_good"] = metrics.auroc(image_scores[both], (kinds[both] != "good").astype(int))
        table[kind] = entry
    return table


def _curve_for_plot(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(fpr) <= PLOT_POINTS:
        return fpr, tpr
    keep = np.unique(np.linspace(0, len(fpr) - 1, PLOT_POINTS).astype(int))
    return fpr[keep], tpr[keep]


def write_evaluation(
    out_dir: str | Path,
    result: dict,
    records: dict,
    title: str,
    test_set: EvaluationData | None = None,
    scorer: ImageScorer | None = None,
) -> list[Path]:
    """Write metrics.json, report.md, scores.jsonl, roc.png and overlays of every false alarm and miss.

    Args:
        out_dir: report folder.
        result, records: from :func:`evaluate`.
        title: report heading.
        test_set, scorer: when given, overlays of the errors go to ``out_dir/errors/``
            and the report links them.

    Returns:
        the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if test_set is not None and scorer is not None:
        result["error_overlays"] = _error_overlays(out_dir, result, records, test_set, scorer)
        written += [out_dir / p for p in result["error_overlays"].values()]
    written += list(write_report(out_dir, result, title))
    rows_path = out_dir / "scores.jsonl"
    rows_path.write_text("".join(json.dumps(row) + "\n" for row in records["rows"]))
    written.append(rows_path)
    labels = records["labels"]
    if 0 < labels.sum() < len(labels):
        curves = {"image": _curve_for_plot(*metrics.roc_curve(records["scores"].image, labels)[:2])}
        if test_set is not None and test_set.masks[test_set.has_mask].any():
            usable = test_set.has_mask
            fpr, tpr, _ = metrics.roc_curve(records["scores"].maps[usable].ravel(), test_set.masks[usable].ravel())
            curves["pixel"] = _curve_for_plot(fpr, tpr)
        roc_path = out_dir / "roc.png"
        save_roc_png(roc_path, curves, title)
        written.append(roc_path)
    return written


def _error_overlays(out_dir: Path, result: dict, records: dict, data: EvaluationData, scorer: ImageScorer) -> dict[str, str]:
    """Overlays (on the inspected crop) of every false alarm and miss: what a person reviews first."""
    wrong = set(result["false_alarms"]) | set(result["misses"])
    height, width = data.crops.shape[1:3]
    whole = PreprocessConfig(aspect="pad", input_size=(height, width))  # the crop is the whole picture here
    paths: dict[str, str] = {}
    for i, (sample, row) in enumerate(zip(data.samples, records["rows"])):
        if row["image"] not in wrong:
            continue
        kind = "false_alarm" if row["is_anomalous"] else "miss"
        target = out_dir / "errors" / f"{kind}-{sample.defect_type}-{sample.path.stem}-{i:04d}{OVERLAY_SUFFIX}"
        image = render_overlay(
            data.crops[i], scorer.normalization(records["scores"].maps[i]), whole, row["score"],
            row["normalized_score"], row["is_anomalous"], scorer.threshold, max_side=max(height, width, 320),
        )
        save_overlay(target, image)
        paths[row["image"]] = target.relative_to(out_dir).as_posix()
    return paths
