"""The engine worker thread alone (no network): batching, ordering, late frames, isolation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from server.codes import CloseCode
from server.engine_pool import EnginePool
from server.engine_worker import Delivery, EngineWorker, Fatal, Job, Out
from server.jobs import EndMark, StreamJob, TokenOutput
from server.messages import mode_of
from server.metrics import Metrics
from streaming.framing import SampleFormat
from streaming.model import CodecModel
from tests.server.conftest import load_clip


@pytest.fixture(scope="module")
def model() -> CodecModel:
    return CodecModel.load()


@pytest.fixture
def worker(model: CodecModel) -> Iterator[EngineWorker]:
    w = EngineWorker(model, Metrics(), capacity=4)
    yield w
    w.stop()


class Collector:
    """A sink that keeps outputs and resolves when the job ends (`end` text or Fatal)."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def __call__(self, items: list[Any]) -> None:
        self.items.extend(items)
        ended = any(isinstance(i, Fatal) or (isinstance(i, Out) and i.close) for i in items)
        if ended and not self.done.done():
            self.done.set_result(None)


def encode_job(model: CodecModel, sink: Callable[[list[Any]], None]) -> StreamJob:
    return StreamJob(
        model,
        sink,
        endpoint="encode",
        encode=True,
        decode=False,
        rate=16000,
        fmt=SampleFormat.S16LE,
        mode=mode_of(model.card, 3),
        tokens=TokenOutput.BINARY,
    )


async def test_streams_due_together_share_one_onnx_call(
    worker: EngineWorker, model: CodecModel
) -> None:
    pcm = load_clip()[:320].astype("<i2").tobytes()
    sinks = [Collector() for _ in range(6)]
    jobs = [encode_job(model, s) for s in sinks]
    for job in jobs:  # queued before the thread starts: all due in the first tick
        worker.add(job)
        worker.submit(job, pcm)
        worker.submit(job, EndMark())
    worker.start(asyncio.get_running_loop())
    await asyncio.wait_for(asyncio.gather(*(s.done for s in sinks)), 10)
    assert worker.engine.encode_batches == 1
    assert worker.engine.capacity >= 6  # grew from 4 to take the batch
    for sink in sinks:
        packets = [i for i in sink.items if isinstance(i, Out) and isinstance(i.data, bytes)]
        assert len(packets) == 1 and packets[0].frames == 1


async def test_late_frames_are_counted(worker: EngineWorker, model: CodecModel) -> None:
    sink = Collector()
    job = encode_job(model, sink)
    worker.add(job)
    worker.submit(job, load_clip()[:960].astype("<i2").tobytes())
    worker.submit(job, EndMark())
    await asyncio.sleep(0.05)  # the input waits longer than one frame period (20 ms)
    worker.start(asyncio.get_running_loop())
    await asyncio.wait_for(sink.done, 10)
    assert job.late_frames == 3
    summary = worker.encode_stats.summary()
    assert summary["count"] == 3 and summary["queue_p50_ms"] >= 40


class Exploding(Job):
    endpoint = "encode"

    def on_input(self, item: object, now: float) -> None:
        raise RuntimeError("boom")


async def test_a_failing_job_does_not_stop_the_others(
    worker: EngineWorker, model: CodecModel
) -> None:
    worker.start(asyncio.get_running_loop())
    bad_sink, good_sink = Collector(), Collector()
    bad = Exploding(bad_sink)
    good = encode_job(model, good_sink)
    worker.add(bad)
    worker.add(good)
    worker.submit(bad, b"")
    worker.submit(good, load_clip()[:640].astype("<i2").tobytes())
    worker.submit(good, EndMark())
    await asyncio.wait_for(asyncio.gather(bad_sink.done, good_sink.done), 10)
    (fatal,) = [i for i in bad_sink.items if isinstance(i, Fatal)]
    assert fatal.code == CloseCode.INTERNAL_ERROR and "RuntimeError: boom" in fatal.reason
    assert sum(isinstance(i, Out) and isinstance(i.data, bytes) for i in good_sink.items) == 2
    assert worker.alive


async def test_burst_is_processed_one_frame_per_tick_in_order(
    worker: EngineWorker, model: CodecModel
) -> None:
    """A 1 s burst and a 1-frame stream: the small one finishes in the first ticks."""
    worker.start(asyncio.get_running_loop())
    big_sink, small_sink = Collector(), Collector()
    big, small = encode_job(model, big_sink), encode_job(model, small_sink)
    worker.add(big)
    worker.add(small)
    clip = load_clip()
    worker.submit(big, clip[:16000].astype("<i2").tobytes())
    worker.submit(big, EndMark())
    worker.submit(small, clip[:320].astype("<i2").tobytes())
    worker.submit(small, EndMark())
    t0 = time.perf_counter()
    await asyncio.wait_for(small_sink.done, 10)
    small_time = time.perf_counter() - t0
    await asyncio.wait_for(big_sink.done, 10)
    big_time = time.perf_counter() - t0
    assert small_time < big_time
    assert sum(isinstance(i, Out) and isinstance(i.data, bytes) for i in big_sink.items) == 50
    assert np.isfinite(big_time)


# ---- batching window, cost model, pool, delivery -----------------------------------------


class FakeClock:
    """A settable clock (s)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_batching_window_waits_for_more_streams_but_keeps_the_deadline(
    model: CodecModel,
) -> None:
    clock = FakeClock()
    w = EngineWorker(model, Metrics(), batch_window_s=0.009, clock=clock)
    jobs = [encode_job(model, lambda items: None) for _ in range(3)]
    for job in jobs:
        w.add(job)
    pcm = load_clip()[:320].astype("<i2").tobytes()
    w.submit(jobs[0], pcm)  # stamped at t = 0
    w._drain()
    w.cost_fixed, w.cost_stream, w.arrival_rate = 0.0005, 0.0003, 0.0
    clock.now = 0.001
    # the window's end: 9 ms after the oldest input
    assert w._window_wait() == pytest.approx(0.008)
    # a slower step: it must still end within target_s (10 ms) of the oldest input
    w.cost_fixed = 0.005
    assert w._window_wait() == pytest.approx(w.target_s - 0.001 - 0.005 - 0.0003)
    clock.now = 0.0044
    assert w._window_wait() == 0.0  # less than 0.5 ms left: not worth a sleep
    clock.now = 0.001
    w.arrival_rate = 10000.0  # near saturation: ticks run back to back
    assert w._window_wait() == 0.0
    w.cost_fixed, w.arrival_rate = 0.001, 0.0
    clock.now = 0.0095
    assert w._window_wait() == 0.0  # the window is over
    clock.now = 0.001
    for job in jobs[1:]:  # every job has input: nobody left to wait for
        w.submit(job, pcm)
    w._drain()
    assert w._window_wait() == 0.0
    assert EngineWorker(model, Metrics(), batch_window_s=0.0)._window_wait() == 0.0


def test_the_tick_time_model_learns_fixed_and_per_stream_costs(model: CodecModel) -> None:
    w = EngineWorker(model, Metrics())
    for i in range(200):
        b = 1 + i % 16
        w._learn(b, 0.002 + 0.0004 * b, 0.005)
    assert w.cost_fixed == pytest.approx(0.002, rel=1e-3)
    assert w.cost_stream == pytest.approx(0.0004, rel=1e-3)
    assert w.arrival_rate > 0


async def test_the_pool_spreads_jobs_and_keeps_related_jobs_together(model: CodecModel) -> None:
    pool = EnginePool(model, Metrics(), workers=2, capacity=4, batch_window_s=0.004)
    sinks = [Collector() for _ in range(4)]
    jobs = [encode_job(model, s) for s in sinks]
    for job in jobs:
        pool.add(job)
    assert {job.home for job in jobs} == set(pool.workers)
    assert sum(job.home is pool.workers[0] for job in jobs) == 2
    buddy = encode_job(model, Collector())
    pool.add(buddy, near=jobs[1])
    assert buddy.home is jobs[1].home
    pool.remove(buddy)
    pcm = load_clip()[:960].astype("<i2").tobytes()
    pool.start(asyncio.get_running_loop())
    try:
        for job in jobs:
            pool.submit(job, pcm)
            pool.submit(job, EndMark())
        await asyncio.wait_for(asyncio.gather(*(s.done for s in sinks)), 10)
        assert pool.alive
    finally:
        pool.stop()
    for sink in sinks:
        packets = [i for i in sink.items if isinstance(i, Out) and isinstance(i.data, bytes)]
        assert len(packets) == 3
    assert pool.latency_summary()["encode"]["count"] == 12
    assert not pool.alive


async def test_delivery_hands_queued_outputs_over_in_order_in_one_callback() -> None:
    loop = asyncio.get_running_loop()
    calls: list[object] = []

    class CountingLoop:
        def is_closed(self) -> bool:
            return False

        def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
            calls.append(callback)
            loop.call_soon_threadsafe(callback)

    delivery = Delivery()
    delivery.loop = CountingLoop()  # type: ignore[assignment]
    got: list[Any] = []
    delivery.put([(got.extend, [1, 2])])
    delivery.put([(got.extend, [3])])  # the first flush has not run yet: no second callback
    assert len(calls) == 1
    await asyncio.sleep(0)
    assert got == [1, 2, 3]
    delivery.put([(got.extend, [4])])
    await asyncio.sleep(0)
    assert got == [1, 2, 3, 4] and len(calls) == 2
