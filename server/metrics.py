"""Prometheus metrics of the server (`GET /metrics`), one registry per app.

Names and labels (all counters end in `_total`; times are seconds, Prometheus style):

* `codecstream_sessions_active{endpoint}`, `codecstream_sessions_total{endpoint}`: WebSocket
  sessions (endpoint `encode`, `decode`, `roundtrip`, `room`) and HTTP jobs (`http_encode`,
  `http_decode`) open now / ever admitted;
* `codecstream_sessions_closed_total{endpoint, code}`: sessions closed, by close code (a
  client's own close code outside 1000-1015 as `other`: `server.session.closed_label`);
* `codecstream_frames_encoded_total{endpoint}`, `codecstream_frames_decoded_total{endpoint}`;
* `codecstream_frames_late_total{endpoint}`: frames done more than one frame period (20 ms)
  after their input was complete;
* `codecstream_frames_dropped_total{reason}`: `rate` (room sender over real time),
  `send_queue` (slow room receiver);
* `codecstream_frame_queue_seconds{direction}`, `codecstream_frame_compute_seconds{direction}`:
  histograms per frame of the time from input complete to step start and of the (batched)
  step; `codecstream_batch_size{direction}`: streams per ONNX call;
* `codecstream_frame_latency_ms{direction, stage, quantile}`: p50/p99 of the engine's
  `streaming.latency.LatencyStats` (queue, compute, total = algorithmic + queue + compute);
* `codecstream_bytes_received_total{endpoint}`, `codecstream_bytes_sent_total{endpoint}`:
  WebSocket message payload bytes and HTTP bodies;
* `codecstream_rooms_active`, `codecstream_room_participants`;
* `codecstream_auth_failures_total{reason}`: `missing` or `unknown` key;
* `codecstream_protocol_errors_total{code}`: sessions the server closed on a client error, by
  close code (`4400`, `4422`, ...), and `codecstream_packet_errors_total{error}` by `ErrorCode`;
* `codecstream_engine_ticks_total`, `codecstream_engine_cpu_seconds_total` (CPU time of the
  engine threads, s, summed), `codecstream_engine_alive`, `codecstream_model_info`;
* `codecstream_engine_slow_percent`: the smoothed percentage of slow frames (over 3/4 of
  the frame period in the engine) on the engine worker a new stream session would go to
  (`server.capacity`; new stream sessions are refused above `max_slow_percent`), and
  `codecstream_sessions_refused_total{reason}` (`capacity`).

The three per-frame histograms are `BatchHistogram`s: the engine updates them once per
batched step (one lock per step instead of one per frame and histogram); they expose the
same `_bucket` / `_sum` / `_count` series as a `prometheus_client.Histogram`.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["BatchHistogram", "Metrics", "StatsSource"]

_TIME_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    1.0,
)
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

StatsSource = Callable[[], dict[str, dict[str, float]]]
"""Returns {direction: LatencyStats.summary()} (published by the engine worker)."""


class _LatencyCollector(Collector):
    """Exports the latest LatencyStats summaries as gauges at scrape time."""

    def __init__(self, source: StatsSource) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "codecstream_frame_latency_ms",
            "Per-frame latency percentiles of the engine (ms): queue, compute, total",
            labels=["direction", "stage", "quantile"],
        )
        for direction, summary in self._source().items():
            for stage in ("queue", "compute", "total"):
                for q in ("p50", "p99"):
                    value = summary.get(f"{stage}_{q}_ms")
                    if value is not None and value == value:  # skip nan (no frames yet)
                        family.add_metric([direction, stage, q[1:]], value)
        yield family

    def describe(self) -> Iterable[Metric]:
        return []


class BatchHistogram(Collector):
    """A histogram with one label, updated a batch of values at a time (thread-safe).

    `observe(label, values)` and `observe_repeat(label, value, n)` take one lock for the
    whole batch.  Exposed like a `prometheus_client.Histogram` (`_bucket{le}`, `_sum`,
    `_count`) at scrape time.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self._bounds = tuple(float(b) for b in buckets)
        self._le = [repr(b) for b in self._bounds] + ["+Inf"]  # as prometheus_client writes them
        self._series: dict[str, tuple[list[int], list[float]]] = {}  # counts, [sum]
        self._lock = threading.Lock()
        registry.register(self)

    def _get(self, label: str) -> tuple[list[int], list[float]]:
        series = self._series.get(label)
        if series is None:
            series = self._series[label] = ([0] * (len(self._bounds) + 1), [0.0])
        return series

    def observe(self, label: str, values: Iterable[float]) -> None:
        """Record every value of `values` under `label`."""
        bounds = self._bounds
        with self._lock:
            counts, total = self._get(label)
            for value in values:
                counts[bisect_left(bounds, value)] += 1
                total[0] += value

    def observe_repeat(self, label: str, value: float, n: int = 1) -> None:
        """Record `value` `n` times under `label`."""
        if n <= 0:
            return
        with self._lock:
            counts, total = self._get(label)
            counts[bisect_left(self._bounds, value)] += n
            total[0] += value * n

    def snapshot(self) -> dict[str, tuple[list[int], float]]:
        """{label: (counts per bucket incl. +Inf, sum)}: cumulative, a copy."""
        with self._lock:
            return {k: (list(c), t[0]) for k, (c, t) in self._series.items()}

    def add_counts(self, label: str, counts: Sequence[int], total: float) -> None:
        """Add per-bucket `counts` (this histogram's buckets, +Inf last) and `total` under
        `label`: the increments of another process's histogram (server.engine_process)."""
        if len(counts) != len(self._bounds) + 1:
            raise ValueError(f"{len(counts)} bucket counts for {len(self._bounds) + 1} buckets")
        with self._lock:
            mine, sum_ = self._get(label)
            for i, n in enumerate(counts):
                mine[i] += n
            sum_[0] += total

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            snapshot = [(k, list(c), t[0]) for k, (c, t) in self._series.items()]
        for label, counts, total in snapshot:
            cumulative, buckets = 0, []
            for le, count in zip(self._le, counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric([label], buckets, total)
        yield family

    def describe(self) -> Iterable[Metric]:
        return []


class Metrics:
    """All metrics of one app; thread-safe (prometheus_client locks every update)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.sessions_active = Gauge(
            "codecstream_sessions_active", "Sessions open now", ["endpoint"], registry=r
        )
        self.sessions_total = Counter(
            "codecstream_sessions", "Sessions admitted", ["endpoint"], registry=r
        )
        self.sessions_closed = Counter(
            "codecstream_sessions_closed",
            "Sessions closed, by close code",
            ["endpoint", "code"],
            registry=r,
        )
        self.sessions_refused = Counter(
            "codecstream_sessions_refused",
            "Stream sessions refused because the engine was at capacity (max_slow_percent)",
            ["reason"],
            registry=r,
        )
        self.frames_encoded = Counter(
            "codecstream_frames_encoded", "Frames encoded", ["endpoint"], registry=r
        )
        self.frames_decoded = Counter(
            "codecstream_frames_decoded", "Frames decoded", ["endpoint"], registry=r
        )
        self.frames_late = Counter(
            "codecstream_frames_late",
            "Frames done later than one frame period after input",
            ["endpoint"],
            registry=r,
        )
        self.frames_dropped = Counter(
            "codecstream_frames_dropped", "Frames dropped", ["reason"], registry=r
        )
        self.queue_seconds = BatchHistogram(
            "codecstream_frame_queue_seconds",
            "Time from frame input complete to step start",
            "direction",
            _TIME_BUCKETS,
            r,
        )
        self.compute_seconds = BatchHistogram(
            "codecstream_frame_compute_seconds",
            "Time of the batched step computing a frame",
            "direction",
            _TIME_BUCKETS,
            r,
        )
        self.batch_size = BatchHistogram(
            "codecstream_batch_size", "Streams per ONNX call", "direction", _BATCH_BUCKETS, r
        )
        self.bytes_received = Counter(
            "codecstream_bytes_received", "Payload bytes received", ["endpoint"], registry=r
        )
        self.bytes_sent = Counter(
            "codecstream_bytes_sent", "Payload bytes sent", ["endpoint"], registry=r
        )
        self.rooms_active = Gauge("codecstream_rooms_active", "Rooms open now", registry=r)
        self.room_participants = Gauge(
            "codecstream_room_participants", "Participants in all rooms", registry=r
        )
        self.auth_failures = Counter(
            "codecstream_auth_failures", "Rejected API keys", ["reason"], registry=r
        )
        self.protocol_errors = Counter(
            "codecstream_protocol_errors",
            "Sessions closed on a client error, by close code",
            ["code"],
            registry=r,
        )
        self.packet_errors = Counter(
            "codecstream_packet_errors",
            "Malformed packets and files, by ErrorCode",
            ["error"],
            registry=r,
        )
        self.engine_ticks = Counter(
            "codecstream_engine_ticks", "Engine worker ticks with work", registry=r
        )
        self.engine_cpu = Counter(
            "codecstream_engine_cpu_seconds",
            "CPU time of the engine worker thread (updated every second)",
            registry=r,
        )
        self.engine_slow_percent = Gauge(
            "codecstream_engine_slow_percent",
            "Smoothed percentage of frames the engine worker a new stream session would go to "
            "took over 3/4 of the frame period (above max_slow_percent new stream sessions are "
            "refused)",
            registry=r,
        )
        self.engine_alive = Gauge(
            "codecstream_engine_alive", "1 while the engine worker thread runs", registry=r
        )
        self.model_info = Gauge(
            "codecstream_model_info",
            "The loaded model (value 1)",
            ["model_id", "random_weights"],
            registry=r,
        )

    def add_latency_source(self, source: StatsSource) -> None:
        """Export `source()`'s LatencyStats summaries as `codecstream_frame_latency_ms`."""
        self.registry.register(_LatencyCollector(source))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
