"""Faint recurring dents on the synthetic ring parts: the labelled-defects case (#15.5 test and benchmark).

A darker disc at about the same place on the ring of each normal 128-px part, with
its mask, written as ``test/dent`` in MVTec layout: faint enough that a normal-only
model misses most of them at its threshold, the same every time, so a few labelled
ones can teach the rest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecore.data.synthetic import save_png
from edgecore.runtime.imageio import load_image


def write_dents(good: list[Path], out: Path, delta: int = 35, radius: int = 8) -> Path:
    """Write one dented copy (and mask) of every image in ``good`` under ``out``; return ``out``."""
    yy, xx = np.mgrid[0:128, 0:128]
    for i, path in enumerate(good):
        rgb = load_image(path).astype(np.int16)
        angle = np.random.default_rng(i).uniform(0.5, 0.9)
        cx, cy = 63.5 + 0.27 * 128 * np.cos(angle), 63.5 + 0.27 * 128 * np.sin(angle)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        rgb[mask] -= delta
        save_png(np.clip(rgb, 0, 255).astype(np.uint8), out / "test" / "dent" / f"{i:03d}.png")
        save_png(mask.astype(np.uint8) * 255, out / "ground_truth" / "dent" / f"{i:03d}_mask.png")
    return out
