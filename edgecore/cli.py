"""The ``edgecore`` command line.

Heavy imports (torch, OpenVINO) happen inside the commands, so ``edgecore
--help`` and the camera-side commands work on a machine without torch.
"""
from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer

from edgecore.runtime.errors import EdgecoreError

app = typer.Typer(
    name="edgecore",
    help="PatchCore anomaly detection from the workstation to the smart camera.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _friendly(command: Callable) -> Callable:
    """Turn our own errors (bad files, bad options) into one clear line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (EdgecoreError, ValueError, FileExistsError) as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _echo_err(message: str) -> None:
    typer.echo(message, err=True)


def _expand_images(paths: list[Path]) -> list[Path]:
    from edgecore.data.datasets import list_images

    images: list[Path] = []
    for path in paths:
        images.extend(list_images(path) if path.is_dir() else [path])
    return images


@app.command()
@_friendly
def fit(
    data: Path = typer.Argument(..., help="MVTec category (uses train/good) or a folder of normal images."),
    output: Path = typer.Option(..., "-o", "--output", help="Model directory to write (atomically)."),
    backbone: str = typer.Option("efficientnet_lite0", help="wide_resnet50_2 | resnet18 | efficientnet_lite0"),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default: the backbone's stride-8 + stride-16 pair)."),
    weights: Optional[Path] = typer.Option(None, help="Local weights file (.pth, loaded with weights_only=True)."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights: speed benchmarks and tests ONLY."),
    embed_dim: int = typer.Option(1024, help="Patch embedding size after the linear reduction."),
    coreset_ratio: float = typer.Option(0.1, help="Fraction of patches kept by k-center greedy."),
    num_neighbors: int = typer.Option(9, help="b in the paper's Eq. 7 reweighting (1 = plain max)."),
    resize: int = typer.Option(256, help="Square resize before the center crop."),
    crop: int = typer.Option(224, help="Center crop size fed to the backbone."),
    val_ratio: float = typer.Option(0.1, help="Share of normal images held out to set the threshold."),
    false_alarm_rate: float = typer.Option(0.01, help="Allowed false-alarm rate on held-out normal images."),
    seed: int = typer.Option(0, help="Seed for the split, the coreset and random init."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(16, help="Images per backbone batch."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images with a warning instead of failing."),
) -> None:
    """Fit PatchCore on normal images and write a model directory."""
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.model import FitConfig, fit as fit_model
    from edgecore.runtime.preprocess import PreprocessConfig

    config = FitConfig(
        backbone=backbone,
        layers=tuple(layers.split(",")) if layers else None,
        weights=str(weights) if weights else None,
        random_init=random_init,
        embed_dim=embed_dim,
        coreset_ratio=coreset_ratio,
        num_neighbors=num_neighbors,
        val_ratio=val_ratio,
        false_alarm_rate=false_alarm_rate,
        seed=seed,
        device=device,
        batch_size=batch_size,
        preprocess=PreprocessConfig(resize=resize, crop=crop),
    )
    samples = train_samples(data)
    stream = ImageStream(samples, skip_bad=skip_bad)
    images, sources = [], []
    for sample, rgb in stream:
        images.append(rgb)
        sources.append(str(sample.path))
    if stream.skipped:
        _echo_err(f"skipped {len(stream.skipped)} unreadable file(s)")
    model = fit_model(images, config, progress=sys.stderr.isatty(), sources=sources)
    model.save(output)
    summary = {
        "model": str(output),
        "train_images": model.config["fit"]["train_images"],
        "validation_images": model.config["fit"]["validation_images"],
        "coreset_size": model.config["coreset"]["size"],
        "embed_dim": model.config["features"]["embed_dim"],
        "threshold": model.threshold,
        "timings_s": model.config["fit"]["timings"],
        "skipped_files": len(stream.skipped),
    }
    typer.echo(json.dumps(summary, indent=2))


@app.command()
@_friendly
def predict(
    model_dir: Path = typer.Argument(..., help="Model directory written by `edgecore fit`."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for scores.jsonl and overlays/."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images with a warning."),
) -> None:
    """Score images: one JSON line per image on stdout and in OUT/scores.jsonl, plus overlay PNGs."""
    from edgecore.data.datasets import ImageStream, Sample
    from edgecore.model import PatchCoreModel
    from edgecore.runtime.overlay import save_overlay
    from edgecore.runtime.preprocess import crop_map_to_original, preprocess

    model = PatchCoreModel.load(model_dir, device=device)
    paths = _expand_images(images)
    output.mkdir(parents=True, exist_ok=True)
    (output / "overlays").mkdir(exist_ok=True)
    stream = ImageStream([Sample(p, 0, "unknown", None) for p in paths], skip_bad=skip_bad)
    normalise = model.normalization
    with open(output / "scores.jsonl", "w") as rows:
        for sample, rgb in stream:
            scores = model.score_crops(preprocess(rgb, model.preprocess_config)[None])
            score = float(scores.image[0])
            full_map = crop_map_to_original(scores.maps[0], rgb.shape[:2], model.preprocess_config)
            overlay_path = output / "overlays" / f"{sample.path.stem}.png"
            save_overlay(overlay_path, rgb, normalise(full_map))
            row = {
                "image": str(sample.path),
                "score": score,
                "normalized_score": float(normalise(score)),
                "is_anomalous": score >= model.threshold,
                "overlay": str(overlay_path),
            }
            line = json.dumps(row)
            rows.write(line + "\n")
            typer.echo(line)
    if stream.skipped:
        _echo_err(f"skipped {len(stream.skipped)} unreadable file(s)")


@app.command()
@_friendly
def evaluate(
    model_dir: Path = typer.Argument(..., help="Model directory written by `edgecore fit`."),
    data: Path = typer.Argument(..., help="MVTec-layout category with test/ and ground_truth/."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for metrics.json, report.md, roc.png."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images with a warning."),
) -> None:
    """Image AUROC, pixel AUROC, AUPRO (30 % FPR) and F1/confusion at the stored threshold."""
    from edgecore.evaluation import evaluate as run_evaluation, load_test_set, write_evaluation
    from edgecore.model import PatchCoreModel

    model = PatchCoreModel.load(model_dir, device=device)
    test_set = load_test_set(data, model.preprocess_config, skip_bad=skip_bad)
    result, records = run_evaluation(model, test_set)
    result["model"] = str(model_dir)
    write_evaluation(output, result, records, title=f"edgecore evaluate: {model_dir.name} on {data.name}")
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "skipped_files"}, indent=2))


@app.command()
@_friendly
def demo(
    output: Path = typer.Option(Path("edgecore-demo"), "-o", "--output", help="Work folder for data, model and reports."),
    quick: bool = typer.Option(False, "--quick", help="Smaller synthetic set (used by the tests)."),
) -> None:
    """Run the whole job on synthetic data with the offline Lite0 weights: data → fit → evaluate."""
    from edgecore.demo import run_demo

    summary = run_demo(output, quick=quick, log=_echo_err)
    typer.echo(json.dumps(summary, indent=2))


def main() -> None:  # pragma: no cover - console entry point
    warnings.simplefilter("default")
    app()
