"""The ONE preprocessing implementation, shared by the workstation and the camera.

Resize (bilinear, antialiased, to a square ``resize``×``resize``) → center crop
``crop``×``crop``, all on uint8 with Pillow, so both sides produce the very same
bytes. Mean/std normalisation happens inside the feature graph (torch module and
ONNX alike), so the only thing that crosses the boundary is this uint8 crop —
the resize mismatch that bites anomalib exports cannot happen here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class PreprocessConfig:
    resize: int = 256
    crop: int = 224

    def __post_init__(self) -> None:
        if not (isinstance(self.resize, int) and isinstance(self.crop, int)):
            raise ValueError(f"resize and crop must be integers, got {self.resize!r}, {self.crop!r}")
        if self.crop < 32 or self.resize < self.crop:
            raise ValueError(f"need 32 <= crop <= resize, got crop={self.crop}, resize={self.resize}")

    @property
    def offset(self) -> int:
        """Top/left pixel of the crop inside the resized image (torchvision's rounding)."""
        return int(round((self.resize - self.crop) / 2.0))

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "interpolation": "bilinear-antialias", "layout": "HWC-RGB-uint8"}

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        return cls(resize=int(data["resize"]), crop=int(data["crop"]))


def preprocess(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 H×W×3 RGB → uint8 crop×crop×3 RGB (C-contiguous)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"preprocess expects uint8 H×W×3 RGB, got {rgb.dtype} {rgb.shape}")
    image = Image.fromarray(rgb)
    if (image.width, image.height) != (config.resize, config.resize):
        image = image.resize((config.resize, config.resize), Image.Resampling.BILINEAR)
    o = config.offset
    crop = np.asarray(image, dtype=np.uint8)[o : o + config.crop, o : o + config.crop]
    return np.ascontiguousarray(crop)


def crop_map_to_original(crop_map: np.ndarray, original_hw: tuple[int, int], config: PreprocessConfig) -> np.ndarray:
    """Put a crop-sized map back on the original image (for overlays).

    The margin the center crop cut away has no evidence; it gets the map's
    minimum so it never looks anomalous. Bilinear resampling in float (Pillow 'F').
    """
    canvas = np.full((config.resize, config.resize), float(crop_map.min()), dtype=np.float32)
    o = config.offset
    canvas[o : o + config.crop, o : o + config.crop] = crop_map
    height, width = original_hw
    resized = Image.fromarray(canvas).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def preprocess_mask(mask: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """bool H×W ground-truth mask → bool crop×crop, with the same geometry as the image
    (nearest-neighbour so the mask stays binary)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    if (image.width, image.height) != (config.resize, config.resize):
        image = image.resize((config.resize, config.resize), Image.Resampling.NEAREST)
    o = config.offset
    return np.asarray(image)[o : o + config.crop, o : o + config.crop] > 127
