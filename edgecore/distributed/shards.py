"""Memory-mapped feature shards: the patch bank on disk, one ``.npy`` per group of images.

A shard is written once, atomically (temporary file, then rename), by the worker
that extracted it, so a worker killed half-way leaves no partial shard and its
retry writes the same bytes. Readers map shards with ``mmap_mode="r"``: the page
cache holds what is touched, no process holds the whole bank.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shard:
    """One shard file and where its rows sit in the global bank."""

    index: int
    path: Path
    first_row: int
    rows: int

    def open(self) -> np.ndarray:
        """The shard's rows (rows × D float32), memory-mapped read-only."""
        return np.load(self.path, mmap_mode="r", allow_pickle=False)


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard_{index:05d}.npy"


def write_shard(directory: Path, index: int, rows: np.ndarray) -> Path:
    """Write ``rows`` as shard ``index`` atomically; an existing complete shard is replaced."""
    path = shard_path(directory, index)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            np.save(handle, np.ascontiguousarray(rows, dtype=np.float32), allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def shard_table(paths: list[Path]) -> list[Shard]:
    """Shards in index order with their global row offsets (read from the .npy headers only)."""
    shards, first = [], 0
    for index, path in enumerate(paths):
        rows = int(np.load(path, mmap_mode="r", allow_pickle=False).shape[0])
        shards.append(Shard(index, path, first, rows))
        first += rows
    return shards


def gather_rows(shards: list[Shard], rows: np.ndarray) -> np.ndarray:
    """Global bank rows (any order) read from the shards; only those rows are loaded."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = np.array([shard.first_row for shard in shards], dtype=np.int64)
    owner = np.searchsorted(starts, rows, side="right") - 1
    out = None
    for shard_index in np.unique(owner):
        mask = owner == shard_index
        shard = shards[int(shard_index)]
        block = shard.open()[rows[mask] - shard.first_row]
        if out is None:
            out = np.empty((rows.size, block.shape[1]), dtype=np.float32)
        out[mask] = block
    assert out is not None, "no rows requested"
    return out


def split_evenly(count: int, parts: int) -> list[range]:
    """``count`` items as ``parts`` contiguous, nearly equal, non-empty ranges (fewer if count < parts)."""
    parts = max(1, min(parts, count))
    bounds = np.linspace(0, count, parts + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
