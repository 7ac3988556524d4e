"""Labelled defects (issue #15.5): anomaly bank, sharpened score, re-fitted threshold, bundle + camera."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgecore.data.dents import write_dents
from tests.conftest import recompute_hashes

DENT_DELTA, DENT_RADIUS, DENTS, LABELLED = 35, 8, 10, 3


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A Lite0 model on synthetic parts, dents (3 labelled, 7 held out), the labelled model, crops."""
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.data.synthetic import make_synthetic_dataset
    from edgecore.labelled import LabelConfig, label_model, load_defects
    from edgecore.model import FitConfig, fit
    from edgecore.runtime.imageio import load_image
    from edgecore.runtime.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("labelled")
    category = make_synthetic_dataset(root, n_train=16, n_test_good=6 + DENTS, n_test_per_defect=1, size=128, seed=0)
    goods = sorted((category / "test" / "good").glob("*.png"))
    dents = write_dents(goods[6:], root / "dents", delta=DENT_DELTA, radius=DENT_RADIUS)
    samples = train_samples(category)
    config = FitConfig(device="cpu", preprocess=PreprocessConfig(128, 112), val_ratio=0.25)
    model = fit([rgb for _, rgb in ImageStream(samples)], config, sources=[str(s.path) for s in samples])
    model_dir = model.save(root / "model")
    labelled = label_model(model, load_defects(dents, per_type=LABELLED), LabelConfig(), source=str(dents))
    labelled_dir = labelled.save(root / "labelled")
    crop = lambda paths: np.stack([preprocess(load_image(p), model.preprocess_config) for p in paths])  # noqa: E731
    held_out = sorted((dents / "test" / "dent").glob("*.png"))[LABELLED:]
    return {"model": model, "model_dir": model_dir, "labelled": labelled, "labelled_dir": labelled_dir,
            "dents": dents, "held_out": crop(held_out), "good": crop(goods[:6]), "root": root}


def test_labelled_dents_raise_recall_at_the_threshold_without_more_false_alarms(case):
    model, labelled = case["model"], case["labelled"]
    recall_before = np.mean(model.decision.is_anomalous(model.score_crops(case["held_out"]).image))
    recall_after = np.mean(labelled.decision.is_anomalous(labelled.score_crops(case["held_out"]).image))
    assert recall_after > recall_before, (recall_before, recall_after)
    alarms_before = np.sum(model.decision.is_anomalous(model.score_crops(case["good"]).image))
    alarms_after = np.sum(labelled.decision.is_anomalous(labelled.score_crops(case["good"]).image))
    assert alarms_after <= alarms_before
    info = labelled.config["labelled"]
    assert info["types"] == {"dent": LABELLED} and info["shape"][0] == min(info["candidate_patches"], 1024) >= 1
    assert labelled.threshold >= info["threshold_normal_only"] == model.threshold  # same false-alarm guarantee


def test_sharpened_distance_never_drops_below_the_normal_one(case):
    model, labelled = case["model"], case["labelled"]
    features = model.embed(np.concatenate([case["held_out"], case["good"]]))
    plain, sharp = model.scorer.search_patches(features)[0], labelled.scorer.search_patches(features)[0]
    assert (sharp >= plain).all() and (sharp > plain).any()


def test_without_labels_scores_are_bit_identical(case):
    from edgecore.model import PatchCoreModel
    from edgecore.runtime.anomaly_bank import AnomalyBank

    model = case["model"]
    crops = np.concatenate([case["held_out"], case["good"]])
    reference = model.score_crops(crops)
    reloaded = PatchCoreModel.load(case["model_dir"], device="cpu")  # `label -o` left the fitted model as it was
    assert "labelled" not in reloaded.config and reloaded.anomaly_bank is None
    assert np.array_equal(reloaded.score_crops(crops).image, reference.image)
    # A bank that no patch is nearer than the normal one changes nothing, to the bit.
    far = AnomalyBank(np.full((4, model.memory_bank.shape[1]), 1e4, np.float32), weight=5.0)
    features = model.embed(crops)
    distances, ids = model.scorer.search_patches(features)
    assert np.array_equal(far.sharpen(distances, features), distances)


def test_labelled_model_round_trips_and_refuses_a_missing_bank(case, tmp_path):
    from edgecore.model import PatchCoreModel
    from edgecore.runtime.errors import ModelError

    reloaded = PatchCoreModel.load(case["labelled_dir"], device="cpu")
    assert np.array_equal(reloaded.score_crops(case["held_out"]).image,
                          case["labelled"].score_crops(case["held_out"]).image)
    broken = Path(shutil.copytree(case["labelled_dir"], tmp_path / "broken"))
    config = json.loads((broken / "config.json").read_text())
    config["labelled"]["shape"][1] += 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="labelled"):
        PatchCoreModel.load(broken, device="cpu")


@pytest.fixture(scope="module")
def labelled_bundle(case):
    from edgecore.export.bundle import export_bundle

    return export_bundle(case["labelled_dir"], case["root"] / "labelled.edgecore", index_dtype="fp32", search="exact")


def test_camera_fp32_reproduces_the_host_sharpened_scores(case, labelled_bundle):
    from edgecore.runtime.detector import Detector

    crops = np.concatenate([case["held_out"], case["good"]])
    host = case["labelled"].score_crops(crops).image
    with Detector.open(labelled_bundle, precision="fp32") as detector:
        assert detector.scorer.anomaly is not None
        camera = detector.score_crops(crops).image
        assert detector.threshold == case["labelled"].threshold
    np.testing.assert_allclose(camera, host, rtol=1e-3)
    plain = case["model"].score_crops(crops).image
    assert np.max(np.abs(host - plain) / plain) > 0.05  # the camera really ran the anomaly bank


def _expect_refused(bundle: Path, match: str) -> None:
    from edgecore.runtime.detector import Detector
    from edgecore.runtime.errors import BundleError

    with pytest.raises(BundleError, match=match):
        Detector.open(bundle, precision="fp32").close()


@pytest.mark.parametrize("tamper", ["bytes", "nan", "dim", "unlisted", "weight"])
def test_tampered_anomaly_bank_is_refused(labelled_bundle, tmp_path, tamper):
    bundle = Path(shutil.copytree(labelled_bundle, tmp_path / labelled_bundle.name))
    manifest = json.loads((bundle / "manifest.json").read_text())
    bank_path = bundle / manifest["labelled"]["file"]
    if tamper == "bytes":  # hashed: any change is caught by verify
        data = bytearray(bank_path.read_bytes())
        data[-1] ^= 0xFF
        bank_path.write_bytes(bytes(data))
        return _expect_refused(bundle, "sha256")
    if tamper == "nan":  # re-hashed: only the runtime's own check stands between it and a verdict
        bank = np.load(bank_path)
        bank[0, 0] = np.nan
        np.save(bank_path, bank, allow_pickle=False)
        recompute_hashes(bundle)
        return _expect_refused(bundle, "NaN")
    if tamper == "dim":
        manifest["labelled"]["shape"][1] += 1
        match = "embed_dim"
    elif tamper == "unlisted":
        del manifest["files"][manifest["labelled"]["file"]]
        match = "not listed"
    else:
        manifest["labelled"]["weight"] = float("nan")
        match = "weight"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _expect_refused(bundle, match)


def test_cli_label_writes_a_labelled_model(case, tmp_path):
    from typer.testing import CliRunner

    from edgecore.cli import app

    out = tmp_path / "cli-labelled"
    result = CliRunner().invoke(app, ["label", str(case["model_dir"]), str(case["dents"]), "-o", str(out),
                                      "--per-type", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{"):])
    assert summary["types"] == {"dent": 2} and (out / "config.json").is_file()
    assert summary["threshold_normal_only"] == case["model"].threshold
