"""A small synthetic MVTec-layout dataset, for demos and end-to-end tests.

The "part" is a machined washer: a ring with fine concentric grooves, a fixed
grain texture and four bolt holes, on a plain dark background. Normal images
vary the way real captures do - a shift of a few pixels, brightness jitter, a
faint illumination gradient and sensor noise - so that a frozen ImageNet CNN
sees varied but consistent normal appearance. Defects are clearly visible and
always on the part:

* ``scratch`` - a thin (a few px) bright or dark, possibly curved line;
* ``spot``    - an irregular blob of a different colour and texture (2-6 % of the image);
* ``missing`` - a bite out of the rim, erased to background (2-6 % of the image).

Ground-truth masks (0/255, mode L) cover exactly the pixels that were changed.
Everything is drawn from ``seed`` (per image, so changing one count does not
change the other images): the same seed gives byte-identical files.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edgecore.runtime.errors import DatasetError

__all__ = ["DEFECT_TYPES", "make_synthetic_dataset"]

DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot", "missing")

_BACKGROUND = np.array([38.0, 40.0, 46.0], dtype=np.float32)
_METAL = np.array([172.0, 166.0, 150.0], dtype=np.float32)
_MAX_SHIFT = 3  # px, at any image size: "the part is re-seated a little"
_AREA_RANGE = (0.02, 0.06)  # spot / missing, as a fraction of the image
_STREAMS = {"train": 1, "test": 2, "scratch": 3, "spot": 4, "missing": 5, "texture": 6}


def make_synthetic_dataset(
    root: str | os.PathLike[str],
    *,
    category: str = "part",
    n_train: int = 40,
    n_test_good: int = 8,
    n_test_per_defect: int = 4,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write ``root/<category>`` in MVTec layout and return that category path.

    The category folder must not exist yet or be empty, so stale files from an
    earlier run with other counts can never mix in.
    """
    if size < 64:
        raise ValueError(f"size must be at least 64 px (got {size}); smaller parts cannot show the defects")
    if n_train < 1 or n_test_good < 0 or n_test_per_defect < 0:
        raise ValueError("n_train must be >= 1 and the test counts >= 0")
    out = Path(root) / category
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: already exists and is not empty; choose a new folder")

    part = _Part(size, np.random.default_rng([seed, _STREAMS["texture"]]))
    for i in range(n_train):
        save_png(part.render(_rng(seed, "train", i)).rgb, out / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        save_png(part.render(_rng(seed, "test", i)).rgb, out / "test" / "good" / f"{i:03d}.png")
    for defect in DEFECT_TYPES:
        for i in range(n_test_per_defect):
            rng = _rng(seed, defect, i)
            capture = part.render(rng)
            mask = _DEFECTS[defect](capture, rng)
            save_png(capture.rgb, out / "test" / defect / f"{i:03d}.png")
            save_png(mask.astype(np.uint8) * 255, out / "ground_truth" / defect / f"{i:03d}_mask.png")
    return out


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], index])


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a generated image (fast PNG; parents created) — shared by the synthetic generators."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


class _Part:
    """The canonical part, rendered once; each image is a shifted, jittered crop of it."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        pad = size + 2 * _MAX_SHIFT
        yy, xx = np.mgrid[0:pad, 0:pad].astype(np.float32) - (pad - 1) / 2.0
        r = np.hypot(yy, xx)
        self.r_out, self.r_in = 0.40 * size, 0.14 * size
        alpha = np.clip(self.r_out - r + 0.5, 0, 1) * np.clip(r - self.r_in + 0.5, 0, 1)
        r_bolt, r_ring = 0.035 * size, 0.27 * size
        for k in range(4):
            angle = np.pi / 4 + k * np.pi / 2
            d = np.hypot(yy - r_ring * np.sin(angle), xx - r_ring * np.cos(angle))
            alpha *= np.clip(d - r_bolt + 0.5, 0, 1)
        period = max(4.0, size / 42.0)
        grooves = 0.06 * np.cos(2 * np.pi * r / period)
        grain = 0.05 * rng.standard_normal((pad, pad)).astype(np.float32)
        shade = (1.0 + grooves + grain)[:, :, None] * _METAL
        self.alpha = alpha[:, :, None].astype(np.float32)
        self.color = (self.alpha * shade + (1 - self.alpha) * _BACKGROUND).astype(np.float32)

    def render(self, rng: np.random.Generator) -> _Capture:
        """One capture of the part: shifted, lit and noisy."""
        dy, dx = rng.integers(0, 2 * _MAX_SHIFT + 1, size=2)
        s = self.size
        img = self.color[dy : dy + s, dx : dx + s].copy()
        coverage = self.alpha[dy : dy + s, dx : dx + s, 0]
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
        angle = rng.uniform(0, 2 * np.pi)
        light = 1.0 + rng.uniform(-0.05, 0.05) + 0.04 * (yy * np.sin(angle) + xx * np.cos(angle))
        img *= light[:, :, None]
        img += rng.normal(0.0, 3.0, img.shape).astype(np.float32)
        center = (self.alpha.shape[0] - 1) / 2.0 - np.array([dx, dy], dtype=np.float64)
        return _Capture(self, _to_uint8(img), coverage, center)


@dataclass
class _Capture:
    """A rendered normal image and where its part lies (defects go on the part)."""

    part: _Part
    rgb: np.ndarray  # uint8 H x W x 3, modified in place by a defect
    coverage: np.ndarray  # float H x W in [0, 1]: how much of each pixel is part (anti-aliased)
    center: np.ndarray  # (x, y) of the part's centre in this image

    @property
    def on_part(self) -> np.ndarray:
        """Pixels that are mostly part: where surface defects may go."""
        return self.coverage > 0.5

    def point_on_ring(self, rng: np.random.Generator, margin: float) -> np.ndarray:
        """A random (x, y) on the ring, at least ``margin`` px from its edges."""
        angle = rng.uniform(0, 2 * np.pi)
        radius = rng.uniform(self.part.r_in + margin, self.part.r_out - margin)
        return self.center + radius * np.array([np.cos(angle), np.sin(angle)])


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _draw(size: int, paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _scratch(cap: _Capture, rng: np.random.Generator) -> np.ndarray:
    """A curved line (quadratic Bezier), bright or dark, 2-4 px wide at 256 px.

    It runs roughly along the ring so that most of it lies on the part.
    """
    s = cap.part.size
    p0 = cap.point_on_ring(rng, 0.04 * s)
    radial = (p0 - cap.center) / np.linalg.norm(p0 - cap.center)
    tangent = np.array([-radial[1], radial[0]])
    heading = tangent * np.cos(rng.uniform(-0.5, 0.5)) + radial * np.sin(rng.uniform(-0.5, 0.5))
    p2 = p0 + rng.uniform(0.2, 0.35) * s * heading
    p1 = (p0 + p2) / 2 + rng.uniform(-0.08, 0.08) * s * radial
    t = np.linspace(0, 1, 40)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    width = int(rng.integers(max(2, s // 128), max(3, s // 64) + 1))
    mask = _draw(s, lambda d: d.line([tuple(p) for p in points], fill=255, width=width, joint="curve"))
    mask &= cap.on_part
    level = 245.0 if rng.random() < 0.5 else 15.0
    _paint(cap.rgb, mask, np.full(3, level, np.float32), rng, noise=6.0)
    return mask


def _spot(cap: _Capture, rng: np.random.Generator) -> np.ndarray:
    """An irregular stain (rust-coloured, coarser texture) of 2-6 % of the image."""
    s = cap.part.size
    cx, cy = cap.point_on_ring(rng, 0.06 * s)
    wobble = rng.uniform(0.1, 0.25, size=3)
    phase = rng.uniform(0, 2 * np.pi, size=3)
    theta = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    shape = 1 + sum(w * np.sin((k + 2) * theta + p) for k, (w, p) in enumerate(zip(wobble, phase)))

    def blob(radius: float) -> np.ndarray:
        poly = [(cx + radius * f * np.cos(a), cy + radius * f * np.sin(a)) for f, a in zip(shape, theta)]
        return _draw(s, lambda d: d.polygon(poly, fill=255)) & cap.on_part

    mask = _fit_area(blob, rng.uniform(*_AREA_RANGE) * s * s, 0.1 * s)
    color = np.array([150.0, 82.0, 40.0], np.float32) * rng.uniform(0.85, 1.1)
    _paint(cap.rgb, mask, color, rng, noise=14.0)
    return mask


def _missing(cap: _Capture, rng: np.random.Generator) -> np.ndarray:
    """A bite out of the outer rim, showing the background (2-6 % of the image)."""
    s = cap.part.size
    angle = rng.uniform(0, 2 * np.pi)
    bx, by = cap.center + cap.part.r_out * np.array([np.cos(angle), np.sin(angle)])

    def bite(radius: float) -> np.ndarray:
        box = (bx - radius, by - radius, bx + radius, by + radius)
        # Every pixel with any part in it, so no anti-aliased ghost edge survives.
        return _draw(s, lambda d: d.ellipse(box, fill=255)) & (cap.coverage > 0)

    mask = _fit_area(bite, rng.uniform(*_AREA_RANGE) * s * s, 0.15 * s)
    _paint(cap.rgb, mask, _BACKGROUND, rng, noise=3.0)
    return mask


def _fit_area(shape: Callable[[float], np.ndarray], target: float, radius: float) -> np.ndarray:
    """Grow/shrink ``shape(radius)`` until its area is within 10 % of ``target`` px."""
    mask = shape(radius)
    for _ in range(6):
        area = int(mask.sum())
        if abs(area - target) <= 0.1 * target:
            break
        radius *= float(np.sqrt(target / max(area, 1)))
        mask = shape(radius)
    return mask


def _paint(rgb: np.ndarray, mask: np.ndarray, color: np.ndarray, rng: np.random.Generator, noise: float) -> None:
    """Replace exactly the ``mask`` pixels by ``color`` plus noise (in place)."""
    n = int(mask.sum())
    rgb[mask] = _to_uint8(color[None, :] + rng.normal(0.0, noise, (n, 3)).astype(np.float32))


_DEFECTS: dict[str, Callable[[_Capture, np.random.Generator], np.ndarray]] = {
    "scratch": _scratch,
    "spot": _spot,
    "missing": _missing,
}
