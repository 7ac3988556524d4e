"""Result sinks: rotating JSONL, an overlay folder, MQTT, a webhook, an OPC UA server.

Each sink runs behind a :class:`SinkRunner` (its own bounded queue and thread, an optional
rate limit), so a slow webhook never holds up the detector; what a full queue or a rate
limit skips is counted. Events (started, reload, reload refused, stopping) go to every sink.
A registry maps each sink's name to its factory.
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from edgecore.runtime.overlay import render_overlay as render
from edgecore.runtime.serve.frames import Result


class Sink:
    name = "sink"

    def start(self) -> None:
        """Connect / open (called once, before the first frame)."""

    def handle(self, result: Result) -> None:
        raise NotImplementedError

    def event(self, event: dict) -> None:
        """A service event (dict with ``event`` and ``message``)."""

    def close(self, timeout: float) -> None:
        """Deliver what is buffered (up to ``timeout`` s), then release."""


class SinkRunner:
    """A sink's own thread and bounded queue; rate limit: anomalous results and events always pass."""

    def __init__(self, sink: Sink, metrics, rate: float = 0.0, capacity: int = 1024, log=print) -> None:
        self.sink, self.metrics, self.log = sink, metrics, log
        self.period = 1.0 / rate if rate else 0.0
        self._last = -1e18
        self._queue: queue.Queue = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name=f"sink-{sink.name}", daemon=True)

    def start(self) -> None:
        from edgecore.runtime.serve.config import ConfigError

        try:
            self.sink.start()
        except OSError as exc:  # e.g. the OPC UA port is taken
            raise ConfigError(f"--{self.sink.name}: cannot start it: {exc.strerror or exc}") from None
        self._thread.start()

    def put(self, kind: str, item) -> None:
        if kind == "result" and self.period and not item.is_anomalous:
            now = time.monotonic()
            if now - self._last < self.period:
                self.metrics.rate_limited.labels(self.sink.name).inc()
                return
            self._last = now
        try:
            self._queue.put_nowait((kind, item))
        except queue.Full:
            self.metrics.dropped.labels(f"sink:{self.sink.name}").inc()

    def _run(self) -> None:
        while True:
            kind, item = self._queue.get()
            if kind == "stop":
                return
            try:
                self.sink.handle(item) if kind == "result" else self.sink.event(item)
            except Exception as exc:
                self.metrics.errors.labels(f"sink:{self.sink.name}").inc()
                self.log(f"warning: sink {self.sink.name}: {exc}")

    def close(self, timeout: float = 10.0) -> None:
        """Drain the queue, then let the sink flush."""
        self._queue.put(("stop", None))
        self._thread.join(timeout)
        self.sink.close(timeout)


# --- JSONL --------------------------------------------------------------------------
class JsonlSink(Sink):
    """One JSON line per result (and per event), rotated at ``max_bytes`` keeping ``keep`` old files."""

    name = "jsonl"

    def __init__(self, path: Path, max_bytes: int = 64 << 20, keep: int = 5) -> None:
        self.path, self.max_bytes, self.keep = Path(path), max_bytes, keep
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")

    def _write(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        if self._handle.tell() and self._handle.tell() + len(line) > self.max_bytes:
            self._rotate()
        self._handle.write(line)
        self._handle.flush()

    def _rotate(self) -> None:
        self._handle.close()
        for k in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{k}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{k + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._handle = open(self.path, "a", encoding="utf-8")

    def handle(self, result: Result) -> None:
        self._write(result.to_json())

    def event(self, event: dict) -> None:
        self._write(event)

    def close(self, timeout: float) -> None:
        self._handle.close()


# --- overlays ----------------------------------------------------------------------------
def render_overlay(result: Result, fmt: str = "PNG", max_side: int | None = None) -> bytes:
    """The frame with its heat map, verdict and score (runtime/overlay.py), encoded."""
    import io

    detection = result.detection
    options = {"max_side": max_side} if max_side else {}
    image = render(result.rgb, result.normalization(detection.map), result.preprocess, detection.score,
                   detection.normalized_score, detection.is_anomalous, result.threshold, **options)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 85} if fmt == "JPEG" else {"compress_level": 1}))
    return buffer.getvalue()


def safe_name(frame_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in frame_id)


class OverlaySink(Sink):
    """An overlay PNG per anomalous frame (or every frame), written atomically (temp + rename)."""

    name = "overlays"

    def __init__(self, folder: Path, every_frame: bool = False) -> None:
        self.folder, self.every_frame = Path(folder), every_frame
        self.folder.mkdir(parents=True, exist_ok=True)

    def handle(self, result: Result) -> None:
        if result.detection is None or not (self.every_frame or result.is_anomalous):
            return
        target = self.folder / f"{safe_name(result.frame.id)}.png"
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_bytes(render_overlay(result))
        os.replace(temporary, target)


# --- MQTT ----------------------------------------------------------------------------
class MqttSink(Sink):
    """Results on TOPIC (QoS 1), events on TOPIC/events, a retained status on TOPIC/status.

    While the broker is down, paho keeps up to ``buffer`` unacknowledged messages and sends
    them after it reconnects (what does not fit is refused and counted as dropped).
    """

    name = "mqtt"

    def __init__(self, url: str, buffer: int, metrics, status: Callable[[], dict], log=print) -> None:
        import paho.mqtt.client as mqtt

        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname, parsed.port or 1883
        self.topic = parsed.path.strip("/")
        self.metrics, self.status, self.log = metrics, status, log
        self._sent = self._acked = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgecore-{os.getpid()}-{id(self):x}")
        self.client.max_queued_messages_set(buffer)
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(min_delay=0.5, max_delay=2)
        self.client.will_set(f"{self.topic}/status", json.dumps({"state": "offline"}), qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self._gauge = metrics.buffered.labels(self.name)

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            self._publish(f"{self.topic}/status", self.status(), retain=True)  # a restarted broker forgot it

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self._acked += 1
            self._gauge.set(self._sent - self._acked)

    def _publish(self, topic: str, payload: dict, retain: bool = False) -> None:
        import paho.mqtt.client as mqtt

        info = self.client.publish(topic, json.dumps(payload), qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self.metrics.dropped.labels("sink:mqtt").inc()
            return
        with self._lock:
            self._sent += 1
            self._gauge.set(self._sent - self._acked)

    def handle(self, result: Result) -> None:
        self._publish(self.topic, result.to_json())

    def event(self, event: dict) -> None:
        self._publish(f"{self.topic}/events", event)
        self._publish(f"{self.topic}/status", self.status(), retain=True)

    def pending(self) -> int:
        with self._lock:
            return self._sent - self._acked

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.pending():
            self.log(f"warning: mqtt: {self.pending()} result(s) not acknowledged by the broker at exit")
        self.client.disconnect()
        self.client.loop_stop()


# --- webhook -----------------------------------------------------------------------
class WebhookSink(Sink):
    """POST each result (and event) as JSON; retries with backoff, then counts the failure."""

    name = "webhook"

    def __init__(self, url: str, retries: int = 3, timeout: float = 5.0) -> None:
        self.url, self.retries, self.timeout = url, retries, timeout

    def _post(self, payload: dict) -> None:
        body = json.dumps(payload).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()
                return
            except (urllib.error.URLError, OSError) as exc:
                if attempt == self.retries:
                    raise ConnectionError(f"POST {self.url} failed after {attempt + 1} tries: {exc}") from None
                time.sleep(0.25 * 2**attempt)

    def handle(self, result: Result) -> None:
        self._post(result.to_json())

    def event(self, event: dict) -> None:
        self._post(event)


# --- OPC UA ----------------------------------------------------------------------------
OPCUA_NAMESPACE = "urn:edgecore:serve"
OPCUA_VARIABLES = {  # name -> (variant type, initial value)
    "LastScore": ("Double", 0.0),
    "LastNormalizedScore": ("Double", 0.0),
    "LastVerdict": ("String", ""),
    "IsAnomalous": ("Boolean", False),
    "LastFrameId": ("String", ""),
    "FramesTotal": ("UInt64", 0),
    "AnomalousTotal": ("UInt64", 0),
    "ErrorsTotal": ("UInt64", 0),
    "ModelVersion": ("String", ""),
    "LastEvent": ("String", ""),
}


class OpcUaSink(Sink):
    """An OPC UA server (asyncua, no security: put it on the machine network only) with the last
    result and counts as variables ``ns=<urn:edgecore:serve>;s=edgecore.<Name>`` under Objects/edgecore."""

    name = "opcua"

    def __init__(self, url: str, model_version: Callable[[], str]) -> None:
        self.url, self.model_version = url, model_version
        self.counts = {"FramesTotal": 0, "AnomalousTotal": 0, "ErrorsTotal": 0}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name="opcua", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)
        if self._failed:
            raise self._failed
        self._write({"ModelVersion": self.model_version()})

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._setup())
        except BaseException as exc:
            self._failed = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _setup(self) -> None:
        import logging

        from asyncua import Server, ua

        logging.getLogger("asyncua").setLevel(logging.ERROR)
        server = Server()
        await server.init()
        server.set_endpoint(self.url)
        server.set_server_name("edgecore serve")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        index = await server.register_namespace(OPCUA_NAMESPACE)
        folder = await server.nodes.objects.add_object(ua.NodeId("edgecore", index), ua.QualifiedName("edgecore", index))
        self._nodes = {}
        for name, (kind, initial) in OPCUA_VARIABLES.items():
            variant = getattr(ua.VariantType, kind)
            node = await folder.add_variable(ua.NodeId(f"edgecore.{name}", index), ua.QualifiedName(name, index),
                                             ua.Variant(initial, variant))
            self._nodes[name] = (node, variant)
        self._ua = ua
        await server.start()
        self._server = server

    async def _write_async(self, values: dict) -> None:
        for name, value in values.items():
            node, variant = self._nodes[name]
            await node.write_value(self._ua.DataValue(self._ua.Variant(value, variant)))

    def _write(self, values: dict) -> None:
        asyncio.run_coroutine_threadsafe(self._write_async(values), self._loop).result(timeout=10)

    def handle(self, result: Result) -> None:
        self.counts["FramesTotal"] += 1
        self.counts["AnomalousTotal"] += result.is_anomalous
        self.counts["ErrorsTotal"] += result.detection is None
        values = {"LastVerdict": result.verdict, "IsAnomalous": result.is_anomalous, "LastFrameId": result.frame.id,
                  "ModelVersion": result.model_version, **self.counts}
        if result.detection is not None:
            values["LastScore"] = result.detection.score
            values["LastNormalizedScore"] = result.detection.normalized_score
        self._write(values)

    def event(self, event: dict) -> None:
        self._write({"LastEvent": event.get("message", ""), "ModelVersion": self.model_version()})

    def close(self, timeout: float) -> None:
        if getattr(self, "_server", None) is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result(timeout=timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)


# --- registry ------------------------------------------------------------------------
def build_sinks(config, metrics, status: Callable[[], dict], model_version: Callable[[], str], log) -> list[SinkRunner]:
    """One runner per configured sink (each registry entry knows its own options)."""
    factories: dict[str, Callable[[], Sink]] = {
        "jsonl": lambda: JsonlSink(config.jsonl, int(config.jsonl_max_mb * (1 << 20)), config.jsonl_keep),
        "overlays": lambda: OverlaySink(config.overlays, config.overlays_all),
        "mqtt": lambda: MqttSink(config.mqtt, config.mqtt_buffer, metrics, status, log),
        "webhook": lambda: WebhookSink(config.webhook, config.webhook_retries),
        "opcua": lambda: OpcUaSink(config.opcua, model_version),
    }
    from edgecore.runtime.serve.config import ConfigError

    runners = []
    for name, factory in factories.items():
        if getattr(config, name) is None:
            continue
        try:
            sink = factory()
        except OSError as exc:  # an unwritable folder or file
            raise ConfigError(f"--{name} {getattr(config, name)}: {exc.strerror or exc}") from None
        runners.append(SinkRunner(sink, metrics, rate=config.rates.get(name, 0.0), log=log))
    return runners
