"""The ``edgecore`` command line: the camera CLI (:mod:`edgecore.runtime.cli`) plus the host commands.

Host commands (fit, predict, evaluate, demo, export, pack) import torch and the
host extras inside the command; in a camera install each says in one line which
extra to install, before doing any work.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import typer

from edgecore.runtime.cli import _importable, bundle_summary, engine_line, missing_extra, new_app
from edgecore.runtime.cli import app as camera_app
from edgecore.runtime.cliutil import echo_err as _echo_err
from edgecore.runtime.cliutil import friendly as _friendly

HOST_MODULES = ("torch", "torchvision", "scipy", "safetensors")  # what every host command imports
EXPORT_MODULES = ("torch", "onnx", "safetensors")

app = new_app()
app.registered_commands.extend(camera_app.registered_commands)  # the camera commands, then the host ones
# In a camera install the host commands stay callable (to say which extra they need) but out of --help.
_HIDDEN = not all(_importable(name) for name in HOST_MODULES)


def _needs_host(command: str, modules: tuple[str, ...] = HOST_MODULES) -> None:
    missing_extra("host", modules, f"`edgecore {command}`")


@app.command(hidden=_HIDDEN)
@_friendly
def fit(
    data: Path = typer.Argument(..., help="MVTec category (uses train/good) or a folder of normal images."),
    output: Path = typer.Option(..., "-o", "--output", help="Model directory to write (atomically)."),
    backbone: str = typer.Option("efficientnet_lite0", help="wide_resnet50_2 | resnet18 | efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2"),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default: the backbone's stride-8 + stride-16 pair)."),
    weights: Optional[Path] = typer.Option(None, help="Local weights file (.pth, loaded with weights_only=True)."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights: speed benchmarks and tests ONLY."),
    embed_dim: int = typer.Option(1024, help="Patch embedding size after the linear reduction."),
    coreset_ratio: float = typer.Option(0.1, help="Fraction of patches kept by k-center greedy."),
    num_neighbors: int = typer.Option(9, help="b in the paper's Eq. 7 reweighting (1 = plain max)."),
    resize: int = typer.Option(256, help="Square resize before the center crop (--aspect squash)."),
    crop: int = typer.Option(224, help="Center crop size fed to the backbone; the short side in pad/crop."),
    aspect: str = typer.Option(
        "auto", help="auto (from the training frames' sizes) | squash (square resize + center crop) | "
        "pad (keep the aspect, pad: whole frame inspected) | crop (keep the aspect, center crop the overflow) | "
        "tile (large frames: overlapping tiles at the graph input, stitched back onto the whole frame)."),
    input_size: Optional[str] = typer.Option(
        None, help="HEIGHTxWIDTH of the static graph input for --aspect pad/crop (default: the frames' aspect); "
        "one tile for --aspect tile (default CROPxCROP)."),
    tile_grid: Optional[str] = typer.Option(
        None, help="ROWSxCOLS of tiles for --aspect tile (default: the most detail in at most 6 tiles)."),
    tile_overlap: float = typer.Option(0.25, help="Share of a tile side that neighbouring tiles overlap (--aspect tile)."),
    val_ratio: float = typer.Option(0.1, help="Share of normal images held out to set the threshold."),
    denoise: str = typer.Option(
        "off", help="Drop training images that look defective before the coreset: off | auto (robust z-score, "
        "no estimate needed) | FRACTION in (0, 0.5) (drop that share of the most outlying images). "
        "Flagged images are listed in config.json coreset.denoise."),
    augment: str = typer.Option(
        "off", help="Add turned/flipped training frames to the bank: off | comma list of rot90, rot180, rot270, "
        "hflip, vflip (rotation-robust; the bank grows by 1 + N before the coreset). Recorded in coreset.augment."),
    false_alarm_rate: Optional[float] = typer.Option(
        None, help="Allowed false-alarm rate on held-out normal images (default 0.01; or give --sensitivity)."),
    sensitivity: Optional[float] = typer.Option(
        None, help="Expected false alarms per 1 000 normal parts at the threshold (10 = 1 %): higher catches "
        "fainter defects and stops more good parts."),
    seed: int = typer.Option(0, help="Seed for the split, the coreset and random init."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(16, help="Images per backbone batch on a GPU (on the CPU every forward is 16 images, two side by side, so features do not depend on it)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images with a warning instead of failing."),
    roi: Optional[Path] = typer.Option(
        None, help="Region of interest in the training frames' pixels: a mask image (white = inspect) or a JSON "
        "polygon [[x, y], ...]. Patches outside it are left out of the coreset, the score and the map."),
    cluster: Optional[str] = typer.Option(
        None, help="Fit on a Ray cluster: auto (a running one, else a private local one) | HOST:PORT. "
        "Default: this machine alone. Needs edgecore[cluster]."),
) -> None:
    """Fit PatchCore on normal images and write a model directory."""
    _needs_host("fit")
    from dataclasses import replace

    from edgecore.aspect import resolve_preprocess
    from edgecore.augment import parse_augment
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.denoise import parse_denoise
    from edgecore.model import FitConfig, fit as fit_model
    from edgecore.roi import RoiSource

    if sensitivity is not None and false_alarm_rate is not None:
        raise ValueError("give --sensitivity (false alarms per 1 000 parts) or --false-alarm-rate, not both")
    if sensitivity is not None and not 0 <= sensitivity < 1000:
        raise ValueError(f"--sensitivity is false alarms per 1 000 normal parts, in [0, 1000), got {sensitivity}")
    rate = sensitivity / 1000.0 if sensitivity is not None else 0.01 if false_alarm_rate is None else false_alarm_rate
    config = FitConfig(
        backbone=backbone,
        layers=tuple(layers.split(",")) if layers else None,
        weights=str(weights) if weights else None,
        random_init=random_init,
        embed_dim=embed_dim,
        coreset_ratio=coreset_ratio,
        num_neighbors=num_neighbors,
        val_ratio=val_ratio,
        denoise=parse_denoise(denoise),
        augment=parse_augment(augment),
        false_alarm_rate=rate,
        seed=seed,
        device=device,
        batch_size=batch_size,
    )  # the options are checked before any file is read
    samples = train_samples(data)
    preprocess, preprocess_choice = resolve_preprocess(aspect, input_size, resize, crop, (s.path for s in samples),
                                                       tile_grid, tile_overlap)
    config = replace(config, preprocess=preprocess)
    if cluster is not None and roi is not None:
        raise ValueError("--roi is not available with --cluster yet (the workers build the bank unmasked)")
    if cluster is not None and config.augment:
        raise ValueError("--augment is not available with --cluster yet (the workers embed the frames as read)")
    if cluster is not None and config.denoise != "off":
        raise ValueError("--denoise is not available with --cluster yet (the driver never holds the bank)")
    if cluster is not None:  # workers read and decode the frames themselves (see edgecore.distributed.fit)
        from edgecore.distributed import fit_distributed

        summary = fit_distributed([s.path for s in samples], config, output, cluster=cluster, progress=True,
                                  skip_bad=skip_bad)
        if summary["skipped_files"]:
            _echo_err(f"skipped {summary['skipped_files']} unreadable file(s)")
        typer.echo(json.dumps(summary, indent=2))
        return
    stream = ImageStream(samples, skip_bad=skip_bad)
    sources: list[str] = []  # filled as the frames stream in (one decoded frame in memory at a time)
    roi_source = RoiSource(roi) if roi is not None else None  # read before any frame is decoded
    model = fit_model(stream.images(sources), config, progress=True, sources=sources, roi=roi_source)
    if stream.skipped:
        _echo_err(f"skipped {len(stream.skipped)} unreadable file(s)")
    model.config["fit"]["preprocess_choice"] = preprocess_choice
    model.save(output)
    summary = {
        "model": str(output),
        "train_images": model.config["fit"]["train_images"],
        "validation_images": model.config["fit"]["validation_images"],
        "coreset_size": model.config["coreset"]["size"],
        **({"denoise_flagged": [f["source"] for f in model.config["coreset"]["denoise"]["flagged"]]}
           if "denoise" in model.config["coreset"] else {}),
        **({"validation_screened": [f["source"] for f in model.config["fit"]["validation_screened"]]}
           if "validation_screened" in model.config["fit"] else {}),
        "embed_dim": model.config["features"]["embed_dim"],
        "preprocess": preprocess_choice,
        "threshold": model.threshold,
        "timings_s": model.config["fit"]["timings"],
        "skipped_files": len(stream.skipped),
    }
    typer.echo(json.dumps(summary, indent=2))


@app.command(hidden=_HIDDEN)
@_friendly
def label(
    model_dir: Path = typer.Argument(..., help="Model directory written by `edgecore fit`."),
    defects: Path = typer.Argument(..., help="Labelled defects, MVTec layout: test/<type>/*.png + ground_truth/<type>/*_mask.png."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Model directory to write (default: MODEL_DIR, atomically)."),
    weight: float = typer.Option(1.0, help="λ in s = d_n + λ·max(0, d_n − d_a): push-up of patches nearer a labelled defect than any normal patch."),
    per_type: Optional[int] = typer.Option(None, help="Use the first N images of each defect type (default: all)."),
    max_patches: int = typer.Option(1024, help="Anomaly bank cap (k-center greedy); the camera searches it exactly."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
) -> None:
    """Learn from a few labelled defects: an anomaly bank from their masked patches sharpens the score;
    the threshold is re-fitted on the held-out normals at the model's false-alarm rate."""
    _needs_host("label")
    from edgecore.labelled import LabelConfig, label_model, load_defects
    from edgecore.model import PatchCoreModel

    config = LabelConfig(weight=weight, max_patches=max_patches)
    model = PatchCoreModel.load(model_dir, device=device)
    labelled = label_model(model, load_defects(defects, per_type=per_type), config, source=str(defects))
    labelled.save(output or model_dir)
    summary = {k: v for k, v in labelled.config["labelled"].items() if k not in ("file", "score")}
    typer.echo(json.dumps({"model": str(output or model_dir), "threshold": labelled.threshold, **summary}, indent=2))


@app.command(name="fit-many", hidden=_HIDDEN)
@_friendly
def fit_many(
    config: Path = typer.Argument(..., help="TOML/JSON job list: [defaults] fit options, [[jobs]] name/data/output."),
    cluster: Optional[str] = typer.Option(None, help="auto | HOST:PORT (default: the file's `cluster`, else auto)."),
    report: Optional[Path] = typer.Option(None, help="Summary JSON (default CONFIG.report.json)."),
) -> None:
    """Fit several categories/variants as parallel jobs on one Ray cluster, one model directory each."""
    _needs_host("fit-many")
    from edgecore.distributed.many import fit_many as run_fit_many

    summary = run_fit_many(config, cluster=cluster, report=report)
    typer.echo(json.dumps(summary, indent=2))
    if summary["failed"]:
        raise typer.Exit(code=1)


@app.command(hidden=_HIDDEN)
@_friendly
def predict(
    model_dir: Path = typer.Argument(..., help="Model directory written by `edgecore fit`."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for results.jsonl and overlays/."),
    overlays: str = typer.Option("all", help="Overlay PNGs for all | anomalous | none of the images."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    weights: Optional[Path] = typer.Option(None, help="Backbone weights file, if moved since `fit --weights`."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images with a warning."),
) -> None:
    """Score images on the workstation: the camera's `infer` loop with the torch model (same JSON lines and overlays)."""
    _needs_host("predict")
    from edgecore.model import PatchCoreModel
    from edgecore.runtime.results import score_images

    model = PatchCoreModel.load(model_dir, device=device, weights=str(weights) if weights else None)
    _echo_err(f"engine: host torch ({model.device.type}) fp32; search exact fp32 over {len(model.memory_bank)} points")
    summary = score_images(
        model, images, output, overlays=overlays, skip_bad=skip_bad, emit=typer.echo, warn=_echo_err,
        extra={"engine": f"torch {model.device.type} fp32"},
    )
    if summary.skipped:
        _echo_err(f"skipped {summary.skipped} unreadable file(s)")


@app.command(hidden=_HIDDEN)
@_friendly
def evaluate(
    model: Path = typer.Argument(..., help="Model directory (host, torch) or bundle/archive (camera runtime)."),
    data: Path = typer.Argument(..., help="MVTec-layout category with test/ and ground_truth/."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for metrics.json, report.md, roc.png."),
    device: str = typer.Option("auto", help="Host model: auto | cpu | cuda. Bundle: the backend device (CPU)."),
    backend: str = typer.Option("openvino", help="Bundle only: openvino | tensorrt"),
    precision: Optional[str] = typer.Option(None, help="Bundle only: engine precision."),
    search: Optional[str] = typer.Option(None, help="Bundle only: exact | hnsw | coarse | int8 | compiled."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images with a warning."),
    weights: Optional[Path] = typer.Option(None, help="Host model: backbone weights file, if moved since `fit --weights`."),
) -> None:
    """Image AUROC, pixel AUROC, AUPRO (30 % FPR), per-defect recall and F1/confusion at the stored threshold.

    The same metric code scores a host model and a bundle on the camera runtime,
    so workstation and camera numbers can be compared line by line.
    """
    _needs_host("evaluate", ("scipy",))  # before scoring anything: AUPRO needs scipy
    from edgecore.evaluation import evaluate as run_evaluation, load_test_set, write_evaluation

    if (model / "manifest.json").is_file() or model.is_file():
        from edgecore.runtime.detector import Detector, describe_index

        scorer = Detector.open(
            model, backend=backend, device=None if device == "auto" else device, precision=precision, search=search
        )
        _echo_err(engine_line(scorer))
        engine = scorer.engine.info
        described = {"runtime": f"{engine.backend} {engine.executed_precision} (requested {engine.requested_precision})",
                     "engine_source": engine.source, "search": describe_index(scorer.index)}
    else:
        _needs_host("evaluate")
        from edgecore.model import PatchCoreModel

        scorer = PatchCoreModel.load(model, device=device, weights=str(weights) if weights else None)
        described = {"runtime": f"host torch ({scorer.device.type}) fp32", "search": "exact fp32"}
    test_set = load_test_set(data, scorer.preprocess_config, skip_bad=skip_bad)
    result, records = run_evaluation(scorer, test_set, progress=True)
    result.update({"model": str(model), **described})
    write_evaluation(output, result, records, title=f"edgecore evaluate: {model.name} on {data.name}", test_set=test_set,
                     scorer=scorer)
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "skipped_files"}, indent=2))


@app.command(hidden=_HIDDEN)
@_friendly
def demo(
    output: Path = typer.Option(Path("edgecore-demo"), "-o", "--output", help="Work folder for data, model and reports."),
    quick: bool = typer.Option(False, "--quick", help="Smaller synthetic set (used by the tests)."),
) -> None:
    """Run the whole job on synthetic data with the offline Lite0 weights: data → fit → evaluate → camera."""
    _needs_host("demo", HOST_MODULES + ("onnx", "nncf"))
    from edgecore.demo import run_demo

    summary = run_demo(output, quick=quick, log=_echo_err)
    typer.echo(json.dumps(summary, indent=2))


@app.command(hidden=_HIDDEN)
@_friendly
def export(
    model_dir: Path = typer.Argument(..., help="Model directory written by `edgecore fit`."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle directory to write, e.g. bottle.edgecore"),
    index_dtype: str = typer.Option("int8", help="Stored coreset vectors: int8 | fp16 | fp32"),
    search: Optional[str] = typer.Option(None, help="exact | hnsw | coarse | int8 | compiled (default: chosen per bundle by measurement, recorded in index.choice)"),
    batch: int = typer.Option(1, help="Static batch of the ONNX graph."),
) -> None:
    """Fuse backbone + patch pooling into one ONNX graph, quantize the coreset index, write a bundle."""
    _needs_host("export", EXPORT_MODULES)
    from edgecore.export.bundle import export_bundle
    from edgecore.runtime.bundle import verify_bundle

    bundle = export_bundle(model_dir, output, index_dtype=index_dtype, search=search, batch=batch, log=_echo_err)
    manifest = verify_bundle(bundle).manifest
    typer.echo(json.dumps(bundle_summary(bundle, manifest), indent=2))


@app.command(hidden=_HIDDEN)
@_friendly
def pack(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Archive path (default NAME.edgecore.tar)."),
) -> None:
    """Verify a bundle and pack it into one reproducible archive to copy onto a camera."""
    _needs_host("pack", EXPORT_MODULES)
    from edgecore.export.bundle import pack_bundle

    archive = pack_bundle(bundle, output)
    typer.echo(json.dumps({"archive": str(archive), "bytes": archive.stat().st_size}))


def main() -> None:  # pragma: no cover - console entry point
    warnings.simplefilter("default")
    app()


if __name__ == "__main__":
    main()
