"""Aspect-aware inspection (#15.1): geometry, the auto choice, recall on tall parts, camera = host."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgecore.runtime.preprocess import PreprocessConfig, crop_map_to_original, preprocess, preprocess_mask

PAD = PreprocessConfig(aspect="pad", input_size=(224, 64))


def test_pad_keeps_the_whole_tall_frame_and_its_aspect():
    frame = np.zeros((448, 112, 3), np.uint8)  # aspect 4 into a 224x64 input: scale 0.5 → 224x56, 4 px pad each side
    frame[:, :, 0] = (np.arange(448) // 2).astype(np.uint8)[:, None]
    frame[:4, :, 1] = 255  # a mark at the very top survives
    out = preprocess(frame, PAD)
    assert out.shape == (224, 64, 3)
    assert PAD.placement(448, 112) == (224, 56, 0, 4)
    assert out[:, :4].max() == 0 and out[:, -4:].max() == 0  # padding
    assert out[0, 10, 1] > 200 and out[223, 30, 0] == 223  # top mark and bottom row both kept
    box, (rows, cols) = PAD.inspected(448, 112)
    assert box == (0.0, 0.0, 112.0, 448.0) and (rows, cols) == (slice(0, 224), slice(4, 60))


def test_crop_mode_covers_the_input_and_marks_the_cut():
    config = PreprocessConfig(aspect="crop", input_size=(224, 64))
    rh, rw, top, left = config.placement(448, 160)  # cover: scale max(0.5, 0.4) = 0.5 → 224x80, 8 px cut per side
    assert (rh, rw, top, left) == (224, 80, 0, -8)
    box, (rows, cols) = config.inspected(448, 160)
    assert box == (16.0, 0.0, 144.0, 448.0) and (rows, cols) == (slice(0, 224), slice(0, 64))


def test_map_and_mask_follow_the_padded_geometry():
    mask = np.zeros((448, 112), bool)
    mask[:20, 40:60] = True  # a defect at the very top: kept, at rows 0:10, cols 24:34 (+4 px pad)
    small = preprocess_mask(mask, PAD)
    rows, cols = np.nonzero(small)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (0, 9, 24, 33)
    crop_map = np.zeros((224, 64), np.float32)
    crop_map[:10, 24:34] = 1.0
    crop_map[:, :4] = 5.0  # padding: dropped on the way back, never shown on the frame
    full = crop_map_to_original(crop_map, (448, 112), PAD)
    assert full.shape == (448, 112) and full.max() <= 1.0 + 1e-6
    hot = np.argwhere(full > 0.5)
    assert hot[:, 0].min() == 0 and hot[:, 0].max() < 24 and 36 <= hot[:, 1].min() and hot[:, 1].max() <= 62


def test_config_round_trip_and_refusals():
    assert PreprocessConfig.from_dict(PAD.to_dict()) == PAD
    assert PAD.to_dict()["resize"] == 224 and PAD.to_dict()["crop"] == 64  # long / short side
    assert "aspect" not in PreprocessConfig().to_dict()  # square bundles are byte-for-byte unchanged
    for bad in ({"aspect": "stretch", "input_size": (64, 64)}, {"aspect": "pad"}, {"aspect": "pad", "input_size": (224, 16)},
                {"input_size": (224, 64)}):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)


def test_auto_choice_from_frame_sizes(tmp_path):
    from PIL import Image

    from edgecore.aspect import choose_preprocess, resolve_preprocess

    assert choose_preprocess([(900, 900), (880, 900)]).config == PreprocessConfig()
    tall = choose_preprocess([(1250, 500)] * 3)  # the 500 x 1250 parts
    # same pixel budget as 224x224: short side 224/sqrt(2.5) → 128, long side 2.5 x 128 = 320
    assert tall.config == PreprocessConfig(aspect="pad", input_size=(320, 128)) and "2.50" in tall.reason
    wide = choose_preprocess([(300, 1200)], crop=128).config
    assert wide.input_hw == (64, 256)
    for i in range(3):
        Image.new("RGB", (64, 224)).save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    config, record = resolve_preprocess("auto", None, 128, 112, sorted(tmp_path.iterdir()))
    assert config.input_hw == (224, 64) and record["mode"] == "auto" and record["median_hw"] == [224, 64]
    assert resolve_preprocess("crop", "256x96", 128, 64, [])[0] == PreprocessConfig(aspect="crop", input_size=(256, 96))
    with pytest.raises(ValueError, match="--input-size goes with"):
        resolve_preprocess("squash", "256x96", 128, 64, [])


def test_bundle_refuses_input_size_that_disagrees(bundle_copy):
    from edgecore.runtime.bundle import validate_manifest
    from edgecore.runtime.errors import BundleError

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["preprocess"].update(aspect="pad", input_size=[224, 64])  # resize/crop still say 128/112
    with pytest.raises(BundleError, match="input_size"):
        validate_manifest(manifest, "manifest.json")
    manifest["preprocess"].update(resize=224, crop=64)  # consistent now, but the grid is square
    with pytest.raises(BundleError, match="grid"):
        validate_manifest(manifest, "manifest.json")


# --- tall parts: recall at the threshold, and the camera reproducing the host -------
@pytest.fixture(scope="module")
def tall_category(tmp_path_factory) -> Path:
    from edgecore.data.tall_parts import make_tall_parts_dataset

    return make_tall_parts_dataset(tmp_path_factory.mktemp("tall"), n_train=30, n_test_good=10, n_test_per_defect=6)


@pytest.fixture(scope="module")
def tall_model_dir(tall_category, tmp_path_factory) -> Path:
    """`edgecore fit` with the default --aspect auto: the 64x224 frames get a padded 224x64 input
    (about the pixels of the 112x112 crop the square model gets)."""
    from typer.testing import CliRunner

    from edgecore.cli import app

    out = tmp_path_factory.mktemp("tall-models") / "pad"
    result = CliRunner().invoke(app, ["fit", str(tall_category), "-o", str(out), "--crop", "112", "--val-ratio", "0.2",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def _recall(model, category: Path) -> float:
    from edgecore.evaluation import evaluate, load_test_set

    result, _ = evaluate(model, load_test_set(category, model.preprocess_config))
    assert result["at_threshold"]["fp"] <= 1  # the operating point still holds on the normal test images
    return result["at_threshold"]["recall"]


def test_aspect_aware_fit_catches_defects_at_the_ends_that_square_misses(tall_category, tall_model_dir):
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.model import FitConfig, PatchCoreModel, fit

    model = PatchCoreModel.load(tall_model_dir, device="cpu")
    choice = model.config["fit"]["preprocess_choice"]
    assert choice["mode"] == "auto" and choice["input_size"] == [224, 64] and model.grid == (28, 8)
    square = fit(ImageStream(train_samples(tall_category)).images(),
                 FitConfig(device="cpu", preprocess=PreprocessConfig(128, 112), val_ratio=0.2))
    aspect_recall, square_recall = _recall(model, tall_category), _recall(square, tall_category)
    # measured: 1.00 vs 0.58 (benchmarks/RESULTS.md § Total Recall)
    assert aspect_recall >= 0.9 and aspect_recall >= square_recall + 0.25, (aspect_recall, square_recall)


@pytest.fixture(scope="module")
def tall_bundle(tall_model_dir, tmp_path_factory) -> Path:
    from edgecore.export.bundle import export_bundle

    return export_bundle(tall_model_dir, tmp_path_factory.mktemp("tall-bundle") / "tall.edgecore",
                         index_dtype="fp32", search="exact")


def test_fp32_engine_reproduces_the_host_on_a_non_square_input(tall_category, tall_model_dir, tall_bundle):
    from edgecore.data.datasets import test_samples
    from edgecore.model import PatchCoreModel
    from edgecore.runtime.detector import Detector

    bundle = tall_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["graph"]["input"]["shape"] == [1, 224, 64, 3] and manifest["preprocess"]["aspect"] == "pad"
    model = PatchCoreModel.load(tall_model_dir, device="cpu")
    paths = [s.path for s in test_samples(tall_category)][::4]
    with Detector.open(bundle, precision="fp32") as detector:
        for path in paths:
            host, camera = model.detect(path), detector.detect(path)
            assert abs(host.score - camera.score) <= 1e-3 * max(1.0, abs(host.score)), path
            assert camera.map.shape == (224, 64) and camera.map_original.shape == (224, 64)
            assert host.is_anomalous == camera.is_anomalous


def test_c_api_writes_the_non_square_map_of_a_pad_bundle(tall_category, tall_bundle, capi_programs, tmp_path):
    """ec_map_size/ec_detect follow the graph input (224x64 here), not a square crop."""
    import subprocess

    from PIL import Image

    from edgecore.data.datasets import test_samples
    from edgecore.runtime.detector import Detector

    png = [s.path for s in test_samples(tall_category)][-1]
    ppm = tmp_path / "frame.ppm"
    Image.open(png).convert("RGB").save(ppm)
    done = subprocess.run([str(capi_programs["detect"]), "--maps", str(tmp_path), str(tall_bundle), str(ppm)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = np.fromfile(tmp_path / "map_0.f32", dtype=np.float32)
    with Detector.open(tall_bundle) as detector:  # the engine ec_open picks by default, like the C side
        want = detector.detect(png)
        expected = detector.normalization(want.map)
    assert got.size == 224 * 64
    np.testing.assert_allclose(got.reshape(224, 64), expected, rtol=1e-5, atol=1e-6)
