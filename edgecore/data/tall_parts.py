"""Synthetic tall parts (a threaded shaft, aspect ~3.5) with defects near the ends, MVTec layout.

Issue #15's failure case: a square resize + center crop squashes a tall part and
cuts its top and bottom ~6 %, so defects there are never seen. These parts make
that case in seconds: a shaft spans nearly the whole frame height; normal images
shift it by a few pixels and vary light and noise; every defect (a dark ``pit``
or a bright ``burr``) sits in the outer ~8 % of the height, where threads end and
real parts get damaged. Ground-truth masks cover exactly the changed pixels.
The same seed gives byte-identical files.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgecore.data.synthetic import save_png
from edgecore.runtime.errors import DatasetError

__all__ = ["TALL_DEFECT_TYPES", "make_tall_parts_dataset"]

TALL_DEFECT_TYPES: tuple[str, ...] = ("pit", "burr")

_BACKGROUND = np.array([36.0, 38.0, 44.0], dtype=np.float32)
_METAL = np.array([176.0, 170.0, 154.0], dtype=np.float32)
_STREAMS = {"train": 1, "test": 2, "pit": 3, "burr": 4, "texture": 5}
#: Defect centres lie this far (as a fraction of the height) from the top or bottom edge.
END_BAND = (0.025, 0.07)


def make_tall_parts_dataset(
    root: str | os.PathLike[str],
    *,
    category: str = "shaft",
    n_train: int = 30,
    n_test_good: int = 10,
    n_test_per_defect: int = 6,
    width: int = 64,
    height: int = 224,
    seed: int = 0,
) -> Path:
    """Write ``root/<category>`` in MVTec layout (train/good, test/{good,pit,burr}, ground_truth) and return it."""
    if width < 32 or height < 2 * width:
        raise ValueError(f"need width >= 32 and a tall part (height >= 2 x width), got {width}x{height}")
    out = Path(root) / category
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: already exists and is not empty; choose a new folder")
    part = _Shaft(width, height, np.random.default_rng([seed, _STREAMS["texture"]]))
    for i in range(n_train):
        save_png(part.render(_rng(seed, "train", i)), out / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        save_png(part.render(_rng(seed, "test", i)), out / "test" / "good" / f"{i:03d}.png")
    for defect in TALL_DEFECT_TYPES:
        for i in range(n_test_per_defect):
            rng = _rng(seed, defect, i)
            rgb = part.render(rng)
            mask = part.defect(rgb, rng, bright=defect == "burr")
            save_png(rgb, out / "test" / defect / f"{i:03d}.png")
            save_png(mask.astype(np.uint8) * 255, out / "ground_truth" / defect / f"{i:03d}_mask.png")
    return out


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], index])


class _Shaft:
    """A vertical threaded shaft from 2 % to 98 % of the height, rendered once with a margin for shifts."""

    shift = 1

    def __init__(self, width: int, height: int, rng: np.random.Generator) -> None:
        self.width, self.height = width, height
        pad_h, pad_w = height + 2 * self.shift, width + 2 * self.shift
        yy, xx = np.mgrid[0:pad_h, 0:pad_w].astype(np.float32)
        self.x0, self.x1 = 0.22 * width + self.shift, 0.78 * width + self.shift
        self.y0, self.y1 = 0.02 * height + self.shift, 0.98 * height + self.shift
        alpha = (np.clip(xx - self.x0 + 0.5, 0, 1) * np.clip(self.x1 - xx + 0.5, 0, 1)
                 * np.clip(yy - self.y0 + 0.5, 0, 1) * np.clip(self.y1 - yy + 0.5, 0, 1))
        threads = 0.10 * np.cos(2 * np.pi * yy / 5.0)
        rounding = 0.18 * np.cos(np.pi * (xx - (self.x0 + self.x1) / 2) / (self.x1 - self.x0))  # a lit cylinder
        grain = 0.04 * rng.standard_normal((pad_h, pad_w)).astype(np.float32)
        shade = (0.85 + threads + rounding + grain)[:, :, None] * _METAL
        self.alpha = alpha[:, :, None]
        self.color = self.alpha * shade + (1 - self.alpha) * _BACKGROUND

    def render(self, rng: np.random.Generator) -> np.ndarray:
        dy, dx = rng.integers(0, 2 * self.shift + 1, size=2)
        self.offset = (int(dy), int(dx))
        img = self.color[dy : dy + self.height, dx : dx + self.width].copy()
        img *= 1.0 + rng.uniform(-0.05, 0.05)
        img += rng.normal(0.0, 2.5, img.shape).astype(np.float32)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    def defect(self, rgb: np.ndarray, rng: np.random.Generator, bright: bool) -> np.ndarray:
        """Paint a pit (dark) or burr (bright) blob on the shaft near one end; returns its mask."""
        dy, dx = self.offset
        band = rng.uniform(*END_BAND) * self.height
        cy = band if rng.random() < 0.5 else self.height - 1 - band
        cy = float(np.clip(cy, self.y0 - dy + 3, self.y1 - dy - 4))
        cx = rng.uniform(self.x0 - dx + 0.25 * (self.x1 - self.x0), self.x1 - dx - 0.25 * (self.x1 - self.x0))
        ry, rx = rng.uniform(0.035, 0.05) * self.width * 1.4, rng.uniform(0.06, 0.09) * self.width
        yy, xx = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        color = np.array([235.0, 228.0, 205.0]) if bright else np.array([70.0, 58.0, 50.0])
        noise = rng.normal(0.0, 6.0, (int(mask.sum()), 3))
        rgb[mask] = np.clip(color + noise, 0, 255).astype(np.uint8)
        return mask
