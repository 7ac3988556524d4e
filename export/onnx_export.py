"""Fuse backbone + patch pooling + reduction into ONE static ONNX graph.

Input: the preprocessed crop as uint8 RGB, NHWC (the cast and mean/std live
inside the graph). Output: N×(h·w)×D float32 patch embeddings. Opset 17 so both
TensorRT's parser and OpenVINO's frontend take it; simplified with onnxsim;
``onnx.checker`` full check; every op must be on the allow-list both support.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from edgecore.features import PatchCoreFeatures
from edgecore.runtime.errors import EdgecoreError

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "embeddings"
ALLOWLIST_FILE = Path(__file__).with_name("onnx_ops_allowlist.json")


def allowed_ops() -> set[str]:
    return set(json.loads(ALLOWLIST_FILE.read_text())["ops"])


def graph_ops(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def export_onnx(module: PatchCoreFeatures, crop: int | tuple[int, int], batch: int = 1) -> onnx.ModelProto:
    """Trace the feature module into a simplified, checked ONNX model (in memory); ``crop``
    is the static input side, or (height, width) for an aspect-aware bundle."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    module = module.cpu().eval()
    height, width = (crop, crop) if isinstance(crop, int) else crop
    dummy = torch.zeros(batch, height, width, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            (dummy,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    model = _simplify(model)
    model.producer_name = "edgecore"
    onnx.checker.check_model(model, full_check=True)
    unsupported = graph_ops(model) - allowed_ops()
    if unsupported:
        raise EdgecoreError(
            f"the exported graph uses ops outside the TensorRT+OpenVINO allow-list: {sorted(unsupported)} "
            f"(see {ALLOWLIST_FILE.name})"
        )
    return model


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise EdgecoreError("onnxsim could not validate the simplified graph")
    return simplified


def torch_reference(module: PatchCoreFeatures, crops: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module.cpu().eval()(torch.from_numpy(np.ascontiguousarray(crops))).numpy()
