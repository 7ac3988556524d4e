"""Dataset discovery and streaming decode.

Two layouts are understood:

* an **MVTec AD category** ``root/`` with ``train/good/*``, ``test/<type>/*``
  and ``ground_truth/<type>/<stem>_mask.png`` (``good`` = normal);
* a **plain folder** of normal images (training only).

Discovery (:func:`train_samples`, :func:`test_samples`) only lists files and
returns :class:`Sample` records; nothing is decoded, so it is cheap and a
dataset far larger than memory is fine. Decoding happens one image at a time in
:class:`ImageStream`::

    stream = ImageStream(samples, skip_bad=skip_bad)
    for sample, rgb in stream:                      # rgb: uint8 H x W x 3
        ...
    for sample, rgb, mask in stream.with_masks():   # mask: bool H x W, or None
        ...
    stream.skipped                                  # [(path, reason), ...]

``mask`` is None for normal samples and for defect images that have no mask
file (MVTec always has them; users' own data may not - such images still count
for image-level metrics but not for pixel-level ones).

With ``skip_bad=False`` (the default) the first unreadable image, or a mask
whose size differs from its image, raises (ImageError / DatasetError naming the
file(s)); with ``skip_bad=True`` it is skipped with a warning and recorded in
``stream.skipped`` so the caller can report "skipped N files".
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecore.runtime.errors import DatasetError, ImageError
from edgecore.runtime.frames import IMAGE_EXTENSIONS, list_images
from edgecore.runtime.frames import accepted_extensions as _accepted
from edgecore.runtime.frames import is_image_file as _is_image_file
from edgecore.runtime.imageio import load_image, load_mask

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageStream",
    "Sample",
    "SkippedImageWarning",
    "is_mvtec_category",
    "list_images",
    "test_samples",
    "train_samples",
]

GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, before decoding."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images
    mask_path: Path | None = None  # ground truth (defect images only; may be missing)


class SkippedImageWarning(UserWarning):
    """An unreadable image was skipped (``skip_bad=True``); a category of its own so
    a CLI that reports ``ImageStream.skipped`` itself can silence it."""


# --------------------------------------------------------------------------- discovery


def is_mvtec_category(root: str | os.PathLike[str]) -> bool:
    """True when ``root`` looks like one MVTec AD category (it has ``train/good``)."""
    return (Path(root) / "train" / GOOD).is_dir()


def train_samples(root: str | os.PathLike[str]) -> list[Sample]:
    """Normal training images: ``root/train/good`` of an MVTec category, else ``root`` itself."""
    root = Path(root)
    folder = root / "train" / GOOD if is_mvtec_category(root) else root
    return [Sample(path, 0, GOOD) for path in list_images(folder)]


def test_samples(root: str | os.PathLike[str]) -> list[Sample]:
    """Labelled test images of an MVTec-layout category.

    ``root/test/good/*`` are normal (label 0); every other ``root/test/<type>/*``
    is anomalous (label 1) with mask ``root/ground_truth/<type>/<stem>_mask.png``,
    or ``mask_path=None`` when that file does not exist. Empty type folders are
    ignored; no test images at all is a DatasetError.
    """
    root = Path(root)
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: folder not found; expected the MVTec layout root/test/<type>/*.png")
    samples: list[Sample] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        paths = sorted(p for p in type_dir.iterdir() if _is_image_file(p))
        for path in paths:
            if type_dir.name == GOOD:
                samples.append(Sample(path, 0, GOOD))
            else:
                mask = root / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
                samples.append(Sample(path, 1, type_dir.name, mask if mask.is_file() else None))
    if not samples:
        raise DatasetError(f"{test_dir}: no test images found in its <type>/ subfolders (accepted: {_accepted()})")
    return samples


# Not a pytest test, although its name says so (tests import it by this name).
test_samples.__test__ = False  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- decoding


class ImageStream:
    """Decode samples one at a time (memory stays at one image), optionally skipping bad ones.

    ``skipped`` lists ``(path, reason)`` for the files skipped during the latest pass.
    """

    def __init__(self, samples: Sequence[Sample], *, skip_bad: bool = False) -> None:
        self.samples = list(samples)
        self.skip_bad = skip_bad
        self.skipped: list[tuple[Path, str]] = []

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[tuple[Sample, np.ndarray]]:
        """Yield ``(sample, rgb)``; masks are not read (training needs none)."""
        self.skipped = []
        for sample in self.samples:
            try:
                rgb = load_image(sample.path)
            except ImageError as exc:
                self._skip(sample.path, exc)
                continue
            yield sample, rgb

    def images(self, sources: list[str] | None = None) -> Iterator[np.ndarray]:
        """Yield the decoded frames one by one (for ``fit``: memory holds one frame at a time,
        however large the dataset), appending each one's path to ``sources`` as it goes."""
        for sample, rgb in self:
            if sources is not None:
                sources.append(str(sample.path))
            yield rgb

    def with_masks(self) -> Iterator[tuple[Sample, np.ndarray, np.ndarray | None]]:
        """Yield ``(sample, rgb, mask)``; a mask that is unreadable or sized unlike
        its image makes the sample bad (raised, or skipped with ``skip_bad``)."""
        self.skipped = []
        for sample in self.samples:
            try:
                rgb = load_image(sample.path)
                mask = None if sample.mask_path is None else _load_mask_for(sample, rgb.shape[:2])
            except (ImageError, DatasetError) as exc:
                self._skip(sample.path, exc)
                continue
            yield sample, rgb, mask

    def _skip(self, path: Path, exc: ImageError | DatasetError) -> None:
        if not self.skip_bad:
            raise exc
        self.skipped.append((path, str(exc)))
        warnings.warn(f"skipping {path}: {exc}", SkippedImageWarning, stacklevel=3)


def _load_mask_for(sample: Sample, image_hw: tuple[int, int]) -> np.ndarray:
    assert sample.mask_path is not None
    mask = load_mask(sample.mask_path, None)
    if mask.shape != tuple(image_hw):
        raise DatasetError(
            f"{sample.mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image "
            f"{sample.path} is {image_hw[0]}x{image_hw[1]}; a mask must have exactly the size of its image"
        )
    return mask
