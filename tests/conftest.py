"""Shared fixtures: a tiny synthetic MVTec-layout dataset and a model fitted on it once."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

SHARED_BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_bottle"


@pytest.fixture(scope="session")
def synthetic_category(tmp_path_factory) -> Path:
    from edgecore.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, n_train=16, n_test_good=4, n_test_per_defect=2, size=128, seed=0)


@pytest.fixture(scope="session")
def fitted_model_dir(synthetic_category, tmp_path_factory) -> Path:
    """Lite0 (real offline weights) on the synthetic set at 128→112 px: ~2 s on 2 cores."""
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.model import FitConfig, fit
    from edgecore.runtime.preprocess import PreprocessConfig

    images = [rgb for _, rgb in ImageStream(train_samples(synthetic_category))]
    config = FitConfig(backbone="efficientnet_lite0", device="cpu", preprocess=PreprocessConfig(128, 112), val_ratio=0.25)
    model = fit(images, config)
    return model.save(tmp_path_factory.mktemp("models") / "part")


@pytest.fixture(scope="session")
def bottle() -> Path:
    if not (SHARED_BOTTLE / "train" / "good").is_dir():
        pytest.skip(f"real MVTec bottle data not found at {SHARED_BOTTLE} (only in the project's own checkouts)")
    return SHARED_BOTTLE


@pytest.fixture(autouse=True)
def _random_init_warnings_are_expected():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM INITIALISATION.*")
        yield


@pytest.fixture(scope="session")
def exported_bundle(fitted_model_dir, tmp_path_factory) -> Path:
    """The synthetic model exported with defaults (int8 index, auto search). Treat as read-only."""
    from edgecore.export.bundle import export_bundle

    return export_bundle(fitted_model_dir, tmp_path_factory.mktemp("bundles") / "part.edgecore")


@pytest.fixture
def bundle_copy(exported_bundle, tmp_path) -> Path:
    """A private copy a test may tamper with."""
    import shutil

    return Path(shutil.copytree(exported_bundle, tmp_path / exported_bundle.name))
