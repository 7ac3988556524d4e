"""Labelled defects (seed §5.2, Labeled PatchCore): an anomaly bank from a few masked defect images.

``edgecore label MODEL DEFECTS`` runs after ``fit``, when an integrator has collected a
few real defects with masks (MVTec layout: ``test/<type>/*.png`` +
``ground_truth/<type>/*_mask.png``). It keeps the normal coreset as it is and adds:

1. the **anomaly bank**: feature patches inside the masks (each mask placed on the
   feature grid through the one preprocessing, a cell counts when at least half of
   it is defective) that lie farther from the normal bank than 99 % of the held-out
   normal patches (so mask borders that look normal stay out), capped by k-center
   greedy at ``max_patches``;
2. the **sharpened score** :data:`~edgecore.runtime.anomaly_bank.SCORE_RULE`
   (``s = d_n + weight·max(0, d_n − d_a)``, never below the normal-only ``d_n``);
3. the **threshold re-fitted** on the held-out normal images' sharpened scores with
   the model's own false-alarm rate — the same normal-only guarantee as ``fit``
   (the labelled defects only move scores up; they never pull the threshold down).

Without a ``label`` step the model has no anomaly bank and scores bit-identically.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from edgecore.runtime.anomaly_bank import ANOMALY_BANK_FILE, SCORE_RULE, AnomalyBank, validate_labelled_section
from edgecore.runtime.errors import BundleError, ModelError


@dataclass(frozen=True)
class LabelConfig:
    weight: float = 1.0  # λ in SCORE_RULE: how far a patch near a known defect is pushed up
    max_patches: int = 1024  # anomaly bank cap (k-center greedy); the camera searches it exactly
    min_coverage: float = 0.5  # share of a feature cell the mask must cover for the cell to be a defect patch
    normal_quantile: float = 0.99  # a masked patch enters only if farther from the normal bank than this share of held-out normal patches
    seed: int = 0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight}")
        if self.max_patches < 1:
            raise ValueError(f"max_patches must be >= 1, got {self.max_patches}")
        if not 0.0 < self.min_coverage <= 1.0:
            raise ValueError(f"min_coverage must be in (0, 1], got {self.min_coverage}")
        if not 0.0 <= self.normal_quantile <= 1.0:
            raise ValueError(f"normal_quantile must be in [0, 1], got {self.normal_quantile}")


def anomaly_scorer(config: dict, anomaly_bank: np.ndarray | None) -> AnomalyBank | None:
    """The model's AnomalyBank, checked against its config ``labelled`` section (both or neither)."""
    section = config.get("labelled")
    if section is None and anomaly_bank is None:
        return None
    if section is None or anomaly_bank is None:
        raise ModelError("the model's config and memory bank disagree about labelled defects (one has them, one not)")
    try:
        validate_labelled_section(section, config["features"]["embed_dim"], "config.labelled")
        if list(anomaly_bank.shape) != section["shape"]:
            raise ModelError(f"anomaly bank {list(anomaly_bank.shape)}, config.labelled.shape {section['shape']}")
        return AnomalyBank(np.asarray(anomaly_bank), section["weight"])
    except (BundleError, ValueError) as exc:
        raise ModelError(f"labelled defects: {exc}") from exc


def mask_to_grid(mask: np.ndarray, grid: tuple[int, int], min_coverage: float) -> np.ndarray:
    """input_h×input_w bool mask → grid bool: a cell is defective when ``min_coverage`` of its pixels are.

    Cell i spans rows [i·H/h, (i+1)·H/h): the footprint whose centre the map's bilinear
    upsampling puts patch i at.
    """
    h, w = grid
    rows = np.linspace(0, mask.shape[0], h + 1).round().astype(int)
    cols = np.linspace(0, mask.shape[1], w + 1).round().astype(int)
    sums = np.add.reduceat(np.add.reduceat(mask.astype(np.float64), rows[:-1], axis=0), cols[:-1], axis=1)
    area = np.outer(np.diff(rows), np.diff(cols))
    return sums / np.maximum(area, 1) >= min_coverage


def load_defects(root: str | Path, per_type: int | None = None, skip_bad: bool = False):
    """The masked defect images of an MVTec-layout folder: (samples, crops-ready RGB, masks).

    ``per_type``: keep the first N of each defect type (sorted file names); images
    without a mask are left out (they cannot say which patches are defective).
    """
    from edgecore.data.datasets import ImageStream, test_samples

    chosen, counts = [], {}
    for sample in test_samples(root):
        if sample.label == 0 or sample.mask_path is None:
            continue
        if per_type is not None and counts.get(sample.defect_type, 0) >= per_type:
            continue
        counts[sample.defect_type] = counts.get(sample.defect_type, 0) + 1
        chosen.append(sample)
    if not chosen:
        raise ValueError(f"{root}: no defect images with masks (expected test/<type>/*.png + ground_truth/<type>/*_mask.png)")
    return list(ImageStream(chosen, skip_bad=skip_bad).with_masks())


def label_model(model, defects: Iterable[tuple], config: LabelConfig = LabelConfig(), source: str = "",
                validation: np.ndarray | None = None):
    """Add labelled defects to a fitted model.

    Args:
        model: a :class:`~edgecore.model.PatchCoreModel` (with or without an earlier anomaly bank).
        defects: ``(sample, rgb, mask)`` triples, e.g. from :func:`load_defects`.
        config: weight, bank cap, mask coverage.
        source: where the defects came from (recorded).
        validation: the held-out normal crops (default: the model's recorded validation images).

    Returns:
        a new model with the anomaly bank, the sharpened score and the re-fitted threshold;
        ``model.config["labelled"]`` says what was learnt and what the threshold keeps.
    """
    from edgecore.calibration.threshold import threshold_config
    from edgecore.model import PatchCoreModel
    from edgecore.runtime.preprocess import preprocess, preprocess_mask
    from edgecore.samplers import create_sampler

    if validation is None:
        from edgecore.export.validation import validation_crops

        validation, why = validation_crops(model)
        if validation is None:  # no held-out normals: no honest threshold for the sharpened score
            raise ModelError(f"labelled defects need the model's held-out validation images to re-fit the threshold: {why}")
    plain_config = {k: v for k, v in model.config.items() if k != "labelled"}
    roi = getattr(model, "roi", None)  # an ROI stays: patches outside it are neither scored nor labelled
    plain = PatchCoreModel(plain_config, model.features, model.memory_bank, model.neighbour_table, model.device, roi=roi)

    normal_only = plain.score_crops(validation)
    inspected = normal_only.patches if roi is None else normal_only.patches[:, roi.flat]
    normal_patch_limit = float(np.quantile(inspected, config.normal_quantile))
    crops, grids, kinds = [], [], []
    for sample, rgb, mask in defects:
        crops.append(preprocess(rgb, plain.preprocess_config))
        grids.append(mask_to_grid(preprocess_mask(mask, plain.preprocess_config), plain.grid, config.min_coverage).ravel())
        kinds.append(sample.defect_type)
    if not crops:
        raise ValueError("no labelled defect images")
    crops = np.stack(crops)
    features = np.concatenate([plain.embed(crops[i : i + 16]) for i in range(0, len(crops), 16)])
    defect_scores = plain.score_features(features)
    inside = np.stack(grids)
    candidates = inside & (defect_scores.patches > normal_patch_limit)
    if not candidates.any():
        raise ValueError(
            f"none of the {int(inside.sum())} masked patches lies farther from the normal bank than the held-out "
            f"normal patches ({normal_patch_limit:.4g}): the labelled defects teach the model nothing"
        )
    patches = features[candidates]
    if len(patches) > config.max_patches:
        sampler = create_sampler("k-center-greedy", ratio=config.max_patches / len(patches),
                                 projection_dim=model.config["coreset"].get("projection_dim", 128), seed=config.seed)
        patches = patches[np.sort(sampler.select(patches))[: config.max_patches]]
    bank = np.ascontiguousarray(patches, dtype=np.float32)

    labelled_config = dict(plain_config)
    labelled_config["labelled"] = {
        "file": ANOMALY_BANK_FILE, "shape": list(bank.shape), "weight": float(config.weight), "score": SCORE_RULE,
    }
    labelled = PatchCoreModel(labelled_config, plain.features, plain.memory_bank, plain.neighbour_table, plain.device,
                              anomaly_bank=bank, roi=roi)
    sharpened = labelled.score_crops(validation)
    rate = float(plain_config["threshold"]["false_alarm_rate"])
    held_out = bool(plain_config["threshold"].get("from_held_out_normals", True))
    # Re-derived rather than read: a model labelled before stores its sharpened threshold.
    old_threshold = threshold_config(normal_only.image, rate, held_out=held_out)
    refit = threshold_config(sharpened.image, rate, held_out=held_out)
    labelled_config["threshold"] = {**plain_config["threshold"], **refit}
    defect_sharpened = labelled.score_features(features).image
    labelled_config["labelled"].update({
        "source": source,
        "images": int(len(crops)),
        "types": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
        "masked_patches": int(inside.sum()),
        "candidate_patches": int(candidates.sum()),
        "normal_patch_limit": normal_patch_limit,
        "max_patches": config.max_patches,
        "min_coverage": config.min_coverage,
        "normal_quantile": config.normal_quantile,
        "threshold_normal_only": float(old_threshold["value"]),
        "false_alarm_rate": rate,
        # In-sample (these very images built the bank): how the labelled defects sit against each threshold.
        "labelled_recall_normal_only": float(np.mean(defect_scores.image >= old_threshold["value"])),
        "labelled_recall": float(np.mean(defect_sharpened >= refit["value"])),
    })
    return labelled
