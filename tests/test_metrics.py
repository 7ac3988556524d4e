"""Tests for edgecore.metrics and edgecore.report: hand cases, references, and artefacts."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from edgecore.metrics import (
    aupro,
    auroc,
    confusion_at,
    f1_optimal_threshold,
    pixel_auroc,
    roc_curve,
    threshold_for_false_alarm_rate,
)
from edgecore.report import save_roc_png, write_report


# --------------------------------------------------------------------------- AUROC / ROC


def test_auroc_hand_case() -> None:
    # Pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4.
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_auroc_ties_count_half() -> None:
    # Pairs: 0.5 vs 0.5 tie (0.5), 0.5 vs 0.1 win, 0.9 vs 0.5 win, 0.9 vs 0.1 win -> 3.5 / 4.
    assert auroc([0.5, 0.1, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert auroc([0.3, 0.3, 0.3], [0, 1, 1]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 12, 300) / 12 + 0.1 * labels  # heavy ties
    assert auroc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_roc_curve_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 20, 200).astype(np.float64)
    ours = roc_curve(scores, labels)
    ref = metrics.roc_curve(labels, scores, drop_intermediate=False)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b)


def test_roc_curve_starts_at_origin_and_ends_at_one() -> None:
    fpr, tpr, thr = roc_curve([0.2, 0.2, 0.7], [0, 1, 1])
    assert (fpr[0], tpr[0], thr[0]) == (0.0, 0.0, np.inf)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    np.testing.assert_array_equal(thr[1:], [0.7, 0.2])  # one point per distinct score


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn(seed: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    masks = rng.random((4, 16, 16)) < 0.2
    maps = (rng.integers(0, 30, masks.shape) + 5 * masks).astype(np.float32)
    expected = metrics.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- AUPRO


def _reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Slow, literal definition: sweep every distinct score, average overlap per region."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, n + 1)]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        xs.append(pred[normal].mean())
        ys.append(np.mean([pred[i][region].mean() for i, region in regions]))
    area = 0.0
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def test_aupro_perfect_map_is_one() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[0, 5:8, 5:8] = True
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)


def test_aupro_inverted_map_is_zero() -> None:
    # Every normal pixel outranks every defect: PRO stays 0 until FPR reaches 1.
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 2:5, 2:5] = True
    assert aupro((~masks).astype(np.float32), masks) == pytest.approx(0.0)


def _two_regions(region_b_score: float) -> tuple[np.ndarray, np.ndarray]:
    # One row of 8 pixels: A = pixel 0 (area 1), B = pixels 2..4 (area 3), 4 normals.
    masks = np.zeros((1, 1, 8), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 0, 2:5] = True
    maps = np.zeros((1, 1, 8))
    maps[0, 0, 0] = 0.9
    maps[0, 0, 2:5] = region_b_score
    maps[0, 0, [1, 5, 6, 7]] = [0.5, 0.4, 0.3, 0.2]
    return maps, masks


def test_aupro_two_regions_is_mean_over_regions_not_pixels() -> None:
    # A scores above all normals, B below all: at FPR 0 PRO = (1 + 0) / 2 = 0.5 and
    # stays 0.5 until FPR = 1, so AUPRO@0.3 = 0.3 * 0.5 / 0.3 = 0.5.
    # (A pixel-weighted overlap would give 1/4 instead.)
    maps, masks = _two_regions(region_b_score=0.1)
    assert aupro(maps, masks) == pytest.approx(0.5)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_vertical_step_and_interpolation() -> None:
    # B = 0.45 sits between normals 0.5 and 0.4. Curve: (0,0) -> (0,.5) at t=.9,
    # (.25,.5) at t=.5, (.25,1) at t=.45, (.5,1) at t=.4 ...
    # Area to 0.3 = 0.25 * 0.5 + 0.05 * 1 = 0.175 -> 0.175 / 0.3.
    maps, masks = _two_regions(region_b_score=0.45)
    assert aupro(maps, masks) == pytest.approx(0.175 / 0.3)


def test_aupro_interpolates_at_fpr_limit() -> None:
    # B = 0.4 ties with a normal pixel, so one threshold adds both: the curve goes
    # (0,0) -> (0,.5) -> (.25,.5) -> (.5,1). At FPR 0.3 the sloped segment is at
    # PRO 0.6: area = 0.25 * 0.5 + 0.05 * (0.5 + 0.6) / 2 = 0.1525 -> 0.1525 / 0.3.
    maps, masks = _two_regions(region_b_score=0.4)
    assert aupro(maps, masks) == pytest.approx(0.1525 / 0.3)


def test_aupro_uses_8_connectivity() -> None:
    # Pixel (0,0) touches block (1:3,1:3) only diagonally: one region of 5 pixels.
    # Scoring just (0,0) above all normals: 8-conn PRO = 1/5; 4-conn would be (1+0)/2.
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 1:3, 1:3] = True
    maps = np.full(masks.shape, 0.5)
    maps[0, 0, 0] = 1.0
    maps[0, 1:3, 1:3] = 0.0
    assert aupro(maps, masks) == pytest.approx(0.2)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_opening(rng.random((5, 14, 14)) < 0.35, np.ones((1, 2, 2)))
    masks[0] = False  # a defect-free image contributes only normal pixels
    masks[1, 3:6, 3:6] = True
    if seed % 2:
        maps = rng.integers(0, 10, masks.shape) / 10 + 0.3 * masks  # many ties
    else:
        maps = rng.random(masks.shape) + 0.4 * masks
    expected = _reference_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-6)


def test_aupro_requires_regions() -> None:
    with pytest.raises(ValueError, match="region"):
        aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), dtype=bool))


# --------------------------------------------------------------------------- thresholds


def test_f1_optimal_threshold_hand_case() -> None:
    # t=0.8: F1=2/3; t=0.4: 1/2; t=0.35: TP2 FP1 -> 0.8; t=0.1: 2/3.
    thr, f1 = f1_optimal_threshold([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert (thr, f1) == (pytest.approx(0.35), pytest.approx(0.8))


def test_f1_optimal_threshold_prefers_highest_on_tie() -> None:
    # t=4: TP1 FP0 FN1 -> 2/3; t=1: TP2 FP2 -> 2/3. Fewer alarms wins.
    assert f1_optimal_threshold([4, 3, 2, 1], [1, 0, 0, 1]) == (4.0, pytest.approx(2 / 3))


def test_confusion_at_hand_case() -> None:
    c = confusion_at([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.35)
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (2, 1, 1, 0)
    assert c["precision"] == pytest.approx(2 / 3)
    assert c["recall"] == 1.0
    assert c["f1"] == pytest.approx(0.8)
    assert c["accuracy"] == pytest.approx(0.75)


def test_confusion_at_undefined_ratios_are_zero() -> None:
    c = confusion_at([0.1, 0.2], [0, 1], threshold=1.0)
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (0, 0, 1, 1)
    assert c["precision"] == c["recall"] == c["f1"] == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_false_alarm_rate_zero_flags_nothing(dtype: type) -> None:
    scores = np.random.default_rng(0).random(50).astype(dtype)
    t = threshold_for_false_alarm_rate(scores, 0.0)
    assert t > scores.max()
    assert not (scores >= t).any()


def test_false_alarm_rate_bounds_and_minimality() -> None:
    scores = np.random.default_rng(1).random(100)
    t = threshold_for_false_alarm_rate(scores, 0.1)
    assert (scores >= t).sum() == 10  # distinct scores: exactly the budget
    tied = np.repeat(np.arange(20.0), 5)  # 20 values x 5 copies
    t = threshold_for_false_alarm_rate(tied, 0.12)
    assert (tied >= t).mean() <= 0.12
    smaller = tied[tied < t]
    assert (tied >= smaller.max()).mean() > 0.12  # next lower score would exceed the rate
    assert threshold_for_false_alarm_rate(tied, 1.0) == 0.0


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: auroc([0.1, 0.2], [0, 1, 1]), "shape"),
        (lambda: auroc([0.1, np.nan], [0, 1]), "NaN"),
        (lambda: auroc([], []), "empty"),
        (lambda: auroc([0.1, 0.2], [1, 1]), "both"),
        (lambda: auroc([0.1, 0.2], [0, 2]), "0 and 1"),
        (lambda: pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), bool)), "shape"),
        (lambda: pixel_auroc(np.zeros((4, 4)), np.zeros((4, 4), bool)), r"\[N,H,W\]"),
        (lambda: aupro(np.ones((1, 2, 2)), np.eye(2, dtype=bool)[None], fpr_limit=0), "fpr_limit"),
        (lambda: threshold_for_false_alarm_rate([0.1], 1.5), "rate"),
        (lambda: f1_optimal_threshold([0.1, 0.2], [0, 0]), "anomalous"),
    ],
)
def test_invalid_inputs_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- report


def test_save_roc_png(tmp_path) -> None:
    fpr, tpr, _ = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    path = tmp_path / "roc.png"
    save_roc_png(path, {"model": (fpr, tpr), "chance": ([0, 1], [0, 1])}, "ROC")
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (640, 640)
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 10
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]  # no temp file left


def test_write_report(tmp_path) -> None:
    metrics = {
        "image_auroc": np.float32(0.9375),
        "pixel_aupro": 0.81,
        "num_images": np.int64(12),
        "confusion": confusion_at([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.35),
        "undefined": float("nan"),
    }
    json_path, md_path = write_report(tmp_path / "out", metrics, "bottle")
    data = json.loads(json_path.read_text())
    assert data["image_auroc"] == pytest.approx(0.9375)
    assert data["num_images"] == 12 and data["confusion"]["tp"] == 2
    assert data["undefined"] is None
    md = md_path.read_text()
    for name in ("image_auroc", "pixel_aupro", "num_images", "confusion.f1", "Confusion matrix"):
        assert name in md
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["metrics.json", "report.md"]
