"""Extension points are registries (each entry owns its factory), and a model fitted with --weights reloads."""
import importlib
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from edgecore import backbones, samplers
from edgecore.runtime.backends import BACKENDS, backend_entry, open_backend


def test_each_backend_entry_owns_its_open_and_its_compile():
    assert set(BACKENDS) == {"openvino", "tensorrt"}
    for entry in BACKENDS.values():
        module, function = entry.compile.split(":")
        assert callable(getattr(importlib.import_module(module), function))
        assert entry.compile_on in ("host", "target") and entry.precisions
    assert BACKENDS["tensorrt"].compile_on == "target"  # plans are built on the GPU that runs them
    with pytest.raises(ValueError, match="unknown backend 'onnxruntime'; choose openvino or tensorrt"):
        backend_entry("onnxruntime")
    with pytest.raises(ValueError, match="unknown backend"):
        open_backend("onnxruntime", bundle=None)


class _TinyTrunk(nn.Module):
    def __init__(self, net: nn.Module, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.net, self.layers = net, layers

    def forward(self, x):
        a = self.net[0](x)
        return [a, self.net[1](a)]


def test_a_new_backbone_is_one_registry_entry(monkeypatch):
    monkeypatch.setattr(backbones, "REGISTRY", dict(backbones.REGISTRY))
    spec = backbones.BackboneSpec(
        name="tiny", layers={"a": backbones.LayerInfo(8, 2), "b": backbones.LayerInfo(16, 4)}, default_layers=("a", "b"),
        mean=backbones.IMAGENET_MEAN, std=backbones.IMAGENET_STD,
        build=lambda size: nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1)),
        trunk=_TinyTrunk, find_weights=lambda: None, weights_hint="tests only",
    )
    backbones.register_backbone(spec)
    with pytest.raises(ValueError, match="registered twice"):
        backbones.register_backbone(spec)
    built = backbones.create_backbone("tiny", random_init=True)
    outs = built.module(torch.zeros(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == built.channels == [8, 16] and built.strides == [2, 4]
    assert "tiny" in backbones.available_backbones()
    assert all(callable(s.trunk) and callable(s.build) for s in backbones.REGISTRY.values())


def test_samplers_come_from_the_registry(monkeypatch):
    assert {"k-center-greedy", "random"} <= set(samplers.available_samplers())
    features = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    chosen = samplers.create_sampler("random", ratio=0.1, projection_dim=8, seed=0).select(features)
    assert len(chosen) == 20 and len(set(chosen.tolist())) == 20
    with pytest.raises(ValueError, match="unknown sampler 'best'"):
        samplers.create_sampler("best", ratio=0.1, projection_dim=8, seed=0)
    monkeypatch.setattr(samplers, "SAMPLERS", dict(samplers.SAMPLERS))

    @samplers.register_sampler("first-rows", "tests only")
    def first_rows(ratio, projection_dim, seed, device, progress):
        class First:
            def select(self, features):
                return np.arange(max(1, int(len(features) * ratio)))
        return First()

    assert samplers.create_sampler("first-rows", ratio=0.05, projection_dim=8, seed=0).select(features).tolist() == list(range(10))
    with pytest.raises(ValueError, match="registered twice"):
        samplers.register_sampler("first-rows", "again")(first_rows)


def test_fit_uses_the_configured_sampler(synthetic_category):
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.model import FitConfig, fit
    from edgecore.runtime.preprocess import PreprocessConfig

    images = [rgb for _, rgb in ImageStream(train_samples(synthetic_category))][:6]
    config = FitConfig(device="cpu", preprocess=PreprocessConfig(64, 48), sampler="random", val_ratio=0.0, embed_dim=64)
    model = fit(images, config)
    assert model.config["coreset"]["sampler"] == "random"
    with pytest.raises(ValueError, match="unknown sampler 'nope'; available: .*k-center-greedy"):
        FitConfig(sampler="nope")  # refused before any work


def test_model_fitted_with_weights_path_reloads_and_a_moved_file_can_be_given(synthetic_category, tmp_path):
    """The bug: a model fitted with `fit --weights PATH` (weights unlike the default source) could not be
    reloaded by predict/evaluate/export, which rebuilt the backbone from the default source."""
    from typer.testing import CliRunner

    from edgecore.cli import app
    from edgecore.model import PatchCoreModel
    from edgecore.runtime.errors import EdgecoreError

    source = backbones.REGISTRY["efficientnet_lite0"].find_weights()
    if source is None:
        pytest.skip("Lite0 weights package not installed")
    state = torch.load(source, map_location="cpu", weights_only=True)
    weights = tmp_path / "weights" / "fine-tuned-lite0.pth"  # e.g. fine-tuned in-house: not the package's bytes
    weights.parent.mkdir()
    torch.save({k: (v * 1.01 if v.is_floating_point() else v) for k, v in state.items()}, weights)
    model_dir = tmp_path / "model"
    runner = CliRunner()
    result = runner.invoke(app, ["fit", str(synthetic_category), "-o", str(model_dir), "--weights", str(weights),
                                 "--resize", "64", "--crop", "48", "--device", "cpu", "--embed-dim", "64"])
    assert result.exit_code == 0, result.output
    assert PatchCoreModel.load(model_dir, device="cpu").config["backbone"]["weights_source"] == str(weights)

    moved = tmp_path / "archive" / "lite0.pth"
    moved.parent.mkdir()
    weights.rename(moved)
    with pytest.raises(EdgecoreError, match="backbone weights differ"):  # never silently the default weights
        PatchCoreModel.load(model_dir, device="cpu")
    assert PatchCoreModel.load(model_dir, device="cpu", weights=str(moved)).memory_bank.shape[1] == 64
    result = runner.invoke(app, ["predict", str(model_dir), str(synthetic_category / "test" / "good"),
                                 "-o", str(tmp_path / "p"), "--weights", str(moved), "--overlays", "none"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["predict", str(model_dir), str(synthetic_category / "test" / "good"),
                                 "-o", str(tmp_path / "q")])
    assert result.exit_code == 2 and "error: backbone weights differ" in result.output


def test_a_new_search_mode_is_one_registry_entry_and_round_trips_through_a_bundle_index(monkeypatch, tmp_path):
    """A mode that stores nothing beyond the vectors: register it, build, save, load and search with it."""
    from edgecore.export.index_build import build_index
    from edgecore.runtime import index as index_module
    from edgecore.runtime.index import SEARCH_MODES, QuantizedIndex, SearchMode

    opened = []

    class BruteForce:
        def __init__(self, points: np.ndarray) -> None:
            self.points, self.shape = points, points.shape

        def search(self, queries, k):
            distances = np.linalg.norm(queries[:, None, :] - self.points[None], axis=2)
            order = np.argsort(distances, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(distances, order, axis=1).astype(np.float32), order.astype(np.int64)

        def memory_bytes(self) -> int:
            return 0

    def open_brute(dtype, arrays, graph, params):
        opened.append(dtype)
        return BruteForce(index_module.decode(dtype, arrays))

    monkeypatch.setitem(SEARCH_MODES, "brute", SearchMode("brute", graph_arrays={}, open=open_brute))
    coreset = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    built = build_index(coreset, dtype="fp32", mode="brute")
    loaded = QuantizedIndex.load(tmp_path, built.save(tmp_path))
    assert loaded.mode == "brute" and opened == ["fp32", "fp32"]
    queries = coreset[:20] + 0.01
    exact = build_index(coreset, dtype="fp32", mode="exact")
    np.testing.assert_array_equal(loaded.search(queries, 3)[1], exact.search(queries, 3)[1])
    with pytest.raises(ValueError, match="mode must be one of"):
        QuantizedIndex("fp32", {"codes": coreset}, "nonexistent")
