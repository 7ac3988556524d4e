"""The HTTP API (stdlib server, one thread per connection): KServe-v2-style inference protocol,
Prometheus ``/metrics``, hot reload, and the live page with server-sent events.

    GET  /v2/health/live | /v2/health/ready       200 / 503
    GET  /v2/models/NAME  (/ready)                 metadata: versions, inputs, outputs
    POST /v2/models/NAME/infer                     an encoded image (raw body, or v2 JSON with
                                                   base64 BYTES) → score, verdict (+ map with ?map=1)
    POST /v2/repository/models/NAME/load           verify → open → warm → swap (400 when refused)
    GET  /metrics                                  Prometheus text format
    GET  /   /live/frames   /live/events   /live/overlay/SEQ.jpg
"""
from __future__ import annotations

import base64
import collections
import itertools
import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

import numpy as np

from edgecore.runtime.serve.frames import Frame, Result
from edgecore.runtime.serve.sinks import render_overlay

MAX_BODY = 64 << 20  # an encoded frame larger than this is refused (413) before it is read


class LiveView:
    """The last N results for the page, their overlays rendered on request, and SSE subscribers."""

    def __init__(self, frames: int) -> None:
        self._recent: collections.deque = collections.deque(maxlen=frames)
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self._subscribers: list[queue.Queue] = []

    def __call__(self, kind: str, item) -> None:
        if kind == "result":
            seq = next(self._seq)
            row = {**item.to_json(), "seq": seq}
            if item.detection is not None:
                row["overlay"] = f"/live/overlay/{seq}.jpg"
            with self._lock:
                self._recent.append({"row": row, "result": item, "jpeg": None})
            message = ("result", row)
        else:
            message = ("event", item)
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            try:
                subscriber.put_nowait(message)
            except queue.Full:  # a stalled browser tab: it misses frames, nothing else waits
                pass

    def rows(self) -> list[dict]:
        with self._lock:
            return [entry["row"] for entry in self._recent]

    def overlay(self, seq: int) -> bytes | None:
        with self._lock:
            entry = next((e for e in self._recent if e["row"]["seq"] == seq), None)
        if entry is None or entry["result"].detection is None:
            return None
        if entry["jpeg"] is None:
            entry["jpeg"] = render_overlay(entry["result"], fmt="JPEG", max_side=480)
        return entry["jpeg"]

    def subscribe(self) -> queue.Queue:
        subscriber: queue.Queue = queue.Queue(256)
        with self._lock:
            self._subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: queue.Queue) -> None:
        with self._lock:
            self._subscribers.remove(subscriber)


class HttpApi:
    def __init__(self, service, host: str, port: int) -> None:
        self.service = service
        self.live = LiveView(service.config.live_frames)
        service.add_listener(self.live)
        self._ids = itertools.count()
        self.page = resources.files("edgecore.runtime.serve").joinpath("static/index.html").read_bytes()
        api = self

        class Handler(_Handler):
            pass

        Handler.api = api
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- protocol --------------------------------------------------------------------
    def metadata(self) -> dict:
        served = self.service.slot.current
        map_h, map_w = served.detector.preprocess_config.map_hw
        return {
            "name": served.name,
            "versions": [served.version],
            "platform": f"edgecore_{served.detector.engine.info.backend}",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
            "outputs": [
                {"name": "score", "datatype": "FP32", "shape": [1]},
                {"name": "normalized_score", "datatype": "FP32", "shape": [1]},
                {"name": "is_anomalous", "datatype": "BOOL", "shape": [1]},
                {"name": "anomaly_map", "datatype": "FP32", "shape": [-1, -1]},
            ],
            "parameters": {"threshold": served.detector.threshold, "map_size": [int(map_h), int(map_w)]},
        }

    def infer(self, body: bytes, content_type: str, want_map: bool) -> tuple[int, dict]:
        request_id = None
        if content_type.startswith("application/json"):
            try:
                request = json.loads(body)
                first = request["inputs"][0]
                request_id = request.get("id")
                want_map = want_map or bool(request.get("parameters", {}).get("return_map"))
                image = base64.b64decode(first["data"][0], validate=True)
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                return 400, {"error": f"expected a v2 request with inputs[0].data[0] = base64 image bytes ({exc})"}
        else:
            image = body
        frame_id = f"http:{request_id or next(self._ids)}"
        result = self.service.score(Frame(id=frame_id, source="http", image=image, name=str(request_id or "")))
        self.service.publish(result)
        if result.detection is None:
            return 400, {"error": result.error}
        return 200, self._response(result, request_id, want_map)

    @staticmethod
    def _response(result: Result, request_id, want_map: bool) -> dict:
        detection = result.detection
        outputs = [
            {"name": "score", "datatype": "FP32", "shape": [1], "data": [detection.score]},
            {"name": "normalized_score", "datatype": "FP32", "shape": [1], "data": [detection.normalized_score]},
            {"name": "is_anomalous", "datatype": "BOOL", "shape": [1], "data": [detection.is_anomalous]},
        ]
        if want_map:
            heat = np.asarray(detection.map_original, dtype=np.float32)
            outputs.append({"name": "anomaly_map", "datatype": "FP32", "shape": list(heat.shape),
                            "data": heat.ravel().tolist()})
        response = {"model_name": result.model_name, "model_version": result.model_version,
                    "outputs": outputs, "parameters": {"frame_id": result.frame.id, "verdict": result.verdict,
                                                       "timings_ms": result.to_json()["timings_ms"]}}
        if request_id is not None:
            response["id"] = request_id
        return response


class _Handler(BaseHTTPRequestHandler):
    api: HttpApi
    protocol_version = "HTTP/1.1"
    server_version = "edgecore-serve"

    def log_message(self, format, *args) -> None:  # access logs would flood a camera's journal
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode())

    def _model_ok(self, name: str) -> bool:
        if name != self.api.service.slot.current.name:
            self._json(404, {"error": f"no model named {name!r}; this server serves {self.api.service.slot.current.name!r}"})
            return False
        return True

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        service = self.api.service
        if url.path == "/":
            self._send(200, self.api.page, "text/html; charset=utf-8")
        elif url.path == "/v2/health/live":
            self._json(200, {"live": True})
        elif url.path == "/v2/health/ready":
            ready = not service.draining.is_set()
            self._json(200 if ready else 503, {"ready": ready})
        elif url.path == "/v2":
            self._json(200, {"name": "edgecore", "version": "serve", "extensions": ["model_repository"]})
        elif len(parts) == 3 and parts[:2] == ["v2", "models"]:
            if self._model_ok(parts[2]):
                self._json(200, self.api.metadata())
        elif len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "ready":
            if self._model_ok(parts[2]):
                ready = not service.draining.is_set()
                self._json(200 if ready else 503, {"name": parts[2], "ready": ready})
        elif url.path == "/metrics":
            self._send(200, service.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        elif url.path == "/live/frames":
            self._json(200, {"frames": self.api.live.rows(), "status": service.status()})
        elif len(parts) == 3 and parts[:2] == ["live", "overlay"] and parts[2].endswith(".jpg"):
            try:
                jpeg = self.api.live.overlay(int(parts[2][:-4]))
            except ValueError:
                jpeg = None
            self._send(200, jpeg, "image/jpeg") if jpeg else self._json(404, {"error": "frame no longer kept"})
        elif url.path == "/live/events":
            self._events()
        else:
            self._json(404, {"error": f"no such endpoint: GET {url.path}"})

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        parts = [p for p in url.path.split("/") if p]
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            self._json(413, {"error": f"request body of {length} bytes is over the {MAX_BODY}-byte limit"})
            return
        body = self.rfile.read(length)
        if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "infer":
            if self._model_ok(parts[2]):
                want_map = parse_qs(url.query).get("map", ["0"])[0] in ("1", "true")
                status, payload = self.api.infer(body, self.headers.get("Content-Type", ""), want_map)
                self._json(status, payload)
        elif len(parts) == 5 and parts[:3] == ["v2", "repository", "models"] and parts[4] == "load":
            if self._model_ok(parts[3]):
                ok, message = self.api.service.reload("POST load")
                self._json(200 if ok else 400, {"message": message} if ok else {"error": message})
        else:
            self._json(404, {"error": f"no such endpoint: POST {url.path}"})

    def _events(self) -> None:
        """Server-sent events: every result and service event, as they happen."""
        live, service = self.api.live, self.api.service
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        subscriber = live.subscribe()
        try:
            self.wfile.write(b"retry: 1000\n\n")
            self.wfile.flush()
            while not service.stopping.is_set():
                try:
                    kind, payload = subscriber.get(timeout=5)
                except queue.Empty:
                    self.wfile.write(b": keep-alive\n\n")
                else:
                    self.wfile.write(f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            live.unsubscribe(subscriber)
