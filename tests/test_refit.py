"""The operating point survives the camera (#15.8): bundles carry the validation images and the
default compile re-fits threshold + normalisation on its own engine, recording the score shift."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgecore.runtime.detector import Detector


def _fit_with_sources(category: Path, out: Path) -> Path:
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.model import FitConfig, fit
    from edgecore.runtime.preprocess import PreprocessConfig

    sources: list[str] = []
    config = FitConfig(device="cpu", preprocess=PreprocessConfig(128, 112), val_ratio=0.25)
    return fit(ImageStream(train_samples(category)).images(sources), config, sources=sources).save(out)


@pytest.fixture(scope="module")
def category_copy(synthetic_category, tmp_path_factory) -> Path:
    return Path(shutil.copytree(synthetic_category, tmp_path_factory.mktemp("refit") / "part"))


@pytest.fixture(scope="module")
def bundle_with_validation(category_copy, tmp_path_factory) -> Path:
    from edgecore.export.bundle import export_bundle

    model_dir = _fit_with_sources(category_copy, tmp_path_factory.mktemp("refit-model") / "m")
    return export_bundle(model_dir, tmp_path_factory.mktemp("refit-bundle") / "part.edgecore")


def test_default_int8_compile_refits_on_the_engine_and_records_the_shift(bundle_with_validation, category_copy, tmp_path):
    from edgecore.export.compile import compile_openvino
    from edgecore.export.validation import load_validation
    from edgecore.runtime.thresholds import threshold_config

    bundle = Path(shutil.copytree(bundle_with_validation, tmp_path / "b.edgecore"))
    lines: list[str] = []
    manifest = compile_openvino(bundle, "int8", calib=category_copy, num_calib=4, log=lines.append)
    assert manifest["validation"]["images"] == 4 and manifest["validation"]["file"] in manifest["files"]
    entry = manifest["engines"]["openvino-int8"]
    assert entry["threshold"]["source"] == "bundle validation images"
    fitted = manifest["threshold"]
    stored = load_validation(bundle, manifest)
    with Detector.open(bundle, precision="int8") as detector:
        engine_scores = detector.score_crops(stored).image
        assert detector.threshold == entry["threshold"]["value"]  # the camera decides with the engine's own boundary
    expected = threshold_config(engine_scores, fitted["false_alarm_rate"], held_out=True)
    assert entry["threshold"]["value"] == pytest.approx(expected["value"], rel=1e-9)
    assert entry["threshold"]["normalization"] == pytest.approx(expected["normalization"], rel=1e-9)
    fp32 = np.asarray(fitted["validation_scores"])
    shift = entry["score_shift"]
    assert shift["images"] == 4 and shift["threshold_fp32"] == fitted["value"]
    assert shift["mean_relative"] == pytest.approx(float(np.mean((engine_scores - fp32) / fp32)), rel=1e-6, abs=1e-9)
    assert any("score shift" in line and "int8" in line for line in lines), lines


def test_fp32_engine_shift_is_within_the_contract_and_keep_threshold_keeps_it(bundle_with_validation, tmp_path):
    from edgecore.export.compile import compile_openvino

    bundle = Path(shutil.copytree(bundle_with_validation, tmp_path / "b.edgecore"))
    entry = compile_openvino(bundle, "fp32")["engines"]["openvino-fp32"]
    # int8 index (the default export) + fp32 engine: the host's fp32 scores within the issue-#4 bounds
    assert entry["score_shift"]["max_abs_relative"] < 2e-2
    kept = compile_openvino(bundle, "fp32", keep_threshold=True)["engines"]["openvino-fp32"]
    assert "threshold" not in kept and "score_shift" not in kept


def test_changed_or_missing_validation_images_are_not_stored(category_copy, exported_bundle, tmp_path):
    from edgecore.export.bundle import export_bundle
    from edgecore.export.compile import compile_openvino

    data = Path(shutil.copytree(category_copy, tmp_path / "part"))
    model_dir = _fit_with_sources(data, tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    first, other = config["fit"]["validation_sources"][0], sorted((data / "train" / "good").iterdir())[0]
    assert Path(first) != other
    shutil.copyfile(other, first)  # a validation image replaced after fit: its stored score no longer holds
    lines: list[str] = []
    bundle = export_bundle(model_dir, tmp_path / "b.edgecore", log=lines.append)
    assert "validation" not in json.loads((bundle / "manifest.json").read_text())
    assert any("changed since fit" in line for line in lines), lines
    lines.clear()
    legacy = Path(shutil.copytree(exported_bundle, tmp_path / "legacy.edgecore"))  # fitted without sources
    entry = compile_openvino(legacy, "fp32", log=lines.append)["engines"]["openvino-fp32"]
    assert "threshold" not in entry and any("no validation images" in line for line in lines)
