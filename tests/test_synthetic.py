"""The synthetic MVTec-layout generator: layout, determinism, masks that match the defects."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgecore.data import DEFECT_TYPES, make_synthetic_dataset
from edgecore.runtime.errors import DatasetError
from edgecore.runtime.imageio import load_image, load_mask

SIZE = 128
COUNTS = {"n_train": 6, "n_test_good": 3, "n_test_per_defect": 3}


def _files(category: Path) -> dict[str, bytes]:
    return {p.relative_to(category).as_posix(): p.read_bytes() for p in sorted(category.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("a"), size=SIZE, seed=7, **COUNTS)


def test_layout_and_counts(category: Path) -> None:
    assert category.name == "part"
    names = set(_files(category))
    expected = {f"train/good/{i:03d}.png" for i in range(6)} | {f"test/good/{i:03d}.png" for i in range(3)}
    for defect in DEFECT_TYPES:
        expected |= {f"test/{defect}/{i:03d}.png" for i in range(3)}
        expected |= {f"ground_truth/{defect}/{i:03d}_mask.png" for i in range(3)}
    assert names == expected
    assert set(DEFECT_TYPES) == {"scratch", "spot", "missing"}
    assert load_image(category / "train/good/000.png").shape == (SIZE, SIZE, 3)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, category: Path) -> None:
    again = make_synthetic_dataset(tmp_path / "b", size=SIZE, seed=7, **COUNTS)
    assert _files(again) == _files(category)
    other = _files(make_synthetic_dataset(tmp_path / "c", size=SIZE, seed=8, **COUNTS))
    mine = _files(category)
    assert other.keys() == mine.keys()
    assert all(other[name] != mine[name] for name in mine if not name.startswith("ground_truth"))


def test_counts_do_not_change_other_images(tmp_path: Path, category: Path) -> None:
    """Images are seeded individually: more training images leave the test set alone."""
    bigger = _files(make_synthetic_dataset(tmp_path, size=SIZE, seed=7, n_train=8, n_test_good=3, n_test_per_defect=3))
    mine = _files(category)
    assert {k: v for k, v in bigger.items() if k.startswith("test")} == {k: v for k, v in mine.items() if k.startswith("test")}


def test_normal_images_vary(category: Path) -> None:
    a = load_image(category / "train/good/000.png").astype(int)
    b = load_image(category / "train/good/001.png").astype(int)
    assert 0 < np.abs(a - b).mean() < 40  # varied, but the same part


def test_masks_cover_visible_defects_on_the_part(category: Path) -> None:
    normal = np.mean([load_image(p).astype(float) for p in sorted((category / "train/good").glob("*.png"))], axis=0)
    part = np.abs(normal - normal[0, 0]).sum(axis=2) > 60  # clearly not background
    for defect, (low, high) in {"scratch": (0.001, 0.02), "spot": (0.018, 0.065), "missing": (0.018, 0.065)}.items():
        for image in sorted((category / "test" / defect).glob("*.png")):
            rgb = load_image(image).astype(float)
            mask = load_mask(category / "ground_truth" / defect / f"{image.stem}_mask.png", rgb.shape[:2])
            assert low <= mask.mean() <= high, (image, mask.mean())
            assert part[mask].mean() > 0.7, f"{image}: defect not on the part"
            # |image - mean normal| summed over RGB: shifts, noise and jitter stay well
            # below 75 outside the mask; every defect is far above it inside.
            change = np.abs(rgb - normal).sum(axis=2)
            assert np.median(change[mask]) > 150, f"{image}: defect not clearly visible"
            assert np.median(change[~mask & part]) < 75, f"{image}: changes outside the mask"


def test_mask_files_are_binary_l(category: Path) -> None:
    from PIL import Image

    for mask in sorted((category / "ground_truth").rglob("*.png")):
        with Image.open(mask) as img:
            assert img.mode == "L"
            assert set(np.unique(np.asarray(img)).tolist()) == {0, 255}


def test_refuses_non_empty_target(category: Path) -> None:
    with pytest.raises(DatasetError, match="not empty"):
        make_synthetic_dataset(category.parent, size=SIZE, seed=7, **COUNTS)


def test_rejects_too_small_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        make_synthetic_dataset(tmp_path, size=16)
