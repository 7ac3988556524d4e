"""`edgecore serve`: sources → one bounded queue → detector workers → sinks, plus the HTTP API.

Lifecycle: ``start()`` opens the model (verified, warmed), the sinks, the HTTP API and the
sources; ``stop()`` (SIGTERM) stops the sources, scores every frame already queued, lets each
sink deliver what it holds, and returns — the process then exits 0. ``reload()`` (SIGHUP, a
changed bundle on disk, ``POST /v2/repository/models/NAME/load``) swaps the model without
losing or re-scoring a frame; a refused bundle is reported on every channel.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgecore.runtime.bundle import MANIFEST
from edgecore.runtime.errors import EdgecoreError
from edgecore.runtime.imageio import load_image
from edgecore.runtime.serve.config import ConfigError, ServeConfig, build_config
from edgecore.runtime.serve.frames import Frame, Result
from edgecore.runtime.serve.metrics import Metrics
from edgecore.runtime.serve.model import ModelSlot
from edgecore.runtime.serve.sinks import build_sinks
from edgecore.runtime.serve.sources import FolderSource, GenICamSource, Source, VideoSource, finish

STAGES = ("decode", "preprocess", "engine", "search", "scoring_map", "total")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Service:
    def __init__(self, config: ServeConfig, log: Callable[[str], None] = _stderr) -> None:
        self.config, self.log = config, log
        self.metrics = Metrics()
        self.queue: queue.Queue = queue.Queue(config.queue)
        self.draining = threading.Event()  # stop() began: not ready, sources closing
        self.stopping = threading.Event()  # queue drained: submit() refuses
        self.counts = {"frames": 0, "anomalous": 0, "errors": 0, "reloads": 0, "reloads_refused": 0}
        self.last_event: dict = {}
        self._counts_lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._listeners: list[Callable[[str, object], None]] = []  # the live page
        self.slot = ModelSlot(config.bundle, backend=config.backend, device=config.device,
                              precision=config.precision, search=config.search)
        self._set_model_info(None)
        self.sinks = build_sinks(config, self.metrics, self.status, lambda: self.slot.current.version, log)
        self.sources: list[Source] = self._build_sources()
        from edgecore.runtime.serve.http import HttpApi

        try:
            self.http = HttpApi(self, config.http_host, config.http_port)
        except OSError as exc:  # the port is taken, or the address is not this machine's
            raise ConfigError(f"--http {config.http}: {exc.strerror or exc}") from None

    # --- wiring ------------------------------------------------------------------
    def _build_sources(self) -> list[Source]:
        config, sources = self.config, []
        if config.watch is not None:
            try:
                sources.append(FolderSource(config.watch, self.submit, self.log, config.journal, config.move_to))
            except OSError as exc:  # the journal or --move-to cannot be written
                raise ConfigError(f"--watch {config.watch}: {exc.filename or ''}: {exc.strerror or exc}") from None
        for url in config.video:
            sources.append(VideoSource(url, self.submit, self.log, config.video_rate,
                                       on_reconnect=lambda: self.metrics.reconnects.labels("video").inc()))
        if config.genicam is not None:
            sources.append(GenICamSource(config.genicam, self.submit, self.log))
        return sources

    def add_listener(self, listener: Callable[[str, object], None]) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        for sink in self.sinks:
            sink.start()
        for index in range(self.config.workers):
            worker = threading.Thread(target=self._work, name=f"detector-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self.http.start()
        for source in self.sources:
            source.start()
        if self.config.watch_bundle:
            threading.Thread(target=self._watch_bundle, name="bundle-watch", daemon=True).start()
        served = self.slot.current
        self.report("started", f"serving {served.name} {served.version} on http://{self.config.http}")

    def status(self) -> dict:
        served = self.slot.current
        state = "stopped" if self.stopping.is_set() else "stopping" if self.draining.is_set() else "running"
        with self._counts_lock:
            counts = dict(self.counts)
        return {"state": state, "model": served.name, "model_version": served.version, **counts,
                "last_event": self.last_event.get("message", "")}

    def report(self, kind: str, message: str, **fields) -> None:
        """An event on every channel: stderr, each sink (MQTT events + status, OPC UA, webhook,
        JSONL), the live page."""
        event = {"event": kind, "message": message, "time": round(time.time(), 3), **fields}
        self.last_event = event
        self.log(f"serve: {kind}: {message}")
        for sink in self.sinks:
            sink.put("event", event)
        for listener in self._listeners:
            listener("event", event)

    # --- frames ---------------------------------------------------------------------
    def submit(self, frame: Frame, wait: bool = True) -> bool:
        """Queue a frame; ``wait``: block while the queue is full (else drop, counted). False once stopping."""
        while not self.stopping.is_set():
            try:
                self.queue.put(frame, timeout=0.1 if wait else 0)
                self.metrics.queue_depth.set(self.queue.qsize())
                return True
            except queue.Full:
                if not wait:
                    self.metrics.dropped.labels(f"source:{frame.source}").inc()
                    return True
        return False

    def score(self, frame: Frame) -> Result:
        """Decode + detect one frame on the current model (a lease: a reload waits for it)."""
        with self.slot.lease() as served:
            detector = served.detector
            result = Result(frame, served.name, served.version, normalization=detector.normalization,
                            threshold=detector.threshold, preprocess=detector.preprocess_config)
            try:
                t0 = time.perf_counter()
                result.rgb = load_image(frame.image)
                decode_ms = (time.perf_counter() - t0) * 1e3
                detection = detector.detect(result.rgb)
                if not (np.isfinite(detection.score) and np.isfinite(detection.map).all()):
                    raise EdgecoreError(f"{frame.id}: the score is not finite; the frame is not called good")
                detection.timings_ms["decode"] += decode_ms
                detection.timings_ms["total"] += decode_ms
                result.detection = detection
            except (EdgecoreError, ValueError, MemoryError) as exc:
                result.error = str(exc)
        result.t_done = time.perf_counter()
        return result

    def publish(self, result: Result) -> None:
        metrics = self.metrics
        with self._counts_lock:
            self.counts["frames"] += 1
            self.counts["anomalous"] += result.is_anomalous
            self.counts["errors"] += result.detection is None
        metrics.frames.labels(result.frame.source).inc()
        if result.detection is None:
            metrics.errors.labels("frame").inc()
        else:
            metrics.anomalous.inc(result.is_anomalous)
            for stage in STAGES:
                metrics.latency.labels(stage).observe(result.detection.timings_ms[stage] / 1e3)
        metrics.latency.labels("queue_to_result").observe(result.t_done - result.frame.t_in)
        for sink in self.sinks:
            sink.put("result", result)
        for listener in self._listeners:
            listener("result", result)

    def _work(self) -> None:
        while True:
            frame = self.queue.get()
            if frame is None:
                self.queue.task_done()
                return
            self.metrics.queue_depth.set(self.queue.qsize())
            try:
                result = self.score(frame)
                self.publish(result)
                finish(result)
            except Exception as exc:  # never lose the worker
                self.metrics.errors.labels("worker").inc()
                self.log(f"error: frame {frame.id}: {exc}")
            finally:
                self.queue.task_done()

    # --- reload ----------------------------------------------------------------------
    def reload(self, trigger: str) -> tuple[bool, str]:
        """Verify, open, warm and swap in the bundle now on disk; the old one serves on if that fails."""
        previous = self.slot.current.version
        try:
            old, new = self.slot.reload()
        except Exception as exc:
            with self._counts_lock:
                self.counts["reloads_refused"] += 1
            self.metrics.reloads.labels("refused").inc()
            message = f"reload ({trigger}) refused, still serving {previous}: {exc}"
            self.report("reload_refused", message, model_version=previous)
            return False, message
        with self._counts_lock:
            self.counts["reloads"] += 1
        self.metrics.reloads.labels("ok").inc()
        self._set_model_info(old)
        message = f"reloaded ({trigger}): {old.version} -> {new.version}"
        self.report("reload", message, model_version=new.version, previous_version=old.version)
        return True, message

    def _set_model_info(self, old) -> None:
        if old is not None:
            self.metrics.model.remove(old.name, old.version)
        current = self.slot.current
        self.metrics.model.labels(current.name, current.version).set(1)

    def _watch_bundle(self) -> None:
        """Reload when the bundle on disk changes (a rewrite swaps the whole folder: its inode changes)."""
        def signature():
            try:
                folder, manifest = Path(self.config.bundle).stat(), (Path(self.config.bundle) / MANIFEST).stat()
                return folder.st_ino, manifest.st_ino, manifest.st_mtime_ns, manifest.st_size
            except OSError:
                return None

        seen = signature()
        while not self.stopping.wait(0.5):
            now = signature()
            if now is not None and now != seen:
                time.sleep(0.2)  # let a copy by hand finish
                seen = signature()
                self.reload("bundle changed on disk")

    # --- stop ------------------------------------------------------------------------
    def finite_sources_done(self) -> bool:
        return all(s.done.is_set() for s in self.sources if s.finite) and any(s.finite for s in self.sources)

    def stop(self, timeout: float = 30.0) -> None:
        """Drain and close: sources stop, queued frames are scored, sinks deliver, then the API closes."""
        self.draining.set()
        self.report("stopping", "draining: no new frames; scoring the queued ones")
        for source in self.sources:
            source.stop()
        for source in self.sources:
            source.join(timeout)
        self.queue.join()  # every frame taken in is scored and published
        self.stopping.set()
        for _ in self._workers:
            self.queue.put(None)
        for worker in self._workers:
            worker.join(timeout)
        for source in self.sources:
            if hasattr(source, "close"):
                source.close()
        served = self.slot.current
        self.report("stopped", f"stopped after {self.counts['frames']} frame(s)", model_version=served.version)
        for sink in self.sinks:
            sink.close(timeout)
        self.http.stop()
        self.slot.close()


def start_service(log: Callable[[str], None] = _stderr, **options) -> Service:
    """Embed the service in a Python program: options as in serve.toml / the flags (``bundle=…,
    watch=…, mqtt=…``), checked the same way; returns it started. Call ``stop()`` to drain."""
    service = Service(build_config({}, options), log=log)
    service.start()
    return service
