"""Tiled inspection (``aspect="tile"``): cut a large frame into overlapping tiles at the graph's
static input size, score every tile, stitch scores and maps back onto the whole frame.

Why tiles: a pad/crop geometry shrinks a large frame until it fits one input, and a small
defect shrinks with it below the backbone's patch size. Tiles keep the frame at a higher
resolution for the cost of one forward per tile.

Geometry: the frame is placed on a *canvas* (``map_hw``) with the pad rule (keep the aspect,
fit, pad: the whole frame is inspected); the canvas is an exact R×C grid of tiles
``tile_hw`` that overlap by ``overlap`` pixels, so every canvas pixel is in at least one tile.
The canvas is what :func:`~edgecore.runtime.preprocess.preprocess` returns and what maps,
masks and overlays live on; the graph only ever sees :func:`cut_tiles` of it.

Stitching (one rule, host and camera alike):

* image score = max over the frame's tiles of each tile's Eq. 7 score;
* map = per-tile maps (upsampled + blurred inside the tile) combined by **max** where tiles
  overlap — a defect seen well by one tile is never averaged away by a neighbour that
  sees it cut at its border.

numpy only (camera side).
"""
from __future__ import annotations

import numpy as np

from edgecore.runtime.scoring import Scores


def canvas_size(tile_hw: tuple[int, int], grid: tuple[int, int], overlap: tuple[int, int]) -> tuple[int, int]:
    """(height, width) covered exactly by a ``grid`` (rows, cols) of ``tile_hw`` tiles overlapping by ``overlap`` px."""
    return tuple(int(n * t - (n - 1) * o) for n, t, o in zip(grid, tile_hw, overlap))  # type: ignore[return-value]


def tile_origins(tile_hw: tuple[int, int], grid: tuple[int, int], overlap: tuple[int, int]) -> list[tuple[int, int]]:
    """Top-left (row, col) of every tile on the canvas, row-major (the order of the graph inputs)."""
    step_h, step_w = tile_hw[0] - overlap[0], tile_hw[1] - overlap[1]
    return [(r * step_h, c * step_w) for r in range(grid[0]) for c in range(grid[1])]


def check_tiling(tile_hw, grid, overlap) -> None:
    """Raise ValueError unless the tiling is a usable R×C grid with overlaps smaller than half a tile."""
    for name, value in (("tile size", tile_hw), ("tiles", grid), ("tile overlap", overlap)):
        if not (isinstance(value, (tuple, list)) and len(value) == 2
                and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"{name} must be two integers, got {value!r}")
    if min(grid) < 1 or grid[0] * grid[1] > 64:
        raise ValueError(f"tiles must be 1..64 tiles in all, got {list(grid)}")
    if min(overlap) < 0 or any(2 * o >= t for o, t in zip(overlap, tile_hw)):
        raise ValueError(f"tile overlap {list(overlap)} must be >= 0 and under half the tile {list(tile_hw)}")


def cut_tiles(canvases: np.ndarray, config) -> np.ndarray:
    """N×H×W[×C] canvases (or masks) → (N·T)×th×tw[×C] graph inputs, tiles of one frame adjacent
    in :func:`tile_origins` order; any other geometry passes through unchanged.

    Args:
        canvases: what :func:`~edgecore.runtime.preprocess.preprocess` (or ``preprocess_mask``) returned, stacked.
        config: the :class:`~edgecore.runtime.preprocess.PreprocessConfig`.
    """
    if config.aspect != "tile":
        return canvases
    th, tw = config.input_hw
    tiles = [canvases[:, y : y + th, x : x + tw] for y, x in config.tile_origins()]
    return np.ascontiguousarray(np.stack(tiles, axis=1).reshape(-1, th, tw, *canvases.shape[3:]))


def stitch_maps(tile_maps: np.ndarray, config) -> np.ndarray:
    """(N·T)×th×tw per-tile maps → N×H×W canvas maps, overlaps combined by max."""
    th, tw = config.input_hw
    origins = config.tile_origins()
    per_frame = tile_maps.reshape(-1, len(origins), th, tw)
    out = np.full((per_frame.shape[0], *config.map_hw), -np.inf, dtype=tile_maps.dtype)
    for t, (y, x) in enumerate(origins):
        np.maximum(out[:, y : y + th, x : x + tw], per_frame[:, t], out=out[:, y : y + th, x : x + tw])
    return out


def stitch_scores(scores: Scores, config) -> Scores:
    """Per-tile Scores → per-frame Scores (image = max over tiles; patches = the tiles' patches in
    tile order; maps = :func:`stitch_maps`); any other geometry passes through unchanged."""
    if config.aspect != "tile":
        return scores
    count = config.tile_count
    if len(scores.image) % count:
        raise ValueError(f"{len(scores.image)} tiles is not a whole number of {count}-tile frames")
    return Scores(
        image=scores.image.reshape(-1, count).max(axis=1),
        patches=scores.patches.reshape(-1, count * scores.patches.shape[1]),
        maps=stitch_maps(scores.maps, config),
    )


def tile_boxes(config, height: int, width: int) -> list[tuple[float, float, float, float]]:
    """(left, top, right, bottom) in frame pixels that each tile sees (clipped to the frame; a tile
    that is all padding gets an empty box) — for ROI masks, overlays and logs."""
    rh, rw, top, left = config.placement(height, width)
    th, tw = config.input_hw
    boxes = []
    for y, x in config.tile_origins():
        y0, y1 = min(max(y - top, 0), rh), min(max(y + th - top, 0), rh)
        x0, x1 = min(max(x - left, 0), rw), min(max(x + tw - left, 0), rw)
        boxes.append((x0 / rw * width, y0 / rh * height, x1 / rw * width, y1 / rh * height))
    return boxes
