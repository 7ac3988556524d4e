"""The camera runtime: fidelity to the host, input kinds, no torch, threads, compile, infer, bench."""
import json
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgecore.cli import app
from edgecore.data.datasets import ImageStream, test_samples as find_test_samples
from edgecore.export.bundle import export_bundle
from edgecore.model import PatchCoreModel
from edgecore.runtime.bundle import verify_bundle
from edgecore.runtime.detector import Detector
from edgecore.runtime.preprocess import preprocess

runner = CliRunner()


@pytest.fixture(scope="module")
def fp32_bundle(fitted_model_dir, tmp_path_factory):
    """fp32 index + exact search: the exported path must reproduce the host bit for bit (up to the engine)."""
    return export_bundle(fitted_model_dir, tmp_path_factory.mktemp("fp32") / "p.edgecore", index_dtype="fp32", search="exact")


@pytest.fixture(scope="module")
def test_crops(synthetic_category, fitted_model_dir):
    model = PatchCoreModel.load(fitted_model_dir, device="cpu")
    samples, crops = [], []
    for sample, rgb in ImageStream(find_test_samples(synthetic_category)):
        samples.append(sample)
        crops.append(preprocess(rgb, model.preprocess_config))
    return samples, np.stack(crops), model


def test_fp32_engine_and_index_reproduce_the_host(fp32_bundle, test_crops):
    samples, crops, model = test_crops
    host = model.score_crops(crops)
    with Detector.open(fp32_bundle, precision="fp32") as detector:
        assert detector.engine.info.executed_precision == "fp32"
        camera = detector.score_crops(crops)
    np.testing.assert_allclose(camera.image, host.image, rtol=1e-3)
    span = model.normalization.max - model.normalization.min
    assert np.abs(camera.maps - host.maps).max() <= 1e-3 * span
    assert ((camera.image >= model.threshold) == (host.image >= model.threshold)).all()


def test_engine_writes_each_frame_into_its_own_array(fp32_bundle, test_crops):
    """The OpenVINO engine writes straight into a fresh output array per call (no 3 MB copy for WRN50): a result
    is never the engine's buffer, so later frames cannot overwrite it; and it equals the copying path's."""
    _, crops, _ = test_crops
    with Detector.open(fp32_bundle, precision="fp32") as detector:
        engine = detector.engine
        assert engine._direct_output
        first = engine.infer(crops[:1])
        kept = first.copy()
        second = engine.infer(crops[-1:])
        engine.infer(crops[:1])
        engine._direct_output = False  # the copying path, for reference
        reference_first, reference_second = engine.infer(crops[:1]), engine.infer(crops[-1:])
    assert first.dtype == np.float32 and first.flags.c_contiguous and first.flags.writeable
    np.testing.assert_array_equal(first, kept)  # untouched by the calls after it
    np.testing.assert_array_equal(first, reference_first)
    np.testing.assert_array_equal(second, reference_second)
    assert not np.array_equal(first, second)


def test_detect_accepts_path_bytes_and_array(fp32_bundle, synthetic_category):
    path = synthetic_category / "test" / "spot" / "000.png"
    from edgecore.runtime.imageio import load_image

    with Detector.open(fp32_bundle, precision="fp32") as detector:
        by_path = detector.detect(path)
        by_bytes = detector.detect(path.read_bytes())
        by_array = detector.detect(load_image(path))
        assert by_path.score == by_bytes.score == by_array.score
        assert by_path.map.shape == (112, 112) and by_path.map_original.shape == (128, 128)
        assert by_path.is_anomalous and 0.5 <= by_path.normalized_score <= 1.0
        assert set(by_path.timings_ms) == {"decode", "preprocess", "engine", "search", "scoring_map", "total"}


def test_default_int8_hnsw_bundle_keeps_the_ranking(exported_bundle, test_crops):
    from edgecore import metrics

    samples, crops, model = test_crops
    labels = np.array([s.label for s in samples])
    with Detector.open(exported_bundle) as detector:
        camera = detector.score_crops(crops)
    assert metrics.auroc(camera.image, labels) == pytest.approx(metrics.auroc(model.score_crops(crops).image, labels))


def test_runtime_works_where_torch_cannot_be_imported(exported_bundle, synthetic_category):
    code = f"""
import sys
sys.modules['torch'] = None  # any 'import torch' now raises ImportError
from edgecore.runtime.detector import Detector
with Detector.open({str(exported_bundle)!r}) as det:
    r = det.detect({str(synthetic_category / 'test' / 'good' / '000.png')!r})
assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]
print('score', r.score)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("score ")


def test_one_detector_is_safe_from_several_threads(exported_bundle, synthetic_category):
    paths = sorted((synthetic_category / "test").rglob("*.png"))
    with Detector.open(exported_bundle) as detector:
        sequential = [detector.detect(p).score for p in paths]
        results: dict[tuple[int, int], float] = {}

        def work(worker: int) -> None:
            for round_ in range(3):
                for i, p in enumerate(paths):
                    results[(worker, round_ * len(paths) + i)] = detector.detect(p).score

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for (worker, k), score in results.items():
        assert score == sequential[k % len(paths)]


def test_compile_fp32_and_bf16_are_stored_and_picked(bundle_copy, test_crops):
    _, crops, model = test_crops
    for precision in ("fp32", "bf16"):
        result = runner.invoke(app, ["compile", str(bundle_copy), "--target", "openvino", "--precision", precision])
        assert result.exit_code == 0, result.output
    manifest = verify_bundle(bundle_copy).manifest
    assert set(manifest["engines"]) == {"openvino-fp32", "openvino-bf16"}
    assert (bundle_copy / manifest["engines"]["openvino-fp32"]["xml"]).is_file()
    with Detector.open(bundle_copy, precision="fp32") as detector:
        assert detector.engine.info.source.endswith("openvino-fp32/model.xml")
        fp32 = detector.score_crops(crops).image
    with Detector.open(bundle_copy, precision="bf16") as detector:
        info = detector.engine.info
        assert info.executed_precision in ("bf16", "fp32")  # fp32 on CPUs without bf16
        bf16 = detector.score_crops(crops).image
    from scipy.stats import spearmanr

    assert spearmanr(fp32, bf16).statistic >= 0.95


def test_int8_compile_with_calibration_and_refit(bundle_copy, synthetic_category, test_crops):
    samples, crops, _ = test_crops
    result = runner.invoke(app, ["compile", str(bundle_copy), "--precision", "int8"])
    assert result.exit_code == 2 and "--calib" in result.output
    result = runner.invoke(
        app,
        ["compile", str(bundle_copy), "--precision", "int8", "--calib", str(synthetic_category), "--num-calib", "8",
         "--refit-threshold", str(synthetic_category / "test" / "good")],
    )
    assert result.exit_code == 0, result.output
    manifest = verify_bundle(bundle_copy).manifest
    entry = manifest["engines"]["openvino-int8"]
    assert entry["calibration"]["images"] == 8
    assert entry["threshold"]["value"] > 0 and entry["threshold"]["from_held_out_normals"]
    with Detector.open(bundle_copy) as detector:  # default picks the int8 engine
        assert detector.engine.info.requested_precision == "int8"
        assert detector.threshold == entry["threshold"]["value"]
        scores = detector.score_crops(crops).image
    labels = np.array([s.label for s in samples])
    from edgecore import metrics

    assert metrics.auroc(scores, labels) >= 0.9


def test_int8_keeps_the_patchcore_head_in_fp32_and_guards_vnni(bundle_copy, synthetic_category, monkeypatch):
    import openvino as ov

    from edgecore.export.compile import compile_openvino
    from edgecore.runtime.errors import BundleError

    manifest = compile_openvino(bundle_copy, "int8", calib=synthetic_category, num_calib=4)
    entry = manifest["engines"]["openvino-int8"]
    model = ov.Core().read_model(str(bundle_copy / entry["xml"]))
    fake_quantized = [op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(fake_quantized) > 10  # the backbone is quantized ...
    for op in model.get_ops():  # ... the pooling/upsampling/concat head is not
        if op.get_type_name() in ("AvgPool", "Interpolate", "Concat") and op.get_friendly_name() != "":
            producers = {inp.get_source_output().get_node().get_type_name() for inp in op.inputs()}
            assert "FakeQuantize" not in producers, op.get_friendly_name()
    if entry["requires_vnni"]:
        import edgecore.runtime.backends.openvino as ov_backend

        monkeypatch.setattr(ov_backend, "has_vnni", lambda: False)  # pretend to be an AVX2-only camera
        with pytest.raises(BundleError, match="VNNI"):
            Detector.open(bundle_copy, precision="int8")


def test_missing_int8_engine_is_a_clear_error(exported_bundle):
    from edgecore.runtime.errors import BundleError

    with pytest.raises(BundleError, match="no OpenVINO INT8 engine"):
        Detector.open(exported_bundle, precision="int8")


def test_infer_cli_writes_jsonl_overlays_and_fails_on_anomaly(exported_bundle, synthetic_category, tmp_path):
    good = synthetic_category / "test" / "good"
    result = runner.invoke(app, ["infer", str(exported_bundle), str(good), "-o", str(tmp_path / "ok"), "--fail-on-anomaly"])
    rows = [json.loads(x) for x in (tmp_path / "ok" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(Path(r["overlay"]).is_file() for r in rows)
    assert result.exit_code == (1 if any(r["is_anomalous"] for r in rows) else 0)
    spot = synthetic_category / "test" / "spot"
    result = runner.invoke(app, ["infer", str(exported_bundle), str(spot), "--fail-on-anomaly"])
    assert result.exit_code == 1


def test_evaluate_accepts_a_bundle_with_the_same_metric_code(fp32_bundle, fitted_model_dir, synthetic_category, tmp_path):
    host = runner.invoke(app, ["evaluate", str(fitted_model_dir), str(synthetic_category), "-o", str(tmp_path / "h")])
    camera = runner.invoke(
        app, ["evaluate", str(fp32_bundle), str(synthetic_category), "-o", str(tmp_path / "c"), "--precision", "fp32"]
    )
    assert host.exit_code == 0 and camera.exit_code == 0, camera.output
    h = json.loads((tmp_path / "h" / "metrics.json").read_text())
    c = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert c["image_auroc"] == pytest.approx(h["image_auroc"], abs=1e-9)
    assert c["pixel_auroc"] == pytest.approx(h["pixel_auroc"], abs=1e-4)
    assert c["runtime"].startswith("openvino fp32")


def test_archive_opens_directly(exported_bundle, tmp_path, synthetic_category):
    from edgecore.export.bundle import pack_bundle

    archive = pack_bundle(exported_bundle, tmp_path / "x.edgecore.tar")
    with Detector.open(archive) as detector:
        scratch = detector._scratch
        assert detector.detect(synthetic_category / "test" / "good" / "000.png").score > 0
    assert not scratch.exists()


def test_portable_int8_runs_under_an_avx2_cap(bundle_copy, synthetic_category, monkeypatch):
    """An AVX2-capped run (camera emulation) has no VNNI: a VNNI engine is refused, a --portable one runs."""
    from edgecore.runtime.cpu import has_vnni
    from edgecore.runtime.errors import BundleError

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert has_vnni() is False
    result = runner.invoke(
        app, ["compile", str(bundle_copy), "--precision", "int8", "--calib", str(synthetic_category), "--num-calib", "4", "--portable"]
    )
    assert result.exit_code == 0, result.output
    entry = verify_bundle(bundle_copy).manifest["engines"]["openvino-int8"]
    assert entry["requires_vnni"] is False and entry["calibration"]["overflow_fix"] is True
    # 7-bit weights: the depthwise convolutions and those at the first one's resolution stay fp32 (the
    # host-vs-camera contract), every other convolution runs int8
    import openvino as ov

    convs = [op for op in ov.Core().read_model(str(bundle_copy / entry["xml"])).get_ordered_ops()
             if op.get_type_name() in ("Convolution", "GroupConvolution")]
    full_size = tuple(convs[0].get_output_shape(0))[2:]
    kept = {op.get_friendly_name() for op in convs
            if op.get_type_name() == "GroupConvolution" or tuple(op.get_output_shape(0))[2:] == full_size}
    quantized = {op.get_friendly_name() for op in convs if op.input_value(0).get_node().get_type_name() == "FakeQuantize"}
    assert convs[0].get_friendly_name() in kept and len(kept) < len(convs)
    assert quantized == {op.get_friendly_name() for op in convs} - kept
    assert entry["calibration"]["kept_fp32"] == ["head", "full-resolution convolutions", "depthwise convolutions"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a current portable engine opens without a word
        with Detector.open(bundle_copy, precision="int8") as detector:
            assert detector.detect(synthetic_category / "test" / "good" / "000.png").score > 0
    entry_vnni = dict(entry, requires_vnni=True)
    import edgecore.runtime.backends.openvino as ov_backend

    class OldPortableBundle:  # as an older edgecore wrote it: 7-bit weights everywhere, no kept_fp32 record
        path = bundle_copy
        manifest = {**verify_bundle(bundle_copy).manifest, "engines": {"openvino-int8": dict(entry, calibration={
            key: value for key, value in entry["calibration"].items() if key != "kept_fp32"})}}

    with pytest.warns(RuntimeWarning, match="every convolution to 7-bit.*--portable"):
        ov_backend.OpenVINOBackend(OldPortableBundle(), precision="int8")

    class FakeBundle:  # the manifest the backend sees, with a VNNI-only engine
        path = bundle_copy
        manifest = {**verify_bundle(bundle_copy).manifest, "engines": {"openvino-int8": entry_vnni}}

    with pytest.raises(BundleError, match="VNNI"):
        ov_backend.OpenVINOBackend(FakeBundle(), precision="int8")


def test_camera_cli_commands_work_without_torch(exported_bundle, synthetic_category):
    code = f"""
import sys
sys.modules['torch'] = None
from edgecore.cli import app
for argv in (['verify', {str(exported_bundle)!r}],
             ['infer', {str(exported_bundle)!r}, {str(synthetic_category / 'test' / 'good' / '000.png')!r}],
             ['bench', {str(exported_bundle)!r}, '--iterations', '2', '--warmup', '1', '--quiet']):
    try:
        app(argv, standalone_mode=False)
    except SystemExit as exc:
        assert exc.code in (0, None), (argv, exc.code)
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
