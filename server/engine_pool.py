"""The server's engine: one or more `EngineWorker` threads, each owning a share of the jobs.

onnxruntime releases the GIL while it computes, so two workers step their streams on two
cores at the same time; only their Python glue (gathering states, framing, outputs) takes
turns with the event loop.  Each job lives on ONE worker for its whole life (its streams and
recurrent states never move); `add` puts a new job on the worker with the fewest jobs, or
next to another job it shares state with (`near`: a room's PCM senders feed its mixer
directly, so they must run on the mixer's thread).  Outputs of all workers reach the loop
through one shared `Delivery`.

The pool has the `EngineWorker` interface the sessions use (`add`, `remove`, `submit`,
`alive`, `start`, `stop`, `latency_summary`), so the rest of the server does not care how
many workers there are.
"""

from __future__ import annotations

import asyncio
import time

from server.engine_worker import Delivery, EngineWorker, Job
from server.metrics import Metrics
from streaming.latency import LatencyStats
from streaming.model import CodecModel
from streaming.stream import Clock

__all__ = ["EnginePool"]


class EnginePool:
    """`workers` engine threads sharing `model` (see the module docstring).

    `capacity`, `batch_window_s` and `clock` are passed to every `EngineWorker`.
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
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
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
        self._load = [0] * workers  # jobs per worker (loop side)
        self._index = {w: i for i, w in enumerate(self.workers)}

    # ---- life cycle -----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start every worker thread; outputs are delivered on `loop`."""
        self.delivery.loop = loop
        for worker in self.workers:
            worker.start(loop)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every worker (each finishes its tick); wait up to `timeout` s in all."""
        for worker in self.workers:  # all at once, then wait for each
            worker.request_stop()
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.stop(max(deadline - time.monotonic(), 0.0))

    @property
    def alive(self) -> bool:
        """Every worker runs and has looped within the last 5 s."""
        return all(worker.alive for worker in self.workers)

    # ---- jobs (loop side) -----------------------------------------------------------------

    def add(self, job: Job, *, near: Job | None = None) -> None:
        """Hand `job` to the least loaded worker, or to the worker of `near`."""
        if near is not None and near.home is not None:
            worker = near.home
        else:
            worker = self.workers[min(range(len(self._load)), key=self._load.__getitem__)]
        self._load[self._index[worker]] += 1
        worker.add(job)

    def remove(self, job: Job) -> None:
        """Take `job` off its worker; inputs still queued for it are discarded."""
        worker = job.home
        if worker is None:
            return
        self._load[self._index[worker]] -= 1
        worker.remove(job)

    def submit(self, job: Job, item: object) -> None:
        """Queue `item` for `job.on_input` on the job's worker (thread-safe, never blocks)."""
        worker = job.home
        if worker is not None:
            worker.submit(job, item)

    # ---- statistics -----------------------------------------------------------------------

    def latency_summary(self) -> dict[str, dict[str, float]]:
        """{"encode"|"decode": LatencyStats.summary()} over every worker, since start."""
        encode, decode = LatencyStats(), LatencyStats()
        for worker in self.workers:
            encode.merge(worker.encode_stats)
            decode.merge(worker.decode_stats)
        return {"encode": encode.summary(), "decode": decode.summary()}
