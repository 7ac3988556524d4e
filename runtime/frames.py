"""Which files are frames, and the output name each one gets (host and camera alike).

Output names mirror each frame's path relative to the common folder of every
input, so two ``000.png`` from ``good/`` and ``broken/`` never overwrite each
other, and the same inputs always give the same names.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgecore.runtime.errors import DatasetError
from edgecore.runtime.imageio import load_image
from edgecore.runtime.preprocess import PreprocessConfig, preprocess
from edgecore.runtime.tiles import cut_tiles

#: File extensions treated as images (compared case-insensitively): one per format in
#: ``imageio.ALLOWED_FORMATS``. The one list of host, camera CLI and ``serve``'s watched folder.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".webp", ".gif",
)


def is_image_file(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def accepted_extensions() -> str:
    return " ".join(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside ``folder``, sorted (deterministic across machines).

    Hidden files (``.*``, e.g. macOS ``._x.png`` droppings) are ignored. An
    empty result is an error: training on nothing is never what the user meant.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DatasetError(f"{folder}: folder not found")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder")
    images = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not images:
        raise DatasetError(f"{folder}: no images found (accepted: {accepted_extensions()}){_subfolder_hint(folder)}")
    return images


def _subfolder_hint(folder: Path) -> str:
    """Point at subfolders: the usual mistake is passing the dataset root, not a category."""
    subs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        return ""
    shown = ", ".join(subs[:5]) + (", ..." if len(subs) > 5 else "")
    return f"; it has subfolders ({shown}) - did you mean one of them?"


def expand_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders as their images; each file once (first mention wins)."""
    images: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        for image in list_images(path) if path.is_dir() else [path]:
            key = Path(os.path.realpath(image))
            if key not in seen:
                seen.add(key)
                images.append(image)
    return images


def output_names(images: list[Path], suffix: str = ".png") -> dict[Path, str]:
    """A unique, stable relative output name per input image.

    Args:
        images: the frames, as :func:`expand_images` returns them.
        suffix: the output file type.

    Returns:
        image → POSIX relative path: the image's path relative to the deepest
        folder that holds every input, with ``suffix``. ``a/x.png`` and
        ``a/x.jpg`` in one run become ``a/x.png`` and ``a/x.jpg.png``.
    """
    resolved = [Path(os.path.realpath(image)) for image in images]
    if not resolved:
        return {}
    root = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for image, real in zip(images, resolved):
        relative = real.relative_to(root)
        name = relative.with_suffix(suffix).as_posix()
        if name.lower() in taken:  # x.png next to x.jpg: keep the source's own extension
            name = relative.as_posix() + suffix
        count = 1
        while name.lower() in taken:  # still taken (a file literally named x.jpg.png): number it
            count += 1
            name = f"{relative.as_posix()}.{count}{suffix}"
        taken.add(name.lower())
        names[image] = name
    return names


#: Calibration images used when ``--num-calib`` is not given.
DEFAULT_NUM_CALIB = 64


def calibration_crops(folder: str | Path, config: PreprocessConfig, count: int = DEFAULT_NUM_CALIB, seed: int = 0) -> np.ndarray:
    """A seeded random subset of ``count`` normal images → N×crop×crop×3 uint8.

    ``folder`` is an MVTec category (its ``train/good`` is used) or a plain folder of
    normal images. Torch-free: TensorRT calibrates on the camera itself.
    """
    if count < 1:
        raise ValueError(f"--num-calib must be >= 1, got {count}")
    folder = Path(folder)
    paths = list_images(folder / "train" / "good" if (folder / "train" / "good").is_dir() else folder)
    order = np.random.default_rng(seed).permutation(len(paths))[:count]
    # graph inputs: a tile bundle calibrates on its tiles
    return cut_tiles(np.stack([preprocess(load_image(paths[i]), config) for i in sorted(order)]), config)
