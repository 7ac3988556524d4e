"""The whole PatchCore feature path as ONE pure ``torch.nn.Module``.

uint8 NHWC crop → normalise → frozen backbone → 3×3 local average per layer →
deeper maps bilinearly upsampled to the shallowest grid → concatenate → fixed
linear reduction to ``embed_dim`` (adaptive average pooling over channels) →
N×(h·w)×D patch embeddings.

Nothing else lives here (anomalib's split): the exporter turns exactly this
module into the ONNX graph, so the camera computes what the workstation did.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _pool_windows(channels: int, embed_dim: int) -> list[tuple[int, int]]:
    """``adaptive_avg_pool1d``'s window [start, end) over channels for each of the embed_dim outputs."""
    return [((j * channels) // embed_dim, -((-(j + 1) * channels) // embed_dim)) for j in range(embed_dim)]


def adaptive_pool_matrix(channels: int, embed_dim: int) -> np.ndarray:
    """C×D matrix equal to ``adaptive_avg_pool1d`` over channels."""
    matrix = np.zeros((channels, embed_dim), dtype=np.float32)
    for j, (start, end) in enumerate(_pool_windows(channels, embed_dim)):
        matrix[start:end, j] = 1.0 / (end - start)
    return matrix


#: Narrowest channel group of the reduction's MatMul: equal groups are merged in twos until this wide.
MIN_GROUP_CHANNELS = 12


def grouped_pool(channels: int, embed_dim: int) -> tuple[int, np.ndarray]:
    """The same pooling as g equal small ones: (g, a×b matrix) with a = C/g, b = D/g, g a divisor of gcd(C, D).

    Output i·b + t averages channels of group i only (from i·a + ⌊t·a/b⌋ to i·a + ⌈(t+1)·a/b⌉), so the C×D
    matrix is block diagonal with g equal a×b blocks: the reduction is a reshape to g × a and one a×b MatMul.
    Why: WRN50's 1536 → 1024 averages channel pairs. As a dense MatMul it was 9 of the int8 engine's 21 ms
    (1.2 GMAC); as channel gathers, their transpose and reorders 1.5 ms; as this 0.48 ms (the concatenation
    included), bit-identical. Groups are merged up to ``MIN_GROUP_CHANNELS``: OpenVINO's fp32 MatMul took
    0.40 ms on 3×2 blocks and 0.26 on 12×8 (PERF_COUNT, RESULTS.md #11 "The head's reduction as one MatMul").
    """
    groups = math.gcd(channels, embed_dim)
    while groups % 2 == 0 and channels // groups < MIN_GROUP_CHANNELS:
        groups //= 2
    return groups, adaptive_pool_matrix(channels // groups, embed_dim // groups)


class PatchCoreFeatures(nn.Module):
    def __init__(
        self,
        trunk: nn.Module,
        channels: list[int],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        embed_dim: int,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1))
        total = sum(channels)
        self.embed_dim = min(embed_dim, total)
        self.pool_groups, block = grouped_pool(total, self.embed_dim) if embed_dim < total else (0, None)
        # The channel reduction (None: no-op): the a×b block each of the pool_groups channel groups is pooled by.
        self.register_buffer("pool_block", None if block is None else torch.from_numpy(block))
        self.pool = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: N×H×W×3 uint8 → N×(h·w)×D float32 patch embeddings."""
        # Cast first: TensorRT requires a uint8 network input to feed a Cast directly.
        x = images.float().permute(0, 3, 1, 2) * self.scale - self.shift
        maps = [self.pool(m) for m in self.trunk(x)]
        size = maps[0].shape[-2:]
        maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        stacked = torch.cat(maps, dim=1)  # N×C×h×w
        if self.pool_block is None:
            return stacked.flatten(2).transpose(1, 2)  # N×P×C
        n, channels = stacked.shape[:2]
        # channels last first: OpenVINO then writes the concatenation in that layout and runs one small MatMul
        grouped = stacked.permute(0, 2, 3, 1).reshape(n, -1, self.pool_groups, channels // self.pool_groups)
        return (grouped @ self.pool_block).reshape(n, -1, self.embed_dim)


def grid_shape(module: PatchCoreFeatures, input_hw: tuple[int, int]) -> tuple[int, int]:
    """The patch grid (h, w) this module produces for an input_hw (height, width) input."""
    with torch.no_grad():
        maps = module.trunk(torch.zeros(1, 3, *input_hw))
    h, w = maps[0].shape[-2:]
    return int(h), int(w)


def inference_copy(module: PatchCoreFeatures) -> PatchCoreFeatures:
    """A copy for batch inference on the host, bit-identical to ``module`` (tested), never exported.

    A symmetric static zero padding (EfficientNet-Lite's TF "same" padding of its stride-1
    convolutions) becomes the convolution's own padding, and ReLU6 works in place: two
    fewer full passes over each activation, which dominate a CPU forward of the Lite trunk.
    """
    fast = copy.deepcopy(module)
    for layer in fast.modules():
        padding = getattr(layer, "static_padding", None)
        if isinstance(layer, nn.Conv2d) and isinstance(padding, nn.ZeroPad2d) and layer.padding == (0, 0):
            left, right, top, bottom = padding.padding
            if left == right and top == bottom:
                layer.padding = (top, left)
                layer.static_padding = nn.Identity()
        if isinstance(layer, nn.ReLU6):
            layer.inplace = True
    return fast


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def embed_concurrently(
    embed: Callable[[np.ndarray], np.ndarray], batches: Iterable[np.ndarray], workers: int
) -> Iterator[np.ndarray]:
    """``embed(batch)`` for each batch, in order, on ``workers`` threads with single-threaded torch ops.

    On a few CPU cores torch's intra-op threads spend much of a small model's forward
    waiting at per-op barriers (worse on a shared machine); whole batches side by side
    keep every core busy. A batch's numbers do not depend on the thread count, only on
    its size, so the features are bit-identical to a plain loop over the same batches.
    """
    if workers <= 1:
        yield from map(embed, batches)
        return
    with _torch_threads(1), ThreadPoolExecutor(workers) as pool:
        yield from pool.map(embed, batches)
