"""EfficientNet-Lite1/-Lite2 (#15.6): real ImageNet weights from their pip packages, the stage taps Lite0 uses."""
from __future__ import annotations

import pytest
import torch

from edgecore.backbones import REGISTRY, create_backbone


@pytest.mark.parametrize("name,channels", [("efficientnet_lite1", [40, 112]), ("efficientnet_lite2", [48, 120])])
def test_lite_variants_load_their_shipped_weights_and_tap_stride_8_and_16(name, channels):
    backbone = create_backbone(name, image_size=(96, 64))
    assert backbone.weights_source.endswith(".pth") and name.replace("_", "-") in backbone.weights_source
    maps = backbone.module(torch.zeros(1, 3, 96, 64))
    assert [m.shape[1] for m in maps] == channels == backbone.channels
    assert [tuple(m.shape[-2:]) for m in maps] == [(12, 8), (6, 4)]  # strides 8 and 16
    lite0 = create_backbone("efficientnet_lite0")
    assert backbone.weights_sha256 != lite0.weights_sha256
    assert REGISTRY[name].mean == REGISTRY["efficientnet_lite0"].mean  # one family, one preprocessing


def test_lite_weights_of_another_variant_are_refused(tmp_path):
    from edgecore.runtime.errors import WeightsError

    with pytest.raises(WeightsError, match="efficientnet_lite2"):
        create_backbone("efficientnet_lite2", weights=REGISTRY["efficientnet_lite0"].find_weights())
