"""The server's engine: one or more `EngineWorker` threads, each owning a share of the jobs.

onnxruntime releases the GIL while it computes, so two workers step their streams on two
cores at the same time; only their Python glue (gathering states, framing, outputs) takes
turns with the event loop.  Each job lives on ONE worker for its whole life (its streams and
recurrent states never move); `add` puts a new job on the worker with the fewest jobs, or
next to another job it shares state with (`near`: a room's PCM senders feed its mixer
directly, so they must run on the mixer's thread).  Outputs of all workers reach the loop
through one shared `Delivery`.

With `processes` > 0 the pool also runs that many engine processes
(`server.engine_process`): `stream_job` then hands the WebSocket stream sessions a
`RemoteJob` that goes to the process with the fewest jobs, and the threads keep the rooms and
HTTP file jobs.

The pool has the `EngineWorker` interface the sessions use (`add`, `remove`, `submit`,
`alive`, `start`, `stop`, `latency_summary`), so the rest of the server does not care how
many workers there are.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from server.capacity import SlowFrameMeter
from server.engine_process import ProcessWorker, RemoteJob
from server.engine_worker import Delivery, EngineWorker, Job, JobHost, Sink
from server.jobs import StreamJobSpec
from server.metrics import Metrics
from streaming.latency import LatencyStats
from streaming.model import CodecModel
from streaming.stream import Clock

__all__ = ["EnginePool"]


class EnginePool:
    """`workers` engine threads sharing `model` (see the module docstring).

    `capacity`, `batch_window_s` and `clock` are passed to every `EngineWorker`;
    `processes` engine processes load the model from `model_dir` (None: the bundled one) with
    `engine_threads` onnxruntime threads each.
    """

    def __init__(
        self,
        model: CodecModel,
        metrics: Metrics,
        *,
        workers: int = 1,
        capacity: int = 64,
        batch_window_s: float = 0.0,
        clock: Clock = time.perf_counter,
        processes: int = 0,
        model_dir: Path | None = None,
        engine_threads: int = 1,
        switch_interval_ms: float = 1.0,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if processes < 0:
            raise ValueError("processes must be >= 0")
        self.model = model
        self.metrics = metrics
        self.delivery = Delivery()
        self.workers: tuple[EngineWorker, ...] = tuple(
            EngineWorker(
                model,
                metrics,
                capacity=capacity,
                batch_window_s=batch_window_s,
                clock=clock,
                delivery=self.delivery,
                name="codecstream-engine" if workers == 1 else f"codecstream-engine-{i}",
            )
            for i in range(workers)
        )
        self.processes: tuple[ProcessWorker, ...] = tuple(
            ProcessWorker(
                model_dir,
                metrics,
                threads=engine_threads,
                capacity=capacity,
                batch_window_s=batch_window_s,
                switch_interval_ms=switch_interval_ms,
                name=f"codecstream-engine-process-{i}",
            )
            for i in range(processes)
        )
        self._load: dict[JobHost, int] = dict.fromkeys(self.workers, 0)
        self._load.update(dict.fromkeys(self.processes, 0))
        """Jobs per worker (loop side)."""
        hosts: list[EngineWorker | ProcessWorker] = [*self.workers, *self.processes]
        self._meters = {host: SlowFrameMeter() for host in hosts}
        """Slow frames of each worker (`server.capacity`), sampled on the loop."""

    # ---- life cycle -----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start every worker thread; outputs are delivered on `loop`."""
        self.delivery.loop = loop
        for worker in self.workers:
            worker.start(loop)
        for process in self.processes:
            process.start(loop)

    async def ready(self, timeout: float = 60.0) -> None:
        """Wait until every engine process has loaded the model (RuntimeError if one fails)."""
        for process in self.processes:
            await process.ready(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every worker (each finishes its tick); wait up to `timeout` s in all."""
        for worker in self.workers:  # all at once, then wait for each
            worker.request_stop()
        for process in self.processes:
            process.request_stop()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.stop(max(deadline - time.monotonic(), 0.0))
        for process in self.processes:
            process.stop(max(deadline - time.monotonic(), 0.1))

    @property
    def alive(self) -> bool:
        """Every worker runs and has looped (processes: reported) within the last 5 s."""
        return all(worker.alive for worker in self.workers) and all(
            process.alive for process in self.processes
        )

    # ---- jobs (loop side) -----------------------------------------------------------------

    def stream_job(self, spec: StreamJobSpec, sink: Sink) -> Job:
        """The job of a WebSocket stream session: remote when the pool has engine
        processes, else built here (for a thread worker).  Hand it to `add`."""
        if self.processes:
            return RemoteJob(spec, sink)
        return spec.build(self.model, sink)

    def add(self, job: Job, *, near: Job | None = None) -> None:
        """Hand `job` to the least loaded worker of its kind (a `RemoteJob` to a running
        process, `_usable_processes`; any other job to a thread), or to the worker of
        `near`."""
        worker: JobHost
        if near is not None and near.home is not None:
            worker = near.home
        elif isinstance(job, RemoteJob):
            worker = min(self._usable_processes(), key=self._load.__getitem__)
        else:
            worker = min(self.workers, key=self._load.__getitem__)
        self._load[worker] += 1
        worker.add(job)

    def _usable_processes(self) -> tuple[ProcessWorker, ...]:
        """The engine processes a new session may go to: the running ones, else those
        whose replacement is due (the session waits for it), else all (a process gone for
        good fails the session with 1011 at once)."""
        running = tuple(p for p in self.processes if not p.exited)
        if running:
            return running
        return tuple(p for p in self.processes if p.respawning) or self.processes

    def remove(self, job: Job) -> None:
        """Take `job` off its worker; inputs still queued for it are discarded."""
        worker = job.home
        if worker is None:
            return
        self._load[worker] -= 1
        worker.remove(job)

    def submit(self, job: Job, item: object) -> None:
        """Queue `item` for `job.on_input` on the job's worker (thread-safe, never blocks)."""
        worker = job.home
        if worker is not None:
            worker.submit(job, item)

    # ---- statistics -----------------------------------------------------------------------

    def sample_slowness(self) -> None:
        """Take a slow-frame sample of every worker where one is due (`SlowFrameMeter`; the
        loop calls this every 0.1 s)."""
        for host, meter in self._meters.items():
            meter.update(host.frames_checked, host.frames_slow)

    def stream_slow_percent(self) -> float:
        """Smoothed percentage of slow frames on the worker a new stream session would go
        to: the least slow of the engine processes, else of the threads."""
        hosts: tuple[EngineWorker | ProcessWorker, ...] = self.processes or self.workers
        return min(self._meters[host].slow_percent for host in hosts)

    def latency_summary(self) -> dict[str, dict[str, float]]:
        """{"encode"|"decode": LatencyStats.summary()} over every worker, since start."""
        encode, decode = LatencyStats(), LatencyStats()
        sources: list[EngineWorker | ProcessWorker] = [*self.workers, *self.processes]
        for source in sources:
            encode.merge(source.encode_stats)
            decode.merge(source.decode_stats)
        return {"encode": encode.summary(), "decode": decode.summary()}
