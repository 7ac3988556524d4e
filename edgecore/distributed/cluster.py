"""Connecting to a Ray cluster: ``auto`` (a running cluster, else a private local one) or an address.

Ray is optional (``pip install edgecore[cluster]``); it is imported here only. The
local cluster is offline and quiet: no dashboard, no usage statistics, CPUs capped.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def import_ray() -> Any:
    """``ray`` with usage statistics off, or a clear error naming the extra to install."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise RuntimeError("--cluster needs Ray: pip install 'edgecore[cluster]'") from exc
    return ray


@contextmanager
def connect(cluster: str = "auto", num_cpus: int | None = None) -> Iterator[Any]:
    """Yield ``ray`` connected to ``cluster``; shut down only what this call started.

    Args:
        cluster: ``auto`` joins a running cluster (``RAY_ADDRESS`` or a local ``ray start --head``)
            or starts a private one on this machine; anything else is a cluster address
            (``HOST:PORT`` or ``ray://HOST:PORT``).
        num_cpus: CPUs of a private local cluster (default: all of this machine's).

    Returns:
        (yields) the ``ray`` module, initialised.
    """
    ray = import_ray()
    if ray.is_initialized():  # a caller (a test, fit-many) already holds a connection: share it
        yield ray
        return
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if cluster == "auto":
        try:
            ray.init(address="auto", **options)
        except (ConnectionError, RuntimeError):
            ray.init(num_cpus=num_cpus, **options)
    else:
        ray.init(address=cluster, **options)
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_cpus(ray: Any) -> int:
    """CPUs the connected cluster offers (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_gpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("GPU", 0))
