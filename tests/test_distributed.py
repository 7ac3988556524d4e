"""Distributed fit on a real local Ray cluster (2 CPUs, no dashboard, no usage stats), composable coreset bound."""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgecore.coreset import KCenterGreedySampler, selection_space
from edgecore.distributed.composable import composable_kcenter
from edgecore.distributed.shards import gather_rows, shard_table, split_evenly, write_shard

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'edgecore[cluster]')")

SHARD_IMAGES = 2


def clustered(n: int, dim: int, n_clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (n_clusters, dim))
    label = rng.integers(n_clusters, size=n)
    return (centres[label] + rng.normal(0, 1, (n, dim)) + 2.0).astype(np.float32)


def write_shards(features: np.ndarray, directory: Path, parts: int) -> list:
    directory.mkdir(exist_ok=True)
    ranges = split_evenly(len(features), parts)
    return shard_table([write_shard(directory, i, features[r.start : r.stop]) for i, r in enumerate(ranges)])


# ----------------------------------------------------------------------------- composable k-center (no Ray)


@pytest.mark.parametrize(("parts", "oversample"), [(4, 4.0), (4, 2.0), (1, 1.0)])
def test_composable_radius_is_exact_and_within_its_bound(tmp_path: Path, parts: int, oversample: float) -> None:
    features = clustered(6000, 24, 80)
    shards = write_shards(features, tmp_path / "shards", parts)
    result = composable_kcenter(shards, ratio=0.05, projection_dim=16, seed=3, oversample=oversample)
    single = KCenterGreedySampler(ratio=0.05, projection_dim=16, seed=3)
    single_selected = single.select(features)

    assert len(result.selected) == len(single_selected) == len(np.unique(result.selected))
    # The reported radius is the true one, measured in the sampler's (same) projected space.
    rng = np.random.default_rng(3)
    rng.integers(len(features))
    points = selection_space(features, 16, rng)
    diff = points[:, None, :] - points[result.selected][None, :, :]
    true_radius = float(np.sqrt((diff.astype(np.float64) ** 2).sum(-1)).min(axis=1).max())
    assert result.radius == pytest.approx(true_radius, rel=1e-4)
    assert result.radius <= result.bound * (1 + 1e-5)  # a-posteriori bound: max_s r_s + rho
    if oversample >= parts:  # every shard kept >= k centres: the a-priori 4-approximation
        assert result.radius <= 4 * single.coverage_radius_
    assert result.radius <= 1.5 * single.coverage_radius_  # in practice close to single-node greedy
    if parts == 1 and oversample == 1.0:  # one shard, no oversampling: round 1 is single-node greedy itself
        np.testing.assert_array_equal(np.sort(result.selected), np.sort(single_selected))


def test_gather_rows_reads_any_rows_across_shards(tmp_path: Path) -> None:
    features = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    shards = write_shards(features, tmp_path, 4)
    rows = np.array([49, 0, 13, 12, 25, 37])
    np.testing.assert_array_equal(gather_rows(shards, rows), features[rows])
    assert [s.rows for s in shards] == [len(r) for r in split_evenly(50, 4)]
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------- fit on a real Ray cluster


@pytest.fixture(scope="module")
def ray_cluster():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def fit_config():
    from edgecore.model import FitConfig
    from edgecore.runtime.preprocess import PreprocessConfig

    return FitConfig(device="cpu", preprocess=PreprocessConfig(128, 112), val_ratio=0.25)


def train_paths(category: Path) -> list[Path]:
    from edgecore.data.datasets import train_samples

    return [sample.path for sample in train_samples(category)]


def bank_of(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "memory_bank.safetensors"))


def aurocs(model_dir: Path, category: Path) -> tuple[float, float]:
    from edgecore.evaluation import evaluate, load_test_set
    from edgecore.model import PatchCoreModel

    model = PatchCoreModel.load(model_dir, device="cpu")
    result, _ = evaluate(model, load_test_set(category, model.preprocess_config))
    return result["image_auroc"], result["pixel_auroc"]


@pytest.fixture(scope="module")
def distributed_model(ray_cluster, synthetic_category, tmp_path_factory) -> tuple[Path, dict]:
    from edgecore.distributed import fit_distributed

    output = tmp_path_factory.mktemp("dist") / "part"
    paths = train_paths(synthetic_category)
    n_shards = math.ceil(len(paths) * 0.75 / SHARD_IMAGES)
    summary = fit_distributed(paths, fit_config(), output, shard_images=SHARD_IMAGES, oversample=n_shards)
    return output, summary


def test_distributed_fit_matches_single_node(distributed_model, fitted_model_dir, synthetic_category) -> None:
    output, summary = distributed_model
    config = json.loads((output / "config.json").read_text())
    local = json.loads((fitted_model_dir / "config.json").read_text())
    assert config["coreset"]["size"] == local["coreset"]["size"]
    assert config["coreset"]["bank_patches"] == local["coreset"]["bank_patches"]
    assert config["fit"]["validation_images"] == local["fit"]["validation_images"]  # same held-out split
    composable = config["coreset"]["composable"]
    assert composable["bound_holds"] and composable["radius"] <= composable["bound"] * (1 + 1e-5)
    # oversample >= shards: the a-priori bound, 4 x the single-node greedy radius (same projection and seed).
    assert composable["radius"] <= 4 * local["coreset"]["coverage_radius_projected"]
    assert summary["cluster"]["workers"] == 2 and summary["cluster"]["shards"] == composable["shards"] > 1
    distributed_auroc, local_auroc = aurocs(output, synthetic_category), aurocs(fitted_model_dir, synthetic_category)
    assert distributed_auroc[0] == pytest.approx(local_auroc[0], abs=0.002)  # image AUROC within 0.2 pt
    assert distributed_auroc[1] == pytest.approx(local_auroc[1], abs=0.002)  # pixel AUROC too


def test_killed_worker_is_retried_and_result_unchanged(distributed_model, synthetic_category, tmp_path) -> None:
    from edgecore.distributed import fit_distributed

    reference, _ = distributed_model
    work = tmp_path / "work"
    work.mkdir()
    killed: list[int] = []

    def kill_one_worker_mid_extraction() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for run in work.glob(".part.shards-*"):
                pids = sorted((run / "workers").glob("*")) if (run / "workers").is_dir() else []
                if len(list(run.glob("shard_*.npy"))) >= 1 and pids:  # extraction under way
                    pid = int(pids[0].name)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_worker_mid_extraction)
    killer.start()
    paths = train_paths(synthetic_category)
    n_shards = math.ceil(len(paths) * 0.75 / SHARD_IMAGES)
    output = tmp_path / "part"
    fit_distributed(paths, fit_config(), output, shard_images=SHARD_IMAGES, oversample=n_shards, work_dir=work)
    killer.join()
    assert killed, "no worker was killed: extraction finished before the test could act"
    restarted = json.loads((output / "config.json").read_text())["fit"]["cluster"]
    assert restarted["workers"] == 2
    got, expected = bank_of(output), bank_of(reference)
    np.testing.assert_array_equal(got["memory_bank"], expected["memory_bank"])
    np.testing.assert_array_equal(got["neighbour_table"], expected["neighbour_table"])
    assert not list(work.iterdir()), "the shard folder was left behind"


def test_failed_fit_leaves_no_model_directory(ray_cluster, synthetic_category, tmp_path) -> None:
    from edgecore.distributed import fit_distributed
    from edgecore.runtime.errors import ImageError

    paths = train_paths(synthetic_category)[:6]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    output = tmp_path / "models" / "part"
    with pytest.raises(ImageError, match="broken.png"):
        fit_distributed([*paths, broken], fit_config(), output, shard_images=SHARD_IMAGES)
    assert not output.exists()
    assert [p.name for p in output.parent.iterdir()] == [], "staging or shard folders were left behind"


def test_skip_bad_skips_a_corrupt_image_with_a_warning(ray_cluster, synthetic_category, tmp_path) -> None:
    from edgecore.data.datasets import SkippedImageWarning
    from edgecore.distributed import fit_distributed

    paths = train_paths(synthetic_category)[:6]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    output = tmp_path / "part"
    with pytest.warns(SkippedImageWarning, match="broken.png"):
        summary = fit_distributed([*paths, broken], fit_config(), output, shard_images=SHARD_IMAGES, skip_bad=True)
    config = json.loads((output / "config.json").read_text())
    assert summary["skipped_files"] == 1
    assert config["fit"]["train_images"] + config["fit"]["validation_images"] == len(paths)
    assert str(broken) not in config["fit"]["validation_sources"]
    assert config["coreset"]["bank_patches"] == config["fit"]["train_images"] * 14 * 14  # 112 px, stride 8


def tiny_folder(synthetic_category: Path, directory: Path, broken: bool) -> Path:
    directory.mkdir()
    for path in train_paths(synthetic_category)[:6]:
        (directory / path.name).write_bytes(path.read_bytes())
    if broken:
        (directory / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return directory


def test_cli_fit_cluster_auto_writes_the_model_and_a_failed_fit_leaves_none(ray_cluster, synthetic_category,
                                                                           tmp_path) -> None:
    from typer.testing import CliRunner

    from edgecore.cli import app

    data = tiny_folder(synthetic_category, tmp_path / "frames", broken=True)
    common = ["--cluster", "auto", "--device", "cpu", "--resize", "128", "--crop", "112", "--val-ratio", "0.25"]
    failed = tmp_path / "models" / "failed"
    result = CliRunner().invoke(app, ["fit", str(data), "-o", str(failed), *common])
    assert result.exit_code != 0 and "zz_broken.png" in result.output
    assert not failed.exists() and list(failed.parent.iterdir()) == [], "a failed fit left files behind"

    model = tmp_path / "models" / "ok"
    result = CliRunner().invoke(app, ["fit", str(data), "-o", str(model), *common, "--skip-bad"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["model"] == str(model) and summary["skipped_files"] == 1
    assert summary["cluster"]["workers"] == 2
    assert {"config.json", "memory_bank.safetensors"} <= {p.name for p in model.iterdir()}
    config = json.loads((model / "config.json").read_text())
    assert config["coreset"]["sampler"] == "composable-k-center-greedy"
    assert config["fit"]["train_images"] + config["fit"]["validation_images"] == 6
    assert list(model.parent.iterdir()) == [model]  # no staging or shard folder left


# ----------------------------------------------------------------------------- fit-many


def test_fit_many_runs_jobs_in_parallel_and_reports_each(ray_cluster, synthetic_category, tmp_path) -> None:
    from edgecore.distributed.many import fit_many

    config = tmp_path / "lines.toml"
    config.write_text(
        f"""
[defaults]
device = "cpu"
resize = 128
crop = 112
val_ratio = 0.25
[[jobs]]
name = "part-a"
data = "{synthetic_category}"
output = "models/a"
[[jobs]]
name = "part-b"
data = "{synthetic_category}"
output = "models/b"
coreset_ratio = 0.05
[[jobs]]
name = "missing"
data = "no/such/folder"
output = "models/missing"
"""
    )
    summary = fit_many(config)
    rows = {row["name"]: row for row in summary["jobs"]}
    assert summary["ok"] == 2 and summary["failed"] == 1
    assert rows["part-a"]["status"] == rows["part-b"]["status"] == "ok"
    assert rows["part-b"]["coreset_size"] < rows["part-a"]["coreset_size"]
    assert (tmp_path / "models" / "a" / "config.json").is_file() and (tmp_path / "models" / "b" / "config.json").is_file()
    assert rows["missing"]["status"] == "failed" and rows["missing"]["error"]
    assert not (tmp_path / "models" / "missing").exists()
    assert json.loads((tmp_path / "lines.report.json").read_text())["failed"] == 1


def test_fit_many_refuses_a_bad_config_before_starting(tmp_path) -> None:
    from edgecore.distributed.many import fit_many

    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"defaults": {"coreset_ratoi": 0.1}, "jobs": [{"data": "x", "output": "y"}]}))
    with pytest.raises(ValueError, match="coreset_ratoi"):
        fit_many(config)
    config.write_text(json.dumps({"jobs": [{"data": "x"}]}))
    with pytest.raises(ValueError, match="lacks output"):
        fit_many(config)
