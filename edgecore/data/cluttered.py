"""Synthetic parts next to clutter: what an ROI mask is for (#15.2 tests and benchmark).

Each frame is the synthetic washer (:mod:`edgecore.data.synthetic`) on the left and a
conveyor strip on the right where unrelated objects lie (screws, labels, a hand…):
random ellipses and rectangles. Training frames carry ``train_clutter`` (min, max)
dull objects; normal test frames ``test_clutter`` objects of any colour, so the strip
looks unlike anything in training although the part is good. ``spot`` test frames
have a defect on the part. ``roi.json`` is the part's square as a polygon in frame pixels.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edgecore.data.synthetic import make_synthetic_dataset, save_png

ROI_NAME = "roi.json"


def add_clutter(frame: np.ndarray, left: int, count: int, rng: np.random.Generator, vivid: bool) -> np.ndarray:
    """Draw ``count`` objects on the frame's columns ``left:``; vivid = any colour, else dull greys."""
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    height, width = frame.shape[:2]
    for _ in range(count):
        side = int(rng.integers(6, max(8, (width - left) // 2)))
        x0, y0 = int(rng.integers(left + 2, max(left + 3, width - side))), int(rng.integers(0, height - side))
        colour = tuple(int(v) for v in (rng.integers(0, 256, 3) if vivid else np.full(3, rng.integers(60, 110))))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + side, y0 + side // 2 + int(rng.integers(0, side // 2 + 1))), fill=colour)
    return np.asarray(image)


def make_cluttered_dataset(
    root: str | Path, *, n_train: int = 20, n_test_good: int = 10, n_test_spot: int = 5, part_size: int = 96,
    strip: int = 48, train_clutter: tuple[int, int] = (0, 1), test_clutter: tuple[int, int] = (2, 4), seed: int = 0,
) -> Path:
    """Write ``root/cluttered`` (MVTec layout + ``roi.json``) and return it."""
    out = Path(root) / "cluttered"
    parts = make_synthetic_dataset(Path(root) / "_parts", n_train=n_train, n_test_good=n_test_good,
                                   n_test_per_defect=n_test_spot, size=part_size, seed=seed)
    rng = np.random.default_rng([seed, 7])
    background = np.asarray(Image.open(next((parts / "train" / "good").iterdir())).convert("RGB"))[0, 0]

    def compose(source: Path, clutter: tuple[int, int], vivid: bool) -> np.ndarray:
        part = np.asarray(Image.open(source).convert("RGB"))
        frame = np.empty((part_size, part_size + strip, 3), np.uint8)
        frame[:, :part_size] = part
        frame[:, part_size:] = background
        noise = rng.normal(0, 3, (part_size, strip, 3))
        frame[:, part_size:] = np.clip(frame[:, part_size:] + noise, 0, 255).astype(np.uint8)
        return add_clutter(frame, part_size, int(rng.integers(clutter[0], clutter[1] + 1)), rng, vivid)

    for split, folder, clutter, vivid in (("train", "good", train_clutter, False), ("test", "good", test_clutter, True),
                                          ("test", "spot", train_clutter, False)):
        for path in sorted((parts / split / folder).glob("*.png")):
            save_png(compose(path, clutter, vivid), out / split / folder / path.name)
    for path in sorted((parts / "ground_truth" / "spot").glob("*.png")):
        mask = np.zeros((part_size, part_size + strip), np.uint8)
        mask[:, :part_size] = np.asarray(Image.open(path))
        save_png(mask, out / "ground_truth" / "spot" / path.name)
    shutil.rmtree(parts.parent)
    (out / ROI_NAME).write_text(json.dumps([[0, 0], [part_size - 1, 0], [part_size - 1, part_size - 1], [0, part_size - 1]]))
    return out
