"""The camera command line: what runs on a torch-free camera (`infer`, `bench`, `verify`, `unpack`, `compile`).

The host CLI (:mod:`edgecore.cli`) adds the workstation commands on top of this
app. Nothing here imports torch or host code (a static test holds it to that).

Commands that live in their own modules add themselves through ``register(app)``;
see :func:`_register_extensions` — one line per module.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from edgecore.runtime.cliutil import echo_err, echo_error, friendly

DEVICE_HELP = ("Backend device (OpenVINO: CPU, or GPU for an Intel iGPU; TensorRT: cuda:N); "
               "--search compiled runs there too.")


def new_app() -> typer.Typer:
    """An empty ``edgecore`` app with the house settings (the host CLI builds its own from it)."""
    return typer.Typer(
        name="edgecore",
        help="PatchCore anomaly detection from the workstation to the smart camera.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )


app = new_app()


def missing_extra(extra: str, modules: tuple[str, ...], what: str) -> None:
    """Refuse in one line, before any work, when ``modules`` are not installed.

    Args:
        extra: the pip extra that brings them (``host``, ``jetson``…).
        modules: top-level modules the step imports.
        what: the step, for the message ("`edgecore fit`").
    """
    absent = [name for name in modules if not _importable(name)]
    if absent:
        echo_error(f"{what} runs on the workstation; this install lacks {', '.join(absent)}: "
                 f"pip install \"edgecore[{extra}]\"")
        raise typer.Exit(code=2)


def _importable(name: str) -> bool:
    """True when ``name`` can be imported here (without importing it)."""
    if name in sys.modules:
        return sys.modules[name] is not None  # None: import blocked on purpose
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def bundle_summary(bundle: Path, manifest: dict) -> dict:
    """What `verify`, `unpack`, `export` and `compile` print about a bundle."""
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


def engine_line(detector) -> str:
    """Which engine and precision actually execute, in one line (always printed)."""
    info = detector.engine.info
    from edgecore.runtime.detector import describe_index

    line = (f"engine: {info.backend} {info.executed_precision} (requested {info.requested_precision}) "
            f"from {info.source}; search {describe_index(detector.index)}")
    skipped = info.details.get("skipped_engines")
    if skipped:
        line += "; not runnable on this CPU: " + "; ".join(f"{key} ({why})" for key, why in skipped.items())
    return line


@app.command()
@friendly
def verify(bundle: Path = typer.Argument(..., help="Bundle directory or packed archive.")) -> None:
    """Check schema version, sizes and sha256 of every file (safe unpacking for archives)."""
    from edgecore.runtime.bundle import verify_path

    verified = verify_path(bundle)
    typer.echo(json.dumps({"ok": True, **bundle_summary(bundle, verified.manifest)}, indent=2))


@app.command()
@friendly
def unpack(
    archive: Path = typer.Argument(..., help="Packed bundle (.edgecore.tar)."),
    output: Path = typer.Option(Path("."), "-o", "--output", help="Folder to unpack into."),
) -> None:
    """Safely unpack and verify an archive on the camera (refuses links, devices, absolute or .. paths)."""
    import shutil

    from edgecore.runtime.bundle import unpack_archive, verify_bundle

    bundle = unpack_archive(archive, output)
    try:
        verified = verify_bundle(bundle)
    except Exception:
        shutil.rmtree(bundle, ignore_errors=True)  # never leave an unverified bundle behind
        raise
    typer.echo(json.dumps({"ok": True, **bundle_summary(bundle, verified.manifest)}, indent=2))


@app.command()
@friendly
def infer(
    bundle: Path = typer.Argument(..., help="Bundle directory or packed archive."),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for results.jsonl and overlays/."),
    overlays: str = typer.Option("all", help="With -o: overlay PNGs for all | anomalous | none of the frames."),
    backend: str = typer.Option("openvino", help="openvino | tensorrt"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    precision: Optional[str] = typer.Option(None, help="Engine precision (default: best engine this CPU runs, else ONNX)."),
    search: Optional[str] = typer.Option(None, help="exact | hnsw | coarse | int8 | compiled (default: the bundle's choice; int8 and compiled open any int8 bundle)."),
    fail_on_anomaly: bool = typer.Option(False, "--fail-on-anomaly", help="Exit 1 if any image is anomalous."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images with a warning."),
) -> None:
    """Run the camera runtime: one JSON line per image (stdout and OUT/results.jsonl), overlays in OUT/overlays/."""
    from edgecore.runtime.detector import Detector
    from edgecore.runtime.results import score_images

    with Detector.open(bundle, backend=backend, device=device, precision=precision, search=search) as detector:
        echo_err(engine_line(detector))
        info = detector.engine.info
        summary = score_images(
            detector, images, output, overlays=overlays, skip_bad=skip_bad, emit=typer.echo, warn=echo_err,
            extra={"engine": f"{info.backend} {info.executed_precision}"},
        )
    if summary.skipped:
        echo_err(f"skipped {summary.skipped} unreadable file(s)")
    if fail_on_anomaly and summary.anomalous:
        raise typer.Exit(code=1)


@app.command()
@friendly
def bench(
    bundle: Path = typer.Argument(..., help="Bundle directory or packed archive."),
    backend: str = typer.Option("openvino", help="openvino | tensorrt"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    precision: list[str] = typer.Option([], help="Engine precision; repeat to compare several, interleaved."),
    search: list[str] = typer.Option([], help="exact | hnsw | coarse | int8 | compiled; repeat to compare."),
    images: Optional[Path] = typer.Option(None, help="Folder of real frames (default: synthetic; decode then under-counted)."),
    iterations: int = typer.Option(50, help="Timed frames per configuration (>= 1)."),
    warmup: int = typer.Option(5, help="Untimed frames first."),
    threads: Optional[int] = typer.Option(None, help="Inference threads (default: the backend's choice)."),
    streams: int = typer.Option(1, help="Parallel streams for the multi-stream throughput run."),
    target_ms: float = typer.Option(200.0, help="Per-image budget; PASS when total p99 <= target."),
    interval_ms: float = typer.Option(0.0, "--interval-ms", help="Pace timed frames like a camera: one every N ms, "
                                      "idle in between (e.g. 100 at 10 fps); 0: back to back."),
    emulate_camera: bool = typer.Option(False, "--emulate-camera", help="Also run 1 thread + AVX2-capped ISA (estimate)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", help="Write the report as Markdown."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when the target is missed."),
    quiet: bool = typer.Option(False, "--quiet", help="No console table."),
) -> None:
    """Per-stage latency percentiles, throughput, RSS, load average and PASS/FAIL against the per-image budget."""
    from edgecore.runtime import bench as bench_mod

    configs = [
        bench_mod.BenchConfig(backend=backend, device=device, precision=p, search=s, threads=threads)
        for p in (precision or [None])
        for s in (search or [None])
    ]
    frames = bench_mod.folder_frames(images) if images else None
    options = dict(iterations=iterations, warmup=warmup, streams=streams, target_ms=target_ms, interval_ms=interval_ms)
    report = bench_mod.run_bench(bundle, configs, frames=frames, **options)
    if emulate_camera:
        report["camera_estimate"] = bench_mod.emulate_camera(bundle, configs, images, **options)
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
    line = bench_mod.verdict_line(report)
    typer.echo(line)
    if strict and line.startswith("FAIL"):
        raise typer.Exit(code=1)


@app.command(name="compile")
@friendly
def compile_(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    target: str = typer.Option("openvino", help="openvino (on the workstation) | tensorrt (on the Jetson itself)"),
    precision: str = typer.Option(..., help="openvino: fp32 | fp16 | bf16 | int8; tensorrt: fp16 | int8"),
    calib: Optional[Path] = typer.Option(None, help="Normal images for INT8 calibration (MVTec category or folder)."),
    num_calib: Optional[int] = typer.Option(None, help="How many calibration images (default 64)."),
    max_drop: Optional[float] = typer.Option(None, help="OpenVINO INT8 accuracy-aware mode: max drop of embedding cosine."),
    refit_threshold: Optional[Path] = typer.Option(
        None, help="OpenVINO: held-out normal images to re-fit the threshold on (default: the bundle's validation images)."),
    keep_threshold: bool = typer.Option(
        False, "--keep-threshold", help="OpenVINO: keep fit's fp32 threshold (default: re-fit on this engine)."),
    portable: bool = typer.Option(
        False, "--portable", help="OpenVINO INT8 that every x86 CPU runs (7-bit weights, also without VNNI)."
    ),
    workspace: int = typer.Option(1024, help="TensorRT builder workspace (MB)."),
    dla: Optional[int] = typer.Option(None, help="TensorRT: run on DLA core N (Jetson)."),
) -> None:
    """Compile the bundle's ONNX graph into an engine stored in the bundle (manifest updated atomically)."""
    from edgecore.runtime.backends import backend_entry

    entry = backend_entry(target)
    if entry.compile_on == "host":
        missing_extra(entry.compile_extra, ("torch", "nncf", "onnx"), f"`edgecore compile --target {target}`")
    module, function = entry.compile.split(":")
    compile_function = getattr(importlib.import_module(module), function)
    if target == "tensorrt":
        options = dict(calib=calib, num_calib=num_calib, workspace_mb=workspace, dla_core=dla)
    else:
        options = dict(calib=calib, num_calib=num_calib, max_drop=max_drop, refit=refit_threshold, portable=portable,
                       keep_threshold=keep_threshold)
    manifest = compile_function(bundle, precision, log=echo_err, **options)
    typer.echo(json.dumps(bundle_summary(bundle, manifest), indent=2))


def _register_extensions(app: typer.Typer) -> None:
    """Commands kept in their own modules; each module offers ``register(app)``. One line each."""
    importlib.import_module("edgecore.runtime.serve.cli").register(app)  # serve, threshold (#14)


_register_extensions(app)


def main() -> None:  # pragma: no cover - console entry point
    import warnings

    warnings.simplefilter("default")
    app()


if __name__ == "__main__":
    sys.exit(main())
