"""The engine worker: ONE thread that owns a `BatchEngine` and runs every encode/decode step.

Sessions (on the asyncio event loop) never touch a stream: each has a `Job`, its engine-side
half, handed to the worker with `EngineWorker.add`.  The loop sends a job input with
`EngineWorker.submit(job, item)` (thread-safe, never blocks: a deque and an Event); the worker
thread timestamps nothing itself: `submit` records the arrival time on the loop, so a frame's
queueing time includes the hop to this thread.

One **tick** of the worker:

1. drain the inbox: each item goes to its job (`Job.on_input`, arrival time attached);
2. periodic jobs (room mixers) get `on_period` once per frame period (20 ms), on a fixed
   schedule of the worker's clock;
3. every job feeds its streams (`Job.feed`: at most what the next frame needs, so a job's
   backlog stays in its own queue where it can be bounded, reordered with control messages
   or dropped);
4. ONE `BatchEngine.encode_step` over every encoder stream with a frame due, results to
   `Job.on_encoded`; then ONE `decode_step` over every decoder with a frame due
   (`Job.on_decoded`);
5. `Job.after_step` (periodic jobs mix here; stream jobs finish flushes);
6. every job's outputs go back to the loop in ONE `loop.call_soon_threadsafe` per tick, where
   each job's `sink` receives its list.

Ticks run back to back while frames are due (one frame per stream per tick: a session that
sends faster than real time gets no more than its share), otherwise the thread sleeps until
the next submit or period.  Every frame has a deadline of one frame period after its input
was complete: frames finished later are counted late (`codecstream_frames_late_total`).
Queueing and compute times of every frame go to `streaming.latency.LatencyStats` (summaries
republished every second for `/metrics`) and to Prometheus histograms.

An exception in a job's hook fails that job only (its sink gets a `Fatal` with close 1011);
the worker and every other session go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from server.codes import CloseCode
from server.metrics import Metrics
from streaming.batch import BatchEngine
from streaming.latency import FrameLatency, LatencyStats
from streaming.model import CodecModel
from streaming.protocol import TokenFrame
from streaming.stream import Clock, DecoderStream, EncoderStream

__all__ = ["EngineWorker", "Fatal", "Job", "Out", "Sink"]

log = logging.getLogger("codecstream.engine")

_STATS_PERIOD_S: Final = 1.0
_IDLE_WAIT_S: Final = 0.5
"""Longest sleep while idle (keeps the heartbeat fresh for /readyz)."""


@dataclass(slots=True)
class Out:
    """One message for the client.

    * `data`: binary (bytes) or text (str) payload;
    * `frames`: input frames this message completes (flow control on the loop);
    * `stamp`: byte offset of a `server_send_us` field to fill just before sending (-1: none);
    * `close`: close the session normally (1000) after sending it.
    """

    data: bytes | str
    frames: int = 0
    stamp: int = -1
    close: bool = False


@dataclass(frozen=True, slots=True)
class Fatal:
    """The job failed: the session must close with `code` and `reason`."""

    code: CloseCode
    reason: str


Sink = Callable[[list[Any]], None]
"""Receives a job's outputs of one tick, on the event loop."""


class Job:
    """Engine-side half of a session.

    Constructed on the loop; after `EngineWorker.add` only the worker thread calls its hooks
    (the loop talks to it through `EngineWorker.submit`).  `sink` runs on the loop.
    Subclasses override the hooks they need; `outbox` collects outputs during a tick.
    """

    endpoint: str = "unknown"
    """Metrics label of the session kind."""
    periodic: bool = False
    """True: `on_period` is called once per frame period."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.outbox: list[Any] = []
        self.finished = False
        """Set by the job when it has nothing more to do; the worker then drops it."""
        self.late_frames = 0
        self.worker: EngineWorker | None = None

    # ---- hooks (worker thread) ------------------------------------------------------------

    def on_input(self, item: object, now: float) -> None:
        """An item submitted by the loop, which received it at `now` (s, perf_counter)."""

    def on_period(self, now: float) -> None:
        """Once per frame period (periodic jobs), before the steps."""

    def feed(self) -> None:
        """Move queued input into the streams, as much as the next step needs."""

    def encoders(self) -> Sequence[EncoderStream]:
        """Encoder streams that may have a frame due."""
        return ()

    def decoders(self) -> Sequence[DecoderStream]:
        """Decoder streams that may have a frame due."""
        return ()

    def on_encoded(self, stream: EncoderStream, frame: TokenFrame) -> None:
        """`stream` produced `frame` in this tick's encoder step."""

    def on_decoded(self, stream: DecoderStream) -> None:
        """`stream` consumed a frame in this tick's decoder step (its PCM can be pulled)."""

    def after_step(self, period: bool) -> None:
        """After both steps; `period`: this tick ran `on_period`."""

    def wants_tick(self) -> bool:
        """True when the job has queued work even though no stream has a frame due."""
        return False

    def on_remove(self) -> None:
        """The job leaves the worker (session closed)."""

    # ---- helpers --------------------------------------------------------------------------

    def emit(self, item: object) -> None:
        """Queue one output for the loop (delivered at the end of the tick)."""
        self.outbox.append(item)

    def check_late(self, ready: float, end: float) -> bool:
        """Count the frame late when it ended more than one period after `ready`."""
        worker = self.worker
        if worker is not None and end - ready > worker.deadline_s:
            self.late_frames += 1
            worker.count_late(self.endpoint)
            return True
        return False


class _Add:
    __slots__ = ("job",)

    def __init__(self, job: Job) -> None:
        self.job = job


class _Remove:
    __slots__ = ("job",)

    def __init__(self, job: Job) -> None:
        self.job = job


class EngineWorker:
    """The single engine thread (see the module docstring).

    * `model`: the loaded `CodecModel` (its `card.frame_ms` is the tick period and the frame
      deadline);
    * `metrics`: where frame counters and histograms go;
    * `capacity`: initial batch capacity (streams per ONNX call; grows on demand).
    """

    def __init__(
        self,
        model: CodecModel,
        metrics: Metrics,
        *,
        capacity: int = 64,
        batch_window_s: float = 0.0,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.model = model
        self.batch_window_s = batch_window_s
        self.metrics = metrics
        self.clock = clock
        self.engine = BatchEngine(model, capacity=capacity, clock=clock)
        self.period_s = model.card.frame_ms / 1000.0
        self.deadline_s = self.period_s
        self.encode_stats = LatencyStats()
        self.decode_stats = LatencyStats()
        self._summary: dict[str, dict[str, float]] = {}
        self._inbox: deque[tuple[Job | None, object, float]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: dict[Job, None] = {}  # every job (ordered sets)
        self._periodic: dict[Job, None] = {}
        self._active: dict[Job, None] = {}  # jobs with input or work pending
        self._last_tick = 0.0
        self._cpu = 0.0  # thread CPU time at the last publication (s)
        self._next_period = 0.0
        self._next_stats = 0.0
        self.heartbeat = 0.0
        """Worker clock at the last loop iteration (s)."""
        self.ticks = 0
        self.missed_periods = 0
        """Periods skipped because the worker was more than one period behind."""
        self._late = {
            name: metrics.frames_late.labels(name)
            for name in ("encode", "decode", "roundtrip", "room", "http_encode", "http_decode")
        }

    # ---- life cycle (loop side) -----------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the thread; outputs are delivered on `loop`."""
        if self._thread is not None:
            raise RuntimeError("EngineWorker already started")
        self._loop = loop
        self.heartbeat = self.clock()
        self._thread = threading.Thread(target=self._run, name="codecstream-engine", daemon=True)
        self._thread.start()
        self.metrics.engine_alive.set(1)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish its tick and exit; wait up to `timeout` s."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.metrics.engine_alive.set(0)

    @property
    def alive(self) -> bool:
        """The thread runs and has looped within the last 5 s."""
        thread = self._thread
        return (
            thread is not None
            and thread.is_alive()
            and not self._stop
            and self.clock() - self.heartbeat < 5.0
        )

    # ---- loop-side API --------------------------------------------------------------------

    def add(self, job: Job) -> None:
        """Hand `job` to the worker (thread-safe)."""
        job.worker = self
        self._post(None, _Add(job))

    def remove(self, job: Job) -> None:
        """Take `job` off the worker; inputs still queued for it are discarded."""
        self._post(None, _Remove(job))

    def submit(self, job: Job, item: object) -> None:
        """Queue `item` for `job.on_input` (thread-safe, never blocks), stamped now."""
        self._post(job, item)

    def _post(self, job: Job | None, item: object) -> None:
        self._inbox.append((job, item, self.clock()))
        self._wake.set()

    def latency_summary(self) -> dict[str, dict[str, float]]:
        """{"encode"|"decode": LatencyStats.summary()} as of the last publication (<= 1 s)."""
        return self._summary

    def count_late(self, endpoint: str) -> None:
        """Count one late frame (worker thread)."""
        counter = self._late.get(endpoint)
        if counter is None:
            counter = self._late[endpoint] = self.metrics.frames_late.labels(endpoint)
        counter.inc()

    # ---- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._gather()
                self._wake.clear()
                self.heartbeat = self.clock()
                self._drain()
                if self._stop:
                    break
                if self._tick():
                    continue
                self._wake.wait(self._idle_wait())
        except BaseException:  # pragma: no cover - a bug in the worker itself
            log.exception("engine worker crashed")
        finally:
            self.metrics.engine_alive.set(0)
            jobs = list(self._jobs)
            fatal = (
                Fatal(CloseCode.GOING_AWAY, "server shutting down")
                if self._stop
                else Fatal(CloseCode.INTERNAL_ERROR, "engine worker stopped unexpectedly")
            )
            for job in jobs:
                job.emit(fatal)
            self._deliver(jobs)

    def _gather(self) -> None:
        """Batching window: let input gather until `batch_window_s` after the last tick."""
        if self.batch_window_s <= 0 or self._stop:
            return
        wait = self._last_tick + self.batch_window_s - self.clock()
        if wait > 0:
            time.sleep(wait)

    def _idle_wait(self) -> float:
        now = self.clock()
        wait = _IDLE_WAIT_S
        if self._periodic:
            wait = min(wait, max(self._next_period - now, 0.0))
        return wait

    def _drain(self) -> None:
        inbox = self._inbox
        while inbox:
            job, item, now = inbox.popleft()
            if isinstance(item, _Add):
                self._jobs[item.job] = None
                if item.job.periodic:
                    self._periodic[item.job] = None
            elif isinstance(item, _Remove):
                self._drop(item.job)
            elif job is not None and job.worker is self and not job.finished:
                self._active[job] = None
                self._guard(job, job.on_input, item, now)

    def _drop(self, job: Job) -> None:
        self._periodic.pop(job, None)
        self._active.pop(job, None)
        if job in self._jobs:
            del self._jobs[job]
            self._guard(job, job.on_remove)
        job.worker = None

    def _guard(self, job: Job, hook: Callable[..., None], *args: Any) -> bool:
        """Run one hook; on an exception fail the job (1011) and keep going."""
        try:
            hook(*args)
            return True
        except Exception as exc:
            log.exception("engine job %s failed", job.endpoint)
            self._fail(job, f"engine error: {type(exc).__name__}: {exc}")
            return False

    def _fail(self, job: Job, reason: str) -> None:
        job.outbox.clear()
        job.emit(Fatal(CloseCode.INTERNAL_ERROR, reason))
        job.finished = True
        self._deliver([job])
        self._drop(job)

    def _tick(self) -> bool:
        """One tick over the active jobs; True when more work is due right away."""
        now = self.clock()
        period = bool(self._periodic) and now >= self._next_period
        if period:
            self._advance_period(now)
            for job in list(self._periodic):
                self._active[job] = None
                self._guard(job, job.on_period, now)
        active = list(self._active)
        if not active:
            return False
        self._last_tick = now
        for job in active:
            self._guard(job, job.feed)
        encoded = self._encode(active)
        decoded = self._decode(active)
        for job in active:
            self._guard(job, job.after_step, period)
        self._deliver(active)
        for job in active:
            if job.finished:
                self._drop(job)
        self._active = {j: None for j in active if j in self._jobs and j.wants_tick()}
        if now >= self._next_stats:
            self._publish_stats(now)
        if encoded or decoded or period:
            self.ticks += 1
            self.metrics.engine_ticks.inc()
        return bool(self._active)

    def _advance_period(self, now: float) -> None:
        if self._next_period == 0.0 or now - self._next_period > self.period_s:
            if self._next_period:
                self.missed_periods += int((now - self._next_period) / self.period_s)
            self._next_period = now + self.period_s
        else:
            self._next_period += self.period_s

    def _encode(self, jobs: Sequence[Job]) -> bool:
        due: list[tuple[Job, EncoderStream]] = [
            (job, s) for job in jobs if not job.finished for s in job.encoders() if s.pending_frames
        ]
        if not due:
            return False
        streams = [s for _, s in due]
        try:
            frames = self.engine.encode_step(streams)
        except Exception as exc:
            log.exception("encoder step failed")
            for job in {id(j): j for j, _ in due}.values():
                self._fail(job, f"encoder step failed: {type(exc).__name__}")
            return False
        self._observe("encode", streams, self.encode_stats)
        self._count(self.metrics.frames_encoded, [job.endpoint for job, _ in due])
        for (job, stream), frame in zip(due, frames, strict=True):
            if frame is not None and not job.finished:
                self._guard(job, job.on_encoded, stream, frame)
        return True

    def _decode(self, jobs: Sequence[Job]) -> bool:
        due: list[tuple[Job, DecoderStream]] = [
            (job, s) for job in jobs if not job.finished for s in job.decoders() if s.pending_frames
        ]
        if not due:
            return False
        streams = [s for _, s in due]
        before = [s.frames_decoded for s in streams]
        try:
            self.engine.decode_step(streams)
        except Exception as exc:
            log.exception("decoder step failed")
            for job in {id(j): j for j, _ in due}.values():
                self._fail(job, f"decoder step failed: {type(exc).__name__}")
            return False
        decoded = [s for s, b in zip(streams, before, strict=True) if s.frames_decoded > b]
        self._observe("decode", decoded, self.decode_stats)
        self._count(
            self.metrics.frames_decoded,
            [j.endpoint for (j, s), b in zip(due, before, strict=True) if s.frames_decoded > b],
        )
        for job, stream in due:
            if not job.finished:
                self._guard(job, job.on_decoded, stream)
        return True

    @staticmethod
    def _count(counter: Any, endpoints: list[str]) -> None:
        """Add one per listed endpoint to a labelled counter (one inc per label)."""
        totals: dict[str, int] = {}
        for name in endpoints:
            totals[name] = totals.get(name, 0) + 1
        for name, n in totals.items():
            counter.labels(name).inc(n)

    def _observe(
        self,
        direction: str,
        streams: Sequence[EncoderStream | DecoderStream],
        stats: LatencyStats,
    ) -> None:
        """Frame counters, batch size and per-frame queue/compute histograms."""
        if not streams:
            return
        m = self.metrics
        m.batch_size.labels(direction).observe(len(streams))
        queue = m.queue_seconds.labels(direction)
        compute = m.compute_seconds.labels(direction)
        for stream in streams:
            record: FrameLatency | None = stream.last_latency
            if record is None:
                continue
            stats.add(record)
            queue.observe(max(record.start - record.ready, 0.0))
            compute.observe(record.end - record.start)

    def _publish_stats(self, now: float) -> None:
        self._next_stats = now + _STATS_PERIOD_S
        cpu = time.thread_time()
        self.metrics.engine_cpu.inc(max(cpu - self._cpu, 0.0))
        self._cpu = cpu
        self._summary = {
            "encode": self.encode_stats.summary(),
            "decode": self.decode_stats.summary(),
        }

    def _deliver(self, jobs: Sequence[Job]) -> None:
        batch = [(job.sink, job.outbox) for job in jobs if job.outbox]
        if not batch:
            return
        for job in jobs:
            if job.outbox:
                job.outbox = []
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed meanwhile (shutdown)
            loop.call_soon_threadsafe(_dispatch, batch)


def _dispatch(batch: list[tuple[Sink, list[Any]]]) -> None:
    """Runs on the loop: hand each job's outputs to its sink."""
    for sink, items in batch:
        try:
            sink(items)
        except Exception:
            log.exception("session sink failed")
