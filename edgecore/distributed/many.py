"""``edgecore fit-many CONFIG``: several categories or variants fitted as parallel jobs on one Ray cluster.

CONFIG is TOML or JSON::

    cluster = "auto"              # or a Ray address; optional
    cpus_per_job = 1              # optional
    [defaults]                    # any FitConfig field, plus resize / crop
    backbone = "efficientnet_lite0"
    [[jobs]]
    name = "bottle"
    data = "mvtec/bottle"         # MVTec category or folder of normal images
    output = "models/bottle"      # relative paths are relative to CONFIG's folder
    coreset_ratio = 0.05          # per-job override

Each job is one Ray task running the single-machine fit, which writes its model
directory atomically: a failed job leaves no directory and does not stop the others.
The summary (one row per job: status, sizes, threshold, wall time, error) is
returned, printed by the CLI and written as JSON next to CONFIG.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from edgecore.distributed.cluster import connect

_JOB_KEYS = {"name", "data", "output"}


def read_jobs_config(path: Path) -> dict:
    """Parse CONFIG (``.toml`` or ``.json``) and check that every job names data and an output."""
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        config = tomllib.loads(text)
    else:
        config = json.loads(text)
    jobs = config.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        raise ValueError(f"{path}: needs a non-empty [[jobs]] list")
    names = set()
    for number, job in enumerate(jobs, 1):
        missing = {"data", "output"} - set(job)
        if missing:
            raise ValueError(f"{path}: job {number} lacks {', '.join(sorted(missing))}")
        job.setdefault("name", Path(job["output"]).name)
        if job["name"] in names:
            raise ValueError(f"{path}: two jobs are named {job['name']!r}")
        names.add(job["name"])
    return config


def fit_config(options: dict) -> Any:
    """A FitConfig from a flat dict of its fields (``resize``/``crop`` go to the preprocessing)."""
    from edgecore.model import FitConfig
    from edgecore.runtime.preprocess import PreprocessConfig

    options = dict(options)
    preprocess = PreprocessConfig(**{key: options.pop(key) for key in ("resize", "crop") if key in options})
    known = {field.name for field in dataclasses.fields(FitConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown fit option(s): {', '.join(sorted(unknown))}")
    if isinstance(options.get("layers"), list):
        options["layers"] = tuple(options["layers"])
    return FitConfig(preprocess=preprocess, **options)


def run_job(job: dict, defaults: dict, base: str, threads: int) -> dict:
    """One fit, as a Ray task: never raises, so one bad job cannot cancel the others."""
    import torch

    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.model import fit

    torch.set_num_threads(threads)
    start = time.perf_counter()
    row: dict[str, Any] = {"name": job["name"], "output": None}
    try:
        data = Path(base) / job["data"]
        output = Path(base) / job["output"]
        row["output"] = str(output)
        config = fit_config({**defaults, **{k: v for k, v in job.items() if k not in _JOB_KEYS}})
        samples = train_samples(data)
        stream = ImageStream(samples)
        model = fit((rgb for _, rgb in stream), config, sources=[str(s.path) for s in samples])
        model.save(output)
        row.update(status="ok", train_images=model.config["fit"]["train_images"],
                   coreset_size=model.config["coreset"]["size"], threshold=model.config["threshold"]["value"])
    except Exception as exc:  # noqa: BLE001 - reported per job, the other jobs go on
        row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    row["wall_s"] = round(time.perf_counter() - start, 2)
    return row


def fit_many(config_path: Path, cluster: str | None = None, report: Path | None = None) -> dict:
    """Run every job of ``config_path`` in parallel; return (and write) the summary.

    Args:
        config_path: the TOML/JSON job list (see the module docstring).
        cluster: overrides the file's ``cluster`` (default ``auto``).
        report: where to write the JSON summary (default ``CONFIG.report.json``).

    Returns:
        ``{"jobs": [...], "ok": n, "failed": n, "wall_s": s}``.
    """
    config = read_jobs_config(config_path)
    defaults = config.get("defaults", {})
    fit_config(defaults)  # a typo in the defaults fails every job: refuse it before starting any
    cpus = int(config.get("cpus_per_job", 1))
    base = str(config_path.resolve().parent)
    start = time.perf_counter()
    with connect(cluster or config.get("cluster", "auto")) as ray:
        task = ray.remote(num_cpus=cpus)(run_job)
        rows = ray.get([task.remote(job, defaults, base, cpus) for job in config["jobs"]])
    summary = {
        "jobs": rows,
        "ok": sum(row["status"] == "ok" for row in rows),
        "failed": sum(row["status"] != "ok" for row in rows),
        "wall_s": round(time.perf_counter() - start, 2),
    }
    from edgecore.runtime.fsutil import write_json

    write_json(report or config_path.with_suffix(".report.json"), summary)
    return summary
