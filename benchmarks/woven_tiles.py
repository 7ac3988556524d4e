"""The 763-tile set of issue #16: synthetic 400x300 grayscale woven-texture tiles.

A stand-in for a textile/mesh line: a warp and a weft grating (over-under weave)
with per-tile phase, angle and brightness jitter, fibre grain and sensor noise.
The noise gives the Lite0 patch bank a high intrinsic dimension, the hard case for
pruned greedy k-center (see RESULTS § Distributed fit).

    python benchmarks/woven_tiles.py /tmp/tiles            # 763 tiles, seed 0
    edgecore fit /tmp/tiles -o /tmp/m_tiles --backbone efficientnet_lite0
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def woven_tile(rng: np.random.Generator, width: int = 400, height: int = 300) -> np.ndarray:
    """One uint8 H x W grayscale tile."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = np.deg2rad(rng.normal(0.0, 2.0))
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    period = 12.0 * (1 + rng.normal(0, 0.01))
    phase_u, phase_v = rng.uniform(0, 2 * np.pi, size=2)
    warp = np.sin(2 * np.pi * u / period + phase_u)
    weft = np.sin(2 * np.pi * v / period + phase_v)
    over = np.sign(np.sin(np.pi * u / period + phase_u) * np.sin(np.pi * v / period + phase_v))  # which thread is on top
    texture = np.where(over > 0, np.abs(warp), np.abs(weft))
    grain = rng.normal(0, 0.08, size=(height, width // 4)).repeat(4, axis=1)[:, :width]  # fibres along the rows
    image = 0.45 + rng.normal(0, 0.03) + 0.35 * texture + grain + rng.normal(0, 0.04, size=(height, width))
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_woven_tiles(directory: Path, count: int = 763, seed: int = 0) -> list[Path]:
    """Write ``count`` tiles as ``directory/tile_0000.png`` ...; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"tile_{index:04d}.png"
        Image.fromarray(woven_tile(np.random.default_rng([seed, index]))).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--count", type=int, default=763)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{len(make_woven_tiles(args.directory, args.count, args.seed))} tiles in {args.directory}")


if __name__ == "__main__":
    main()
