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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


#: Widest pooling window that is computed as that many channel gathers; wider ones use the matrix.
MAX_GATHERED_WINDOW = 4


def _pool_windows(channels: int, embed_dim: int) -> list[tuple[int, int]]:
    """``adaptive_avg_pool1d``'s window [start, end) over channels for each of the embed_dim outputs."""
    return [((j * channels) // embed_dim, -((-(j + 1) * channels) // embed_dim)) for j in range(embed_dim)]


def adaptive_pool_matrix(channels: int, embed_dim: int) -> np.ndarray:
    """C×D matrix equal to ``adaptive_avg_pool1d`` over channels (a plain MatMul in ONNX)."""
    matrix = np.zeros((channels, embed_dim), dtype=np.float32)
    for j, (start, end) in enumerate(_pool_windows(channels, embed_dim)):
        matrix[start:end, j] = 1.0 / (end - start)
    return matrix


def adaptive_pool_gathers(channels: int, embed_dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The same pooling as K channel gathers: (K×D indices, K×D weights), None if a window exceeds
    ``MAX_GATHERED_WINDOW``.

    Output j is Σ_t weights[t, j] · x[indices[t, j]]. Why: the dense C×D matrix is almost all zeros
    (WRN50's 1536 → 1024 averages channel pairs), yet as a MatMul it was 9 of the int8 engine's 21 ms
    on the CPU (fp32 GEMM, 1.2 GMAC); two gathers and an add take 0.5 ms (OpenVINO PERF_COUNT, RESULTS.md).
    """
    windows = _pool_windows(channels, embed_dim)
    width = max(end - start for start, end in windows)
    if width > MAX_GATHERED_WINDOW:
        return None
    indices = np.zeros((width, embed_dim), dtype=np.int64)
    weights = np.zeros((width, embed_dim), dtype=np.float32)
    for j, (start, end) in enumerate(windows):
        for t in range(width):
            indices[t, j] = min(start + t, end - 1)  # a padded slot repeats the last channel, weighted 0
            weights[t, j] = 1.0 / (end - start) if start + t < end else 0.0
    return indices, weights


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
        reduction = indices = weights = None
        self.gather_scale: float | None = None
        if embed_dim < total:
            gathers = adaptive_pool_gathers(total, embed_dim)
            if gathers is None:
                reduction = torch.from_numpy(adaptive_pool_matrix(total, embed_dim))
            else:
                indices = torch.from_numpy(gathers[0])
                if np.all(gathers[1] == gathers[1][0, 0]):
                    self.gather_scale = float(gathers[1][0, 0])
                else:
                    weights = torch.from_numpy(gathers[1][:, None, :, None])
        # The channel reduction, as one of: a C×D matrix (windows too wide to gather); or K×D channel
        # indices whose gathers are summed, then scaled by gather_scale (every window the same width) or
        # weighted per output by the K×1×D×1 gather_weights (not).
        self.register_buffer("reduction", reduction)
        self.register_buffer("gather_indices", indices)
        self.register_buffer("gather_weights", weights)
        self.pool = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: N×H×W×3 uint8 → N×(h·w)×D float32 patch embeddings."""
        # Cast first: TensorRT requires a uint8 network input to feed a Cast directly.
        x = images.float().permute(0, 3, 1, 2) * self.scale - self.shift
        maps = [self.pool(m) for m in self.trunk(x)]
        size = maps[0].shape[-2:]
        maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        stacked = torch.cat(maps, dim=1).flatten(2)  # N×C×P
        if self.gather_indices is not None:
            stacked = self._pool_channels(stacked)
        patches = stacked.transpose(1, 2)  # N×P×C
        if self.reduction is not None:
            patches = patches @ self.reduction
        return patches

    def _pool_channels(self, stacked: torch.Tensor) -> torch.Tensor:
        """N×C×P → N×D×P: adaptive average pooling over channels as a few whole-row gathers."""
        pooled = None
        for t, indices in enumerate(self.gather_indices):
            term = stacked.index_select(1, indices)
            if self.gather_weights is not None:
                term = term * self.gather_weights[t]
            pooled = term if pooled is None else pooled + term
        return pooled * self.gather_scale if self.gather_weights is None else pooled


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
