"""`edgecore bench`: does this bundle meet the takt time on THIS device?

Honest by construction: per-stage percentiles (not just a mean), warm-up
excluded, what actually executed (precision, ISA, threads) recorded next to the
numbers, peak RSS of this process, and — because shared machines are noisy —
a comparison mode that interleaves configurations round-robin so their ratios
hold even when absolute times drift.
"""
from __future__ import annotations

import io
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgecore.runtime import native
from edgecore.runtime.cpu import cpu_info
from edgecore.runtime.frames import expand_images

STAGES = ("decode", "preprocess", "engine", "search", "scoring_map", "total")
SYNTHETIC_NOTE = (
    "frames: synthetic PNGs at the bundle's resize size; decode is under-counted against real camera frames "
    "(measured 6.6 ms vs 25-30 ms for 900x900 PNGs) - pass --images DIR for real frames"
)
# Spread p99/p50 above this, or a load average above the core count, means the numbers are not clean.
SPREAD_WARN = 1.5
ISA_FLAGS = ("sse4_2", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class BenchConfig:
    backend: str = "openvino"
    device: str | None = None
    precision: str | None = None
    search: str | None = None
    threads: int | None = None
    bundle: str | None = None  # another export of the same model (e.g. one per search mode); None: the bench's

    def label(self) -> str:
        parts = [self.backend, self.precision or "default", self.search or "auto"]
        if self.threads:
            parts.append(f"{self.threads}t")
        if self.bundle:
            parts.append(Path(self.bundle).name)
        return "/".join(parts)


def _engine_options(config: BenchConfig, streams: int) -> dict:
    """Threads/streams are OpenVINO CPU knobs; TensorRT has one stream per detector."""
    if config.backend != "openvino":
        return {}
    options: dict = {}
    if config.threads:
        options["threads"] = config.threads
    if streams > 1:
        options["streams"] = streams
    return options


def synthetic_frames(size: int, count: int = 8, seed: int = 0) -> list[bytes]:
    """PNG-encoded textured frames at the bundle's resize size, so decode is measured too."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    frames = []
    for _ in range(count):
        phase = rng.uniform(0, 2 * np.pi)
        base = 128 + 60 * np.sin(xx / 7.0 + phase) * np.cos(yy / 11.0)
        rgb = np.clip(base[..., None] + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG")
        frames.append(buffer.getvalue())
    return frames


def folder_frames(folder: str | Path, limit: int = 32) -> list[bytes]:
    """Encoded bytes of up to ``limit`` frames from a folder (decode is timed on them)."""
    return [p.read_bytes() for p in expand_images([Path(folder)])[:limit]]


def load_average() -> list[float] | None:
    """1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def noise_warnings(report: dict) -> list[str]:
    """Why these numbers may not be clean: a busy CPU or a wide spread between p50 and p99."""
    warnings = []
    cores = report["environment"].get("cpu_count") or 1
    for when in ("load_before", "load_after"):
        load = report.get(when)
        if load and load[0] > cores:
            warnings.append(f"CPU was busy: 1-min load average {load[0]} on {cores} cores ({when.replace('_', ' ')} the run)")
    for run in report["runs"]:
        total = run["stages_ms"]["total"]
        spread = total["p99"] / max(total["p50"], 1e-9)
        if spread > SPREAD_WARN:
            warnings.append(f"{run['config']}: p99 is {spread:.1f}x p50 - noisy; rerun on an idle device before trusting PASS/FAIL")
    return warnings


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "p50": float(np.percentile(array, 50)),
        "p90": float(np.percentile(array, 90)),
        "p99": float(np.percentile(array, 99)),
        "max": float(array.max()),
        "mean": float(array.mean()),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def environment() -> dict:
    info = {
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }
    model, flags = cpu_info()
    info["cpu_model"] = model
    info["isa"] = [flag for flag in ISA_FLAGS if flag in flags]
    return info


def kernel_isas(detector) -> dict[str, int]:
    """Which instruction sets the compiled kernels use (OpenVINO only): proves an ISA cap took effect."""
    compiled = getattr(detector.engine, "compiled", None)
    if compiled is None:
        return {}
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "primitiveType" not in info:
            continue
        name = str(info["primitiveType"].astype(str))
        isa = next((tag for tag in ("amx", "avx512", "avx2", "sse41") if tag in name), None)
        if isa:
            counts[isa] += 1
    return dict(counts)


def _throughput(detector, frames: list[bytes], streams: int, seconds: float) -> float:
    """Images/s with ``streams`` threads sharing one detector for ``seconds``."""
    done = [0] * streams
    stop = time.perf_counter() + seconds

    def worker(slot: int) -> None:
        i = slot
        while time.perf_counter() < stop:
            detector.detect(frames[i % len(frames)])
            done[slot] += 1
            i += streams

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - start)


def bundle_sizes(detector) -> dict:
    files = detector.manifest["files"]
    index_dir = detector.manifest["index"]["dir"] + "/"
    return {
        "bundle_bytes": sum(e["size"] for e in files.values()),
        "graph_bytes": files[detector.manifest["graph"]["file"]]["size"],
        "index_bytes": sum(e["size"] for n, e in files.items() if n.startswith(index_dir)),
        "neighbour_table_bytes": files[detector.manifest["neighbour_table"]["file"]]["size"],
        "coreset_fp32_bytes": int(detector.index.size * detector.manifest["features"]["embed_dim"] * 4),
    }


def run_bench(
    bundle: str | Path,
    configs: list[BenchConfig],
    frames: list[bytes] | None = None,
    iterations: int = 50,
    warmup: int = 5,
    streams: int = 1,
    throughput_seconds: float = 3.0,
    target_ms: float = 200.0,
    interval_ms: float = 0.0,
) -> dict:
    """Benchmark one or more configurations, interleaved round-robin when there are several.

    Args:
        bundle: bundle directory or archive.
        configs: what to compare (backend, precision, search, threads).
        frames: encoded frames (default: synthetic ones; the report says decode is under-counted).
        iterations: timed frames per configuration (>= 1).
        warmup: untimed frames first.
        streams: > 1 adds a multi-stream throughput run.
        throughput_seconds: length of that run.
        target_ms: PASS when total p99 <= target.
        interval_ms: pace the timed frames as a camera's frame rate does: each detect starts interval_ms after
            the one before (the CPU idles in between); 0: back to back. Why: after an idle gap a CPU (or a VM's
            virtual CPU) runs the next frame slower, and thread placement after a wake-up can halve its
            parallelism; back-to-back frames hide both.

    Returns:
        the report (JSON-able): per-stage percentiles, what executed, sizes, load, warnings.
    """
    from edgecore.runtime.detector import Detector, describe_index

    if iterations < 1:
        raise ValueError(f"--iterations must be >= 1, got {iterations}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    if not (interval_ms >= 0 and math.isfinite(interval_ms)):
        raise ValueError(f"--interval-ms must be a finite number >= 0, got {interval_ms}")
    if not configs:
        raise ValueError("nothing to benchmark: no configuration given")
    load_before = load_average()
    synthetic = frames is None
    detectors = []
    try:
        for config in configs:
            detectors.append(
                Detector.open(
                    config.bundle or bundle, backend=config.backend, device=config.device, precision=config.precision,
                    search=config.search, **_engine_options(config, streams),
                )
            )
        if frames is None:  # a tile bundle's frames are as large as its canvas, not one tile
            pre = detectors[0].preprocess_config
            frames = synthetic_frames(max(pre.map_hw) if pre.aspect == "tile" else pre.resize)
        for detector in detectors:  # warm every configuration before any is timed
            for i in range(warmup):
                detector.detect(frames[i % len(frames)])
        samples = [{stage: [] for stage in STAGES} for _ in detectors]
        due = time.perf_counter()
        for i in range(iterations):  # round-robin: drift hits every configuration alike
            for slot, detector in enumerate(detectors):
                if interval_ms:  # the next frame arrives interval_ms after the last one did
                    time.sleep(max(0.0, due - time.perf_counter()))
                    due = max(due, time.perf_counter()) + interval_ms / 1e3
                timings = detector.detect(frames[i % len(frames)]).timings_ms
                for stage in STAGES:
                    samples[slot][stage].append(timings[stage])
        runs = []
        for config, detector, stages in zip(configs, detectors, samples):
            engine = detector.engine.info
            run = {
                "config": config.label(),
                "executed": f"{engine.backend} {engine.executed_precision}, {describe_index(detector.index)}",
                "tiles": detector.preprocess_config.tile_count,  # graph forwards per frame
                "stages_ms": {stage: percentiles(values) for stage, values in stages.items()},
                "throughput_single_stream_ips": 1000.0 / float(np.mean(stages["total"])),
                "engine": {
                    "backend": engine.backend, "device": engine.device, "requested_precision": engine.requested_precision,
                    "executed_precision": engine.executed_precision, "library_version": engine.library_version,
                    "source": engine.source, "threads": engine.details.get("threads"),
                    "streams": engine.details.get("streams"), "kernel_isa": kernel_isas(detector),
                },
                "search": describe_index(detector.index),
                "index_memory_bytes": detector.index.memory_bytes(),
                "sizes": bundle_sizes(detector),
            }
            if streams > 1:
                run["throughput_multi_stream_ips"] = _throughput(detector, frames, streams, throughput_seconds)
                run["streams"] = streams
            p99 = run["stages_ms"]["total"]["p99"]
            run["target_ms"] = target_ms
            run["pass"] = bool(p99 <= target_ms)
            runs.append(run)
        base = runs[0]["stages_ms"]["total"]["p50"]
        for run in runs:
            run["ratio_p50_vs_first"] = run["stages_ms"]["total"]["p50"] / base
        report = {
            "bundle": str(bundle),
            "iterations": iterations,
            "warmup": warmup,
            "interval_ms": interval_ms,
            "frames": len(frames),
            "frames_source": SYNTHETIC_NOTE if synthetic else "frames: the given images (decode measured on them)",
            "peak_rss_mb": peak_rss_mb(),
            "environment": environment(),
            "load_before": load_before,
            "load_after": load_average(),
            "runs": runs,
            "pass": all(run["pass"] for run in runs),
        }
        report["warnings"] = noise_warnings(report)
        return report
    finally:
        for detector in detectors:
            detector.close()


def emulate_camera(bundle: str | Path, configs: list[BenchConfig], images: str | Path | None = None, **options) -> dict:
    """Re-run this bench in a child with 1 thread and oneDNN capped to AVX2 (a Core/Atom-class
    estimate). OpenVINO's CPU plugin honours ONEDNN_MAX_CPU_ISA, which must be set before it
    loads, hence the child (``python -m edgecore.runtime.bench``); it reports the kernel ISAs it
    actually used, so the report can say whether the cap took effect. numpy's BLAS is held to
    1 thread too (PNG decoding is one thread anyway); hnswlib's query threads are not capped (stated in the report)."""
    with tempfile.TemporaryDirectory() as scratch:
        spec, out = Path(scratch) / "spec.json", Path(scratch) / "camera.json"
        spec.write_text(json.dumps({
            "bundle": str(bundle), "images": str(images) if images else None, "options": options,
            "configs": [{**config.__dict__, "threads": 1} for config in configs],
        }))
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               native.ENV_THREADS: "1"}
        if platform.machine().lower() in ("x86_64", "amd64"):  # the native search's AVX2 path, as on the camera
            env[native.ENV_ISA] = "avx2"
        command = [sys.executable, "-m", "edgecore.runtime.bench", str(spec), str(out)]
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        if completed.returncode != 0 or not out.is_file():
            raise RuntimeError(f"camera emulation run failed: {completed.stderr.strip()[-500:]}")
        report = json.loads(out.read_text())
    for run in report["runs"]:
        isas = run["engine"]["kernel_isa"]
        capped = sum(n for isa, n in isas.items() if isa not in ("avx512", "amx"))
        run["isa_cap_honoured"] = f"{capped}/{sum(isas.values())} kernels at AVX2 or below" if isas else "unknown"
    report["estimate"] = (
        "camera-class emulation: 1 inference thread, ONEDNN_MAX_CPU_ISA=AVX2, BLAS 1 thread, PNG decode 1 thread, native int8 "
        f"search on its {report.get('native_search_isa', 'unknown')} path with 1 thread "
        "(an estimate, not a measurement on a camera; HNSW queries may still use every core)"
    )
    return report


def _emulation_child(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    frames = folder_frames(spec["images"]) if spec["images"] else None
    configs = [BenchConfig(**config) for config in spec["configs"]]
    report = run_bench(spec["bundle"], configs, frames=frames, **spec["options"])
    try:
        report["native_search_isa"] = native.kernel().isa
    except native.NativeUnavailable as exc:
        report["native_search_isa"] = f"unavailable ({exc})"
    Path(out_path).write_text(json.dumps(report))


def render_markdown(report: dict) -> str:
    """The report as Markdown (for RESULTS.md and CI logs)."""
    env = report["environment"]
    lines = [
        f"# edgecore bench — {report['bundle']}",
        "",
        f"CPU: {env.get('cpu_model')} ({env.get('cpu_count')} logical), ISA: {', '.join(env.get('isa', []))}; "
        f"{env.get('os')}; peak RSS {report['peak_rss_mb']:.0f} MB; {report['iterations']} iterations "
        f"after {report['warmup']} warm-up, {report['frames']} frames"
        f"{'; one every %g ms' % report['interval_ms'] if report.get('interval_ms') else ', back to back'}; "
        f"load average {report.get('load_before')} "
        f"before, {report.get('load_after')} after.",
        "",
        f"{report.get('frames_source', '')}",
    ]
    lines += ["", *[f"**warning:** {w}" for w in report.get("warnings", [])]]
    if report.get("estimate"):
        lines += ["", f"**{report['estimate']}**"]
    lines += ["", "| config | executed | " + " | ".join(f"{s} p50" for s in STAGES) + " | total p90 | total p99 | max | img/s | ratio | result |",
              "|---" * (len(STAGES) + 8) + "|"]
    for run in report["runs"]:
        st = run["stages_ms"]
        cells = [run["config"], run.get("executed", run["engine"]["executed_precision"])]
        cells += [f"{st[s]['p50']:.2f}" for s in STAGES]
        cells += [f"{st['total']['p90']:.2f}", f"{st['total']['p99']:.2f}", f"{st['total']['max']:.2f}",
                  f"{run['throughput_single_stream_ips']:.1f}", f"{run['ratio_p50_vs_first']:.2f}",
                  ("PASS" if run["pass"] else "FAIL") + f" (p99 ≤ {run['target_ms']:.0f} ms)"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for run in report["runs"]:
        sizes = run["sizes"]
        extra = f", {run['throughput_multi_stream_ips']:.1f} img/s with {run['streams']} streams" if "streams" in run else ""
        lines.append(
            f"- {run['config']}: engine {run['engine']['source']} (OpenVINO/TensorRT {run['engine']['library_version']}, "
            f"threads {run['engine']['threads']}, kernels {run['engine']['kernel_isa']}), search {run['search']}, "
            f"bundle {sizes['bundle_bytes'] / 1e6:.1f} MB, index {sizes['index_bytes'] / 1e6:.2f} MB "
            f"(fp32 coreset {sizes['coreset_fp32_bytes'] / 1e6:.2f} MB){extra}"
            + (f"; ISA cap honoured: {run['isa_cap_honoured']}" if "isa_cap_honoured" in run else "")
        )
    return "\n".join(lines) + "\n"


def print_table(report: dict) -> None:
    """A rich table on the console with PASS/FAIL."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=max(180, shutil.get_terminal_size().columns))
    title = "edgecore bench" + (" (camera-class ESTIMATE)" if report.get("estimate") else "")
    table = Table(title=title, caption="stage columns: p50 ms; p99: total")
    widest = {key: max(len(str(run.get(key, ""))) for run in report["runs"]) for key in ("config", "executed")}
    for column in ("config", "executed", *STAGES, "p99", "img/s", "ratio", "result"):
        if column in widest:  # what tells rows apart (hnsw vs exact): never cut to "openvino…"
            table.add_column(column, justify="left", min_width=widest[column], overflow="fold")
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for run in report["runs"]:
        st = run["stages_ms"]
        table.add_row(
            run["config"], run.get("executed", run["engine"]["executed_precision"]), *[f"{st[s]['p50']:.2f}" for s in STAGES],
            f"{st['total']['p99']:.2f}", f"{run['throughput_single_stream_ips']:.1f}", f"{run['ratio_p50_vs_first']:.2f}",
            "[green]PASS[/green]" if run["pass"] else "[red]FAIL[/red]",
        )
    console.print(table)
    env = report["environment"]
    console.print(f"{env.get('cpu_model')} · ISA {' '.join(env.get('isa', []))} · peak RSS {report['peak_rss_mb']:.0f} MB"
                  f" · load {report.get('load_before')} → {report.get('load_after')}")
    console.print(report.get("frames_source", ""))
    for warning in report.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {warning}")


def verdict_line(report: dict) -> str:
    """PASS/FAIL with the p99 it was decided on, for every run (and the camera estimate)."""
    parts = []
    for source in (report, report.get("camera_estimate")):
        for run in (source or {}).get("runs", []):
            p99 = run["stages_ms"]["total"]["p99"]
            mark = "<=" if run["pass"] else ">"
            label = run["config"] + (" [camera estimate]" if source is not report else "")
            parts.append(f"total p99 {p99:.1f} ms {mark} {run['target_ms']:.0f} ms ({label})")
    passed = report["pass"] and report.get("camera_estimate", {}).get("pass", True)
    return ("PASS: " if passed else "FAIL: ") + "; ".join(parts)


if __name__ == "__main__":  # the camera-emulation child (see emulate_camera)
    _emulation_child(*sys.argv[1:3])
