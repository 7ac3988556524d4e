"""Region of interest (ROI) on the feature grid: which patches are inspected at all.

An ROI is drawn in the frame coordinates of the fit images (``edgecore fit --roi``;
host side: :mod:`edgecore.roi`). It goes through the ONE preprocessing placement
(:meth:`PreprocessConfig.placement`) onto the map and then onto the feature grid:

    **rule**: a patch is inside when at least half of its feature cell (the map
    pixels its grid cell stands for, area-averaged) lies inside the ROI; padding
    added by the placement counts as outside.

Patches outside are left out of the coreset, of the nearest-neighbour search, of
the image score and of the map (0 there: not inspected). This is feature
hard-masking: a patch inside still sees the pixels of its receptive field, so
clutter right at the ROI's edge can reach it; far-away clutter cannot.

The camera stores only the grid mask (``roi.npy``, uint8 0/1, one byte a patch)
and the frame size it was drawn for. A frame of that size, or of the same aspect
ratio (within :data:`ASPECT_TOLERANCE`, e.g. a binned sensor mode), is masked with
the ROI scaled along (the placement depends on the aspect only); any other frame
is refused with :class:`RoiFrameError`, because the ROI would cover another part
of the scene.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from edgecore.runtime.errors import BundleError, ImageError
from edgecore.runtime.preprocess import PreprocessConfig, _place

ROI_FILE = "roi.npy"
RULE = "cell-half"  # a patch is inside when >= half of its feature cell is inside the ROI
ASPECT_TOLERANCE = 0.01  # relative; 1 % of a 28-cell side is a third of a cell


class RoiFrameError(ImageError):
    """A frame whose aspect ratio differs from the frame the ROI was drawn on: no verdict."""


@dataclass(frozen=True)
class RoiMask:
    """Args: inside: bool grid (h, w), True = inspected; frame_size: (height, width) of the
    frames the ROI was drawn on; source: where it came from (recorded, never read)."""

    inside: np.ndarray
    frame_size: tuple[int, int]
    source: str = ""

    @cached_property
    def flat(self) -> np.ndarray:
        """Indices of the inspected patches in the N×P patch order (row-major grid)."""
        return np.flatnonzero(self.inside.ravel())

    def check_frame(self, height: int, width: int) -> None:
        """Refuse a frame the ROI cannot be placed on (another aspect ratio than at fit)."""
        fit_h, fit_w = self.frame_size
        if (height, width) != (fit_h, fit_w) and abs(height * fit_w / (width * fit_h) - 1.0) > ASPECT_TOLERANCE:
            raise RoiFrameError(
                f"frame is {height}x{width} px but the ROI was drawn on {fit_h}x{fit_w} frames (another aspect "
                f"ratio: the ROI would cover another part of the scene); refit with an ROI for this frame size"
            )

    def map_mask(self, map_hw: tuple[int, int]) -> np.ndarray:
        """bool map_h×map_w: each map pixel takes its grid cell's inside/outside (nearest cell)."""
        grid_h, grid_w = self.inside.shape
        rows = np.minimum(((np.arange(map_hw[0]) + 0.5) * grid_h / map_hw[0]).astype(int), grid_h - 1)
        cols = np.minimum(((np.arange(map_hw[1]) + 0.5) * grid_w / map_hw[1]).astype(int), grid_w - 1)
        return self.inside[np.ix_(rows, cols)]

    def to_manifest(self, file: str = ROI_FILE) -> dict:
        """The ``roi`` section of config.json / manifest.json."""
        return {
            "file": file, "grid": list(self.inside.shape), "frame_size": list(self.frame_size),
            "inside_patches": int(self.inside.sum()), "rule": RULE, "source": self.source,
        }

    def save(self, directory: Path, file: str = ROI_FILE) -> None:
        np.save(Path(directory) / file, self.inside.astype(np.uint8), allow_pickle=False)


def grid_mask(frame_mask: np.ndarray, config: PreprocessConfig, grid: tuple[int, int]) -> np.ndarray:
    """bool H×W ROI in frame pixels → bool grid (h, w), by the module's rule (see the docstring)."""
    if config.aspect == "tile":
        raise ValueError("--roi with --aspect tile is not supported yet (the ROI would need one mask per tile); "
                         "use pad/crop/squash, or no ROI")
    height, width = frame_mask.shape
    rh, rw, _, _ = config.placement(height, width)
    coverage = Image.fromarray(frame_mask.astype(np.float32)).resize((rw, rh), Image.Resampling.BOX)
    placed = _place(np.asarray(coverage, dtype=np.float32), config, height, width, 0.0)
    cells = Image.fromarray(np.ascontiguousarray(placed)).resize((grid[1], grid[0]), Image.Resampling.BOX)
    return np.asarray(cells) >= 0.5 - 1e-6


# --- the manifest section and the array, checked fail closed -----------------------------
def validate_roi_section(manifest: dict, where: str) -> None:
    """``roi`` (optional): a safe file name, the features' grid, a frame size, a positive count."""
    roi = manifest.get("roi")
    if roi is None:
        return
    if not isinstance(roi, dict):
        raise BundleError(f"{where}.roi: expected an object, got {type(roi).__name__}")
    name = roi.get("file")
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith((".", "~")):
        raise BundleError(f"{where}.roi.file: expected a plain file name in the bundle, got {name!r}")
    grid = roi.get("grid")
    if grid != manifest.get("features", {}).get("grid"):
        raise BundleError(f"{where}.roi.grid: {grid!r} disagrees with features.grid {manifest['features']['grid']!r}")
    for key in ("frame_size",):
        size = roi.get(key)
        if not (isinstance(size, list) and len(size) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise BundleError(f"{where}.roi.{key}: expected [height, width] positive integers, got {size!r}")
    count = roi.get("inside_patches")
    if not (isinstance(count, int) and not isinstance(count, bool) and 0 < count <= grid[0] * grid[1]):
        raise BundleError(f"{where}.roi.inside_patches: expected 1..{grid[0] * grid[1]}, got {count!r}")
    if roi.get("rule") != RULE:
        raise BundleError(f"{where}.roi.rule: {roi.get('rule')!r}, but this runtime implements only {RULE!r}")
    if manifest.get("preprocess", {}).get("aspect") == "tile":
        raise BundleError(f"{where}.roi: an ROI on a tiled bundle is not supported; refused")


def load_roi(directory: Path, section: dict | None, error: type[Exception] = BundleError) -> RoiMask | None:
    """Read and check ``roi.npy`` against its (already validated) section; None when there is no ROI.

    Refused (``error``): unreadable, not uint8, another shape than the grid, a value other
    than 0/1, no patch inside, or a count that disagrees with the section.
    """
    if section is None:
        return None
    path = Path(directory) / section["file"]
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise error(f"{path}: unreadable ROI mask: {exc}") from None
    grid = tuple(section["grid"])
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.shape != grid:
        kind = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise error(f"{path}: expected a uint8 {grid[0]}x{grid[1]} mask (the feature grid), got {kind}")
    if not np.isin(array, (0, 1)).all():
        raise error(f"{path}: ROI mask values must be 0 or 1, found {sorted(set(np.unique(array).tolist()))[:8]}")
    inside = int(array.sum())
    if inside == 0:
        raise error(f"{path}: the ROI mask is all zero: no patch would be inspected; refused")
    if inside != section["inside_patches"]:
        raise error(f"{path}: {inside} patches inside, the manifest says {section['inside_patches']}")
    return RoiMask(array.astype(bool), (int(section["frame_size"][0]), int(section["frame_size"][1])),
                   str(section.get("source", "")))
