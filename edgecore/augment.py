"""Rotation / flip augmentation of the memory bank (#15 item 4, seed §5.1 weakness 1).

PatchCore's bank only knows the orientations it saw: a normal part turned by 90°
has patches (edges, threads, labels) in directions the bank never held, so it
scores as a defect. ``fit --augment rot90,hflip`` adds the training frames turned
or flipped to the bank (never to the validation split, which must stay the line's
real frames so the threshold means what it says).

Each transform acts on the decoded *frame*, then the one preprocessing runs on
the result, exactly as a turned part would reach the camera: a 400 × 300 frame
rotated by 90° is a 300 × 400 frame, resized/padded into the same graph input.
Cost: the bank grows by (1 + transforms) × before the coreset (fit time and, at a
fixed coreset ratio, bundle size); it is recorded in ``coreset.augment``.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]

TRANSFORMS: dict[str, Transform] = {
    "rot90": lambda frame: np.rot90(frame, 1),  # counter-clockwise, as np.rot90
    "rot180": lambda frame: np.rot90(frame, 2),
    "rot270": lambda frame: np.rot90(frame, 3),
    "hflip": lambda frame: frame[:, ::-1],
    "vflip": lambda frame: frame[::-1],
}


def parse_augment(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """Validated transform names from ``"rot90,hflip"`` (or a sequence); ``""``/``"off"`` → none.

    Raises:
        ValueError: on an unknown or repeated name (before any frame is read).
    """
    if spec is None:
        return ()
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if names == ["off"]:
        return ()
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(unknown)}; available: {', '.join(TRANSFORMS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"augmentation names repeat: {','.join(names)}")
    return tuple(names)


def augmented_frames(frame: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """The frame under each transform (contiguous copies, same dtype; H and W swap for rot90/270)."""
    return [np.ascontiguousarray(TRANSFORMS[name](frame)) for name in names]


def augment_record(names: Sequence[str], patches_before: int, patches_after: int) -> dict:
    """The ``coreset.augment`` provenance record (config.json and the bundle manifest)."""
    return {"transforms": list(names), "bank_patches_unaugmented": int(patches_before),
            "bank_patches": int(patches_after)}
