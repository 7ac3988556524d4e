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
  center crop the overflow — the cut part is marked not inspected.

Every geometry is one :meth:`PreprocessConfig.placement`: the frame is resized to
``rh``×``rw`` and put at (top, left) on the graph input (negative = cut off,
positive = padding). Mapping back (maps, masks, overlays) is the same placement
inverted, so nothing can disagree. Mean/std normalisation happens inside the
feature graph, so the only thing that crosses the boundary is this uint8 input.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

ASPECT_MODES = ("squash", "pad", "crop")


@dataclass(frozen=True)
class PreprocessConfig:
    """Args: resize, crop: the squash geometry (in pad/crop mode: the input's long and
    short side, kept for readers that only need a size); aspect: one of
    :data:`ASPECT_MODES`; input_size: (height, width) of the graph input in pad/crop mode."""

    resize: int = 256
    crop: int = 224
    aspect: str = "squash"
    input_size: tuple[int, int] | None = None

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
            raise ValueError("input_size is for aspect pad/crop; squash uses resize and crop")
        if not (isinstance(self.resize, int) and isinstance(self.crop, int)):
            raise ValueError(f"resize and crop must be integers, got {self.resize!r}, {self.crop!r}")
        if self.crop < 32 or self.resize < self.crop:
            raise ValueError(f"need 32 <= crop <= resize, got crop={self.crop}, resize={self.resize}")

    @property
    def input_hw(self) -> tuple[int, int]:
        """(height, width) of the graph input (and of every crop-size map)."""
        return self.input_size if self.aspect != "squash" else (self.crop, self.crop)

    @property
    def offset(self) -> int:
        """squash: top/left pixel of the crop inside the resized image (torchvision's rounding)."""
        return int(round((self.resize - self.crop) / 2.0))

    def placement(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(rh, rw, top, left): a height×width frame is resized to rh×rw and its top-left
        corner lands at (top, left) on the graph input (negative: cut off; positive: padding)."""
        if self.aspect == "squash":
            return self.resize, self.resize, -self.offset, -self.offset
        in_h, in_w = self.input_size
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
        in_h, in_w = self.input_hw
        y0, y1 = max(0, -top), min(rh, in_h - top)
        x0, x1 = max(0, -left), min(rw, in_w - left)
        box = (x0 / rw * width, y0 / rh * height, x1 / rw * width, y1 / rh * height)
        return box, (slice(y0 + top, y1 + top), slice(x0 + left, x1 + left))

    def to_dict(self) -> dict:
        data = {"resize": self.resize, "crop": self.crop, "interpolation": "bilinear-antialias", "layout": "HWC-RGB-uint8"}
        if self.aspect != "squash":
            data.update(aspect=self.aspect, input_size=list(self.input_size))
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        aspect = data.get("aspect", "squash")
        if aspect != "squash":
            size = data.get("input_size")
            if not isinstance(size, list) or len(size) != 2:
                raise ValueError(f"preprocess.input_size must be [height, width], got {size!r}")
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
    in_h, in_w = config.input_hw
    if top <= 0 and left <= 0 and top + rh >= in_h and left + rw >= in_w:
        view = np.ascontiguousarray(array[-top : in_h - top, -left : in_w - left])
        return view if view.flags.writeable else view.copy()  # Pillow's buffer is read-only; torch wants to own it
    canvas = np.full((in_h, in_w, *array.shape[2:]), fill, dtype=array.dtype)
    return _paste(canvas, array, top, left)


def preprocess(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 H×W×3 RGB → uint8 input_h×input_w×3 RGB (C-contiguous)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"preprocess expects uint8 H×W×3 RGB, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    rh, rw, _, _ = config.placement(height, width)
    image = Image.fromarray(rgb)
    if (image.width, image.height) != (rw, rh):
        image = image.resize((rw, rh), Image.Resampling.BILINEAR)
    return _place(np.asarray(image, dtype=np.uint8), config, height, width, 0)


def crop_map_to_original(crop_map: np.ndarray, original_hw: tuple[int, int], config: PreprocessConfig) -> np.ndarray:
    """Put a crop-size map back on the original image (for overlays).

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
    """bool H×W ground-truth mask → bool input_h×input_w, with the same geometry as the image
    (nearest-neighbour so the mask stays binary; padding is never defective)."""
    height, width = mask.shape[:2]
    rh, rw, _, _ = config.placement(height, width)
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    if (image.width, image.height) != (rw, rh):
        image = image.resize((rw, rh), Image.Resampling.NEAREST)
    return _place(np.asarray(image), config, height, width, 0) > 127
