"""``edgecore fit --cluster``: the fit of :func:`edgecore.model.fit`, spread over a Ray cluster.

1. Features: one actor per CPU (or GPU) holds the frozen backbone; each takes a
   group of images (a shard), reads and decodes them itself, embeds them and writes
   the patches as one memory-mapped shard file (atomically). Actors are restarted
   and their in-flight shard retried when a worker dies; a shard's bytes do not
   depend on which worker wrote it, so the result does not change.
2. Coreset: 2-round composable greedy k-center (:mod:`.composable`), round 1 as one
   task per shard on the mapped file.
3. Eq. 7 neighbour table: one task per block of coreset rows, against the coreset
   held once in the object store.
4. Threshold: the actors score the held-out images with the final model.

The driver holds the coreset (the model) and the per-shard results, never the bank.
Images and the work folder must be reachable by every node under the same path
(local disk on one machine; shared storage across machines). The model directory
is written atomically; the work folder is removed whatever happens.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecore.distributed.cluster import cluster_cpus, cluster_gpus, connect
from edgecore.distributed.composable import DEFAULT_OVERSAMPLE, composable_kcenter
from edgecore.distributed.shards import gather_rows, shard_table, split_evenly, write_shard

# Images per feature shard: small enough to balance and to retry cheaply, large enough for full batches.
DEFAULT_SHARD_IMAGES = 64
# Coreset rows per neighbour-table task.
_TABLE_BLOCK = 4096


class FeatureWorker:
    """A Ray actor: the frozen feature module of one model, on this worker's CPU or GPU."""

    def __init__(self, model_config: dict, weights: str | None, device: str, threads: int, work_dir: str) -> None:
        import torch

        from edgecore.model import build_feature_module, resolve_device

        torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.config = model_config
        self.features = build_feature_module(model_config, weights=weights).to(self.device).eval()
        workers = Path(work_dir) / "workers"
        workers.mkdir(exist_ok=True)
        (workers / str(os.getpid())).touch()  # lets an operator (or a test) see which processes hold workers

    def _crops(self, paths: Sequence[str], skip_bad: bool = False) -> tuple[np.ndarray | None, list[list[str]]]:
        """Crops of the readable ``paths`` (None if none is) and ``[path, reason]`` of those skipped;
        with ``skip_bad=False`` the first unreadable image raises, as in the single-node fit."""
        from edgecore.runtime.errors import ImageError
        from edgecore.runtime.imageio import load_image
        from edgecore.runtime.preprocess import PreprocessConfig, preprocess

        config = PreprocessConfig.from_dict(self.config["preprocess"])
        crops, skipped = [], []
        for path in paths:
            try:
                crops.append(preprocess(load_image(path), config))
            except ImageError as exc:
                if not skip_bad:
                    raise
                skipped.append([str(path), str(exc)])
        return (np.stack(crops) if crops else None), skipped

    def _embed(self, crops: np.ndarray, batch_size: int) -> np.ndarray:
        import torch

        parts = []
        with torch.no_grad():
            for i in range(0, len(crops), batch_size):
                tensor = torch.from_numpy(np.ascontiguousarray(crops[i : i + batch_size])).to(self.device)
                parts.append(self.features(tensor).float().cpu().numpy())
        return np.concatenate(parts)

    def extract(self, index: int, paths: Sequence[str], directory: str, batch_size: int,
                skip_bad: bool = False) -> tuple[int, str | None, list[list[str]]]:
        """Embed ``paths`` and write them as shard ``index`` (patches in image order).

        Returns (index, the shard's path or None when no image of it was readable, skipped files).
        """
        from edgecore.runtime.preprocess import PreprocessConfig
        from edgecore.runtime.tiles import cut_tiles  # tile mode: every tile goes into the bank

        crops, skipped = self._crops(paths, skip_bad)
        if crops is None:
            return index, None, skipped
        config = PreprocessConfig.from_dict(self.config["preprocess"])
        embeddings = self._embed(cut_tiles(crops, config), batch_size)
        return index, str(write_shard(Path(directory), index, embeddings.reshape(-1, embeddings.shape[-1]))), skipped

    def score(self, paths: Sequence[str], memory_bank: np.ndarray, table: np.ndarray, batch_size: int,
              skip_bad: bool = False) -> tuple[np.ndarray, list[list[str]]]:
        """Image scores of the readable ``paths`` under the final model (the single-node fit's scorer)."""
        from edgecore.model import PatchCoreModel

        crops, skipped = self._crops(paths, skip_bad)
        if crops is None:
            return np.zeros(0, dtype=np.float32), skipped
        model = PatchCoreModel(self.config, self.features, memory_bank, table, self.device)
        return model.score_crops(crops, batch_size).image, skipped

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a module-level step function (a coreset round, a table block) in this warm worker."""
        return function(*args)


def _neighbour_block(points: np.ndarray, start: int, stop: int, k: int) -> np.ndarray:
    """Rows ``start:stop`` of the Eq. 7 neighbour table (same rule as ``runtime.search.neighbour_table``)."""
    from edgecore.knn import exact_search

    _, index = exact_search(points).search(points[start:stop], k)
    own = np.arange(start, stop)
    for row in np.nonzero(index[:, 0] != own)[0]:  # the point itself first, also among exact duplicates
        others = [i for i in index[row] if i != own[row]]
        index[row] = [own[row], *others[: k - 1]]
    return index.astype(np.int32)


def fit_distributed(
    paths: Sequence[Path],
    config: Any,
    output: Path,
    cluster: str = "auto",
    shard_images: int = DEFAULT_SHARD_IMAGES,
    oversample: float = DEFAULT_OVERSAMPLE,
    work_dir: Path | None = None,
    num_cpus: int | None = None,
    progress: bool = False,
    skip_bad: bool = False,
) -> dict:
    """Fit PatchCore on the normal images ``paths`` over a Ray cluster and save it to ``output``.

    Args:
        paths: normal training images (the held-out split is the single-node fit's).
        config: a :class:`edgecore.model.FitConfig`.
        output: model directory to write (atomically; nothing is left there on failure).
        cluster: ``auto`` or a Ray address (see :func:`.cluster.connect`).
        shard_images: images per feature shard.
        oversample: round-1 coreset multiple (see :func:`.composable.composable_kcenter`).
        work_dir: where shards go (default: a temporary folder next to ``output``); removed afterwards.
        num_cpus: CPUs of a private local cluster.
        progress: report each step on stderr.
        skip_bad: skip unreadable images with a warning (``SkippedImageWarning``, as the
            single-node fit) instead of failing; the split is made before reading, so a
            skipped image leaves the bank or the held-out set one image smaller.

    Returns:
        the summary printed by the CLI (timings, coreset radii and bound, cluster size,
        ``skipped_files``).
    """
    from edgecore.backbones import create_backbone
    from edgecore.calibration.threshold import threshold_config
    from edgecore.features import PatchCoreFeatures, grid_shape
    from edgecore.model import PatchCoreModel, base_model_config, resolve_device, split_validation
    from edgecore.progress import step

    if not paths:
        raise ValueError("no training images")
    if shard_images < 1:
        raise ValueError(f"shard_images must be >= 1, got {shard_images}")
    output = Path(output)
    device = resolve_device(config.device)
    backbone = create_backbone(config.backbone, layers=config.layers, weights=config.weights,
                               random_init=config.random_init, image_size=config.preprocess.input_hw, seed=config.seed)
    features = PatchCoreFeatures(backbone.module, backbone.channels, backbone.spec.mean, backbone.spec.std,
                                 config.embed_dim)
    model_config = base_model_config(config, backbone, features, grid_shape(features, config.preprocess.input_hw))
    bank_idx, val_idx = split_validation(len(paths), config.val_ratio, config.seed)
    bank_paths = [str(paths[i]) for i in bank_idx]
    val_paths = [str(paths[i]) for i in val_idx]

    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.shards-", dir=work_dir or output.parent))
    timings: dict[str, float] = {}
    skipped: list[list[str]] = []
    try:
        with connect(cluster, num_cpus=num_cpus) as ray:
            gpus = cluster_gpus(ray) if device.type == "cuda" else 0
            n_workers = gpus or cluster_cpus(ray)
            worker_class = ray.remote(num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0, max_restarts=3,
                                      max_task_retries=3)(FeatureWorker)
            weights = str(config.weights) if config.weights else None
            workers = [worker_class.remote(model_config, weights, device.type, 1, str(work)) for _ in range(n_workers)]
            try:
                pool = ray.util.ActorPool(workers)
                # The warm workers also run the coreset and table steps: a fresh Ray worker process
                # would first import numpy, numba and torch again (seconds on a loaded node).
                mapper = lambda function, args: list(pool.map(lambda w, a: w.call.remote(function, *a), args))  # noqa: E731

                start = time.perf_counter()
                groups = split_evenly(len(bank_paths), math.ceil(len(bank_paths) / shard_images))
                with step("fit: features (shards)", len(groups), progress) as advance:
                    shard_paths: list[Path | None] = [None] * len(groups)
                    jobs = ((i, [bank_paths[j] for j in group]) for i, group in enumerate(groups))
                    for index, path, bad in pool.map(
                            lambda w, job: w.extract.remote(job[0], job[1], str(work), config.batch_size, skip_bad), jobs):
                        shard_paths[index] = Path(path) if path else None
                        skipped.extend(bad)
                        advance(1)
                _warn_skipped(skipped)
                shards = shard_table([path for path in shard_paths if path is not None])
                if not shards:
                    raise ValueError("no readable training images")
                timings["features_s"] = time.perf_counter() - start

                start = time.perf_counter()
                with step("fit: coreset (2 rounds)", 1, progress) as advance:
                    result = composable_kcenter(shards, config.coreset_ratio, config.projection_dim, config.seed,
                                                oversample=oversample, mapper=mapper)
                    advance(1)
                memory_bank = gather_rows(shards, result.selected)
                timings["coreset_s"] = time.perf_counter() - start

                start = time.perf_counter()
                k = min(config.num_neighbors, memory_bank.shape[0])
                bank_ref = ray.put(memory_bank)
                blocks = split_evenly(memory_bank.shape[0], math.ceil(memory_bank.shape[0] / _TABLE_BLOCK))
                table = np.concatenate(mapper(_neighbour_block, [(bank_ref, b.start, b.stop, k) for b in blocks]))
                timings["neighbour_table_s"] = time.perf_counter() - start

                start = time.perf_counter()
                table_ref = ray.put(table)
                with step("fit: threshold", max(len(val_paths), 1), progress) as advance:
                    if val_paths:
                        chunks = [val_paths[r.start : r.stop] for r in split_evenly(len(val_paths), n_workers)]
                        scored = list(pool.map(
                            lambda w, part: w.score.remote(part, bank_ref, table_ref, config.batch_size, skip_bad), chunks))
                        val_scores = np.concatenate([scores for scores, _ in scored])
                        val_skipped = [bad for _, part_bad in scored for bad in part_bad]
                        _warn_skipped(val_skipped)
                        skipped.extend(val_skipped)
                    if not val_paths or val_scores.size == 0:  # no held-out image: the training images' own scores
                        readable = [path for path in bank_paths if path not in {bad for bad, _ in skipped}][:64]
                        val_scores = ray.get(workers[0].score.remote(readable, bank_ref, table_ref,
                                                                     config.batch_size))[0]
                    advance(max(len(val_paths), 1))
                timings["threshold_s"] = time.perf_counter() - start
                n_nodes = len([node for node in ray.nodes() if node.get("Alive")])
            finally:  # on a shared cluster the actors outlive this call: free their CPUs/GPUs now
                for worker in workers:
                    ray.kill(worker)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    model_config["coreset"] = {
        "sampler": "composable-k-center-greedy",
        "ratio": config.coreset_ratio,
        "projection_dim": config.projection_dim,
        "seed": config.seed,
        "size": int(memory_bank.shape[0]),
        "bank_patches": int(sum(shard.rows for shard in shards)),
        "coverage_radius_projected": result.radius,
        "composable": {"oversample": oversample, "shards": len(shards), **result.summary()},
    }
    model = PatchCoreModel(model_config, features, memory_bank, table, device)
    bad_paths = {bad for bad, _ in skipped}
    val_paths = [path for path in val_paths if path not in bad_paths]
    model.config["threshold"] = threshold_config(val_scores, config.false_alarm_rate, held_out=len(val_paths) > 0)
    model.config["fit"] = {
        "train_images": len([path for path in bank_paths if path not in bad_paths]),
        "validation_images": len(val_paths),
        "validation_sources": val_paths,
        "device": device.type,
        "cluster": {"address": cluster, "nodes": n_nodes, "workers": n_workers, "shards": len(shards)},
        "timings": {key: round(value, 3) for key, value in timings.items()},
    }
    model.save(output)
    return {
        "model": str(output),
        "train_images": model.config["fit"]["train_images"],
        "validation_images": len(val_paths),
        "coreset_size": int(memory_bank.shape[0]),
        "coreset": model_config["coreset"]["composable"],
        "threshold": model.config["threshold"]["value"],
        "cluster": model.config["fit"]["cluster"],
        "timings_s": model.config["fit"]["timings"],
        "skipped_files": len(skipped),
    }


def _warn_skipped(skipped: list[list[str]]) -> None:
    """The single-node fit's warning, once per skipped file, on the driver (workers' warnings stay in their logs)."""
    import warnings

    from edgecore.data.datasets import SkippedImageWarning

    for path, reason in skipped:
        warnings.warn(f"skipping {path}: {reason}", SkippedImageWarning, stacklevel=3)
