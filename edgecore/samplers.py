"""Coreset samplers by name (timm-style registry: each entry owns its factory).

``fit`` asks :func:`create_sampler` for ``FitConfig.sampler``; adding a sampler is
one :func:`register_sampler` entry (here or next to its implementation) plus its
tests. Every sampler has ``select(features: N×D float32) -> row indices of the coreset``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np


class Sampler(Protocol):
    def select(self, features: np.ndarray) -> np.ndarray:
        """N×D features → indices of the rows to keep."""
        ...


@dataclass(frozen=True)
class SamplerEntry:
    name: str
    factory: Callable[..., Sampler]  # (ratio, projection_dim, seed, device, progress) -> Sampler
    summary: str


SAMPLERS: dict[str, SamplerEntry] = {}


def register_sampler(name: str, summary: str) -> Callable[[Callable[..., Sampler]], Callable[..., Sampler]]:
    """Decorator: register ``factory(ratio, projection_dim, seed, device, progress)`` under ``name``."""

    def decorate(factory: Callable[..., Sampler]) -> Callable[..., Sampler]:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        SAMPLERS[name] = SamplerEntry(name, factory, summary)
        return factory

    return decorate


def available_samplers() -> list[str]:
    return sorted(SAMPLERS)


def create_sampler(
    name: str, ratio: float, projection_dim: int, seed: int, device: str = "cpu", progress: bool = False
) -> Sampler:
    """Build the sampler registered as ``name``.

    Args:
        name: registry key (see :func:`available_samplers`).
        ratio: share of the patches to keep.
        projection_dim: random-projection size for the distance computations (where used).
        seed: for any randomness.
        device: ``cpu`` or ``cuda`` (where the sampler can use torch).
        progress: show a progress bar.

    Returns:
        an object with ``select(features) -> indices``.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(available_samplers())}")
    return SAMPLERS[name].factory(ratio=ratio, projection_dim=projection_dim, seed=seed, device=device, progress=progress)


@register_sampler("k-center-greedy", "the paper's greedy coreset (farthest-first on a random projection)")
def _k_center_greedy(ratio: float, projection_dim: int, seed: int, device: str, progress: bool) -> Sampler:
    from edgecore.coreset import KCenterGreedySampler

    return KCenterGreedySampler(ratio=ratio, projection_dim=projection_dim, seed=seed, device=device, progress=progress)


@register_sampler("random", "uniform random subset (a baseline for comparisons)")
def _random(ratio: float, projection_dim: int, seed: int, device: str, progress: bool) -> Sampler:
    from edgecore.coreset import RandomSampler

    return RandomSampler(ratio=ratio, seed=seed)
