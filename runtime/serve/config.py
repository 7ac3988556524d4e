"""`edgecore serve` options: one TOML file and/or flags (a flag wins), checked up front.

Every option is checked before anything starts, and a bad one is reported as ONE
line that names it (``--mqtt``, ``[mqtt].url`` …), so a line operator fixing a
config file is never shown a traceback.

serve.toml::

    bundle = "/opt/edgecore/bundles/part.edgecore"
    http = "127.0.0.1:8080"          # listen_any = true to bind beyond localhost
    queue = 64                       # frames waiting for the detector (bounded)
    workers = 1
    watch_bundle = true              # reload when the bundle on disk changes
    [model]    backend = "openvino"  precision = "int8"
    [watch]    dir = "/var/lib/edgecore/incoming"  move_to = "/var/lib/edgecore/done"
    [video]    url = "rtsp://10.0.0.7/stream"  rate = 0   # frames/s pacing for files (0: as fast as scored)
    [genicam]  cti = "/opt/mvIMPACT/lib/x86_64/mvGenTLProducer.cti"
    [jsonl]    path = "/var/lib/edgecore/results.jsonl"  max_mb = 64  keep = 5
    [overlays] dir = "/var/lib/edgecore/overlays"  all = false
    [mqtt]     url = "mqtt://broker:1883/line1/cam1"  buffer = 10000
    [webhook]  url = "http://mes.local/edgecore"  retries = 3
    [opcua]    url = "opc.tcp://0.0.0.0:4840"
    [live]     frames = 12
    # any sink section takes rate = N (results per second; anomalous ones always pass)
"""
from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from edgecore.runtime.backends import BACKENDS
from edgecore.runtime.errors import EdgecoreError


class ConfigError(EdgecoreError):
    """One bad serve option, named."""


@dataclass
class SinkOptions:
    rate: float = 0.0  # results per second (0: unlimited); anomalous results and events always pass


@dataclass
class ServeConfig:
    bundle: Path
    backend: str = "openvino"
    precision: str | None = None
    device: str | None = None
    search: str | None = None
    http: str = "127.0.0.1:8080"
    listen_any: bool = False
    queue: int = 64
    workers: int = 1
    watch_bundle: bool = True
    watch: Path | None = None
    move_to: Path | None = None
    journal: Path | None = None
    video: list[str] = field(default_factory=list)
    video_rate: float = 0.0
    genicam: Path | None = None
    jsonl: Path | None = None
    jsonl_max_mb: float = 64.0
    jsonl_keep: int = 5
    overlays: Path | None = None
    overlays_all: bool = False
    mqtt: str | None = None
    mqtt_buffer: int = 10000
    webhook: str | None = None
    webhook_retries: int = 3
    opcua: str | None = None
    live_frames: int = 12
    rates: dict[str, float] = field(default_factory=dict)  # sink name -> results/s

    @property
    def http_host(self) -> str:
        return self.http.rpartition(":")[0].strip("[]")

    @property
    def http_port(self) -> int:
        return int(self.http.rpartition(":")[2])


# TOML layout: top-level keys and [section] keys → ServeConfig fields.
_TOP = {"bundle", "backend", "precision", "device", "search", "http", "listen_any", "queue", "workers", "watch_bundle"}
_SECTIONS = {
    "model": {"backend": "backend", "precision": "precision", "device": "device", "search": "search"},
    "watch": {"dir": "watch", "move_to": "move_to", "journal": "journal"},
    "video": {"url": "video", "rate": "video_rate"},
    "genicam": {"cti": "genicam"},
    "jsonl": {"path": "jsonl", "max_mb": "jsonl_max_mb", "keep": "jsonl_keep", "rate": "rate:jsonl"},
    "overlays": {"dir": "overlays", "all": "overlays_all", "rate": "rate:overlays"},
    "mqtt": {"url": "mqtt", "buffer": "mqtt_buffer", "rate": "rate:mqtt"},
    "webhook": {"url": "webhook", "retries": "webhook_retries", "rate": "rate:webhook"},
    "opcua": {"url": "opcua", "rate": "rate:opcua"},
    "live": {"frames": "live_frames"},
}
SINK_NAMES = ("jsonl", "overlays", "mqtt", "webhook", "opcua")


def read_toml(path: Path) -> dict:
    """serve.toml → {field: value}; unknown keys are errors (a typo must not be ignored)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values: dict = {}
    for key, value in data.items():
        if key in _SECTIONS and isinstance(value, dict):
            for inner, inner_value in value.items():
                target = _SECTIONS[key].get(inner)
                if target is None:
                    raise ConfigError(f"{path}: unknown option [{key}].{inner} (known: {', '.join(_SECTIONS[key])})")
                if target.startswith("rate:"):
                    values.setdefault("rates", {})[target[5:]] = inner_value
                elif target == "video":
                    values["video"] = [inner_value] if isinstance(inner_value, str) else inner_value
                else:
                    values[target] = inner_value
        elif key in _TOP:
            values[key] = value
        else:
            raise ConfigError(f"{path}: unknown option {key!r}")
    return values


def build_config(file_values: dict, flag_values: dict) -> ServeConfig:
    """Merge (flags win over the file) and check every option; raises ConfigError naming the first bad one."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v not in (None, [], {})}}
    if "rates" in file_values and "rates" in flag_values:
        merged["rates"] = {**file_values["rates"], **flag_values["rates"]}
    if not merged.get("bundle"):
        raise ConfigError("BUNDLE: give the bundle directory (argument or `bundle =` in the config)")
    names = {f.name: f for f in fields(ServeConfig)}
    for key in merged:
        if key not in names:
            raise ConfigError(f"unknown option {key!r}")
    config = ServeConfig(**merged)
    _check(config)
    return config


def _check(config: ServeConfig) -> None:
    for name in ("bundle", "watch", "move_to", "journal", "genicam", "jsonl", "overlays"):
        value = getattr(config, name)
        if value is not None and not isinstance(value, Path):
            if not isinstance(value, str):
                raise ConfigError(f"--{name.replace('_', '-')}: expected a path, got {value!r}")
            setattr(config, name, Path(value))
    if not config.bundle.exists():
        raise ConfigError(f"BUNDLE {config.bundle}: no such bundle")
    _check_http(config)
    _positive_int(config.queue, "--queue")
    _positive_int(config.workers, "--workers")
    _positive_int(config.jsonl_keep, "--jsonl-keep")
    _positive_int(config.mqtt_buffer, "--mqtt-buffer")
    _positive_int(config.live_frames, "--live-frames")
    if not isinstance(config.webhook_retries, int) or config.webhook_retries < 0:
        raise ConfigError(f"--webhook-retries: expected an integer >= 0, got {config.webhook_retries!r}")
    for what, value in (("--video-rate", config.video_rate), ("--jsonl-max-mb", config.jsonl_max_mb)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"{what}: expected a number >= 0, got {value!r}")
    if config.jsonl_max_mb == 0:
        raise ConfigError("--jsonl-max-mb: must be > 0")
    if config.watch is not None and not config.watch.is_dir():
        raise ConfigError(f"--watch {config.watch}: not a folder")
    if config.move_to is not None:
        if config.watch is None:
            raise ConfigError("--move-to: only with --watch DIR")
        if config.move_to.resolve() == config.watch.resolve():
            raise ConfigError("--move-to: must differ from the watched folder")
    if config.genicam is not None and not config.genicam.is_file():
        raise ConfigError(f"--genicam {config.genicam}: no such GenTL producer (.cti) file")
    for url in config.video:
        if not isinstance(url, str) or not url:
            raise ConfigError(f"--video: expected a file, device (/dev/video0, 0) or rtsp:// URL, got {url!r}")
        if "://" not in url and not url.isdigit() and not Path(url).exists():
            raise ConfigError(f"--video {url}: no such file or device")
    if config.mqtt is not None:
        parsed = _url(config.mqtt, "--mqtt", ("mqtt",), "mqtt://HOST:PORT/TOPIC")
        if not parsed.path.strip("/"):
            raise ConfigError(f"--mqtt {config.mqtt}: no topic; use mqtt://HOST:PORT/TOPIC")
        if any(c in parsed.path for c in "+#"):
            raise ConfigError(f"--mqtt {config.mqtt}: the topic may not contain + or # (those are for subscribers)")
    if config.webhook is not None:
        _url(config.webhook, "--webhook", ("http", "https"), "http://HOST[:PORT]/PATH")
    if config.opcua is not None:
        _url(config.opcua, "--opcua", ("opc.tcp",), "opc.tcp://HOST:PORT")
    for sink, rate in config.rates.items():
        if sink not in SINK_NAMES:
            raise ConfigError(f"--rate {sink}=…: unknown sink (one of {', '.join(SINK_NAMES)})")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate < 0:
            raise ConfigError(f"--rate {sink}: expected results per second >= 0, got {rate!r}")
    if config.backend not in BACKENDS:
        raise ConfigError(f"--backend: expected {' or '.join(BACKENDS)}, got {config.backend!r}")
    if config.search not in (None, "exact", "hnsw"):
        raise ConfigError(f"--search: expected hnsw or exact, got {config.search!r}")


def _positive_int(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}: expected an integer >= 1, got {value!r}")


def _url(value: str, what: str, schemes: tuple[str, ...], form: str):
    parsed = urlsplit(value) if isinstance(value, str) else None
    if parsed is None or parsed.scheme not in schemes or not parsed.hostname:
        raise ConfigError(f"{what} {value!r}: expected {form}")
    try:
        parsed.port
    except ValueError:
        raise ConfigError(f"{what} {value!r}: the port is not a number in 0-65535") from None
    return parsed


def _check_http(config: ServeConfig) -> None:
    host, sep, port = config.http.rpartition(":") if isinstance(config.http, str) else ("", "", "")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError(f"--http {config.http!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ConfigError(f"--http {config.http!r}: HOST must be an IP address or localhost") from None
    if not loopback and not config.listen_any:
        raise ConfigError(
            f"--http {config.http}: listens beyond this machine (the API can reload models); "
            "add --listen-any to allow it"
        )
