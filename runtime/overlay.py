"""Heat-map overlays for people looking at results (numpy + Pillow only).

Cheap by construction: the image is shown at most ``max_side`` pixels wide, the
heat map is coloured at crop resolution and only then resized into the inspected
box, and the file is a JPEG (6 ms to encode where a PNG took 70-110 ms) — no
full-resolution float maps.
Each overlay carries the verdict, the score against the threshold, a colour bar
with the threshold marked, and dims the margin the center crop never inspects.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from edgecore.runtime.preprocess import PreprocessConfig

MAX_SIDE = 640  # longest side of an overlay; full-size frames are for the camera, not the eye
OVERLAY_SUFFIX = ".jpg"
HEADER_PX = 22
BAR_PX = 14
_RED, _GREEN, _BOX = (200, 30, 30), (30, 140, 60), (255, 210, 0)


def jet(values: np.ndarray) -> np.ndarray:
    """[0,1] floats → uint8 RGB with the familiar 'jet' colours (blue → red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.concatenate([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def _edge(mask: np.ndarray) -> np.ndarray:
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def render_overlay(
    rgb: np.ndarray,
    normalised_crop_map: np.ndarray,
    config: PreprocessConfig,
    score: float,
    normalized_score: float,
    is_anomalous: bool,
    threshold: float,
    alpha: float = 0.45,
    max_side: int = MAX_SIDE,
) -> Image.Image:
    """The overlay as a Pillow image.

    Args:
        rgb: the original frame, H×W×3 uint8.
        normalised_crop_map: crop×crop map normalised so 0.5 is the threshold.
        config: the bundle's preprocessing (to place the crop on the frame).
        score, normalized_score, is_anomalous, threshold: the verdict to print.
        alpha: heat-map opacity.
        max_side: longest side of the shown frame.

    Returns:
        header (verdict, score) + frame with heat map inside the inspected box, the
        un-inspected margin dimmed + colour bar with the threshold at 0.5.
    """
    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    shown_w, shown_h = max(1, round(width * scale)), max(1, round(height * scale))
    frame = Image.fromarray(rgb)
    if scale < 1.0:
        frame = frame.resize((shown_w, shown_h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    box, (rows, cols) = config.inspected(height, width)
    normalised_crop_map = np.asarray(normalised_crop_map)[rows, cols]  # padding is no part of the frame
    left, top, right, bottom = (round(v * scale) for v in box)
    box_w, box_h = max(1, right - left), max(1, bottom - top)

    shown = np.asarray(frame, dtype=np.uint8)
    dimmed = (shown.astype(np.uint16) * 2 // 5 + 40).astype(np.uint8)  # the margin nobody inspected
    canvas = Image.fromarray(dimmed)
    region = frame.crop((left, top, left + box_w, top + box_h))
    heat = Image.fromarray(jet(normalised_crop_map)).resize((box_w, box_h), Image.Resampling.BILINEAR)
    blended = Image.blend(region, heat, alpha)
    above = _edge(np.asarray(normalised_crop_map) >= 0.5)
    if above.any():
        contour = Image.fromarray(above.astype(np.uint8) * 255).resize((box_w, box_h), Image.Resampling.NEAREST)
        blended.paste((255, 255, 255), mask=contour)
    canvas.paste(blended, (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((left, top, left + box_w - 1, top + box_h - 1), outline=_BOX)

    out = Image.new("RGB", (shown_w, HEADER_PX + shown_h + BAR_PX), (0, 0, 0))
    out.paste(canvas, (0, HEADER_PX))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    verdict = "ANOMALOUS" if is_anomalous else "normal"
    draw.rectangle((0, 0, shown_w, HEADER_PX - 1), fill=_RED if is_anomalous else _GREEN)
    draw.text((4, 4), f"{verdict}  score {score:.4g} / threshold {threshold:.4g}  ({normalized_score:.2f})",
              fill=(255, 255, 255), font=font)
    gradient = jet(np.linspace(0.0, 1.0, shown_w)[None, :].repeat(BAR_PX, axis=0))
    out.paste(Image.fromarray(gradient), (0, HEADER_PX + shown_h))
    tick = shown_w // 2  # 0.5 after normalising = the threshold
    draw.line((tick, HEADER_PX + shown_h, tick, HEADER_PX + shown_h + BAR_PX), fill=(255, 255, 255), width=2)
    return out


def save_overlay(path: str | Path, image: Image.Image) -> None:
    """Write an overlay JPEG (overlays are for eyes, not archives; the scores are in results.jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG", quality=90)
