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

How the frame is resampled is versioned (``preprocess.resample``, :data:`RESAMPLERS`): a model
keeps the version it was fitted with, so a bundle's scores never move under it. v2 resizes only
the part of the frame that lands on the map; v1 does so too wherever that gives the same bytes.
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
from PIL import Image

from edgecore.runtime import native
from edgecore.runtime.tiles import canvas_size, check_tiling, tile_origins

ASPECT_MODES = ("squash", "pad", "crop", "tile")

#: ``preprocess.resample`` → its reduction gap (None: no reduction). ``v1``: bilinear antialiased
#: over the full-resolution frame — every model fitted before v2, and any config without the field.
#: ``v2``: first a whole-factor box reduction of the visible part (``Image.reduce``) while it stays
#: at least ``gap`` times the output, then the same bilinear antialiased resize (2.1x cheaper than
#: before #11 at 900×900, 3.3x at 1080p; bottle AUROC unchanged, benchmarks/RESULTS.md § Frame overhead).
RESAMPLERS: dict[str, float | None] = {"v1": None, "v2": 1.0}
RESAMPLE_DEFAULT = "v2"  # what a new fit records
RESAMPLE_LEGACY = "v1"  # what a config without the field was fitted with


@dataclass(frozen=True)
class PreprocessConfig:
    """Args: resize, crop: the squash geometry (in pad/crop mode: the input's long and
    short side, kept for readers that only need a size); aspect: one of
    :data:`ASPECT_MODES`; input_size: (height, width) of the graph input in pad/crop/tile mode
    (tile: one tile); tiles: (rows, cols) of tiles and tile_overlap: (rows, cols) pixels two
    neighbouring tiles share (tile mode only); resample: a key of :data:`RESAMPLERS`."""

    resize: int = 256
    crop: int = 224
    aspect: str = "squash"
    input_size: tuple[int, int] | None = None
    tiles: tuple[int, int] | None = None
    tile_overlap: tuple[int, int] | None = None
    resample: str = RESAMPLE_DEFAULT

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLERS:  # fail closed: an unknown version would give other pixels
            raise ValueError(f"preprocess.resample must be one of {', '.join(RESAMPLERS)}, got {self.resample!r}")
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
        data = {"resize": self.resize, "crop": self.crop, "interpolation": "bilinear-antialias", "layout": "HWC-RGB-uint8",
                "resample": self.resample}
        if self.aspect != "squash":
            data.update(aspect=self.aspect, input_size=list(self.input_size))
        if self.aspect == "tile":
            data.update(tiles=list(self.tiles), tile_overlap=list(self.tile_overlap), canvas_size=list(self.map_hw))
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        """A config.json / manifest ``preprocess`` section; one without ``resample`` predates v2 (→ v1)."""
        resample = data.get("resample", RESAMPLE_LEGACY)
        return dataclasses.replace(cls._geometry_from_dict(data), resample=resample)

    @classmethod
    def _geometry_from_dict(cls, data: dict) -> "PreprocessConfig":
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


def _visible(config: PreprocessConfig, height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the rows and columns of the resized frame that land on the map."""
    rh, rw, top, left = config.placement(height, width)
    in_h, in_w = config.map_hw
    return max(0, -top), min(rh, in_h - top), max(0, -left), min(rw, in_w - left)


def _exact_box(size: int, resized: int, lo: int, hi: int) -> tuple[float, float] | None:
    """Source interval of resized pixels lo..hi, or None where Pillow would not compute the very
    same filter taps as for the full resize: it takes the box in float32 and every tap centre from
    it, so the box must be exact in float32 and the scale in float64 (a dyadic size/resized, e.g.
    any frame resized to 256)."""
    scale = Fraction(size, resized)
    edges = (scale * lo, scale * hi)
    if Fraction(size / resized) != scale or any(Fraction(float(np.float32(e))) != e for e in edges):
        return None
    return float(edges[0]), float(edges[1])


def _resize_v1(rgb: np.ndarray, rh: int, rw: int, visible: tuple[int, int, int, int]) -> np.ndarray:
    """v1: exactly the bytes of Pillow's bilinear resize of the whole frame to rh×rw, then the crop.

    Resizing only the box gives the same taps where :func:`_exact_box` holds, but Pillow >= 13
    picks the order of its two passes per call from the sizes (uint8 rounding between them), so
    the box is only taken where both calls are symmetric (square frame, square crop) and pick alike."""
    y0, y1, x0, x1 = visible
    height, width = rgb.shape[:2]
    image = Image.fromarray(rgb)
    box_x, box_y = _exact_box(width, rw, x0, x1), _exact_box(height, rh, y0, y1)
    if box_x is None or (height, rh, (y0, y1)) != (width, rw, (x0, x1)):
        return np.asarray(image.resize((rw, rh), Image.Resampling.BILINEAR))[y0:y1, x0:x1]
    box = (box_x[0], box_y[0], box_x[1], box_y[1])
    return np.asarray(image.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=box))


def _resize_v2(rgb: np.ndarray, rh: int, rw: int, visible: tuple[int, int, int, int], gap: float) -> np.ndarray:
    """v2: the visible part only, reduced by whole factors first, two explicit passes.

    The source box of the visible part (plus the filter's reach, in whole rows and columns) is
    box-averaged by the largest integer factor that leaves it at least ``gap`` times the output
    (``Image.reduce``), then resized bilinear antialiased: the horizontal pass, then the vertical
    one, each its own call so no Pillow version can reorder them."""
    y0, y1, x0, x1 = visible
    height, width = rgb.shape[:2]
    out_w, out_h = x1 - x0, y1 - y0
    box_x = [x0 * width / rw, x1 * width / rw]
    box_y = [y0 * height / rh, y1 * height / rh]
    reach_x, reach_y = max(1.0, width / rw), max(1.0, height / rh)  # the bilinear filter's support
    top, bottom = max(0, math.floor(box_y[0] - reach_y)), min(height, math.ceil(box_y[1] + reach_y))
    left, right = max(0, math.floor(box_x[0] - reach_x)), min(width, math.ceil(box_x[1] + reach_x))
    rows = rgb[top:bottom]  # whole rows: still contiguous, nothing copied twice
    box_y = [v - top for v in box_y]
    factor_x = max(1, int((box_x[1] - box_x[0]) / out_w / gap))
    factor_y = max(1, int((box_y[1] - box_y[0]) / out_h / gap))
    source = rows  # the array the bilinear passes read (None: only Pillow's image holds it)
    if factor_x > 1 or factor_y > 1:
        source = _reduce_native(rows, factor_x, factor_y, left, right)
        box_x = [(v - left) / factor_x for v in box_x]
        box_y = [v / factor_y for v in box_y]
    across = _bilinear_native(source, 0, box_x, out_w) if source is not None else None
    done = _bilinear_native(across, 1, box_y, out_h) if across is not None else None
    if done is not None:
        return done
    if factor_x > 1 or factor_y > 1:
        image = (Image.fromarray(source) if source is not None else
                 Image.fromarray(rows).reduce((factor_x, factor_y), box=(left, 0, right, bottom - top)))
    else:
        image = Image.fromarray(rows)
    image = image.resize((out_w, image.height), Image.Resampling.BILINEAR, box=(box_x[0], 0, box_x[1], image.height))
    image = image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=(0, box_y[0], out_w, box_y[1]))
    return np.asarray(image)


@lru_cache(maxsize=1)
def _reducer():
    """``ecp_reduce`` from the built ``_resample`` library (``native/reduce.c``), or None: Pillow reduces then."""
    i64 = ctypes.c_int64
    return native.load_function("_resample", "ecp_reduce", [ctypes.c_void_p, i64, i64, i64, i64, i64, i64, i64, i64,
                                                            ctypes.c_void_p, i64])


@lru_cache(maxsize=1)
def _bilinear():
    """``ecp_bilinear`` from the built ``_resample`` library (``native/reduce.c``), or None: Pillow resizes then."""
    i64 = ctypes.c_int64
    return native.load_function("_resample", "ecp_bilinear", [ctypes.c_void_p, i64, i64, i64, i64, ctypes.c_int,
                                                              ctypes.c_float, ctypes.c_float, i64, ctypes.c_void_p, i64])


def _bilinear_native(rows: np.ndarray, axis: int, box: list[float], size: int) -> np.ndarray | None:
    """One of v2's bilinear passes over H×W×3 uint8 ``rows``: to ``size`` columns (axis 0) or rows (axis 1) from
    the source interval ``box``, byte for byte ``Image.fromarray(rows).resize(..., BILINEAR, box=...)`` along that
    axis, without Pillow's copies into and out of its 4-byte pixels (bottle: preprocess 1.0 → 0.6 ms); None where
    the library is missing or the rows are not laid out as it reads them (Pillow then)."""
    fn = _bilinear()
    if fn is None or rows.strides[1:] != (3, 1) or rows.strides[0] < 3 * rows.shape[1]:
        return None
    height, width = rows.shape[:2]
    out = np.empty((height, size, 3) if axis == 0 else (size, width, 3), np.uint8)
    if fn(rows.ctypes.data, rows.strides[0], 3, width, height, axis, box[0], box[1], size, out.ctypes.data,
          out.strides[0]) != 0:
        return None
    return out


def _reduce_native(rows: np.ndarray, factor_x: int, factor_y: int, left: int, right: int) -> np.ndarray | None:
    """Columns [left, right) of H×W×3 uint8 ``rows`` reduced by whole factors, byte for byte
    ``Image.fromarray(rows).reduce((factor_x, factor_y), box=(left, 0, right, H))``, without Pillow's copy of the
    frame into its 4-byte pixels (bottle's 900 × 900 frames: preprocessing 1.4 → 0.6 ms); None where the library is
    missing or the rows are not laid out as it reads them (Pillow then)."""
    fn = _reducer()
    if fn is None or rows.strides[1:] != (3, 1) or rows.strides[0] < 3 * rows.shape[1]:
        return None
    height, width = rows.shape[0], right - left
    out = np.empty(((height + factor_y - 1) // factor_y, (width + factor_x - 1) // factor_x, 3), np.uint8)
    if fn(rows.ctypes.data, rows.strides[0], 3, left, 0, width, height, factor_x, factor_y, out.ctypes.data,
          out.strides[0]) != 0:
        return None
    return out


def preprocess(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 H×W×3 RGB → uint8 map_h×map_w×3 RGB (C-contiguous, writeable): the graph input, or in
    tile mode the canvas that :func:`~edgecore.runtime.tiles.cut_tiles` cuts into graph inputs.

    Only the part of the frame that lands on the map is resized (a squash crop skips the 23 % of
    the resized frame it would cut away), in the model's ``resample`` version."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"preprocess expects uint8 H×W×3 RGB, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    rh, rw, top, left = config.placement(height, width)
    y0, y1, x0, x1 = visible = _visible(config, height, width)
    gap = RESAMPLERS[config.resample]
    if (rh, rw) == (height, width):
        part = rgb[y0:y1, x0:x1]
    elif gap is None:
        part = _resize_v1(rgb, rh, rw, visible)
    else:
        part = _resize_v2(rgb, rh, rw, visible, gap)
    in_h, in_w = config.map_hw
    if part.shape[:2] == (in_h, in_w):
        return np.array(part, order="C")  # a fresh, writeable copy: never the caller's or Pillow's buffer
    canvas = np.zeros((in_h, in_w, 3), dtype=np.uint8)
    return _paste(canvas, part, top + y0, left + x0)


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
