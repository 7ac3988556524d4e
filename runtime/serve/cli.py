"""`edgecore serve` and `edgecore threshold`, registered on the camera command line.

Importable without the serve extras: they are imported inside the command, and a missing one
is one line saying what to install.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from edgecore.runtime.cliutil import echo_err, echo_error, friendly

SERVE_EXTRA = 'pip install "edgecore[serve]"'


def register(app: typer.Typer) -> None:
    """Add `serve` and `threshold` to ``app``."""
    app.command()(serve)
    app.command()(threshold)


def _parse_rates(values: list[str]) -> dict[str, float]:
    from edgecore.runtime.serve.config import ConfigError

    rates = {}
    for value in values:
        sink, sep, number = value.partition("=")
        try:
            rates[sink] = float(number) if sep else float("nan")
        except ValueError:
            rates[sink] = float("nan")
        if not rates[sink] == rates[sink]:
            raise ConfigError(f"--rate {value!r}: expected SINK=RESULTS_PER_SECOND, e.g. mqtt=5")
    return rates


@friendly
def serve(
    bundle: Optional[Path] = typer.Argument(None, help="Bundle directory (or `bundle =` in --config)."),
    config: Optional[Path] = typer.Option(None, "--config", help="serve.toml; flags override it."),
    watch: Optional[Path] = typer.Option(None, help="Watched folder: each new image scored exactly once."),
    move_to: Optional[Path] = typer.Option(None, help="Move processed files of --watch here."),
    journal: Optional[Path] = typer.Option(None, help="Journal of scored files (default WATCH/.edgecore-journal.jsonl)."),
    video: list[str] = typer.Option([], help="Video file, V4L2 device (/dev/video0 or 0) or rtsp:// URL; repeatable."),
    video_rate: Optional[float] = typer.Option(None, help="Pace video files at N frames/s (default: as fast as scored)."),
    genicam: Optional[Path] = typer.Option(None, help="GenTL producer (.cti) of a GenICam camera (needs harvesters)."),
    jsonl: Optional[Path] = typer.Option(None, help="Results as JSON lines (rotated)."),
    jsonl_max_mb: Optional[float] = typer.Option(None, help="Rotate the JSONL file at this size (default 64)."),
    jsonl_keep: Optional[int] = typer.Option(None, help="Rotated JSONL files kept (default 5)."),
    overlays: Optional[Path] = typer.Option(None, help="Folder for overlay PNGs of anomalous frames."),
    overlays_all: Optional[bool] = typer.Option(None, "--overlays-all", help="Overlay every frame, not only anomalous."),
    mqtt: Optional[str] = typer.Option(None, help="mqtt://HOST:PORT/TOPIC (QoS 1; status retained on TOPIC/status)."),
    mqtt_buffer: Optional[int] = typer.Option(None, help="Results kept while the broker is down (default 10000)."),
    webhook: Optional[str] = typer.Option(None, help="POST each result as JSON to this URL."),
    webhook_retries: Optional[int] = typer.Option(None, help="Retries per webhook POST (default 3)."),
    opcua: Optional[str] = typer.Option(None, help="Run an OPC UA server at opc.tcp://HOST:PORT."),
    rate: list[str] = typer.Option([], help="SINK=N: at most N results/s to that sink (anomalous always pass)."),
    http: Optional[str] = typer.Option(None, help="HTTP API and live page, HOST:PORT (default 127.0.0.1:8080)."),
    listen_any: Optional[bool] = typer.Option(None, "--listen-any", help="Allow --http on a non-loopback address."),
    queue: Optional[int] = typer.Option(None, help="Frames waiting for the detector, at most (default 64)."),
    workers: Optional[int] = typer.Option(None, help="Detector threads (default 1)."),
    live_frames: Optional[int] = typer.Option(None, help="Frames kept for the live page (default 12)."),
    no_watch_bundle: bool = typer.Option(False, "--no-watch-bundle", help="Do not reload when the bundle changes."),
    exit_when_done: bool = typer.Option(False, "--exit-when-done", help="Stop once every video file has ended."),
    backend: Optional[str] = typer.Option(None, help="openvino | tensorrt"),
    device: Optional[str] = typer.Option(None, help="Backend device."),
    precision: Optional[str] = typer.Option(None, help="Engine precision (default: best compiled engine)."),
    search: Optional[str] = typer.Option(None, help="hnsw | exact"),
) -> None:
    """The long-running inspection service: sources → detector → sinks, HTTP API, live page, hot reload.

    SIGHUP, a changed bundle on disk or POST /v2/repository/models/NAME/load reloads the model;
    SIGTERM scores the queued frames, delivers the results and exits 0.
    """
    from edgecore.runtime.serve.config import build_config, read_toml

    flags = {
        "bundle": bundle, "watch": watch, "move_to": move_to, "journal": journal, "video": video,
        "video_rate": video_rate, "genicam": genicam, "jsonl": jsonl, "jsonl_max_mb": jsonl_max_mb,
        "jsonl_keep": jsonl_keep, "overlays": overlays, "overlays_all": overlays_all, "mqtt": mqtt,
        "mqtt_buffer": mqtt_buffer, "webhook": webhook, "webhook_retries": webhook_retries, "opcua": opcua,
        "rates": _parse_rates(rate), "http": http, "listen_any": listen_any, "queue": queue, "workers": workers,
        "live_frames": live_frames, "watch_bundle": False if no_watch_bundle else None, "backend": backend,
        "device": device, "precision": precision, "search": search,
    }
    settings = build_config(read_toml(config) if config else {}, flags)
    _require_modules(settings)
    from edgecore.runtime.serve.service import Service

    service = Service(settings, log=echo_err)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=service.reload, args=("SIGHUP",), daemon=True).start())
    service.start()
    echo_err(f"serve: ready on http://{settings.http_host}:{service.http.port}/")
    while not stop.wait(0.2):
        if exit_when_done and service.finite_sources_done():
            break
    service.stop()
    typer.echo(json.dumps(service.status()))


def _require_modules(settings) -> None:
    """One line naming what to install, before anything starts (sources import theirs in threads)."""
    needed = {"prometheus_client": True, "watchdog": settings.watch is not None, "cv2": bool(settings.video),
              "paho": settings.mqtt is not None, "asyncua": settings.opcua is not None,
              "harvesters": settings.genicam is not None}
    absent = [name for name, used in needed.items() if used and importlib.util.find_spec(name) is None]
    if absent:
        extra = 'pip install "edgecore[genicam]"' if absent == ["harvesters"] else SERVE_EXTRA
        echo_error(f"`edgecore serve` needs {', '.join(absent)}, not installed here: {extra}")
        raise typer.Exit(code=2)


@friendly
def threshold(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    false_alarm_rate: Optional[float] = typer.Option(None, help="Allowed false-alarm rate on the stored normals."),
    value: Optional[float] = typer.Option(None, help="A fixed raw-score threshold."),
) -> None:
    """Move the decision threshold without refitting (manifest rewritten atomically; serve reloads it)."""
    from edgecore.runtime.serve.threshold import set_threshold

    manifest = set_threshold(bundle, false_alarm_rate=false_alarm_rate, value=value)
    summary = {"bundle": str(bundle), "threshold": manifest["threshold"]["value"], "mode": manifest["threshold"]["mode"]}
    engines = {k: e["threshold"]["value"] for k, e in manifest.get("engines", {}).items() if "threshold" in e}
    if engines:
        summary["engines"] = engines
    typer.echo(json.dumps(summary))
