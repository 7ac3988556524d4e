"""TensorRT backend: what runs everywhere (import, errors, engine selection) and, on an NVIDIA GPU
with TensorRT + pycuda, the same conformance checks as OpenVINO against the ONNX fp32 reference.

No test fakes TensorRT: without it the GPU tests skip and say why.
"""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edgecore.runtime.backends import open_backend
from edgecore.runtime.backends.tensorrt import compile_tensorrt, device_index, engine_key, select_engine
from edgecore.runtime.bundle import VerifiedBundle
from edgecore.runtime.errors import BundleError, EdgecoreError

ORIN, ORIN_TRT = "Orin", "10.3.0"


def _engine(precision: str, gpu: str = ORIN, version: str = ORIN_TRT) -> dict:
    return {"backend": "tensorrt", "precision": precision, "gpu": gpu, "tensorrt_version": version,
            "plan": f"engines/{engine_key(precision, gpu, version)}/model.plan"}


def _engines(*entries: dict) -> dict:
    return {engine_key(e["precision"], e["gpu"], e["tensorrt_version"]): e for e in entries}


# --- runs without TensorRT ---------------------------------------------------
def test_module_imports_without_tensorrt_or_pycuda():
    code = (
        "import sys, edgecore.runtime.backends.tensorrt\n"
        "assert 'tensorrt' not in sys.modules and 'pycuda' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_open_backend_without_tensorrt_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails here even where TensorRT is installed
    bundle = VerifiedBundle(Path("part.edgecore"), {"graph": {"batch": 1}, "engines": _engines(_engine("fp16"))})
    with pytest.raises(EdgecoreError, match="TensorRT is not installed.*Jetson.*--backend openvino"):
        open_backend("tensorrt", bundle)


def test_compile_argument_errors_come_before_importing_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ValueError, match="int8 needs --calib"):
        compile_tensorrt(tmp_path, "int8")
    with pytest.raises(ValueError, match="fp16"):
        compile_tensorrt(tmp_path, "fp32")
    with pytest.raises(EdgecoreError, match="TensorRT is not installed"):  # valid arguments reach the import
        compile_tensorrt(tmp_path, "fp16")


def test_engine_key_and_device_index():
    assert engine_key("fp16", "NVIDIA Jetson AGX Orin", "10.3.0") == "tensorrt-fp16-nvidia-jetson-agx-orin-10.3.0"
    assert engine_key("int8", "Orin (nvgpu)", "8.5.2.2") == "tensorrt-int8-orin-nvgpu-8.5.2.2"
    assert device_index("cuda") == 0 and device_index("cuda:1") == 1
    with pytest.raises(ValueError, match="cuda:N"):
        device_index("CPU")


def test_select_engine_prefers_int8_then_fp16_for_this_gpu():
    engines = _engines(_engine("fp16"), _engine("int8"), _engine("int8", gpu="NVIDIA GeForce RTX 3090"))
    engines["openvino-fp32"] = {"backend": "openvino", "precision": "fp32"}
    key, entry = select_engine(engines, ORIN, ORIN_TRT)
    assert key == "tensorrt-int8-orin-10.3.0" and entry["gpu"] == ORIN
    key, _ = select_engine(engines, ORIN, ORIN_TRT, "fp16")
    assert key == "tensorrt-fp16-orin-10.3.0"
    key, _ = select_engine(_engines(_engine("fp16")), ORIN, ORIN_TRT)
    assert key == "tensorrt-fp16-orin-10.3.0"


def test_select_engine_refuses_engines_built_for_another_gpu():
    engines = _engines(_engine("fp16", gpu="NVIDIA GeForce RTX 3090", version="10.3.0"))
    with pytest.raises(BundleError) as error:
        select_engine(engines, ORIN, ORIN_TRT, bundle="/opt/edgecore/part.edgecore")
    message = str(error.value)
    assert "built for fp16 on NVIDIA GeForce RTX 3090 with TensorRT 10.3.0" in message
    assert "this device is Orin with TensorRT 10.3.0" in message
    assert "`edgecore compile /opt/edgecore/part.edgecore --target tensorrt --precision fp16`" in message


def test_select_engine_refuses_engines_built_by_another_tensorrt_version():
    engines = _engines(_engine("int8", version="8.5.2.2"))
    with pytest.raises(BundleError) as error:
        select_engine(engines, ORIN, ORIN_TRT, "int8", bundle="part.edgecore")
    message = str(error.value)
    assert "int8 on Orin with TensorRT 8.5.2.2" in message and "TensorRT 10.3.0" in message
    assert "--target tensorrt --precision int8 --calib DIR" in message


def test_select_engine_without_tensorrt_engines_or_precision():
    with pytest.raises(BundleError, match="no TensorRT engine in this bundle.*--target tensorrt --precision fp16"):
        select_engine({"openvino-int8": {"backend": "openvino", "precision": "int8"}}, ORIN, ORIN_TRT)
    with pytest.raises(BundleError, match=r"no TensorRT int8 engine.*built here: fp16.*--precision int8 --calib DIR"):
        select_engine(_engines(_engine("fp16")), ORIN, ORIN_TRT, "int8")
    with pytest.raises(ValueError, match="fp16"):
        select_engine(_engines(_engine("fp16")), ORIN, ORIN_TRT, "fp32")


def test_uint8_input_feeds_a_cast_directly():
    pytest.importorskip("torch", reason="exporting the graph needs torch (host side)")
    from edgecore.backbones import create_backbone
    from edgecore.export.onnx_export import INPUT_NAME, export_onnx
    from edgecore.features import PatchCoreFeatures

    backbone = create_backbone("efficientnet_lite0")
    module = PatchCoreFeatures(backbone.module, backbone.channels, backbone.spec.mean, backbone.spec.std, 1024).eval()
    graph = export_onnx(module, crop=112)
    consumers = [node.op_type for node in graph.graph.node if INPUT_NAME in node.input]
    assert consumers == ["Cast"]


# --- needs TensorRT, pycuda and an NVIDIA GPU --------------------------------
@pytest.fixture(scope="module")
def trt():
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (Jetson/JetPack or an NVIDIA GPU host)")
    cuda = pytest.importorskip("pycuda.driver", reason="pycuda is not installed")
    try:
        cuda.init()
        count = cuda.Device.count()
    except cuda.Error as exc:
        pytest.skip(f"no usable CUDA driver: {exc}")
    if count == 0:
        pytest.skip("no CUDA device")
    return trt


@pytest.fixture(scope="module")
def trt_bundle(trt, fitted_model_dir, tmp_path_factory) -> Path:
    """A small exported bundle with an fp16 engine built for this GPU."""
    pytest.importorskip("torch", reason="exporting the bundle needs torch (host side)")
    from edgecore.export.bundle import export_bundle

    bundle = export_bundle(fitted_model_dir, tmp_path_factory.mktemp("trt") / "part.edgecore", index_dtype="fp32")
    compile_tensorrt(bundle, "fp16", workspace_mb=512)
    return bundle


@pytest.fixture(scope="module")
def crops(synthetic_category) -> np.ndarray:
    from edgecore.runtime.imageio import load_image
    from edgecore.runtime.preprocess import PreprocessConfig, preprocess

    paths = sorted((synthetic_category / "test").rglob("*.png"))[:6]
    return np.stack([preprocess(load_image(p), PreprocessConfig(128, 112)) for p in paths])


def _embed(backend, crops: np.ndarray) -> np.ndarray:
    return np.concatenate([backend.infer(crops[i : i + backend.batch]) for i in range(0, len(crops), backend.batch)])


def test_builder_constructs_its_config(trt):
    from edgecore.runtime.backends.tensorrt import builder_config

    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))
    config = builder_config(trt, builder, "fp16", 256)
    assert config.get_flag(trt.BuilderFlag.FP16) and not config.get_flag(trt.BuilderFlag.INT8)
    assert config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == 256 << 20
    assert config.get_timing_cache() is not None
    with pytest.raises(ValueError, match="calibrator"):
        builder_config(trt, builder, "int8", 256)
    with pytest.raises(ValueError, match="DLA core"):
        builder_config(trt, builder, "fp16", 256, dla_core=builder.num_DLA_cores)


def test_int8_builds_pin_the_head_to_fp16(trt, trt_bundle):
    """Every layer from the 3×3 average poolings to the output is pinned to fp16; no convolution is."""
    from edgecore.runtime.backends.tensorrt import _network_flags, pin_head_precision

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    assert trt.OnnxParser(network, logger).parse_from_file(str(trt_bundle / "model.onnx"))
    pinned = pin_head_precision(trt, network)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    marked = [layer for layer in layers if layer.precision_is_set]
    assert pinned == len(marked) > 0 and all(layer.precision == trt.float16 for layer in marked)
    assert not any(layer.type == trt.LayerType.CONVOLUTION for layer in marked)
    producers = {layer.get_output(j).name: layer for layer in layers for j in range(layer.num_outputs)}
    assert producers[network.get_output(0).name].precision_is_set  # the head reaches the output


def test_engine_is_recorded_for_this_gpu(trt, trt_bundle):
    from edgecore.runtime.bundle import verify_bundle

    engines = verify_bundle(trt_bundle).manifest["engines"]
    (key, entry), = [(k, e) for k, e in engines.items() if e["backend"] == "tensorrt"]
    assert entry["precision"] == "fp16" and entry["tensorrt_version"] == trt.__version__
    assert key == engine_key("fp16", entry["gpu"], trt.__version__)
    assert (trt_bundle / entry["plan"]).is_file() and (trt_bundle / entry["timing_cache"]).is_file()
    assert entry["builder"]["workspace_mb"] == 512 and "." in entry["compute_capability"]


def test_fp16_embeddings_match_the_onnx_fp32_reference(trt_bundle, crops):
    from edgecore.calibration.int8 import mean_cosine
    from edgecore.runtime.bundle import verify_bundle

    verified = verify_bundle(trt_bundle)
    reference = open_backend("openvino", verified, precision="fp32")
    engine = open_backend("tensorrt", verified)
    try:
        assert engine.info.executed_precision == "fp16" and engine.info.backend == "tensorrt"
        assert mean_cosine(_embed(reference, crops), _embed(engine, crops)) >= 0.999
    finally:
        engine.close()
        reference.close()


def test_scores_match_openvino_fp32(trt_bundle, crops):
    from edgecore.runtime.detector import Detector

    with Detector.open(trt_bundle, backend="openvino", precision="fp32") as reference:
        expected = reference.score_crops(crops).image
    with Detector.open(trt_bundle, backend="tensorrt") as detector:
        got = detector.score_crops(crops).image
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=1e-3 * float(np.max(expected)))


def test_infer_from_other_threads(trt_bundle, crops):
    from edgecore.runtime.bundle import verify_bundle

    engine = open_backend("tensorrt", verify_bundle(trt_bundle))
    try:
        expected = _embed(engine, crops)
        results: list = [None] * 4
        errors: list = []

        def work(slot: int) -> None:
            try:
                results[slot] = _embed(engine, crops)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert not errors
        for result in results:
            np.testing.assert_array_equal(result, expected)
    finally:
        engine.close()
    with pytest.raises(EdgecoreError, match="closed"):
        engine.infer(crops[:engine.batch])
