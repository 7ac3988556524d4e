"""fit --denoise (#15.3): defective images hidden in the training set are flagged and kept out of the bank.

The contaminated set: the synthetic washers plus re-captures (sensor noise) of the test set's ``spot``
parts. Plain PatchCore memorises those spots and scores the test spots as normal; the robust fit drops
exactly the re-captures and catches them. Random-init Lite0 at 128→112 px keeps each fit under a second.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgecore.data.datasets import ImageStream, test_samples, train_samples
from edgecore.data.synthetic import make_synthetic_dataset, save_png
from edgecore.denoise import parse_denoise, screen_validation, select_clean_images
from edgecore.evaluation import evaluate, load_test_set
from edgecore.model import FitConfig, fit
from edgecore.runtime.errors import BundleError
from edgecore.runtime.preprocess import PreprocessConfig

POISON = "spot"


@pytest.fixture(scope="module")
def contaminated(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(synthetic category, contaminated training folder, names of the contaminating files)."""
    root = tmp_path_factory.mktemp("denoise")
    category = make_synthetic_dataset(root, n_train=16, n_test_good=4, n_test_per_defect=3, size=128, seed=0)
    folder = root / "train_contaminated"
    rng = np.random.default_rng(0)
    for sample, rgb in ImageStream(train_samples(category)):
        save_png(rgb, folder / sample.path.name)
    names = []
    for sample, rgb in ImageStream(test_samples(category)):
        if sample.defect_type == POISON:  # the same defective part, captured again
            recapture = np.clip(rgb + rng.normal(0.0, 1.0, rgb.shape), 0, 255).astype(np.uint8)
            names.append(f"poison_{sample.path.name}")
            save_png(recapture, folder / names[-1])
    return category, folder, names


def _fit(folder: Path, denoise) -> tuple:
    config = FitConfig(random_init=True, device="cpu", preprocess=PreprocessConfig(128, 112), val_ratio=0.0,
                       denoise=denoise)
    sources: list[str] = []
    return fit(ImageStream(train_samples(folder)).images(sources), config, sources=sources), sources


@pytest.fixture(scope="module")
def fits(contaminated) -> dict:
    category, folder, _ = contaminated
    models = {mode: _fit(folder, mode)[0] for mode in ("off", "auto")}
    models["clean-off"] = _fit(category, "off")[0]
    models["clean-auto"] = _fit(category, "auto")[0]
    test_set = load_test_set(category, models["off"].preprocess_config)
    return {name: (model, evaluate(model, test_set)[0]) for name, model in models.items()}


def test_plain_patchcore_misses_the_memorised_defect_and_the_robust_fit_catches_it(fits):
    plain = fits["off"][1]["per_defect_type"][POISON]["auroc_vs_good"]
    robust = fits["auto"][1]["per_defect_type"][POISON]["auroc_vs_good"]
    assert plain <= 0.5, f"plain PatchCore should score its memorised spots as normal (AUROC {plain})"
    assert robust >= 0.9, f"--denoise auto should catch the spots again (AUROC {robust})"
    assert fits["auto"][1]["image_auroc"] > fits["off"][1]["image_auroc"]


def test_the_flagged_images_are_exactly_the_contaminating_ones(fits, contaminated):
    record = fits["auto"][0].config["coreset"]["denoise"]
    flagged = sorted(Path(entry["source"]).name for entry in record["flagged"])
    assert flagged == sorted(contaminated[2])
    assert record["images_dropped"] == len(flagged) and record["mode"] == "auto"
    assert all(entry["z"] > record["z_threshold"] for entry in record["flagged"])
    assert "denoise_s" in fits["auto"][0].config["fit"]["timings"]


def test_clean_training_data_loses_nothing(fits):
    record = fits["clean-auto"][0].config["coreset"]["denoise"]
    assert record["images_dropped"] == 0 and record["flagged"] == []
    np.testing.assert_array_equal(fits["clean-auto"][0].memory_bank, fits["clean-off"][0].memory_bank)
    assert fits["clean-auto"][1]["image_auroc"] == fits["clean-off"][1]["image_auroc"]


def test_a_given_fraction_drops_that_many_of_the_most_outlying_images():
    rng = np.random.default_rng(3)
    features = rng.normal(0.0, 1.0, (20, 49, 96)).astype(np.float32)
    for image in (4, 11, 17):  # three images with a few far-off patches each, each its own defect
        features[image, :3] += rng.normal(0.0, 3.0, 96).astype(np.float32)
    result = select_clean_images(features, 0.1, sources=[f"img{i}" for i in range(20)])
    assert result.record["images_dropped"] == 2 and len(result.keep) == 18
    assert {e["source"] for e in result.record["flagged"]} < {"img4", "img11", "img17"}
    auto = select_clean_images(features, "auto")
    assert sorted(set(range(20)) - set(auto.keep.tolist())) == [4, 11, 17]
    assert auto.record["patches_dropped"] == 3 * 49


@pytest.mark.parametrize("value, expected", [("off", "off"), ("AUTO", "auto"), ("0.05", 0.05), (0.1, 0.1)])
def test_parse_denoise(value, expected):
    assert parse_denoise(value) == expected


@pytest.mark.parametrize("value", ["0", "0.5", "0.7", "-0.1", "sometimes", True])
def test_bad_denoise_values_are_refused_before_any_work(value):
    with pytest.raises(ValueError):
        parse_denoise(value)
    with pytest.raises(ValueError):
        FitConfig(denoise=value)


def test_cli_fit_lists_the_flagged_images_and_the_bundle_manifest_carries_them(contaminated, tmp_path):
    from typer.testing import CliRunner

    from edgecore.cli import app
    from edgecore.export.bundle import export_bundle
    from edgecore.runtime.bundle import MANIFEST, validate_manifest

    _, folder, names = contaminated
    out = tmp_path / "model"
    result = CliRunner().invoke(app, ["fit", str(folder), "-o", str(out), "--random-init", "--device", "cpu",
                                      "--resize", "128", "--crop", "112", "--val-ratio", "0", "--denoise", "auto"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert sorted(Path(p).name for p in summary["denoise_flagged"]) == sorted(names)
    record = json.loads((out / "config.json").read_text())["coreset"]["denoise"]
    assert sorted(Path(e["source"]).name for e in record["flagged"]) == sorted(names)

    bundle = export_bundle(out, tmp_path / "part.edgecore")
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["coreset"]["denoise"] == record
    broken = json.loads(json.dumps(manifest))
    broken["coreset"]["denoise"]["images_dropped"] += 1  # counts no longer match the flagged list
    with pytest.raises(BundleError, match="coreset.denoise"):
        validate_manifest(broken)
    broken["coreset"]["denoise"] = {**record, "mode": "sometimes"}
    with pytest.raises(BundleError, match="coreset.denoise.mode"):
        validate_manifest(broken)


def test_cli_refuses_a_bad_denoise_value(contaminated, tmp_path):
    from typer.testing import CliRunner

    from edgecore.cli import app

    result = CliRunner().invoke(app, ["fit", str(contaminated[1]), "-o", str(tmp_path / "m"), "--random-init",
                                      "--denoise", "0.7"])
    assert result.exit_code != 0 and not (tmp_path / "m").exists()


def test_screen_validation_flags_only_planted_outliers():
    normal = 20.0 + np.linspace(-2.0, 2.0, 20)  # a normal-looking spread: nothing beyond 2 sigma
    keep, flagged = screen_validation(np.concatenate([normal, [35.0, 40.0]]), [f"v{i}" for i in range(22)])
    assert [entry["source"] for entry in flagged] == ["v21", "v20"]
    assert keep.sum() == 20 and not keep[20:].any()
    assert screen_validation(normal)[1] == []  # clean held-out scores: nothing screened
    assert screen_validation(np.array([1.0, 2.0, 99.0]))[1] == []  # too few to judge


def test_a_defect_held_out_for_the_threshold_is_screened_before_the_threshold(contaminated):
    """Cleaning the bank is not enough: a contaminating image in the validation split would set
    the threshold at a defect's score. With --denoise it is screened out and listed."""
    _, folder, names = contaminated
    config = FitConfig(random_init=True, device="cpu", preprocess=PreprocessConfig(128, 112), val_ratio=0.5,
                       denoise="auto")
    sources: list[str] = []
    model = fit(ImageStream(train_samples(folder)).images(sources), config, sources=sources)
    screened = model.config["fit"]["validation_screened"]
    kept = [Path(source).name for source in model.config["fit"]["validation_sources"]]
    assert screened, "a contaminating image should have landed in the validation split with this seed"
    assert {Path(entry["source"]).name for entry in screened} <= set(names)
    assert not set(kept) & set(names)
    assert len(model.config["threshold"]["validation_scores"]) == len(kept)
    assert model.threshold < min(entry["score"] for entry in screened)
