"""The fused graph: one static ONNX model, allow-listed ops, and parity with the torch module."""
import numpy as np
import openvino as ov
import pytest

from edgecore.backbones import create_backbone
from edgecore.export.onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, allowed_ops, export_onnx, graph_ops, torch_reference
from edgecore.features import PatchCoreFeatures


def _module(name: str, random_init: bool = False) -> PatchCoreFeatures:
    backbone = create_backbone(name, random_init=random_init)
    return PatchCoreFeatures(backbone.module, backbone.channels, backbone.spec.mean, backbone.spec.std, 1024).eval()


def _openvino_fp32(model, crops: np.ndarray) -> np.ndarray:
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model=model.SerializeToString()), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.concatenate([compiled(crop[None])[0] for crop in crops])


def _relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.abs(candidate - reference).max() / np.abs(reference).max())


@pytest.fixture(scope="module")
def lite0():
    module = _module("efficientnet_lite0")
    return module, export_onnx(module, crop=112)


def test_graph_is_static_uint8_nhwc_in_float_embeddings_out(lite0):
    _, model = lite0
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == INPUT_NAME and inp.type.tensor_type.elem_type == 2  # UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [1, 112, 112, 3]
    assert out.name == OUTPUT_NAME and out.type.tensor_type.elem_type == 1  # FLOAT
    assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 14 * 14, 152]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == OPSET


def test_every_op_is_in_the_tensorrt_and_openvino_allow_list(lite0):
    _, model = lite0
    ops = graph_ops(model)
    assert ops <= allowed_ops()
    assert {"Cast", "Conv", "AveragePool", "Resize", "Concat"} <= ops  # the fused pieces are really in there


def test_parity_openvino_fp32_vs_torch_on_synthetic_images(lite0, synthetic_category):
    from edgecore.runtime.imageio import load_image
    from edgecore.runtime.preprocess import PreprocessConfig, preprocess

    module, model = lite0
    paths = sorted((synthetic_category / "test").rglob("*.png"))[:4]
    crops = np.stack([preprocess(load_image(p), PreprocessConfig(128, 112)) for p in paths])
    assert _relative_error(torch_reference(module, crops), _openvino_fp32(model, crops)) < 1e-4


@pytest.mark.shared_data
def test_parity_on_real_images_wrn50_and_lite0(bottle):
    from edgecore.runtime.imageio import load_image
    from edgecore.runtime.preprocess import PreprocessConfig, preprocess

    paths = [bottle / "test" / "broken_large" / "000.png", bottle / "test" / "good" / "000.png"]
    crops = np.stack([preprocess(load_image(p), PreprocessConfig()) for p in paths])
    for name, random_init in (("efficientnet_lite0", False), ("wide_resnet50_2", True)):
        module = _module(name, random_init)
        model = export_onnx(module, crop=224)
        assert graph_ops(model) <= allowed_ops()
        assert _relative_error(torch_reference(module, crops), _openvino_fp32(model, crops)) < 1e-4, name


def test_fixed_larger_batch(lite0):
    module, _ = lite0
    model = export_onnx(module, crop=112, batch=3)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    with pytest.raises(ValueError):
        export_onnx(module, crop=112, batch=0)
