"""The pure torch feature module and the backbone registry."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgecore.backbones import available_backbones, create_backbone
from edgecore.features import PatchCoreFeatures, adaptive_pool_matrix, grid_shape
from edgecore.runtime.errors import WeightsError


@pytest.mark.parametrize("channels,dim", [(1536, 1024), (10, 3), (7, 7)])
def test_reduction_matrix_equals_adaptive_avg_pool(channels, dim):
    x = torch.randn(5, channels)
    ours = x @ torch.from_numpy(adaptive_pool_matrix(channels, dim))
    ref = F.adaptive_avg_pool1d(x[:, None, :], dim)[:, 0]
    torch.testing.assert_close(ours, ref)


def test_registry_lists_the_three_backbones():
    assert {"wide_resnet50_2", "resnet18", "efficientnet_lite0"} <= set(available_backbones())


def test_missing_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="wide_resnet50_2-95faca4d.pth"):
        create_backbone("wide_resnet50_2")
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("resnet18", weights=tmp_path / "nope.pth")


def test_random_init_warns_and_is_reproducible():
    with pytest.warns(UserWarning, match="RANDOM"):
        a = create_backbone("resnet18", random_init=True, seed=3)
    with pytest.warns(UserWarning):
        b = create_backbone("resnet18", random_init=True, seed=3)
    assert a.weights_sha256 == b.weights_sha256


def test_unknown_layer_and_backbone():
    with pytest.raises(ValueError, match="no layer"):
        create_backbone("efficientnet_lite0", layers=["layer2"])
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("vgg")


def test_lite0_feature_module_shapes_and_normalisation():
    backbone = create_backbone("efficientnet_lite0")
    assert backbone.channels == [40, 112] and backbone.strides == [8, 16]
    module = PatchCoreFeatures(backbone.module, backbone.channels, backbone.spec.mean, backbone.spec.std, 1024).eval()
    assert module.embed_dim == 152 and module.reduction is None  # no-op when already smaller
    assert grid_shape(module, (224, 224)) == (28, 28)
    images = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = module(images)
        # the in-module normalisation equals the textbook one
        x = images.permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(backbone.spec.mean).view(1, 3, 1, 1)) / torch.tensor(backbone.spec.std).view(1, 3, 1, 1)
        first = F.avg_pool2d(backbone.module(x)[0], 3, 1, 1)
    assert out.shape == (2, 28 * 28, 152) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, :, :40], first.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in module.parameters())


def test_wrn50_random_init_reduces_to_embed_dim():
    with pytest.warns(UserWarning):
        backbone = create_backbone("wide_resnet50_2", random_init=True)
    module = PatchCoreFeatures(backbone.module, backbone.channels, backbone.spec.mean, backbone.spec.std, 1024).eval()
    with torch.no_grad():
        out = module(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    assert out.shape == (1, 8 * 8, 1024)
    assert np.isfinite(out.numpy()).all()
