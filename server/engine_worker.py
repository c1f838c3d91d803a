"""The engine worker: a thread that owns a `BatchEngine` and runs encode/decode steps.

Sessions (on the asyncio event loop) never touch a stream: each has a `Job`, its engine-side
half, handed to a worker with `EngineWorker.add`.  The loop sends a job input with
`EngineWorker.submit(job, item)` (thread-safe, never blocks: a deque and an Event); the worker
thread timestamps nothing itself: `submit` records the arrival time on the loop, so a frame's
queueing time includes the hop to this thread.  A server runs one or more workers, each
owning a share of the jobs (`server.engine_pool.EnginePool`).

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
6. every job's outputs go back to the loop (`Job.sink` receives its list there): one
   `loop.call_soon_threadsafe` per batch of ticks the loop has not picked up yet.

**Batching window** (`batch_window_s`).  Real-time clients send their frames at phases
spread over the frame period; running every frame as soon as it arrives gives batches of one
or two streams, and an ONNX call costs a fixed overhead plus a (much smaller) cost per stream.
So when fresh input arrives the worker waits, up to `batch_window_s` after the oldest waiting
input arrived, for the frames of other streams to join the same step, but never so long that
the step would end later than `deadline_s * TARGET_FRACTION` after that oldest input: the
worker keeps a running linear model of its tick time (fixed + per-stream, fitted on the last
ticks) and of the rate at which streams' frames arrive, and shortens the wait accordingly.
It does not wait when every job already has input, for periodic work, when frames are left
over from the previous tick (a backlog: the next tick starts at once), or when the worker is
near saturation (the model predicts that a window's worth of arrivals keeps it busy for 70 %
of the window: ticks then run back to back and batches grow by themselves).  One frame per
stream per tick: a session that sends faster than real time gets no more than its share.

Every frame has a deadline of one frame period after its input was complete: frames
finished later are counted late (`codecstream_frames_late_total`).  Queueing and compute
times of every frame go to `streaming.latency.LatencyStats` (summaries republished every
second for `/metrics`) and to Prometheus histograms.

An exception in a job's hook fails that job only (its sink gets a `Fatal` with close 1011);
the worker and every other session go on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from server.codes import CloseCode
from server.metrics import Metrics
from streaming.batch import BatchEngine
from streaming.latency import FrameLatency, LatencyStats
from streaming.model import CodecModel
from streaming.protocol import TokenFrame
from streaming.stream import Clock, DecoderStream, EncoderStream

__all__ = [
    "TARGET_FRACTION",
    "Delivery",
    "EngineWorker",
    "Fatal",
    "Job",
    "JobHost",
    "Out",
    "Sink",
]

log = logging.getLogger("codecstream.engine")

_STATS_PERIOD_S: Final = 1.0
_IDLE_WAIT_S: Final = 0.5
"""Longest sleep while idle (keeps the heartbeat fresh for /readyz)."""
TARGET_FRACTION: Final = 0.5
"""The batching window never delays a step beyond this fraction of the frame deadline after
its oldest input arrived (the rest is left to the network and the event loop)."""
SLOW_FRACTION: Final = 0.75
"""A frame is slow when the engine took more than this fraction of the frame deadline from its
input to its output: half is the batching target (`TARGET_FRACTION`), which the batching
window fills on purpose, so only a frame well past it shows that the engine is short of
time (`server.capacity`)."""
_MIN_WAIT_S: Final = 0.0005
"""Shorter waits are not worth a sleep (and the GIL hand-off after it)."""
_BUSY_FRACTION: Final = 0.7
"""No window when a window's worth of arrivals would keep the worker this busy: near
saturation ticks run back to back and batches grow by themselves."""
_COST_DECAY: Final = 0.95
"""Forgetting factor of the tick-time model (per tick: ~20 ticks of memory)."""
_RATE_ALPHA: Final = 0.1
"""Smoothing of the measured arrival rate (per tick)."""


@dataclass(slots=True)
class Out:
    """One message for the client.

    * `data`: binary (bytes) or text (str) payload;
    * `frames`: input frames this message completes (flow control on the loop);
    * `stamp`: byte offset of a `server_send_us` field to fill just before sending (-1: none);
    * `close`: close the session normally (1000) after sending it;
    * `reply`: it answers a client request (`set_bitrate`, `flush`): the session counts the
      replies it owes (flow control of control messages, `server.session`).
    """

    data: bytes | str
    frames: int = 0
    stamp: int = -1
    close: bool = False
    reply: bool = False


@dataclass(frozen=True, slots=True)
class Fatal:
    """The job failed: the session must close with `code` and `reason`."""

    code: CloseCode
    reason: str


Sink = Callable[[list[Any]], None]
"""Receives a job's outputs of one tick, on the event loop."""


class JobHost(Protocol):
    """What runs jobs, as the pool sees it: an `EngineWorker` thread or an engine process
    (`server.engine_process.ProcessWorker`)."""

    def add(self, job: Job) -> None: ...
    def remove(self, job: Job) -> None: ...
    def submit(self, job: Job, item: object) -> None: ...


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
        self._last_end = -math.inf  # when the job's previous frame was done (worker clock)
        self.worker: EngineWorker | None = None
        """The worker running the job (None once it left)."""
        self.home: JobHost | None = None
        """The worker the job was added to (routes `submit`; stays set after removal)."""

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
        """Count the frame late when it ended more than one period after `ready`, and slow
        when it took the engine more than `slow_s` from when it could start: its `ready`,
        or the end of the job's previous frame if later (input sent faster than real time
        waits for its turn by design, one frame per tick)."""
        worker = self.worker
        if worker is None:
            return False
        worker.frames_checked += 1
        if end - max(ready, self._last_end) > worker.slow_s:
            worker.frames_slow += 1
        self._last_end = end
        if end - ready > worker.deadline_s:
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


class Delivery:
    """Hands job outputs from worker threads to the event loop.

    `put` (any thread) queues `(sink, items)` pairs and schedules ONE
    `loop.call_soon_threadsafe` unless a flush is already pending, so a loop that is busy
    picks up the ticks of every worker of a pool in one callback (fewer self-pipe writes,
    fewer GIL hand-offs).  Order is kept per producer.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[tuple[Sink, list[Any]]] = deque()
        self._scheduled = False

    def put(self, batch: list[tuple[Sink, list[Any]]]) -> None:
        """Queue outputs for the loop (thread-safe, never blocks)."""
        self._queue.extend(batch)
        if self._scheduled:  # read after the extend: a flush still to run will see them
            return
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        self._scheduled = True
        try:
            loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # loop closed meanwhile (shutdown)
            self._scheduled = False

    def _flush(self) -> None:
        """On the loop: hand every queued output to its sink (those queued so far)."""
        self._scheduled = False  # before draining: a later put schedules a new flush
        queue = self._queue
        for _ in range(len(queue)):
            sink, items = queue.popleft()
            try:
                sink(items)
            except Exception:
                log.exception("session sink failed")


class EngineWorker:
    """One engine thread (see the module docstring).

    * `model`: the loaded `CodecModel` (its `card.frame_ms` is the tick period and the frame
      deadline);
    * `metrics`: where frame counters and histograms go;
    * `capacity`: initial batch capacity (streams per ONNX call; grows on demand);
    * `batch_window_s`: longest wait for other streams' frames before a step, s (0: none);
    * `delivery`: how outputs reach the loop (shared by the workers of a pool; default own);
    * `name`: thread name.
    """

    def __init__(
        self,
        model: CodecModel,
        metrics: Metrics,
        *,
        capacity: int = 64,
        batch_window_s: float = 0.0,
        clock: Clock = time.perf_counter,
        delivery: Delivery | None = None,
        name: str = "codecstream-engine",
    ) -> None:
        if batch_window_s < 0:
            raise ValueError("batch_window_s must be >= 0")
        self.model = model
        self.batch_window_s = batch_window_s
        self.metrics = metrics
        self.clock = clock
        self.name = name
        self.delivery = delivery if delivery is not None else Delivery()
        self.engine = BatchEngine(model, capacity=capacity, clock=clock)
        self.period_s = model.card.frame_ms / 1000.0
        self.deadline_s = self.period_s
        self.target_s = self.deadline_s * TARGET_FRACTION
        """A batching window never makes a step end later than this after its oldest input."""
        self.slow_s = self.deadline_s * SLOW_FRACTION
        """A frame that took the engine longer than this is slow (`frames_slow`)."""
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
        self._stream_jobs = 0  # jobs that are not periodic
        self._first = math.inf  # arrival of the oldest input not yet stepped (s)
        self._backlog = False  # the last tick left frames due: the next one starts at once
        self._last_tick = 0.0
        # tick time model: seconds = cost_fixed + cost_stream * streams, fitted by
        # exponentially weighted least squares on (streams, seconds) of past ticks
        self.cost_fixed = 1e-3
        self.cost_stream = 3e-4
        self._fit = [0.0, 0.0, 0.0, 0.0, 0.0]  # weighted n, sum b, sum b^2, sum t, sum b*t
        self.arrival_rate = 0.0
        """Streams' frames arriving per second (smoothed), for the batching window."""
        self.windows = 0
        """Ticks that waited for a batching window."""
        self.frames_checked = 0
        """Frames whose deadline was checked since start (`Job.check_late`)."""
        self.frames_slow = 0
        """Of those, frames that took the engine longer than `slow_s` (3/4 of the period)
        from input to output (admission at capacity: `server.capacity`)."""
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

    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Start the thread; outputs are delivered on `loop` (None: the delivery needs no
        loop, as in an engine process: `server.engine_process`)."""
        if self._thread is not None:
            raise RuntimeError("EngineWorker already started")
        self._loop = loop
        if self.delivery.loop is None:
            self.delivery.loop = loop
        self.heartbeat = self.clock()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self.metrics.engine_alive.set(1)

    def request_stop(self) -> None:
        """Ask the thread to finish its tick and exit (returns at once)."""
        self._stop = True
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish its tick and exit; wait up to `timeout` s."""
        self.request_stop()
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
        job.home = self
        self._post(None, _Add(job))

    def remove(self, job: Job) -> None:
        """Take `job` off the worker; inputs still queued for it are discarded."""
        self._post(None, _Remove(job))

    def submit(self, job: Job, item: object) -> None:
        """Queue `item` for `job.on_input` (thread-safe, never blocks), stamped now."""
        self._post(job, item)

    def submit_at(self, job: Job, item: object, now: float) -> None:
        """`submit` with the arrival time given: `now` (s, this worker's clock, which must be
        `time.perf_counter`'s system-wide monotonic clock when another process stamped it)."""
        self._inbox.append((job, item, now))
        self._wake.set()

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
            waited = False
            while True:
                self._wake.clear()
                self.heartbeat = self.clock()
                self._drain()
                if self._stop:
                    break
                if not waited and not self._backlog:
                    wait = self._window_wait()
                    if wait > 0:  # let other streams' frames join this step
                        waited = True
                        self.windows += 1
                        time.sleep(wait)
                        continue
                waited = False
                self._backlog = self._tick()
                if not self._backlog:
                    self._wait_input(self._idle_wait())
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

    def _wait_input(self, timeout: float) -> None:
        """Sleep until new input (`_wake`) or `timeout` s (an engine process waits on its
        pipe instead)."""
        self._wake.wait(timeout)

    def run_here(self) -> None:
        """Run the worker loop in the calling thread until stopped (engine processes; a
        server's workers run in their own thread: `start`)."""
        self.heartbeat = self.clock()
        self.metrics.engine_alive.set(1)
        self._run()

    def _window_wait(self) -> float:
        """Seconds to wait for more streams before the next step (0: step now).

        With `due` jobs having input, the oldest of it `elapsed` s old, and streams arriving
        at `arrival_rate` per s, waiting `w` gives a step of about `due + rate * w` streams
        taking `cost_fixed + cost_stream * streams`; `w` is the largest wait with
        `elapsed + w + step <= target_s`, at most `batch_window_s - elapsed`.
        """
        window = self.batch_window_s
        if window <= 0 or not self._active or self._stop:
            return 0.0
        due = len(self._active)
        if due >= self._stream_jobs:  # everybody is in already
            return 0.0
        now = self.clock()
        if self._periodic and now >= self._next_period:
            return 0.0
        rate = self.arrival_rate
        if self.cost_fixed + self.cost_stream * rate * window >= _BUSY_FRACTION * window:
            return 0.0  # near saturation: waiting would only lose time
        elapsed = now - self._first
        slack = self.target_s - elapsed - self.cost_fixed - self.cost_stream * due
        wait = min(window - elapsed, slack / (1.0 + self.cost_stream * rate))
        return wait if wait >= _MIN_WAIT_S else 0.0

    def _learn(self, streams: int, seconds: float, since_last: float) -> None:
        """Update the tick time model with one tick of `streams` streams that took `seconds`,
        and the arrival rate (`since_last`: s since the previous tick started)."""
        fit = self._fit
        b, t = float(streams), seconds
        for i, x in enumerate((1.0, b, b * b, t, b * t)):
            fit[i] = fit[i] * _COST_DECAY + x
        n, sb, sbb, st, sbt = fit
        mean_b, mean_t = sb / n, st / n
        var_b = sbb / n - mean_b * mean_b
        if var_b > 0.25:  # batch sizes varied enough to separate the two terms
            self.cost_stream = min(max((sbt / n - mean_b * mean_t) / var_b, 0.0), 0.05)
        self.cost_fixed = max(mean_t - self.cost_stream * mean_b, 0.0)
        if since_last > 0:
            rate = streams / since_last
            self.arrival_rate += _RATE_ALPHA * (rate - self.arrival_rate)

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
                if item.job not in self._jobs:
                    self._jobs[item.job] = None
                    if item.job.periodic:
                        self._periodic[item.job] = None
                    else:
                        self._stream_jobs += 1
            elif isinstance(item, _Remove):
                self._drop(item.job)
            elif job is not None and job.worker is self and not job.finished:
                self._active[job] = None
                if now < self._first:
                    self._first = now
                self._guard(job, job.on_input, item, now)

    def _drop(self, job: Job) -> None:
        self._periodic.pop(job, None)
        self._active.pop(job, None)
        if job in self._jobs:
            del self._jobs[job]
            if not job.periodic:
                self._stream_jobs -= 1
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
        self._first = math.inf
        if not active:
            return False
        since_last = now - self._last_tick if self._last_tick else 0.0
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
        if self._active:  # frames still due: their input is older than anything new
            self._first = now
        end = self.clock()
        if encoded or decoded:
            self._learn(max(encoded, decoded), end - now, since_last)
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

    def _encode(self, jobs: Sequence[Job]) -> int:
        """One encoder step over the due streams of `jobs`; the number of streams."""
        due: list[tuple[Job, EncoderStream]] = [
            (job, s) for job in jobs if not job.finished for s in job.encoders() if s.pending_frames
        ]
        if not due:
            return 0
        streams = [s for _, s in due]
        try:
            frames = self.engine.encode_step(streams)
        except Exception as exc:
            log.exception("encoder step failed")
            for job in {id(j): j for j, _ in due}.values():
                self._fail(job, f"encoder step failed: {type(exc).__name__}")
            return 0
        self._observe("encode", streams, self.encode_stats)
        self._count(self.metrics.frames_encoded, [job.endpoint for job, _ in due])
        for (job, stream), frame in zip(due, frames, strict=True):
            if frame is not None and not job.finished:
                self._guard(job, job.on_encoded, stream, frame)
        return len(due)

    def _decode(self, jobs: Sequence[Job]) -> int:
        """One decoder step over the due streams of `jobs`; the number of streams."""
        due: list[tuple[Job, DecoderStream]] = [
            (job, s) for job in jobs if not job.finished for s in job.decoders() if s.pending_frames
        ]
        if not due:
            return 0
        streams = [s for _, s in due]
        before = [s.frames_decoded for s in streams]
        try:
            self.engine.decode_step(streams)
        except Exception as exc:
            log.exception("decoder step failed")
            for job in {id(j): j for j, _ in due}.values():
                self._fail(job, f"decoder step failed: {type(exc).__name__}")
            return 0
        decoded = [s for s, b in zip(streams, before, strict=True) if s.frames_decoded > b]
        self._observe("decode", decoded, self.decode_stats)
        self._count(
            self.metrics.frames_decoded,
            [j.endpoint for (j, s), b in zip(due, before, strict=True) if s.frames_decoded > b],
        )
        for job, stream in due:
            if not job.finished:
                self._guard(job, job.on_decoded, stream)
        return len(due)

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
        """Batch size and per-frame queue/compute times of one step (one update each)."""
        if not streams:
            return
        m = self.metrics
        m.batch_size.observe_repeat(direction, float(len(streams)))
        queue: list[float] = []
        compute = 0.0
        for stream in streams:
            record: FrameLatency | None = stream.last_latency
            if record is None:
                continue
            stats.add(record)
            queue.append(max(record.start - record.ready, 0.0))
            compute = record.end - record.start  # the same for every frame of the step
        m.queue_seconds.observe(direction, queue)
        m.compute_seconds.observe_repeat(direction, compute, len(queue))

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
        batch: list[tuple[Sink, list[Any]]] = []
        for job in jobs:
            if job.outbox:
                batch.append((job.sink, job.outbox))
                job.outbox = []
        if batch:
            self.delivery.put(batch)
