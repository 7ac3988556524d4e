"""Prometheus metrics of one serve process (its own registry: several services in one test process
do not share counters)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# 1 ms … 10 s: a camera frame is scored in tens of ms, a queue can back up to seconds.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("edgecore_stage_seconds", "Per-stage latency of scored frames", ["stage"],
                                 buckets=_BUCKETS, registry=r)
        self.frames = Counter("edgecore_frames", "Frames scored", ["source"], registry=r)
        self.anomalous = Counter("edgecore_anomalous", "Frames scored anomalous", registry=r)
        self.dropped = Counter("edgecore_dropped", "Frames or results dropped (bounded queues, live sources)",
                               ["where"], registry=r)
        self.errors = Counter("edgecore_errors", "Frames that could not be scored, sink failures", ["where"], registry=r)
        self.reloads = Counter("edgecore_reloads", "Model reloads", ["result"], registry=r)
        self.reconnects = Counter("edgecore_source_reconnects", "Video/camera source reconnects", ["source"], registry=r)
        self.rate_limited = Counter("edgecore_sink_rate_limited", "Results a sink's rate limit skipped", ["sink"],
                                    registry=r)
        self.queue_depth = Gauge("edgecore_queue_depth", "Frames waiting for the detector", registry=r)
        self.buffered = Gauge("edgecore_sink_buffered", "Results a sink holds until delivered", ["sink"], registry=r)
        self.model = Gauge("edgecore_model_info", "The served model (value 1)", ["name", "version"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
