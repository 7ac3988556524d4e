"""Evaluation artefacts: a ROC plot (Pillow only, no matplotlib) and metrics.json/report.md.

Files are written atomically (temp file in the same directory + ``os.replace``) so a
crashed or concurrent run never leaves a half-written report behind.
"""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edgecore.runtime.fsutil import atomic_write_bytes

__all__ = ["save_roc_png", "write_report"]

_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
_SUPERSAMPLE = 3  # lines are drawn 3x larger and downscaled: Pillow has no anti-aliasing
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 64, 16, 44, 52


# --------------------------------------------------------------------------- files


_atomic_write = atomic_write_bytes  # temp file in the same folder + os.replace (one implementation)


# --------------------------------------------------------------------------- ROC plot


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled default font; sized where the Pillow version allows (>= 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _check_curve(name: str, fpr: object, tpr: object) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(fpr, dtype=np.float64)
    y = np.asarray(tpr, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"curve {name!r}: fpr and tpr must be 1-D, equal length, >= 2 points")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"curve {name!r}: fpr/tpr contain NaN or infinite values")
    if x.min() < 0 or x.max() > 1 or y.min() < 0 or y.max() > 1:
        raise ValueError(f"curve {name!r}: fpr/tpr must lie in [0, 1]")
    return x, y


def _dashed_line(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float],
                 fill: str, width: int, dash: float) -> None:
    length = math.dist(a, b)
    steps = int(length // dash)
    for i in range(0, steps, 2):
        t0, t1 = i * dash / length, min((i + 1) * dash / length, 1.0)
        p0 = (a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0)
        p1 = (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)
        draw.line([p0, p1], fill=fill, width=width)


def _draw_geometry(size: int, side: int, curves: list[tuple[np.ndarray, np.ndarray, str]]) -> Image.Image:
    """Grid, frame, diagonal and curves, supersampled then downscaled for smooth lines."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (size * s, size * s), "white")
    draw = ImageDraw.Draw(img)
    x0, y0 = _MARGIN_LEFT * s, _MARGIN_TOP * s
    span = side * s

    def to_px(fx: float, fy: float) -> tuple[float, float]:
        return x0 + fx * span, y0 + (1.0 - fy) * span

    for tick in np.linspace(0.0, 1.0, 6):
        draw.line([to_px(tick, 0), to_px(tick, 1)], fill="#e6e6e6", width=s)
        draw.line([to_px(0, tick), to_px(1, tick)], fill="#e6e6e6", width=s)
        draw.line([to_px(tick, 0), (to_px(tick, 0)[0], y0 + span + 5 * s)], fill="black", width=s)
        draw.line([to_px(0, tick), (x0 - 5 * s, to_px(0, tick)[1])], fill="black", width=s)
    _dashed_line(draw, to_px(0, 0), to_px(1, 1), fill="#9a9a9a", width=s, dash=8 * s)
    for fpr, tpr, colour in curves:
        draw.line([to_px(fx, fy) for fx, fy in zip(fpr, tpr)], fill=colour, width=2 * s, joint="curve")
    draw.rectangle([x0, y0, x0 + span, y0 + span], outline="black", width=s)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _draw_text(img: Image.Image, side: int, title: str, legend: list[tuple[str, str]]) -> None:
    """Tick labels, axis labels, title and legend, drawn at final resolution for crisp text."""
    draw = ImageDraw.Draw(img)
    font, big = _font(12), _font(15)
    x0, y0, x1, y1 = _MARGIN_LEFT, _MARGIN_TOP, _MARGIN_LEFT + side, _MARGIN_TOP + side

    for tick in np.linspace(0.0, 1.0, 6):
        label = f"{tick:.1f}"
        draw.text((x0 + tick * side, y1 + 8), label, fill="black", font=font, anchor="mt")
        draw.text((x0 - 8, y1 - tick * side), label, fill="black", font=font, anchor="rm")
    draw.text(((x0 + x1) / 2, y1 + 28), "False positive rate", fill="black", font=font, anchor="mt")
    draw.text(((x0 + x1) / 2, y0 / 2), title, fill="black", font=big, anchor="mm")

    ylabel = "True positive rate"
    w = int(draw.textlength(ylabel, font=font)) + 4
    label_img = Image.new("L", (w, 18), 0)
    ImageDraw.Draw(label_img).text((w / 2, 9), ylabel, fill=255, font=font, anchor="mm")
    rotated = label_img.rotate(90, expand=True)
    img.paste("black", (12, int((y0 + y1 - rotated.height) / 2)), mask=rotated)

    row, pad, swatch = 18, 8, 22
    width = max(int(draw.textlength(text, font=font)) for text, _ in legend) + swatch + 3 * pad
    height = row * len(legend) + pad
    lx, ly = x1 - width - 10, y1 - height - 10
    draw.rectangle([lx, ly, lx + width, ly + height], fill="white", outline="#b0b0b0")
    for i, (text, colour) in enumerate(legend):
        cy = ly + pad // 2 + row * i + row / 2
        draw.line([(lx + pad, cy), (lx + pad + swatch, cy)], fill=colour, width=3)
        draw.text((lx + 2 * pad + swatch, cy), text, fill="black", font=font, anchor="lm")


def save_roc_png(path: str | os.PathLike[str], curves: Mapping[str, tuple[object, object]],
                 title: str, size: int = 640) -> None:
    """Plot ROC curves ``{name: (fpr, tpr)}`` to a square PNG.

    The legend shows each name with its AUROC, computed from the curve itself with
    the trapezoid rule so the number always matches the line drawn.
    """
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    if size < 200:
        raise ValueError(f"size must be >= 200 px to fit axes and legend, got {size}")
    side = min(size - _MARGIN_LEFT - _MARGIN_RIGHT, size - _MARGIN_TOP - _MARGIN_BOTTOM)
    checked, legend = [], []
    for i, (name, (fpr, tpr)) in enumerate(curves.items()):
        x, y = _check_curve(name, fpr, tpr)
        colour = _PALETTE[i % len(_PALETTE)]
        checked.append((x, y, colour))
        legend.append((f"{name} (AUROC {float(np.trapezoid(y, x)):.3f})", colour))
    img = _draw_geometry(size, side, checked)
    _draw_text(img, side, title, legend)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    _atomic_write(Path(path), buf.getvalue())


# --------------------------------------------------------------------------- metrics report


def _jsonable(value: object) -> object:
    """Plain-Python copy of ``value``; NaN/inf become None so the JSON stays strict."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.ndarray, list, tuple)):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON: {value!r}")


def _scalar_rows(metrics: Mapping[str, object], prefix: str = "") -> list[tuple[str, object]]:
    """Flatten nested mappings to dotted keys, keeping scalars only (lists stay JSON-only)."""
    rows: list[tuple[str, object]] = []
    for key in sorted(metrics):
        value = metrics[key]
        if isinstance(value, Mapping):
            rows += _scalar_rows(value, f"{prefix}{key}.")
        elif not isinstance(value, list):
            rows.append((f"{prefix}{key}", value))
    return rows


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def _confusion_blocks(metrics: Mapping[str, object], prefix: str = "") -> list[str]:
    """A Markdown confusion matrix for every mapping that has tp/fp/tn/fn counts."""
    blocks: list[str] = []
    for key in sorted(metrics):
        value = metrics[key]
        if not isinstance(value, Mapping):
            continue
        if {"tp", "fp", "tn", "fn"} <= value.keys():
            blocks.append(
                f"## Confusion matrix (`{prefix}{key}`)\n\n"
                "| | Predicted anomalous | Predicted normal |\n"
                "|---|---:|---:|\n"
                f"| **Anomalous** | {value['tp']} | {value['fn']} |\n"
                f"| **Normal** | {value['fp']} | {value['tn']} |\n"
            )
        blocks += _confusion_blocks(value, f"{prefix}{key}.")
    return blocks


def _rate(fp: object, tn: object) -> float | None:
    return fp / (fp + tn) if isinstance(fp, int) and isinstance(tn, int) and fp + tn else None


def _summary(metrics: Mapping[str, object]) -> list[str]:
    """Headline numbers, the threshold's operating point, per-defect results and the errors to review."""
    lines: list[str] = []
    head = [(k, metrics[k]) for k in ("image_auroc", "recall_at_threshold", "false_alarms_per_1000_at_threshold",
                                      "pixel_auroc", "aupro") if k in metrics]
    if head:
        lines += ["| " + " | ".join(k for k, _ in head) + " |", "|" + "---:|" * len(head),
                  "| " + " | ".join(_fmt(v) for _, v in head) + " |", ""]
    point = metrics.get("at_threshold")
    if isinstance(point, Mapping) and "threshold" in metrics:
        lines += [
            "## Operating point (the stored threshold)", "",
            f"Threshold {_fmt(metrics['threshold'])} (set on held-out normal images). "
            f"Recall {_fmt(point.get('recall'))}, precision {_fmt(point.get('precision'))}, "
            f"false-alarm rate {_fmt(_rate(point.get('fp'), point.get('tn')))}, F1 {_fmt(point.get('f1'))}.", "",
        ]
        if "runtime" in metrics:
            lines += [f"Executed: {_fmt(metrics['runtime'])}; search {_fmt(metrics.get('search'))}.", ""]
    per_defect = metrics.get("per_defect_type")
    if isinstance(per_defect, Mapping) and per_defect:
        lines += ["## Per defect type", "", "| type | images | flagged | flagged rate | AUROC vs good |",
                  "|---|---:|---:|---:|---:|"]
        for kind, entry in per_defect.items():
            lines.append(f"| {_fmt(kind)} | {entry['images']} | {entry['flagged']} | {_fmt(entry['flagged_rate'])} | "
                         f"{_fmt(entry.get('auroc_vs_good'))} |")
        lines += ["", "(`flagged rate` is recall for a defect type and the false-alarm rate for `good`.)", ""]
    overlays = metrics.get("error_overlays") or {}
    for key, heading in (("false_alarms", "False alarms (normal images flagged)"), ("misses", "Misses (defects called normal)")):
        found = metrics.get(key)
        if found is None:
            continue
        lines += [f"## {heading}: {len(found)}", ""]
        for image in found:
            link = f" — overlay [{overlays[image]}]({overlays[image]})" if image in overlays else ""
            lines.append(f"- `{image}`{link}")
        lines.append("")
    return lines


def _markdown(metrics: Mapping[str, object], title: str) -> str:
    lines = [f"# {title}", "", *_summary(metrics), "## All values", "", "| Metric | Value |", "|---|---:|"]
    lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in _scalar_rows(metrics) if not k.startswith("per_defect_type.")]
    return "\n".join(lines) + "\n" + "".join("\n" + block for block in _confusion_blocks(metrics))


def write_report(out_dir: str | os.PathLike[str], metrics: Mapping[str, object],
                 title: str) -> tuple[Path, Path]:
    """Write ``metrics.json`` (sorted, indented) and ``report.md`` into ``out_dir``.

    Nested mappings become dotted rows in the Markdown table; any mapping with
    tp/fp/tn/fn (e.g. ``confusion_at`` output) also gets a confusion-matrix block.
    Returns ``(json_path, markdown_path)``.
    """
    out = Path(out_dir)
    clean = _jsonable(metrics)
    if not isinstance(clean, dict):
        raise TypeError(f"metrics must be a mapping, got {type(metrics).__name__}")
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "metrics.json", out / "report.md"
    text = json.dumps(clean, indent=2, sort_keys=True, allow_nan=False) + "\n"
    _atomic_write(json_path, text.encode("utf-8"))
    _atomic_write(md_path, _markdown(clean, title).encode("utf-8"))
    return json_path, md_path
