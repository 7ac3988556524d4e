"""Pick the preprocessing geometry from the training images' sizes (``fit --aspect auto``).

Roughly square parts keep the square resize + center crop (the numbers on bottle
say it is fine there). A part whose frames are elongated gets ``pad``: the aspect
ratio is kept and the static graph input keeps the pixel budget of the square
crop (≈ crop², sides rounded to the backbone's stride 32, long side capped at
:data:`MAX_ASPECT`× the short side): the ends are no longer cut and the camera's
latency stays where it was sized. Measured on 160×560 tall parts (RESULTS.md
§ Total Recall): short side = crop (768×224) buys the same recall at 8× the latency.

Very large frames (short side at least :data:`TILE_ABOVE`× the crop: one input would shrink
them 8× or more, below the size of a small defect) get ``tile``: crop×crop tiles overlapping by
:data:`TILE_OVERLAP`, the grid (≤ :data:`MAX_TILES` tiles) that keeps the most detail. No frame
edgecore has numbers for (bottle 900², tall parts ≤ 500 px wide) reaches that size, so their
defaults are unchanged.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from edgecore.runtime.preprocess import PreprocessConfig

#: Frames whose long/short side ratio stays below this are treated as square.
SQUARE_BELOW = 1.25
#: The graph input's long side is at most this many times its short side.
MAX_ASPECT = 4.0
STRIDE = 32
#: ``auto`` tiles a frame whose short side is at least this many times the crop.
TILE_ABOVE = 8.0
#: Most tiles per frame ``auto`` (and ``--aspect tile`` without ``--tile-grid``) chooses: one forward each.
MAX_TILES = 6
#: Default share of a tile side that two neighbouring tiles overlap.
TILE_OVERLAP = 0.25


@dataclass(frozen=True)
class AspectChoice:
    config: PreprocessConfig
    median_hw: tuple[int, int]
    reason: str

    def to_dict(self) -> dict:
        return {"mode": "auto", "median_hw": list(self.median_hw), "reason": self.reason, **self.config.to_dict()}


def input_size_for(height: float, width: float, short_side: int) -> tuple[int, int]:
    """(H, W) of a graph input with the frame's aspect: short side ``short_side``, long side a multiple of 32."""
    ratio = min(max(height, width) / min(height, width), MAX_ASPECT)
    long_side = max(short_side, int(round(short_side * ratio / STRIDE)) * STRIDE)
    return (long_side, short_side) if height >= width else (short_side, long_side)


def tile_config(height: float, width: float, tile_hw: tuple[int, int], overlap: float = TILE_OVERLAP,
                grid: tuple[int, int] | None = None) -> PreprocessConfig:
    """A tile geometry for height×width frames: ``grid`` (rows, cols), or the grid of at most
    :data:`MAX_TILES` tiles whose canvas keeps the most of the frame's pixels (fewest tiles on a tie)."""
    if not 0.0 <= overlap < 0.5:
        raise ValueError(f"--tile-overlap is a share of the tile side in [0, 0.5), got {overlap}")
    px = (int(round(tile_hw[0] * overlap)), int(round(tile_hw[1] * overlap)))
    if grid is None:
        def detail(rc: tuple[int, int]) -> tuple[float, int]:
            canvas = PreprocessConfig(aspect="tile", input_size=tile_hw, tiles=rc, tile_overlap=px).map_hw
            return min(1.0, canvas[0] / height, canvas[1] / width), -rc[0] * rc[1]
        grid = max(((r, c) for r in range(1, MAX_TILES + 1) for c in range(1, MAX_TILES + 1) if r * c <= MAX_TILES),
                   key=detail)
    return PreprocessConfig(aspect="tile", input_size=tuple(tile_hw), tiles=tuple(grid), tile_overlap=px)


def choose_preprocess(sizes: Iterable[tuple[int, int]], resize: int = 256, crop: int = 224) -> AspectChoice:
    """Args: sizes: (height, width) of the training frames; resize, crop: the square geometry.

    Returns: the geometry and why it was chosen (recorded in the model's config)."""
    sizes = np.asarray(list(sizes), dtype=np.float64)
    if sizes.size == 0:
        raise ValueError("no training images to choose the preprocessing from")
    height, width = np.median(sizes[:, 0]), np.median(sizes[:, 1])
    median_hw = (int(round(height)), int(round(width)))
    ratio = max(height, width) / min(height, width)
    if min(height, width) >= TILE_ABOVE * crop:
        config = tile_config(height, width, (crop, crop))
        return AspectChoice(config, median_hw,
                            f"frames are large (short side {min(median_hw)} >= {TILE_ABOVE:g} x crop {crop}): "
                            f"{config.tiles[0]}x{config.tiles[1]} tiles of {crop}x{crop}, overlap {config.tile_overlap[0]} px")
    if ratio < SQUARE_BELOW:
        return AspectChoice(PreprocessConfig(resize=resize, crop=crop), median_hw,
                            f"frames are near-square (aspect {ratio:.2f} < {SQUARE_BELOW}): square resize + center crop")
    short_side = max(STRIDE, int(round(crop / np.sqrt(min(ratio, MAX_ASPECT)) / STRIDE)) * STRIDE)
    size = input_size_for(height, width, short_side)
    return AspectChoice(PreprocessConfig(aspect="pad", input_size=size), median_hw,
                        f"frames have aspect {ratio:.2f}: keep it, pad to a static {size[0]}x{size[1]} input "
                        f"(about the pixels of a {crop}x{crop} crop)")


def parse_input_size(text: str, option: str = "--input-size") -> tuple[int, int]:
    """``"448x160"`` (height x width) → (448, 160)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{option} must be HEIGHTxWIDTH, e.g. 448x160, got {text!r}") from None
    return height, width


def frame_sizes(paths: Iterable) -> list[tuple[int, int]]:
    """(height, width) of each readable frame, from its header (no decoding); unreadable ones are left
    to the fit's own decoding, which reports or skips them."""
    from edgecore.runtime.errors import EdgecoreError
    from edgecore.runtime.imageio import image_size

    sizes = []
    for path in paths:
        try:
            sizes.append(image_size(path))
        except (EdgecoreError, OSError):
            continue
    return sizes


def resolve_preprocess(
    aspect: str, input_size: str | None, resize: int, crop: int, paths: Iterable,
    tile_grid: str | None = None, tile_overlap: float = TILE_OVERLAP,
) -> tuple[PreprocessConfig, dict]:
    """What ``fit --aspect/--input-size/--resize/--crop`` mean, with the record kept in the model config.

    Args:
        aspect: ``auto`` (choose from the frames' sizes), ``squash``, ``pad``, ``crop`` or ``tile``.
        input_size: ``HEIGHTxWIDTH`` of the graph input (pad/crop: default the frames'
            median aspect with short side ``crop``; tile: one tile, default crop×crop).
        resize, crop: the square geometry (squash), and the short side of pad/crop.
        paths: the training frames (only their headers are read, and only when needed).
        tile_grid: ``ROWSxCOLS`` of tiles (tile only; default: the most detail in ≤ MAX_TILES tiles).
        tile_overlap: share of a tile side neighbouring tiles overlap (tile only).

    Returns:
        (the geometry, how it was chosen).
    """
    if input_size is not None and aspect not in ("pad", "crop", "tile"):
        raise ValueError("--input-size goes with --aspect pad, crop or tile")
    if tile_grid is not None and aspect != "tile":
        raise ValueError("--tile-grid goes with --aspect tile")
    if aspect == "tile":
        tile_hw = parse_input_size(input_size) if input_size is not None else (crop, crop)
        grid = parse_input_size(tile_grid, "--tile-grid") if tile_grid is not None else None
        sizes = np.asarray(frame_sizes(paths) if grid is None else [(1, 1)], dtype=np.float64)
        if sizes.size == 0:
            raise ValueError("no readable training images to choose the tile grid from; give --tile-grid")
        config = tile_config(float(np.median(sizes[:, 0])), float(np.median(sizes[:, 1])), tile_hw, tile_overlap, grid)
        return config, {"mode": "tile", **config.to_dict()}
    if aspect == "squash":
        config = PreprocessConfig(resize=resize, crop=crop)
        return config, {"mode": "squash", **config.to_dict()}
    if aspect == "auto":
        return (choice := choose_preprocess(frame_sizes(paths), resize, crop)).config, choice.to_dict()
    if aspect not in ("pad", "crop"):
        raise ValueError(f"--aspect must be auto, squash, pad, crop or tile, got {aspect!r}")
    if input_size is not None:
        size = parse_input_size(input_size)
    else:
        sizes = np.asarray(frame_sizes(paths), dtype=np.float64)
        if sizes.size == 0:
            raise ValueError("no readable training images to size the input from; give --input-size")
        size = input_size_for(float(np.median(sizes[:, 0])), float(np.median(sizes[:, 1])), crop)
    config = PreprocessConfig(aspect=aspect, input_size=size)
    return config, {"mode": aspect, **config.to_dict()}
