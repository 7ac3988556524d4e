"""Read an ROI the user drew (``edgecore fit --roi PATH``) and put it on the feature grid.

PATH is a mask image (PNG or any frame format; white = inspect, the fit frames' size)
or a JSON polygon in frame pixels: ``[[x, y], ...]`` (one polygon) or a list of such
polygons (their union). The grid rule and what the camera does with it:
:mod:`edgecore.runtime.roi`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edgecore.runtime.preprocess import PreprocessConfig
from edgecore.runtime.roi import RoiMask, grid_mask


class RoiSource:
    """A user's ROI before it meets a frame size: a mask image or polygons."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.mask: np.ndarray | None = None
        self.polygons: list[list[tuple[float, float]]] = []
        if self.path.suffix.lower() == ".json":
            self.polygons = _parse_polygons(json.loads(self.path.read_text()), self.path)
        else:
            with Image.open(self.path) as image:
                self.mask = np.asarray(image.convert("L")) > 127

    @property
    def frame_size(self) -> tuple[int, int] | None:
        """(height, width) the mask image was drawn on; None for polygons (any frame)."""
        return None if self.mask is None else (int(self.mask.shape[0]), int(self.mask.shape[1]))

    def rasterize(self, height: int, width: int) -> np.ndarray:
        """bool height×width: True inside the ROI."""
        if self.mask is not None:
            if self.mask.shape != (height, width):
                raise ValueError(f"{self.path}: the ROI mask is {self.mask.shape[0]}x{self.mask.shape[1]} px, "
                                 f"the training frames {height}x{width}; draw it on a training frame")
            return self.mask
        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in self.polygons:
            draw.polygon(polygon, fill=255)
        return np.asarray(canvas) > 127

    def on_grid(self, frame_size: tuple[int, int], config: PreprocessConfig, grid: tuple[int, int]) -> RoiMask:
        """The ROI on the feature grid of ``config`` for frames of ``frame_size``; refuses an empty one."""
        inside = grid_mask(self.rasterize(*frame_size), config, grid)
        if not inside.any():
            raise ValueError(f"{self.path}: the ROI covers no feature cell (grid {grid[0]}x{grid[1]}: a patch is "
                             "inspected when half of its cell lies inside); draw a larger region")
        return RoiMask(inside, (int(frame_size[0]), int(frame_size[1])), self.path.name)


def _parse_polygons(data: object, path: Path) -> list[list[tuple[float, float]]]:
    def point(p) -> bool:
        return isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(v, (int, float)) for v in p)

    polygons = [data] if isinstance(data, list) and data and all(point(p) for p in data) else data
    if not (isinstance(polygons, list) and polygons
            and all(isinstance(poly, list) and len(poly) >= 3 and all(point(p) for p in poly) for poly in polygons)):
        raise ValueError(f"{path}: expected a polygon [[x, y], ...] (>= 3 points, frame pixels) or a list of them")
    return [[(float(x), float(y)) for x, y in poly] for poly in polygons]


def fit_roi(source: RoiSource, frame_sizes: list[tuple[int, int]], config: PreprocessConfig,
            grid: tuple[int, int]) -> RoiMask:
    """The ROI for a fit: drawn on the mask image's size (else the first frame's); every training
    frame must be one the camera would accept (:meth:`RoiMask.check_frame`)."""
    mask = source.on_grid(source.frame_size or tuple(frame_sizes[0]), config, grid)
    for height, width in frame_sizes:
        mask.check_frame(int(height), int(width))
    return mask
