"""ROI masks (#15.2): the grid rule, coreset/score/map hard-masking, camera = host, fail-closed bundle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import recompute_hashes
from edgecore.runtime.preprocess import PreprocessConfig, preprocess
from edgecore.runtime.roi import RoiFrameError, grid_mask

PAD = PreprocessConfig(aspect="pad", input_size=(96, 160))  # the 96x160 frames map 1:1; Lite0 grid 12x20
BLOB = (250, 40, 40)


# --- the rule: a patch is inside when >= half of its cell is --------------------------------
def test_half_a_cell_is_inside_and_less_is_not():
    frame = np.zeros((96, 160), bool)
    frame[:, :52] = True  # 6.5 cells of 8 px
    assert grid_mask(frame, PAD, (12, 20)).sum(axis=1).tolist() == [7] * 12
    frame[:, 51] = False  # 6 + 3/8 cells
    assert grid_mask(frame, PAD, (12, 20)).sum(axis=1).tolist() == [6] * 12


def test_rule_goes_through_the_placement_squash_and_padding():
    square = PreprocessConfig(128, 112)  # 256 px frame → 128, crop offset 8: the left half is 56 of 112 px
    frame = np.zeros((256, 256), bool)
    frame[:, :128] = True
    inside = grid_mask(frame, square, (14, 14))
    assert inside[:, :7].all() and not inside[:, 7:].any()
    tall = PreprocessConfig(aspect="pad", input_size=(96, 64))  # 96x48 frame: 8 px of padding each side
    inside = grid_mask(np.ones((96, 48), bool), tall, (12, 8))
    assert not inside[:, 0].any() and not inside[:, -1].any() and inside[:, 1:-1].all()  # padding is outside
    with pytest.raises(ValueError, match="tile"):
        grid_mask(frame, PreprocessConfig(aspect="tile", input_size=(64, 64), tiles=(2, 2), tile_overlap=(0, 0)),
                  (8, 8))


def test_polygon_and_mask_image_give_the_same_grid(tmp_path):
    from PIL import Image

    from edgecore.roi import RoiSource

    (tmp_path / "roi.json").write_text(json.dumps([[0, 0], [95, 0], [95, 95], [0, 95]]))
    mask = np.zeros((96, 160), np.uint8)
    mask[:, :96] = 255
    Image.fromarray(mask).save(tmp_path / "roi.png")
    polygon = RoiSource(tmp_path / "roi.json").on_grid((96, 160), PAD, (12, 20))
    image = RoiSource(tmp_path / "roi.png").on_grid((96, 160), PAD, (12, 20))
    assert np.array_equal(polygon.inside, image.inside) and image.inside.sum() == 12 * 12
    (tmp_path / "tiny.json").write_text(json.dumps([[0, 0], [2, 0], [2, 2]]))
    with pytest.raises(ValueError, match="no feature cell"):
        RoiSource(tmp_path / "tiny.json").on_grid((96, 160), PAD, (12, 20))
    with pytest.raises(ValueError, match="draw it on a training frame"):
        RoiSource(tmp_path / "roi.png").on_grid((96, 96), PAD, (12, 20))
    (tmp_path / "bad.json").write_text(json.dumps([[0, 0], [1, "x"]]))
    with pytest.raises(ValueError, match="polygon"):
        RoiSource(tmp_path / "bad.json")


# --- a fitted part with clutter beside it -----------------------------------------------------
@pytest.fixture(scope="module")
def cluttered(tmp_path_factory) -> Path:
    from PIL import Image

    from edgecore.data.cluttered import make_cluttered_dataset

    category = make_cluttered_dataset(tmp_path_factory.mktemp("cluttered"), n_train=12, n_test_good=2, n_test_spot=2,
                                      strip=64)
    mask = np.zeros((96, 160), np.uint8)
    mask[:, :96] = 255  # white = inspect: the part's square
    Image.fromarray(mask).save(category / "roi.png")
    return category


@pytest.fixture(scope="module")
def roi_model_dir(cluttered, tmp_path_factory) -> Path:
    """`edgecore fit --roi roi.png` (real offline Lite0 weights, 96x160 input)."""
    from typer.testing import CliRunner

    from edgecore.cli import app

    out = tmp_path_factory.mktemp("roi-models") / "roi"
    result = CliRunner().invoke(app, ["fit", str(cluttered), "-o", str(out), "--aspect", "pad", "--input-size",
                                      "96x160", "--val-ratio", "0.25", "--device", "cpu", "--roi",
                                      str(cluttered / "roi.png")])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def frames(cluttered):
    from edgecore.data.datasets import ImageStream, train_samples

    return [rgb for _, rgb in ImageStream(train_samples(cluttered))]


def _with_blob(frame: np.ndarray, x0: int) -> np.ndarray:
    out = frame.copy()
    out[30:55, x0 : x0 + 20] = BLOB
    return out


def test_coreset_holds_inside_patches_only(roi_model_dir, frames):
    from edgecore.model import PatchCoreModel

    model = PatchCoreModel.load(roi_model_dir, device="cpu")
    section = model.config["roi"]
    assert section["grid"] == [12, 20] and section["inside_patches"] == 144 and section["frame_size"] == [96, 160]
    assert model.config["coreset"]["bank_patches"] == model.config["fit"]["train_images"] * 144
    features = model.embed(np.stack([preprocess(frame, model.preprocess_config) for frame in frames]))
    inside, outside = features[:, model.roi.flat], features[:, ~model.roi.inside.ravel()]

    def nearest(rows: np.ndarray, pool: np.ndarray) -> np.ndarray:
        pool = pool.reshape(-1, pool.shape[-1])
        return np.sqrt(((rows[:, None, :] - pool[None]) ** 2).sum(-1)).min(axis=1)

    bank = model.memory_bank
    assert nearest(bank, inside).max() < 1e-3  # every coreset row is an inside training patch …
    assert nearest(bank, outside).min() > 1e-2  # … and none is an outside one


def test_defect_outside_the_roi_is_not_anomalous_inside_it_is(roi_model_dir, frames):
    from edgecore.model import FitConfig, PatchCoreModel, fit

    model = PatchCoreModel.load(roi_model_dir, device="cpu")
    plain = fit(frames, FitConfig(device="cpu", preprocess=PAD, val_ratio=0.25))  # same fit without the ROI
    good, outside, inside = frames[0], _with_blob(frames[0], 134), _with_blob(frames[0], 20)  # 38 px off the ROI
    assert plain.detect(outside).is_anomalous  # the clutter alarms a model that looks everywhere …
    result = model.detect(outside)
    assert not result.is_anomalous  # … and not the ROI model,
    # … which barely felt it (feature masking: an inside patch's receptive field still reaches 38 px out)
    assert abs(result.score - model.detect(good).score) <= 0.01 * model.detect(good).score
    assert model.detect(inside).is_anomalous  # the same defect on the part is caught
    assert np.all(result.map[:, 96:] == 0) and np.all(result.map_original[:, 97:] == 0)  # not inspected: 0
    assert model.detect(inside).map[:, :96].max() > model.threshold


def test_frame_of_another_size_scales_or_is_refused(roi_model_dir, frames):
    from PIL import Image

    from edgecore.model import PatchCoreModel

    model = PatchCoreModel.load(roi_model_dir, device="cpu")
    double = np.asarray(Image.fromarray(_with_blob(frames[0], 20)).resize((320, 192), Image.Resampling.BILINEAR))
    assert model.detect(double).is_anomalous  # same aspect (a binned/unbinned sensor): the ROI scales along
    with pytest.raises(RoiFrameError, match="aspect"):
        model.detect(frames[0][:, :96])  # another aspect: the ROI would land elsewhere, no verdict


def test_roi_with_cluster_is_refused(cluttered, tmp_path):
    from typer.testing import CliRunner

    from edgecore.cli import app

    result = CliRunner().invoke(app, ["fit", str(cluttered), "-o", str(tmp_path / "m"), "--roi",
                                      str(cluttered / "roi.png"), "--cluster", "auto"])
    assert result.exit_code != 0 and "--roi is not available with --cluster" in result.output


# --- the camera: same scores through the ONE scorer, bundle refused when tampered --------------
@pytest.fixture(scope="module")
def roi_bundle(roi_model_dir, tmp_path_factory) -> Path:
    from edgecore.export.bundle import export_bundle

    return export_bundle(roi_model_dir, tmp_path_factory.mktemp("roi-bundle") / "roi.edgecore", index_dtype="fp32",
                         search="exact")


def test_fp32_engine_reproduces_the_host_with_an_roi(roi_model_dir, roi_bundle, cluttered, frames):
    from edgecore.data.datasets import test_samples
    from edgecore.model import PatchCoreModel
    from edgecore.runtime.detector import Detector

    manifest = json.loads((roi_bundle / "manifest.json").read_text())
    assert manifest["roi"]["inside_patches"] == 144 and "roi.npy" in manifest["files"]
    model = PatchCoreModel.load(roi_model_dir, device="cpu")
    inputs = [s.path for s in test_samples(cluttered)] + [_with_blob(frames[0], 134), _with_blob(frames[0], 20)]
    with Detector.open(roi_bundle, precision="fp32") as detector:
        assert detector.scorer.roi is not None
        for item in inputs:
            host, camera = model.detect(item), detector.detect(item)
            assert abs(host.score - camera.score) <= 1e-3 * max(1.0, abs(host.score))
            assert host.is_anomalous == camera.is_anomalous
            assert np.all(camera.map[:, 96:] == 0)
        with pytest.raises(RoiFrameError):
            detector.detect(frames[0][:, :96])


def _tamper(bundle: Path, tmp_path: Path, edit_array=None, edit_manifest=None, rehash: bool = True) -> Path:
    copy = Path(shutil.copytree(bundle, tmp_path / bundle.name))
    if edit_array is not None:
        np.save(copy / "roi.npy", edit_array(np.load(copy / "roi.npy")), allow_pickle=False)
    if edit_manifest is not None:
        manifest = json.loads((copy / "manifest.json").read_text())
        edit_manifest(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
    if rehash:
        recompute_hashes(copy)
    return copy


@pytest.mark.parametrize("case, edits, message", [
    ("modified file", dict(edit_array=lambda a: 1 - a, rehash=False), "sha256"),
    ("non-binary", dict(edit_array=lambda a: a * 2), "0 or 1"),
    ("all zero", dict(edit_array=np.zeros_like, edit_manifest=lambda m: m["roi"].update(inside_patches=1)),
     "all zero"),
    ("wrong shape", dict(edit_array=lambda a: a.T.copy()), "uint8 12x20"),
    ("wrong dtype", dict(edit_array=lambda a: a.astype(np.int64)), "uint8"),
    ("count", dict(edit_manifest=lambda m: m["roi"].update(inside_patches=143)), "manifest says 143"),
    ("grid", dict(edit_manifest=lambda m: m["roi"].update(grid=[20, 12])), "features.grid"),
    ("rule", dict(edit_manifest=lambda m: m["roi"].update(rule="centre")), "rule"),
])
def test_tampered_roi_is_refused(roi_bundle, tmp_path, case, edits, message):
    from edgecore.runtime.detector import Detector
    from edgecore.runtime.errors import BundleError

    with pytest.raises(BundleError, match=message):
        Detector.open(_tamper(roi_bundle, tmp_path, **edits), precision="fp32").close()


def test_roi_file_missing_from_the_file_list_is_refused(roi_bundle, tmp_path):
    """manifest.roi still names roi.npy, but files no longer lists it (and it is gone)."""
    from edgecore.runtime.bundle import verify_bundle
    from edgecore.runtime.errors import BundleError

    copy = Path(shutil.copytree(roi_bundle, tmp_path / roi_bundle.name))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"].pop("roi.npy")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "roi.npy").unlink()
    with pytest.raises(BundleError, match="roi file 'roi.npy' is not listed"):
        verify_bundle(copy)
