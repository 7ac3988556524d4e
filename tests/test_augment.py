"""fit --augment (#15 item 4): rotated/flipped training frames in the bank.

A tall synthetic shaft turned by 90° lies across the frame: without augmentation
the bank has never seen it (false alarm); with rot90 in the bank it is normal,
and an (upright) defect is still found.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgecore.augment import TRANSFORMS, augmented_frames, parse_augment
from edgecore.runtime.bundle import validate_manifest
from edgecore.runtime.errors import BundleError
from edgecore.runtime.preprocess import PreprocessConfig, preprocess

PRE = PreprocessConfig(aspect="pad", input_size=(224, 64))  # the shaft's own aspect: 64 × 224 frames


@pytest.fixture(scope="module")
def shafts(tmp_path_factory):
    from edgecore.data.datasets import ImageStream, test_samples, train_samples
    from edgecore.data.tall_parts import make_tall_parts_dataset

    root = make_tall_parts_dataset(tmp_path_factory.mktemp("aug"), n_train=12, n_test_good=4, n_test_per_defect=2)
    train = [rgb for _, rgb in ImageStream(train_samples(root))]
    tests = list(ImageStream(test_samples(root)))
    return train, tests


@pytest.fixture(scope="module")
def models(shafts):
    from edgecore.model import FitConfig, fit

    train, _ = shafts
    config = dict(device="cpu", preprocess=PRE, val_ratio=0.25, coreset_ratio=0.25)
    return {aug: fit(train, FitConfig(augment=aug, **config)) for aug in ((), ("rot90",))}


def _scores(model, frames):
    return model.score_crops(np.stack([preprocess(f, PRE) for f in frames]), 8).image


def test_parse_validates_names():
    assert parse_augment("rot90, hflip") == ("rot90", "hflip")
    assert parse_augment("off") == () and parse_augment(None) == ()
    with pytest.raises(ValueError, match="unknown augmentation rot45"):
        parse_augment("rot90,rot45")
    with pytest.raises(ValueError, match="repeat"):
        parse_augment("hflip,hflip")


def test_non_square_frame_is_turned_then_preprocessed():
    frame = np.arange(30 * 50 * 3, dtype=np.uint8).reshape(30, 50, 3)
    turned = augmented_frames(frame, tuple(TRANSFORMS))
    assert [f.shape for f in turned] == [(50, 30, 3), (30, 50, 3), (50, 30, 3), (30, 50, 3), (30, 50, 3)]
    assert np.array_equal(turned[1], frame[::-1, ::-1]) and np.array_equal(turned[3], frame[:, ::-1])
    for f in turned:  # every turned frame reaches the one graph input
        assert preprocess(f, PRE).shape == (224, 64, 3)


def test_rotated_part_false_alarm_without_normal_with(models, shafts):
    _, tests = shafts
    goods = [np.rot90(rgb) for s, rgb in tests if s.label == 0]
    plain, augmented = models[()], models[("rot90",)]
    assert (_scores(plain, goods) > plain.threshold).all()  # never seen lying across: every one alarms
    assert (_scores(augmented, goods) <= augmented.threshold).all()


def test_defect_still_found_with_augmentation(models, shafts):
    _, tests = shafts
    # upright defects only: a turned 64 × 224 shaft padded into the 224 × 64 input is 18 px tall, its
    # pits too small to see at any bank (a resolution limit of one static input, not of the bank)
    model = models[("rot90",)]
    defects = [rgb for s, rgb in tests if s.label == 1]
    assert (_scores(model, defects) > model.threshold).all()


def test_cost_and_provenance_recorded(models, tmp_path):
    from edgecore.export.bundle import export_bundle

    record = models[("rot90",)].config["coreset"]["augment"]
    assert record["transforms"] == ["rot90"]
    assert record["bank_patches"] == 2 * record["bank_patches_unaugmented"] == models[("rot90",)].config["coreset"]["bank_patches"]
    assert "augment" not in models[()].config["coreset"]
    model_dir = models[("rot90",)].save(tmp_path / "m")
    assert json.loads((model_dir / "config.json").read_text())["coreset"]["augment"] == record
    bundle = export_bundle(model_dir, tmp_path / "b.edgecore")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["coreset"]["augment"] == record
    validate_manifest(manifest)
    for bad in ({**record, "transforms": ["rot45"]}, {**record, "bank_patches": record["bank_patches"] + 1}):
        manifest["coreset"]["augment"] = bad
        with pytest.raises(BundleError, match="coreset.augment"):
            validate_manifest(manifest)


def test_augment_refused_with_roi(shafts, tmp_path):
    from edgecore.model import FitConfig, fit
    from edgecore.roi import RoiSource

    polygon = tmp_path / "roi.json"
    polygon.write_text("[[0, 0], [63, 0], [63, 223], [0, 223]]")
    with pytest.raises(ValueError, match="--augment is not available with --roi"):
        fit(shafts[0][:4], FitConfig(device="cpu", preprocess=PRE, augment=("rot90",)), roi=RoiSource(polygon))
    with pytest.raises(ValueError, match="unknown augmentation spin"):
        FitConfig(augment=("spin",))
