"""The ``edgecore`` command line.

Heavy imports (torch, OpenVINO) happen inside the commands, so ``edgecore
--help`` and the camera-side commands work on a machine without torch.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from edgecore.runtime.cliutil import echo_err as _echo_err
from edgecore.runtime.cliutil import friendly as _friendly

app = typer.Typer(
    name="edgecore",
    help="PatchCore anomaly detection from the workstation to the smart camera.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    model: Path = typer.Argument(..., help="Model directory (host, torch) or bundle/archive (camera runtime)."),
    data: Path = typer.Argument(..., help="MVTec-layout category with test/ and ground_truth/."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for metrics.json, report.md, roc.png."),
    device: str = typer.Option("auto", help="Host model: auto | cpu | cuda. Bundle: the backend device (CPU)."),
    backend: str = typer.Option("openvino", help="Bundle only: openvino | tensorrt"),
    precision: Optional[str] = typer.Option(None, help="Bundle only: engine precision."),
    search: Optional[str] = typer.Option(None, help="Bundle only: hnsw | exact."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images with a warning."),
) -> None:
    """Image AUROC, pixel AUROC, AUPRO (30 % FPR) and F1/confusion at the stored threshold.

    The same metric code scores a host model and a bundle on the camera runtime,
    so workstation and camera numbers can be compared line by line.
    """
    from edgecore.evaluation import evaluate as run_evaluation, load_test_set, write_evaluation

    if (model / "manifest.json").is_file() or model.is_file():
        from edgecore.runtime.detector import Detector, describe_index

        scorer = Detector.open(
            model, backend=backend, device=None if device == "auto" else device, precision=precision, search=search
        )
        engine = scorer.engine.info
        described = {"runtime": f"{engine.backend} {engine.executed_precision} (requested {engine.requested_precision})",
                     "search": describe_index(scorer.index)}
    else:
        from edgecore.model import PatchCoreModel

        scorer = PatchCoreModel.load(model, device=device)
        described = {"runtime": f"host torch ({scorer.device.type}) fp32", "search": "exact fp32"}
    test_set = load_test_set(data, scorer.preprocess_config, skip_bad=skip_bad)
    result, records = run_evaluation(scorer, test_set)
    result.update({"model": str(model), **described})
    write_evaluation(output, result, records, title=f"edgecore evaluate: {model.name} on {data.name}")
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


@app.command()
@_friendly
def export(
    model_dir: Path = typer.Argument(..., help="Model directory written by `edgecore fit`."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle directory to write, e.g. bottle.edgecore"),
    index_dtype: str = typer.Option("int8", help="Stored coreset vectors: int8 | fp16 | fp32"),
    search: Optional[str] = typer.Option(None, help="hnsw | exact (default: chosen per bundle by coreset size)"),
    batch: int = typer.Option(1, help="Static batch of the ONNX graph."),
) -> None:
    """Fuse backbone + patch pooling into one ONNX graph, quantize the coreset index, write a bundle."""
    from edgecore.export.bundle import export_bundle
    from edgecore.runtime.bundle import verify_bundle

    bundle = export_bundle(model_dir, output, index_dtype=index_dtype, search=search, batch=batch, log=_echo_err)
    manifest = verify_bundle(bundle).manifest
    typer.echo(json.dumps(_bundle_summary(bundle, manifest), indent=2))


def _bundle_summary(bundle: Path, manifest: dict) -> dict:
    return {
        "bundle": str(bundle),
        "format_version": manifest["format_version"],
        "backbone": manifest["backbone"]["name"],
        "grid": manifest["features"]["grid"],
        "embed_dim": manifest["features"]["embed_dim"],
        "index": {k: manifest["index"].get(k) for k in ("dtype", "mode", "size")},
        "engines": sorted(manifest.get("engines", {})),
        "files": len(manifest["files"]),
        "bytes": sum(entry["size"] for entry in manifest["files"].values()),
    }


@app.command()
@_friendly
def pack(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Archive path (default NAME.edgecore.tar)."),
) -> None:
    """Verify a bundle and pack it into one reproducible archive to copy onto a camera."""
    from edgecore.export.bundle import pack_bundle

    archive = pack_bundle(bundle, output)
    typer.echo(json.dumps({"archive": str(archive), "bytes": archive.stat().st_size}))


@app.command()
@_friendly
def verify(bundle: Path = typer.Argument(..., help="Bundle directory or packed archive.")) -> None:
    """Check schema version, sizes and sha256 of every file (safe unpacking for archives)."""
    from edgecore.runtime.bundle import verify_path

    verified = verify_path(bundle)
    typer.echo(json.dumps({"ok": True, **_bundle_summary(bundle, verified.manifest)}, indent=2))


@app.command()
@_friendly
def unpack(
    archive: Path = typer.Argument(..., help="Packed bundle (.edgecore.tar)."),
    output: Path = typer.Option(Path("."), "-o", "--output", help="Folder to unpack into."),
) -> None:
    """Safely unpack and verify an archive on the camera (refuses links, devices, absolute or .. paths)."""
    from edgecore.runtime.bundle import unpack_archive, verify_bundle

    bundle = unpack_archive(archive, output)
    try:
        verified = verify_bundle(bundle)
    except Exception:
        import shutil

        shutil.rmtree(bundle, ignore_errors=True)  # never leave an unverified bundle behind
        raise
    typer.echo(json.dumps({"ok": True, **_bundle_summary(bundle, verified.manifest)}, indent=2))


@app.command(name="compile")
@_friendly
def compile_(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    target: str = typer.Option("openvino", help="openvino | tensorrt"),
    precision: str = typer.Option(..., help="openvino: fp32 | fp16 | bf16 | int8; tensorrt: fp16 | int8"),
    calib: Optional[Path] = typer.Option(None, help="Normal images for INT8 calibration (MVTec category or folder)."),
    num_calib: Optional[int] = typer.Option(None, help="How many calibration images (default 64)."),
    max_drop: Optional[float] = typer.Option(None, help="INT8 accuracy-aware mode: max drop of embedding cosine."),
    refit_threshold: Optional[Path] = typer.Option(None, help="Held-out normal images: re-fit the threshold with this engine."),
    portable: bool = typer.Option(
        False, "--portable", help="OpenVINO INT8 for CPUs without VNNI (Atom/older Core): 7-bit weights, never saturates."
    ),
    workspace: int = typer.Option(1024, help="TensorRT builder workspace (MB)."),
    dla: Optional[int] = typer.Option(None, help="TensorRT: run on DLA core N (Jetson)."),
) -> None:
    """Compile the bundle's ONNX graph into an engine stored in the bundle (manifest updated atomically)."""
    if target == "openvino":
        from edgecore.export.compile import compile_openvino

        manifest = compile_openvino(
            bundle, precision, calib=calib, num_calib=num_calib, max_drop=max_drop, refit=refit_threshold,
            portable=portable, log=_echo_err,
        )
    elif target == "tensorrt":
        from edgecore.runtime.backends.tensorrt import compile_tensorrt

        manifest = compile_tensorrt(
            bundle, precision, calib=calib, num_calib=num_calib, workspace_mb=workspace, dla_core=dla, log=_echo_err
        )
    else:
        raise ValueError(f"unknown target {target!r}; choose openvino or tensorrt")
    typer.echo(json.dumps(_bundle_summary(bundle, manifest), indent=2))


@app.command()
@_friendly
def infer(
    bundle: Path = typer.Argument(..., help="Bundle directory or packed archive."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for results.jsonl and overlays/."),
    backend: str = typer.Option("openvino", help="openvino | tensorrt"),
    device: Optional[str] = typer.Option(None, help="Backend device (OpenVINO: CPU)."),
    precision: Optional[str] = typer.Option(None, help="Engine precision (default: best compiled engine, else ONNX)."),
    search: Optional[str] = typer.Option(None, help="hnsw | exact (default: the bundle's choice)."),
    fail_on_anomaly: bool = typer.Option(False, "--fail-on-anomaly", help="Exit 1 if any image is anomalous."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images with a warning."),
) -> None:
    """Run the camera runtime: one JSON line per image (stdout and OUT/results.jsonl), overlay PNGs."""
    from edgecore.runtime.detector import Detector
    from edgecore.runtime.errors import ImageError
    from edgecore.runtime.imageio import load_image
    from edgecore.runtime.overlay import save_overlay

    paths = _expand_images(images)
    if output:
        (output / "overlays").mkdir(parents=True, exist_ok=True)
    anomalous = skipped = 0
    with Detector.open(bundle, backend=backend, device=device, precision=precision, search=search) as detector:
        rows = open(output / "results.jsonl", "w") if output else None
        try:
            for path in paths:
                try:
                    rgb = load_image(path)
                except ImageError as exc:
                    if not skip_bad:
                        raise
                    skipped += 1
                    _echo_err(f"warning: skipped {exc}")
                    continue
                result = detector.detect(rgb)
                anomalous += result.is_anomalous
                row = {"image": str(path), **result.to_json()}
                if output:
                    overlay_path = output / "overlays" / f"{path.stem}.png"
                    save_overlay(overlay_path, rgb, detector.normalization(result.map_original))
                    row["overlay"] = str(overlay_path)
                    rows.write(json.dumps(row) + "\n")
                typer.echo(json.dumps(row))
        finally:
            if rows:
                rows.close()
    if skipped:
        _echo_err(f"skipped {skipped} unreadable file(s)")
    if fail_on_anomaly and anomalous:
        raise typer.Exit(code=1)


@app.command()
@_friendly
def bench(
    bundle: Path = typer.Argument(..., help="Bundle directory or packed archive."),
    backend: str = typer.Option("openvino", help="openvino | tensorrt"),
    device: Optional[str] = typer.Option(None, help="Backend device."),
    precision: list[str] = typer.Option([], help="Engine precision; repeat to compare several, interleaved."),
    search: list[str] = typer.Option([], help="hnsw | exact; repeat to compare."),
    images: Optional[Path] = typer.Option(None, help="Folder of frames (default: synthetic frames at bundle size)."),
    iterations: int = typer.Option(50, help="Timed frames per configuration."),
    warmup: int = typer.Option(5, help="Untimed frames first."),
    threads: Optional[int] = typer.Option(None, help="Inference threads (default: the backend's choice)."),
    streams: int = typer.Option(1, help="Parallel streams for the multi-stream throughput run."),
    target_ms: float = typer.Option(200.0, help="Per-image budget; PASS when total p99 <= target."),
    emulate_camera: bool = typer.Option(False, "--emulate-camera", help="Also run 1 thread + AVX2-capped ISA (estimate)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the report as Markdown."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when the target is missed."),
    quiet: bool = typer.Option(False, "--quiet", help="No console table."),
) -> None:
    """Per-stage latency percentiles, throughput, RSS and PASS/FAIL against the per-image budget."""
    from edgecore.runtime import bench as bench_mod

    configs = [
        bench_mod.BenchConfig(backend=backend, device=device, precision=p, search=s, threads=threads)
        for p in (precision or [None])
        for s in (search or [None])
    ]
    frames = bench_mod.folder_frames(images) if images else None
    report = bench_mod.run_bench(
        bundle, configs, frames=frames, iterations=iterations, warmup=warmup, streams=streams, target_ms=target_ms
    )
    if emulate_camera:
        argv = [str(bundle), "--backend", backend, "--iterations", str(iterations), "--warmup", str(warmup),
                "--target-ms", str(target_ms)]
        argv += [a for p in precision for a in ("--precision", p)] + [a for s in search for a in ("--search", s)]
        if images:
            argv += ["--images", str(images)]
        report["camera_estimate"] = bench_mod.emulate_camera(argv)
    if not quiet:
        bench_mod.print_table(report)
        if emulate_camera:
            bench_mod.print_table(report["camera_estimate"])
    text = bench_mod.render_markdown(report)
    if emulate_camera:
        text += "\n" + bench_mod.render_markdown(report["camera_estimate"])
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
    if markdown_out:
        markdown_out.write_text(text)
    passed = report["pass"] and (report.get("camera_estimate", {}).get("pass", True))
    typer.echo(("PASS" if passed else "FAIL") + f": total p99 vs {target_ms:.0f} ms target")
    if strict and not passed:
        raise typer.Exit(code=1)


def main() -> None:  # pragma: no cover - console entry point
    warnings.simplefilter("default")
    app()


if __name__ == "__main__":
    main()
