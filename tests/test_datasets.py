"""Dataset discovery (MVTec layout, plain folders) and ImageStream decoding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecore.data import (
    ImageStream,
    Sample,
    SkippedImageWarning,
    is_mvtec_category,
    list_images,
    make_synthetic_dataset,
    train_samples,
)
from edgecore.data import test_samples as find_test_samples
from edgecore.runtime.errors import DatasetError, ImageError


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    return make_synthetic_dataset(root, n_train=3, n_test_good=2, n_test_per_defect=2, size=64)


def _png(path: Path, size: tuple[int, int] = (8, 6), value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def test_mvtec_discovery(category: Path) -> None:
    assert is_mvtec_category(category)
    train = train_samples(category)
    assert [s.path.name for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in train)
    assert all(s.path.parent == category / "train" / "good" for s in train)

    test = find_test_samples(category)
    assert [(s.defect_type, s.path.name) for s in test] == [
        (t, f"00{i}.png") for t in ("good", "missing", "scratch", "spot") for i in range(2)
    ]
    for s in test:
        if s.defect_type == "good":
            assert s.label == 0 and s.mask_path is None
        else:
            assert s.label == 1
            assert s.mask_path == category / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"


def test_defect_without_mask_file_has_no_mask(tmp_path: Path) -> None:
    _png(tmp_path / "test" / "good" / "a.png")
    _png(tmp_path / "test" / "dent" / "b.png")
    (tmp_path / "test" / "empty_type").mkdir()
    samples = find_test_samples(tmp_path)
    assert samples == [
        Sample(tmp_path / "test" / "dent" / "b.png", 1, "dent", None),
        Sample(tmp_path / "test" / "good" / "a.png", 0, "good", None),
    ]
    rows = list(ImageStream(samples).with_masks())
    assert [mask for _, _, mask in rows] == [None, None]


def test_plain_folder_filters_sorts_and_ignores_hidden(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "c.tiff", ".hidden.png", "._a.jpg", "notes.txt", "d.webp", "e.ppm", "f.gif"):
        if name.endswith(".txt"):
            (tmp_path / name).write_text("x")
        else:
            _png(tmp_path / name)
    (tmp_path / "sub.png").mkdir()  # a folder with an image-like name is not an image
    assert not is_mvtec_category(tmp_path)
    expected = ["a.jpg", "b.PNG", "c.tiff", "d.webp", "e.ppm", "f.gif"]  # every allowed format's extension
    assert [p.name for p in list_images(tmp_path)] == expected
    assert [s.path.name for s in train_samples(tmp_path)] == expected


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"empty: no images found \(accepted: \.png .*\.webp \.gif\)"):
        list_images(tmp_path / "empty")
    with pytest.raises(DatasetError, match="nowhere: folder not found"):
        train_samples(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="not a folder"):
        list_images(tmp_path / "empty" / "readme.txt")
    with pytest.raises(DatasetError, match=r"test: folder not found"):
        find_test_samples(tmp_path / "empty")
    (tmp_path / "empty" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no test images"):
        find_test_samples(tmp_path / "empty")


def test_dataset_root_instead_of_category_gets_a_hint(category: Path) -> None:
    with pytest.raises(DatasetError, match=r"subfolders \(part\)"):
        train_samples(category.parent)


def test_stream_decodes_in_order(category: Path) -> None:
    samples = train_samples(category)
    stream = ImageStream(samples)
    assert len(stream) == 3
    rows = list(stream)
    assert [s for s, _ in rows] == samples
    assert all(rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8 for _, rgb in rows)
    assert stream.skipped == []


def test_skip_bad_counts_and_warns(tmp_path: Path) -> None:
    for name in ("a.png", "c.png", "d.png"):
        _png(tmp_path / name)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not a png at all")
    samples = train_samples(tmp_path)

    stream = ImageStream(samples, skip_bad=True)
    with pytest.warns(SkippedImageWarning, match=r"b\.png"):
        kept = [s.path.name for s, _ in stream]
    assert kept == ["a.png", "c.png", "d.png"]
    assert len(stream.skipped) == 1
    path, reason = stream.skipped[0]
    assert path == bad and "not an image" in reason

    with pytest.raises(ImageError, match=r"b\.png: not an image"):
        list(ImageStream(samples))


def test_mask_size_mismatch_names_both_files(tmp_path: Path, category: Path) -> None:
    samples = [s for s in find_test_samples(category) if s.defect_type == "spot"]
    # Copy the category's spot images elsewhere with one mask of the wrong size.
    root = tmp_path / "cat"
    copies = []
    for s in samples:
        image = root / "test" / "spot" / s.path.name
        mask = root / "ground_truth" / "spot" / f"{s.path.stem}_mask.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        mask.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(s.path.read_bytes())
        assert s.mask_path is not None
        mask.write_bytes(s.mask_path.read_bytes())
        copies.append(Sample(image, 1, "spot", mask))
    wrong = copies[1].mask_path
    assert wrong is not None
    Image.new("L", (32, 64), 255).save(wrong)

    stream = ImageStream(copies)
    with pytest.raises(DatasetError, match=r"001_mask\.png: mask is 64x32 \(HxW\) but its image .*001\.png is 64x64"):
        list(stream.with_masks())

    stream = ImageStream(copies, skip_bad=True)
    with pytest.warns(SkippedImageWarning, match=r"001_mask\.png"):
        rows = list(stream.with_masks())
    assert [s.path.name for s, _, _ in rows] == ["000.png"]
    mask = rows[0][2]
    assert mask is not None and mask.dtype == bool and mask.shape == (64, 64) and mask.any()
    assert stream.skipped == [(copies[1].path, stream.skipped[0][1])]


def test_skipped_is_reset_per_pass(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"")
    stream = ImageStream(train_samples(tmp_path), skip_bad=True)
    with pytest.warns(SkippedImageWarning):
        list(stream)
        list(stream)
    assert [p.name for p, _ in stream.skipped] == ["b.png"]
