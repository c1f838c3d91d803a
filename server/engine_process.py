"""Engine processes: the stream sessions' engine work on other cores.

The server process runs the event loop (WebSockets, HTTP) and by default the engine in
threads (`server.engine_worker`).  onnxruntime releases the GIL, but the Python around it
(framing, states, packets) does not: at ~35 round-trip sessions the engine thread is busy
nearly all the time (about 60 % inside onnxruntime, the rest glue taking turns with the
event loop), so one server process is one core.  With `engine_processes` = N > 0 the
WebSocket stream sessions (encode, decode, roundtrip) run in N child processes instead, each
an `EngineWorker` with its own copy of the model (~10 MB) and `BatchEngine`: the engine uses
as many cores as there are processes and the event loop keeps its own.  Rooms (a mixer and
its PCM senders share state) and HTTP file jobs stay on the in-process workers.

On the loop side a session gets a `RemoteJob` (the `StreamJobSpec` the child builds its
`StreamJob` from, and the session's sink) and talks to it through `ProcessWorker`, which has
the interface of `EngineWorker` the pool uses (`add`, `remove`, `submit`, `start`, `stop`,
`alive`).  Two one-way pipes (`multiprocessing` pipes, pickled tuples) carry:

* parent -> child: ``("ops", [op, ...])`` with op ``("add", id, spec)``,
  ``("in", id, item, t)`` or ``("remove", id)``, in the order the loop issued them (one
  message per loop iteration at most: `submit` queues, a `call_soon` flushes); ``("stop",)``;
* child -> parent: ``("ready", pid)``; ``("out", [(id, [output, ...]), ...])`` once per tick
  (the outputs of `StreamJob`: `Out`, `Fatal`); ``("stats", {...})`` every 0.5 s: the
  child's cumulative frame counters, histograms, `LatencyStats` and slow-frame counts, which
  the parent adds to its own metrics as increments (so `/metrics` is one view of all
  processes), and a heartbeat for `alive`.

Both directions carry length-prefixed pickles (`write_message` / `encode_message`: a u32
big-endian byte count, then the pickle), reassembled by `MessageReader` from reads of any
size.  The event loop never blocks on a pipe: it reads the child's messages when its end is
readable (an event loop may make the descriptors it watches non-blocking, as uvloop does, and
a large `out` message arrives in several reads), and its writes to the child go through a
`PipeWriter`, which writes what the pipe takes and keeps the rest until the pipe is writable
again.  A blocking write there could freeze the whole server: when the loop stalls, the
child's unread outputs fill its pipe, the child blocks in its own (blocking) write and stops
reading, and the loop's next large write would then wait for it forever.  The bytes kept are
bounded by the sessions' flow control (each session stops reading its socket when
`max_backlog_ms` of its input is unanswered).  The child, which has nothing else to do,
writes with blocking writes and reads its input without blocking at the start of every tick.

Arrival times cross the pipe as `time.perf_counter()` stamps taken on the loop: on Linux that
clock is CLOCK_MONOTONIC, the same in every process, so queueing times include the hop.  A
child that dies (crash, kill) fails its sessions with close code 1011 and is started again
(`RESPAWN_DELAY_S` later, at most `MAX_RESPAWNS` times per `RESPAWN_WINDOW_S`; not a child
that dies before it is ready); sessions that arrive meanwhile wait in the writer for the
new child.  A session never touches another's state in either process.  Children ignore
SIGINT (the parent stops them) and exit when the parent's pipe closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import select
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from server.codes import CloseCode
from server.engine_worker import Delivery, EngineWorker, Fatal, Job, Out, Sink
from server.jobs import StreamJobSpec
from server.metrics import Metrics
from streaming.latency import LatencyStats
from streaming.model import CodecModel

__all__ = [
    "MessageReader",
    "PipeWriter",
    "ProcessWorker",
    "RemoteJob",
    "encode_message",
    "read_messages",
    "write_message",
]

log = logging.getLogger("codecstream.engine")

_STATS_PERIOD_S: Final = 0.5
"""How often a child reports its metrics (and so proves it is alive)."""
_ALIVE_S: Final = 5.0
"""A child silent for longer is not alive (readiness fails)."""
_COUNTERS: Final = ("frames_encoded", "frames_decoded", "frames_late", "engine_ticks",
                    "engine_cpu")
_HISTOGRAMS: Final = ("batch_size", "queue_seconds", "compute_seconds")

Connection = multiprocessing.connection.Connection


_PIPE_BYTES: Final = 1 << 20
"""Pipe capacity asked for (Linux F_SETPIPE_SZ; the default is 64 KiB, ~20 ms of input at
100 sessions): a child that stalls for a moment must not block the event loop's sends, nor
a busy loop the child's."""
_F_SETPIPE_SZ: Final = 1031


_LENGTH: Final = struct.Struct("!I")
"""Prefix of a child -> parent message: the pickle's size in bytes, u32 big-endian."""
MAX_MESSAGE_BYTES: Final = 64 << 20
"""A longer length prefix means the stream is corrupt (a tick's outputs are ~100 KB)."""
_READ_BYTES: Final = 1 << 16


RESPAWN_DELAY_S: Final = 1.0
"""Seconds between a child's unexpected exit and the start of its replacement."""
MAX_RESPAWNS: Final = 3
RESPAWN_WINDOW_S: Final = 60.0
"""At most `MAX_RESPAWNS` replacements per `RESPAWN_WINDOW_S` seconds: a child that keeps
dying stays dead (the pool then sends new sessions elsewhere, or fails them)."""


def encode_message(message: object) -> bytes:
    """`message` as one pipe record: its pickle's size (u32 big-endian), then the pickle."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


def write_message(fd: int, message: object) -> None:
    """Write `message` to the blocking descriptor `fd` as one record (`encode_message`; all
    of it: a short write is continued)."""
    view = memoryview(encode_message(message))
    while view:
        view = view[os.write(fd, view) :]


class PipeWriter:
    """Writes records to a non-blocking pipe without ever blocking the event loop.

    `write` appends a record to the bytes pending and writes what the pipe takes now; what
    it does not take is written from `loop.add_writer` when the pipe drains.
    `flush_blocking` is for shutdown, off the loop: it writes what is pending within a
    deadline.
    """

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._loop = loop
        self._pending = bytearray()
        self._watching = False
        self.closed = False
        """True after a write failed (the reader is gone) or `close`."""

    @property
    def pending_bytes(self) -> int:
        """Bytes accepted by `write` and not yet in the pipe."""
        return len(self._pending)

    def write(self, message: object) -> None:
        """Queue `message` and write as much as the pipe takes (loop thread only)."""
        if self.closed:
            return
        self._pending += encode_message(message)
        self._write_some()

    def _write_now(self) -> None:
        """Write what the pipe takes now; a gone reader closes the writer (the child's exit
        is reported by its own pipe)."""
        try:
            while self._pending:
                del self._pending[: os.write(self._fd, self._pending)]
        except BlockingIOError:
            pass
        except OSError:
            self.close()

    def _write_some(self) -> None:
        self._write_now()
        if not self.closed:
            self._watch(bool(self._pending))

    def _watch(self, on: bool) -> None:
        if on == self._watching:
            return
        self._watching = on
        if on:
            self._loop.add_writer(self._fd, self._write_some)
        else:
            self._loop.remove_writer(self._fd)

    def flush_blocking(self, timeout: float) -> bool:
        """Write what is pending, waiting for the pipe up to `timeout` s (any thread, when
        the loop no longer runs or does not watch the pipe); True if all of it went."""
        deadline = time.monotonic() + timeout
        while self._pending and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _, writable, _ = select.select([], [self._fd], [], left)
            if writable:
                self._write_now()
        return not self._pending and not self.closed

    def close(self) -> None:
        """Stop writing (pending bytes are dropped; the descriptor stays open)."""
        self.closed = True
        self._pending.clear()
        with contextlib.suppress(Exception):  # the loop may be closed already
            self._watch(False)


class MessageReader:
    """Reassembles `write_message` messages from reads of any size (sans I/O: `feed` the
    bytes read, get the messages they complete)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """Append `data`; return the messages now complete, in order (ValueError on a
        length prefix over `MAX_MESSAGE_BYTES`)."""
        buffer = self._buffer
        buffer += data
        messages: list[Any] = []
        start = 0
        while len(buffer) - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, start)
            if size > MAX_MESSAGE_BYTES:
                raise ValueError(f"engine message of {size} bytes: the pipe is corrupt")
            end = start + _LENGTH.size + size
            if len(buffer) < end:
                break
            messages.append(pickle.loads(buffer[start + _LENGTH.size : end]))
            start = end
        del buffer[:start]
        return messages

    @property
    def pending_bytes(self) -> int:
        """Bytes of a message not complete yet."""
        return len(self._buffer)


def read_messages(fd: int, reader: MessageReader) -> tuple[list[Any], bool]:
    """The messages that what `fd` holds now completes (non-blocking reads fed to
    `reader`), and whether the pipe ended (end of file or a read error).  ValueError from
    `MessageReader.feed` on a corrupt stream."""
    messages: list[Any] = []
    while True:
        try:
            data = os.read(fd, _READ_BYTES)
        except BlockingIOError:
            return messages, False
        except OSError:
            return messages, True
        if not data:
            return messages, True
        messages += reader.feed(data)
        if len(data) < _READ_BYTES:  # drained (what arrives later wakes the reader again)
            return messages, False


def _widen(connection: Connection) -> None:
    """Ask for a `_PIPE_BYTES` pipe (best effort: other systems keep their default)."""
    with contextlib.suppress(OSError, AttributeError):
        import fcntl

        fcntl.fcntl(connection.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)


class RemoteJob(Job):
    """Loop-side stand-in of a `StreamJob` stepped in an engine process (`spec` builds it
    there).  Its hooks never run here; `sink` receives the child's outputs on the loop."""

    def __init__(self, spec: StreamJobSpec, sink: Sink) -> None:
        super().__init__(sink)
        self.spec = spec
        self.endpoint = spec.endpoint
        self.job_id = -1
        """Id of the job on its process (set by `ProcessWorker.add`)."""


class ProcessWorker:
    """One engine process and the loop side of its pipes (see the module docstring).

    * `model_dir`: the model the child loads (None: the bundled one);
    * `metrics`: the server's metrics, which the child's are added to;
    * `threads`: onnxruntime intra-op threads in the child; `capacity`, `batch_window_s`:
      as for `EngineWorker`; `switch_interval_ms`: the child's `sys.setswitchinterval`.
    """

    def __init__(
        self,
        model_dir: Path | None,
        metrics: Metrics,
        *,
        threads: int = 1,
        capacity: int = 64,
        batch_window_s: float = 0.0,
        switch_interval_ms: float = 1.0,
        name: str = "codecstream-engine-process",
    ) -> None:
        self.model_dir = model_dir
        self.metrics = metrics
        self.name = name
        self._config = (threads, capacity, batch_window_s, switch_interval_ms)
        self.encode_stats = LatencyStats()
        self.decode_stats = LatencyStats()
        self.heartbeat = -math.inf
        self.frames_checked = 0
        self.frames_slow = 0
        """The child's `EngineWorker.frames_checked` / `frames_slow` at its last
        report."""
        self.pid: int | None = None
        self._jobs: dict[int, RemoteJob] = {}
        self._next_id = 0
        self._ops: list[tuple[Any, ...]] = []
        self._flush_scheduled = False
        self._seen_counters: dict[tuple[str, str], float] = {}
        self._seen_histograms: dict[tuple[str, str], tuple[list[int], float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None
        self._writer: PipeWriter | None = None
        self._reader = MessageReader()
        self._ready = asyncio.Event()
        self._stopping = False
        self.exited = False
        """True once the child is gone (stopped or died), until a replacement starts."""
        self.respawning = False
        """The child died and a replacement is due (`RESPAWN_DELAY_S`)."""
        self.respawns: list[float] = []
        """`time.monotonic()` of each replacement started."""

    # ---- life cycle (loop side) -----------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Spawn the child; its messages are read on `loop` (`ready` waits for it)."""
        if self._process is not None:
            raise RuntimeError("ProcessWorker already started")
        context = multiprocessing.get_context("spawn")  # the parent has threads: no fork
        from_child, child_out = context.Pipe(duplex=False)
        child_in, to_child = context.Pipe(duplex=False)
        process = context.Process(
            target=child_main,
            args=(self.model_dir, *self._config, child_in, child_out, self.name),
            name=self.name,
            daemon=True,
        )
        _widen(to_child)
        _widen(from_child)
        process.start()
        child_in.close()
        child_out.close()
        self._process, self._to_child, self._from_child = process, to_child, from_child
        self._loop = loop
        self._writer = PipeWriter(to_child.fileno(), loop)
        os.set_blocking(from_child.fileno(), False)
        loop.add_reader(from_child.fileno(), self._on_readable)
        self._flush()  # what sessions queued while a replacement was due

    async def ready(self, timeout: float) -> None:
        """Wait until the child has loaded the model (RuntimeError after `timeout` s or if
        it exits first)."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s") from None
        if self.exited:
            raise RuntimeError(f"{self.name} exited while loading the model")

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def request_stop(self) -> None:
        """Ask the child to finish its tick, fail its sessions with 1001 and exit (any
        thread: from another one while the loop runs, the loop sends the request)."""
        loop = self._loop
        if loop is not None and loop.is_running() and not self._on_loop_thread():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self.request_stop)
                return
        if self._stopping:
            return
        self._stopping = True
        self.respawning = False
        if self._writer is not None:
            self._flush()
            self._writer.write(("stop",))

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the child; wait up to `timeout` s, then kill it (any thread)."""
        self.request_stop()
        process = self._process
        if process is None:
            return
        loop = self._loop
        writer = self._writer
        if writer is not None and (self._on_loop_thread() or loop is None
                                   or not loop.is_running()):
            writer.flush_blocking(timeout)  # nobody else will write the request
        process.join(timeout)
        if process.is_alive():
            log.warning("%s did not stop in %.1f s: killing it", self.name, timeout)
            process.kill()
            process.join(1.0)
        self.exited = True

    @property
    def alive(self) -> bool:
        """The child runs, is ready and reported within the last 5 s."""
        process = self._process
        return (
            process is not None
            and not self.exited
            and not self._stopping
            and self._ready.is_set()
            and process.is_alive()
            and time.monotonic() - self.heartbeat < _ALIVE_S
        )

    # ---- jobs (loop side) -----------------------------------------------------------------

    def add(self, job: Job) -> None:
        """Build `job` (a `RemoteJob`) in the child; if the child is gone for good (no
        replacement due), the job fails at once with 1011."""
        if not isinstance(job, RemoteJob):
            raise TypeError("an engine process runs RemoteJobs only")
        job.job_id = self._next_id
        self._next_id += 1
        job.home = self
        if self.exited and not self.respawning:
            fatal = Fatal(CloseCode.INTERNAL_ERROR, "no engine process is running")
            if self._loop is not None:
                self._loop.call_soon(job.sink, [fatal])
            return
        self._jobs[job.job_id] = job
        self._queue(("add", job.job_id, job.spec))

    def remove(self, job: Job) -> None:
        """Drop the job in the child; its outputs still in flight are discarded."""
        if isinstance(job, RemoteJob) and self._jobs.pop(job.job_id, None) is not None:
            self._queue(("remove", job.job_id))

    def submit(self, job: Job, item: object) -> None:
        """Queue `item` for the job, stamped now (sent at the end of this loop iteration)."""
        if isinstance(job, RemoteJob) and job.job_id in self._jobs:
            self._queue(("in", job.job_id, item, time.perf_counter()))

    @property
    def jobs(self) -> int:
        """Jobs on this process now."""
        return len(self._jobs)

    def _queue(self, op: tuple[Any, ...]) -> None:
        self._ops.append(op)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send the ops queued in this loop iteration (kept while a replacement is due;
        dropped if the child is gone for good: its sessions have failed)."""
        self._flush_scheduled = False
        if not self._ops or self.respawning:
            return
        ops, self._ops = self._ops, []
        if self._writer is not None and not self.exited:
            self._writer.write(("ops", ops))

    # ---- messages from the child (loop) ---------------------------------------------------

    def _on_readable(self) -> None:
        """Read what the child wrote (without blocking) and handle each complete message."""
        connection = self._from_child
        if connection is None or self.exited:
            return
        try:
            messages, ended = read_messages(connection.fileno(), self._reader)
        except ValueError:
            log.exception("%s: unreadable message", self.name)
            messages, ended = [], True
        for message in messages:
            self._handle(message)
        if ended:  # end of file: the child is gone
            self._exited()

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "out":
            for job_id, items in message[1]:
                job = self._jobs.get(job_id)
                if job is None:
                    continue  # removed meanwhile
                try:
                    job.sink(items)
                except Exception:
                    log.exception("session sink failed")
        elif kind == "stats":
            self._apply_stats(message[1])
        elif kind == "ready":
            self.pid = message[1]
            self.heartbeat = time.monotonic()
            self._ready.set()

    def _exited(self) -> None:
        """The child's pipe closed: it stopped or died; fail whatever sessions it had, and
        start a replacement if it died after it was ready (`_respawn`)."""
        if self._loop is not None and self._from_child is not None:
            self._loop.remove_reader(self._from_child.fileno())
        if self._writer is not None:
            self._writer.close()
        was_ready = self._ready.is_set()
        self.exited = True
        self._ops.clear()  # for the sessions failed below
        self._ready.set()  # wake `ready` waiters (they check `exited`)
        if was_ready and not self._stopping and self._loop is not None:
            self._schedule_respawn(self._loop)
        jobs, self._jobs = list(self._jobs.values()), {}
        if jobs and not self._stopping:
            log.error("%s exited unexpectedly (%s): failing its %d sessions", self.name,
                      self._exit_status(), len(jobs))
        fatal = (
            Fatal(CloseCode.GOING_AWAY, "server shutting down")
            if self._stopping
            else Fatal(CloseCode.INTERNAL_ERROR, "engine process exited unexpectedly")
        )
        for job in jobs:
            with contextlib.suppress(Exception):
                job.sink([fatal])

    def _schedule_respawn(self, loop: asyncio.AbstractEventLoop) -> None:
        now = time.monotonic()
        self.respawns = [t for t in self.respawns if now - t < RESPAWN_WINDOW_S]
        if len(self.respawns) >= MAX_RESPAWNS:
            log.error("%s died %d times within %.0f s: not starting it again", self.name,
                      len(self.respawns) + 1, RESPAWN_WINDOW_S)
            return
        self.respawning = True
        loop.call_later(RESPAWN_DELAY_S, self._respawn)

    def _respawn(self) -> None:
        """Start a replacement child with fresh pipes and metrics baselines."""
        if self._stopping or not self.respawning or self._loop is None:
            return
        for connection in (self._to_child, self._from_child):
            if connection is not None:
                with contextlib.suppress(OSError):
                    connection.close()
        self._process = self._to_child = self._from_child = self._writer = None
        self._reader = MessageReader()
        self._seen_counters.clear()  # the new child counts from zero
        self._seen_histograms.clear()
        self.pid, self.heartbeat = None, -math.inf
        self._ready.clear()
        self.exited = self.respawning = False
        self.respawns.append(time.monotonic())
        log.warning("%s: starting a replacement", self.name)
        self.start(self._loop)

    def _exit_status(self) -> str:
        """How the child ended, for the log: its exit code or the signal that killed it."""
        process = self._process
        if process is None:
            return "never started"
        process.join(0.5)
        code = process.exitcode
        if code is None:
            return "still running, its pipe closed"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exit code {code}"

    def _apply_stats(self, stats: dict[str, Any]) -> None:
        """Add the increments of the child's cumulative metrics to ours."""
        self.heartbeat = time.monotonic()
        metrics = self.metrics
        for name, series in stats["counters"].items():
            for label, value in series.items():
                key = (name, label)
                delta = value - self._seen_counters.get(key, 0.0)
                self._seen_counters[key] = value
                if delta > 0:
                    counter = getattr(metrics, name)
                    (counter.labels(label) if label else counter).inc(delta)
        for name, series in stats["histograms"].items():
            histogram = getattr(metrics, name)
            for label, (counts, total) in series.items():
                key = (name, label)
                seen_counts, seen_total = self._seen_histograms.get(key, ([0] * len(counts), 0.0))
                self._seen_histograms[key] = (counts, total)
                increments = [a - b for a, b in zip(counts, seen_counts, strict=True)]
                if any(increments):
                    histogram.add_counts(label, increments, total - seen_total)
        self.encode_stats = stats["encode"]
        self.decode_stats = stats["decode"]
        self.frames_checked, self.frames_slow = stats["slow_frames"]


# ---- the child ----------------------------------------------------------------------------


class _RemoteSink:
    """A job's sink in the child: only its id travels (`_PipeDelivery` sends the outputs)."""

    __slots__ = ("job_id",)

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id

    def __call__(self, items: list[Any]) -> None:  # pragma: no cover - never called
        raise RuntimeError("a remote job's sink runs in the server process")


class _PipeDelivery(Delivery):
    """Hands the worker's outputs to the parent: one `("out", ...)` message per tick.

    When a session ends or fails in the tick, the metrics go first (`("stats", ...)`), so
    the parent's counters include the session's frames before its client sees the close.
    """

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__()
        self._send_message = send
        self.snapshot: Callable[[], dict[str, Any]] | None = None

    def put(self, batch: list[tuple[Sink, list[Any]]]) -> None:
        out = [(sink.job_id, items) for sink, items in batch if isinstance(sink, _RemoteSink)]
        if not out:
            return
        with contextlib.suppress(OSError, ValueError):  # parent gone: we exit soon
            if self.snapshot is not None and any(_ends(items) for _, items in out):
                self._send_message(("stats", self.snapshot()))
            self._send_message(("out", out))


def _ends(items: list[Any]) -> bool:
    """The outputs close their session."""
    return any(isinstance(x, Fatal) or (isinstance(x, Out) and x.close) for x in items)


class _ChildWorker(EngineWorker):
    """The engine worker of an engine process, run in the process's main thread: it waits
    on the parent's pipe instead of an Event and reads it at the start of every iteration
    (no second thread, no hand-off per message), and reports its metrics every 0.5 s."""

    def __init__(
        self,
        model: CodecModel,
        inbound: Connection,
        outbound: Connection,
        *,
        capacity: int,
        batch_window_s: float,
        name: str,
    ) -> None:
        fd = outbound.fileno()
        os.set_blocking(fd, True)
        self._send_message: Callable[[tuple[Any, ...]], None] = functools.partial(
            write_message, fd
        )
        delivery = _PipeDelivery(self._send_message)
        super().__init__(model, Metrics(), capacity=capacity, batch_window_s=batch_window_s,
                         delivery=delivery, name=name)
        delivery.snapshot = self.snapshot
        self._inbound = inbound
        self._inbound_fd = inbound.fileno()
        os.set_blocking(self._inbound_fd, False)
        self._inbound_reader = MessageReader()
        self._by_id: dict[int, Job] = {}
        self._next_report = 0.0

    def snapshot(self) -> dict[str, Any]:
        """This process's cumulative metrics (see `ProcessWorker._apply_stats`)."""
        counters: dict[str, dict[str, float]] = {}
        for name in _COUNTERS:
            series: dict[str, float] = {}
            for family in getattr(self.metrics, name).collect():
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        series[next(iter(sample.labels.values()), "")] = sample.value
            counters[name] = series
        return {
            "counters": counters,
            "histograms": {name: getattr(self.metrics, name).snapshot() for name in _HISTOGRAMS},
            "encode": self.encode_stats,
            "decode": self.decode_stats,
            "slow_frames": (self.frames_checked, self.frames_slow),
        }

    def _wait_input(self, timeout: float) -> None:
        with contextlib.suppress(OSError, ValueError):
            select.select([self._inbound_fd], [], [], timeout)

    def _drain(self) -> None:
        messages, ended = read_messages(self._inbound_fd, self._inbound_reader)
        if ended:  # the parent is gone
            self.request_stop()
        for message in messages:
            if message[0] == "stop":
                self.request_stop()
                break
            for op in message[1]:
                self._apply(op)
        now = time.monotonic()
        if now >= self._next_report:
            self._next_report = now + _STATS_PERIOD_S
            with contextlib.suppress(OSError, ValueError):
                self._send_message(("stats", self.snapshot()))
        super()._drain()

    def _apply(self, op: tuple[Any, ...]) -> None:
        kind, job_id = op[0], op[1]
        if kind == "in":
            job = self._by_id.get(job_id)
            if job is not None:
                self.submit_at(job, op[2], op[3])
        elif kind == "add":
            spec: StreamJobSpec = op[2]
            try:
                job = spec.build(self.model, _RemoteSink(job_id))
            except Exception as exc:  # a bad spec fails its session only
                log.exception("engine process: cannot start a %s job", spec.endpoint)
                reason = f"engine error: {type(exc).__name__}: {exc}"
                self._send_message(("out", [(job_id, [Fatal(CloseCode.INTERNAL_ERROR, reason)])]))
                return
            self._by_id[job_id] = job
            self.add(job)
        elif kind == "remove":
            job = self._by_id.pop(job_id, None)
            if job is not None:
                self.remove(job)


def child_main(
    model_dir: Path | None,
    threads: int,
    capacity: int,
    batch_window_s: float,
    switch_interval_ms: float,
    inbound: Connection,
    outbound: Connection,
    name: str,
) -> None:
    """Body of an engine process: load the model, run a `_ChildWorker` until stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (Ctrl-C hits the group)
    sys.setswitchinterval(switch_interval_ms / 1000.0)
    model = CodecModel.load(model_dir, threads)
    worker = _ChildWorker(model, inbound, outbound, capacity=capacity,
                          batch_window_s=batch_window_s, name=name)
    write_message(outbound.fileno(), ("ready", os.getpid()))
    try:
        worker.run_here()  # on stop: fails the jobs left with 1001 (delivered if possible)
    finally:
        with contextlib.suppress(OSError, ValueError):
            write_message(outbound.fileno(), ("stats", worker.snapshot()))
            outbound.close()
