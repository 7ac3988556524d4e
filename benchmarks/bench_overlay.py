"""Overlay cost per frame: the old full-resolution overlay vs the current one (interleaved, same frames).

    python benchmarks/bench_overlay.py [--frames DIR] [--repeats 10]

Old = what `infer -o` did before: the map resized to the full frame in float, a float blend and a
contour over every pixel, PNG at Pillow's default compression. New = runtime/overlay.py.
"""
from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from edgecore.runtime.imageio import load_image
from edgecore.runtime.overlay import jet, render_overlay
from edgecore.runtime.preprocess import PreprocessConfig, crop_map_to_original

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_bottle" / "test" / "broken_large"


def old_overlay(rgb: np.ndarray, crop_map: np.ndarray, config: PreprocessConfig) -> bytes:
    full = crop_map_to_original(crop_map, rgb.shape[:2], config)
    heat = jet(full).astype(np.float32)
    blended = 0.55 * rgb.astype(np.float32) + 0.45 * heat
    above = full >= 0.5
    edge = above & ~(np.roll(above, 1, 0) & np.roll(above, -1, 0) & np.roll(above, 1, 1) & np.roll(above, -1, 1))
    blended[edge] = 255.0
    buffer = io.BytesIO()
    Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def new_overlay(rgb: np.ndarray, crop_map: np.ndarray, config: PreprocessConfig) -> bytes:
    image = render_overlay(rgb, crop_map, config, 1.23, 0.61, True, 1.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)  # as save_overlay writes it
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=Path, default=BOTTLE if BOTTLE.is_dir() else None)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    config = PreprocessConfig(256, 224)
    if args.frames:
        frames = [load_image(p) for p in sorted(args.frames.glob("*.png"))[:5]]
        source = str(args.frames)
    else:
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 255, (900, 900, 3), dtype=np.uint8) for _ in range(5)]
        source = "synthetic 900x900"
    yy, xx = np.mgrid[0:224, 0:224]
    crop_map = np.clip(np.exp(-((yy - 120) ** 2 + (xx - 90) ** 2) / 800.0), 0, 1).astype(np.float32)
    times = {"old": [], "new": []}
    sizes = {}
    for _ in range(args.repeats):  # interleaved: load drift hits both alike
        for rgb in frames:
            for name, fn in (("old", old_overlay), ("new", new_overlay)):
                start = time.perf_counter()
                sizes[name] = len(fn(rgb, crop_map, config))
                times[name].append((time.perf_counter() - start) * 1e3)
    print(f"frames: {source} ({frames[0].shape[1]}x{frames[0].shape[0]}), {args.repeats} x {len(frames)} each, "
          f"load average {os.getloadavg()}")
    for name in ("old", "new"):
        t = np.array(times[name])
        print(f"{name}: p50 {np.percentile(t, 50):.1f} ms, p90 {np.percentile(t, 90):.1f} ms, file {sizes[name] / 1e3:.0f} kB")
    print(f"ratio p50 old/new: {np.percentile(times['old'], 50) / np.percentile(times['new'], 50):.1f}x")


if __name__ == "__main__":
    main()
