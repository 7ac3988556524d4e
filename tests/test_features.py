"""The pure torch feature module and the backbone registry."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgecore.backbones import available_backbones, create_backbone
from edgecore.features import MIN_GROUP_CHANNELS, PatchCoreFeatures, adaptive_pool_matrix, grid_shape, grouped_pool
from edgecore.runtime.errors import WeightsError


@pytest.mark.parametrize("channels,dim", [(1536, 1024), (10, 3), (7, 7)])
def test_reduction_matrix_equals_adaptive_avg_pool(channels, dim):
    x = torch.randn(5, channels)
    ours = x @ torch.from_numpy(adaptive_pool_matrix(channels, dim))
    ref = F.adaptive_avg_pool1d(x[:, None, :], dim)[:, 0]
    torch.testing.assert_close(ours, ref)


class _Maps(torch.nn.Module):
    """A stand-in trunk: two fixed random maps (C1 at h×w, C2 at h/2×w/2), whatever the image."""

    def __init__(self, c1: int, c2: int, h: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.maps = [torch.randn(1, c1, h, h, generator=generator), torch.randn(1, c2, h // 2, h // 2, generator=generator)]

    def forward(self, x):
        return [m.expand(x.shape[0], -1, -1, -1) for m in self.maps]


@pytest.mark.parametrize("channels,dim", [(1536, 1024), (1536, 300), (10, 3), (24, 12), (7, 5)])
def test_grouped_pool_is_the_block_diagonal_of_the_matrix(channels, dim):
    groups, block = grouped_pool(channels, dim)
    assert channels % groups == 0 and dim % groups == 0 and block.shape == (channels // groups, dim // groups)
    assert block.shape[0] >= MIN_GROUP_CHANNELS or groups % 2 == 1
    np.testing.assert_array_equal(np.kron(np.eye(groups, dtype=np.float32), block), adaptive_pool_matrix(channels, dim))


@pytest.mark.parametrize("c1,c2,dim,groups", [
    (512, 1024, 1024, 128),  # WRN50: 12 → 8 blocks (four of 3 → 2)
    (4, 6, 3, 1),  # one 10 → 3 block: windows of 4
    (2, 3, 3, 1),  # windows of 2, 3, 2: per-output weights
    (512, 1024, 300, 12),  # 128 → 25 blocks: windows of 6
])
def test_module_pools_channels_like_adaptive_avg_pool(c1, c2, dim, groups):
    module = PatchCoreFeatures(_Maps(c1, c2, 8), [c1, c2], (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), dim).eval()
    assert module.pool_groups == groups
    with torch.no_grad():
        out = module(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
        maps = [F.avg_pool2d(m, 3, 1, 1, count_include_pad=True) for m in module.trunk.maps]
        maps[1] = F.interpolate(maps[1], size=(8, 8), mode="bilinear", align_corners=False)
        patches = torch.cat(maps, dim=1).flatten(2).transpose(1, 2)
        expected = F.adaptive_avg_pool1d(patches, dim)
    assert out.shape == (2, 64, dim)
    torch.testing.assert_close(out, expected.expand(2, -1, -1), rtol=1e-6, atol=1e-6)


def test_wrn50_channel_pairs_are_bit_identical_to_their_means():
    """Each output of WRN50's 1536 → 1024 is the mean of a channel pair; the block MatMul gives the same bits."""
    module = PatchCoreFeatures(_Maps(512, 1024, 8), [512, 1024], (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), 1024).eval()
    with torch.no_grad():
        out = module(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
        maps = [F.avg_pool2d(m, 3, 1, 1, count_include_pad=True) for m in module.trunk.maps]
        maps[1] = F.interpolate(maps[1], size=(8, 8), mode="bilinear", align_corners=False)
        stacked = torch.cat(maps, dim=1).flatten(2)
        first = torch.tensor([j * 3 // 2 for j in range(1024)])
        pairs = ((stacked.index_select(1, first) + stacked.index_select(1, first + 1)) * 0.5).transpose(1, 2)
    assert torch.equal(out, pairs)


def test_wrn50_graph_pools_channels_with_one_small_matmul():
    """The 1536 → 1024 reduction is one 12×8 MatMul in the graph (dense: 9 ms of the engine; gathers: 1.5 ms)."""
    from edgecore.export.onnx_export import export_onnx

    with pytest.warns(UserWarning):
        backbone = create_backbone("wide_resnet50_2", random_init=True)
    module = PatchCoreFeatures(backbone.module, backbone.channels, backbone.spec.mean, backbone.spec.std, 1024).eval()
    graph = export_onnx(module, 64).graph
    ops = {node.op_type for node in graph.node}
    weights = {init.name: tuple(init.dims) for init in graph.initializer}
    matmuls = [node for node in graph.node if node.op_type == "MatMul"]
    assert "Gather" not in ops and "Gemm" not in ops and len(matmuls) == 1
    assert [weights.get(name) for name in matmuls[0].input] == [None, (12, 8)]


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
    assert module.embed_dim == 152 and module.pool_block is None  # no-op when already smaller
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
