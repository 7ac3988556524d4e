"""INT8 calibration keeps the whole PatchCore head fp32, whatever the channel reduction is made of."""
import numpy as np
import pytest
import torch
from torch import nn

from edgecore.calibration.int8 import _head_ops, quantize
from edgecore.export.onnx_export import export_onnx
from edgecore.features import PatchCoreFeatures


class _TinyTrunk(nn.Module):
    """Two stages (8 channels at 1/2, 16 at 1/4): a 24 → 12 reduction averages channel pairs (12 blocks of 2 → 1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU())

    def forward(self, x):
        a = self.first(x)
        return [a, self.second(a)]


@pytest.mark.parametrize("embed_dim", [12, 10])  # 2 → 1 blocks; 12 → 5 blocks (windows of 3 and 4)
def test_quantize_leaves_the_head_unquantized(tmp_path, embed_dim):
    import openvino as ov

    module = PatchCoreFeatures(_TinyTrunk(), [8, 16], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), embed_dim).eval()
    assert module.pool_block is not None
    path = tmp_path / "m.onnx"
    path.write_bytes(export_onnx(module, 32).SerializeToString())
    model = ov.Core().read_model(str(path))
    head = set(_head_ops(model))
    assert {"MatMul", "AvgPool", "Concat"} <= {op.get_type_name() for op in model.get_ordered_ops()
                                              if op.get_friendly_name() in head}
    crops = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    quantized = quantize(model, crops, vnni=True)
    fed_by_quantizer = {op.get_friendly_name() for op in quantized.get_ordered_ops()
                        if any(v.get_node().get_type_name() == "FakeQuantize" for v in op.input_values())}
    assert fed_by_quantizer and not fed_by_quantizer & head  # the trunk is quantized, the head is not
