"""The ONE preprocessing implementation, shared by the workstation and the camera.

Three geometries, all on uint8 with Pillow (bilinear, antialiased), so both sides
produce the very same bytes:

* ``squash`` (the default): resize to a square ``resize``×``resize``, center crop
  ``crop``×``crop`` — fine for roughly square parts, but a tall part is squashed
  and loses its ends;
* ``pad``: keep the aspect ratio, resize the long side to fit the static graph
  input ``input_size`` (height, width), pad the rest with black — the whole frame
  is inspected;
* ``crop``: keep the aspect ratio, resize the short side to cover ``input_size``,
  center crop the overflow — the cut part is marked not inspected;
* ``tile``: for large frames — pad the frame onto a canvas that is an exact grid of
  ``tiles`` (rows, cols) overlapping tiles of ``input_size``; the graph runs once per
  tile and scores and maps are stitched back (:mod:`edgecore.runtime.tiles`).

Every geometry is one :meth:`PreprocessConfig.placement`: the frame is resized to
``rh``×``rw`` and put at (top, left) on the map (``map_hw``: the graph input, or the
tile canvas; negative = cut off, positive = padding). Mapping back (maps, masks, overlays) is the same placement
inverted, so nothing can disagree. Mean/std normalisation happens inside the
feature graph, so the only thing that crosses the boundary is this uint8 input.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from edgecore.runtime.tiles import canvas_size, check_tiling, tile_origins

ASPECT_MODES = ("squash", "pad", "crop", "tile")


@dataclass(frozen=True)
class PreprocessConfig:
    """Args: resize, crop: the squash geometry (in pad/crop mode: the input's long and
    short side, kept for readers that only need a size); aspect: one of
    :data:`ASPECT_MODES`; input_size: (height, width) of the graph input in pad/crop/tile mode
    (tile: one tile); tiles: (rows, cols) of tiles and tile_overlap: (rows, cols) pixels two
    neighbouring tiles share (tile mode only)."""

    resize: int = 256
    crop: int = 224
    aspect: str = "squash"
    input_size: tuple[int, int] | None = None
    tiles: tuple[int, int] | None = None
    tile_overlap: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.aspect not in ASPECT_MODES:
            raise ValueError(f"aspect must be one of {', '.join(ASPECT_MODES)}, got {self.aspect!r}")
        if self.aspect != "squash":
            size = self.input_size
            if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
                raise ValueError(f"aspect {self.aspect!r} needs input_size (height, width) integers, got {size!r}")
            if min(size) < 32:
                raise ValueError(f"need input_size >= 32 px per side, got {list(size)}")
            object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))
            object.__setattr__(self, "resize", max(size))
            object.__setattr__(self, "crop", min(size))
        elif self.input_size is not None:
            raise ValueError("input_size is for aspect pad/crop/tile; squash uses resize and crop")
        if self.aspect == "tile":
            tiles, overlap = self.tiles, (0, 0) if self.tile_overlap is None else self.tile_overlap
            check_tiling(self.input_size, tiles, overlap)
            object.__setattr__(self, "tiles", (int(tiles[0]), int(tiles[1])))
            object.__setattr__(self, "tile_overlap", (int(overlap[0]), int(overlap[1])))
        elif self.tiles is not None or self.tile_overlap is not None:
            raise ValueError("tiles and tile_overlap are for aspect tile")
        if not (isinstance(self.resize, int) and isinstance(self.crop, int)):
            raise ValueError(f"resize and crop must be integers, got {self.resize!r}, {self.crop!r}")
        if self.crop < 32 or self.resize < self.crop:
            raise ValueError(f"need 32 <= crop <= resize, got crop={self.crop}, resize={self.resize}")

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the graph input (one tile in tile mode)."""
        return self.input_size if self.aspect != "squash" else (self.crop, self.crop)

    @property
    def map_hw(self) -> tuple[int, int]:
        """(height, width) of what :func:`preprocess` returns and every map / mask lives on:
        the graph input, or in tile mode the canvas the tiles cover."""
        if self.aspect == "tile":
            return canvas_size(self.input_size, self.tiles, self.tile_overlap)
        return self.input_hw

    @property
    def tile_count(self) -> int:
        """Graph inputs per frame (1 unless tiled)."""
        return self.tiles[0] * self.tiles[1] if self.aspect == "tile" else 1

    def tile_origins(self) -> list[tuple[int, int]]:
        """Top-left (row, col) of each graph input on the map, in the order they are scored."""
        if self.aspect != "tile":
            return [(0, 0)]
        return tile_origins(self.input_size, self.tiles, self.tile_overlap)

    @property
    def offset(self) -> int:
        """squash: top/left pixel of the crop inside the resized image (torchvision's rounding)."""
        return int(round((self.resize - self.crop) / 2.0))

    def placement(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(rh, rw, top, left): a height×width frame is resized to rh×rw and its top-left
        corner lands at (top, left) on the map (:attr:`map_hw`; negative: cut off; positive: padding).
        This is THE frame ↔ map mapping: maps, masks, ROIs and overlays all go through it
        (and, in tile mode, :meth:`tile_origins` from the map to each graph input)."""
        if self.aspect == "squash":
            return self.resize, self.resize, -self.offset, -self.offset
        in_h, in_w = self.map_hw
        pick = max if self.aspect == "crop" else min
        scale = pick(in_h / height, in_w / width)
        rh, rw = max(1, int(round(height * scale))), max(1, int(round(width * scale)))
        if self.aspect == "crop":  # rounding must never leave an empty row or column
            rh, rw = max(rh, in_h), max(rw, in_w)
            return rh, rw, -int(round((rh - in_h) / 2.0)), -int(round((rw - in_w) / 2.0))
        rh, rw = min(rh, in_h), min(rw, in_w)
        return rh, rw, (in_h - rh) // 2, (in_w - rw) // 2

    def inspected(self, height: int, width: int) -> tuple[tuple[float, float, float, float], tuple[slice, slice]]:
        """What of a height×width frame the graph sees.

        Returns:
            ((left, top, right, bottom) in frame pixels, (rows, cols) of the crop-size map
            that cover exactly that box) — the frame outside the box is not inspected,
            the map outside the slices is padding.
        """
        rh, rw, top, left = self.placement(height, width)
        in_h, in_w = self.map_hw
        y0, y1 = max(0, -top), min(rh, in_h - top)
        x0, x1 = max(0, -left), min(rw, in_w - left)
        box = (x0 / rw * width, y0 / rh * height, x1 / rw * width, y1 / rh * height)
        return box, (slice(y0 + top, y1 + top), slice(x0 + left, x1 + left))

    def to_dict(self) -> dict:
        data = {"resize": self.resize, "crop": self.crop, "interpolation": "bilinear-antialias", "layout": "HWC-RGB-uint8"}
        if self.aspect != "squash":
            data.update(aspect=self.aspect, input_size=list(self.input_size))
        if self.aspect == "tile":
            data.update(tiles=list(self.tiles), tile_overlap=list(self.tile_overlap), canvas_size=list(self.map_hw))
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        aspect = data.get("aspect", "squash")
        if aspect != "squash":
            size = data.get("input_size")
            if not isinstance(size, list) or len(size) != 2:
                raise ValueError(f"preprocess.input_size must be [height, width], got {size!r}")
            if aspect == "tile":
                tiles, overlap = data.get("tiles"), data.get("tile_overlap")
                if not (isinstance(tiles, list) and isinstance(overlap, list) and len(tiles) == len(overlap) == 2):
                    raise ValueError(f"preprocess.tiles / tile_overlap must be [rows, cols], got {tiles!r}, {overlap!r}")
                return cls(aspect=aspect, input_size=(int(size[0]), int(size[1])), tiles=(int(tiles[0]), int(tiles[1])),
                           tile_overlap=(int(overlap[0]), int(overlap[1])))
            return cls(aspect=aspect, input_size=(int(size[0]), int(size[1])))
        return cls(resize=int(data["resize"]), crop=int(data["crop"]))


def _paste(target: np.ndarray, source: np.ndarray, top: int, left: int) -> np.ndarray:
    """Copy ``source`` into ``target`` with its top-left corner at (top, left), clipped to both."""
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(target.shape[0], top + source.shape[0]), min(target.shape[1], left + source.shape[1])
    if y1 > y0 and x1 > x0:
        target[y0:y1, x0:x1] = source[y0 - top : y1 - top, x0 - left : x1 - left]
    return target


def _place(array: np.ndarray, config: PreprocessConfig, height: int, width: int, fill) -> np.ndarray:
    """The resized frame (or mask) put on the graph input: a plain slice when nothing is padded."""
    rh, rw, top, left = config.placement(height, width)
    in_h, in_w = config.map_hw
    if top <= 0 and left <= 0 and top + rh >= in_h and left + rw >= in_w:
        view = np.ascontiguousarray(array[-top : in_h - top, -left : in_w - left])
        return view if view.flags.writeable else view.copy()  # Pillow's buffer is read-only; torch wants to own it
    canvas = np.full((in_h, in_w, *array.shape[2:]), fill, dtype=array.dtype)
    return _paste(canvas, array, top, left)


def preprocess(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 H×W×3 RGB → uint8 map_h×map_w×3 RGB (C-contiguous): the graph input, or in tile mode
    the canvas that :func:`~edgecore.runtime.tiles.cut_tiles` cuts into graph inputs."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"preprocess expects uint8 H×W×3 RGB, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    rh, rw, _, _ = config.placement(height, width)
    image = Image.fromarray(rgb)
    if (image.width, image.height) != (rw, rh):
        image = image.resize((rw, rh), Image.Resampling.BILINEAR)
    return _place(np.asarray(image, dtype=np.uint8), config, height, width, 0)


def crop_map_to_original(crop_map: np.ndarray, original_hw: tuple[int, int], config: PreprocessConfig) -> np.ndarray:
    """Put a map (``map_hw``: crop, input or tile canvas) back on the original image (for overlays).

    The part of the frame the graph never saw (the cut-away margin) has no
    evidence; it gets the map's minimum so it never looks anomalous; padding is
    dropped. Bilinear resampling in float (Pillow 'F').
    """
    height, width = original_hw
    rh, rw, top, left = config.placement(height, width)
    canvas = np.full((rh, rw), float(crop_map.min()), dtype=np.float32)
    _paste(canvas, crop_map.astype(np.float32, copy=False), -top, -left)
    resized = Image.fromarray(canvas).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def preprocess_mask(mask: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """bool H×W ground-truth (or ROI) mask → bool map_h×map_w, with the same geometry as the image
    (nearest-neighbour so the mask stays binary; padding is never defective)."""
    height, width = mask.shape[:2]
    rh, rw, _, _ = config.placement(height, width)
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    if (image.width, image.height) != (rw, rh):
        image = image.resize((rw, rh), Image.Resampling.NEAREST)
    return _place(np.asarray(image), config, height, width, 0) > 127
