"""Heat-map overlays for people looking at results (numpy + Pillow only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def jet(values: np.ndarray) -> np.ndarray:
    """[0,1] floats → uint8 RGB with the familiar 'jet' colours (blue → red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.concatenate([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def overlay(rgb: np.ndarray, normalised_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a normalised map (0.5 = threshold) over the image; above-threshold areas get a contour."""
    heat = jet(normalised_map).astype(np.float32)
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat
    above = normalised_map >= 0.5
    edge = above & ~(
        np.roll(above, 1, 0) & np.roll(above, -1, 0) & np.roll(above, 1, 1) & np.roll(above, -1, 1)
    )
    blended[edge] = (255.0, 255.0, 255.0)
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def save_overlay(path: str | Path, rgb: np.ndarray, normalised_map: np.ndarray) -> None:
    Image.fromarray(overlay(rgb, normalised_map)).save(path)
