"""Engine processes (server/engine_process.py): stream sessions stepped in child processes.

Real servers on loopback ports, real websockets clients: a session through an engine process
gives byte for byte what the in-process engine threads give; the child's frame counters
reach /metrics; a killed engine process fails its sessions with 1011 and readiness, and is
replaced (or, past its restart budget, fails new sessions at once); writes to a child never
block the event loop; the
child's messages survive any split into reads (uvloop makes the loop's end of the pipe
non-blocking); the settings parse 'auto'; `StreamJobSpec` states the latency its streams have.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import multiprocessing.connection
import os
import pickle
import random
import signal
import struct
import threading
from typing import Any

import httpx
import numpy as np
import pytest

from server import engine_process
from server import settings as settings_module
from server.codes import CloseCode
from server.engine_process import (
    MAX_MESSAGE_BYTES,
    MessageReader,
    PipeWriter,
    ProcessWorker,
    encode_message,
    write_message,
)
from server.jobs import StreamJobSpec, TokenOutput
from server.metrics import Metrics
from server.settings import MAX_AUTO_PROCESSES, Settings, SettingsError, parse_settings
from streaming.framing import SampleFormat
from streaming.model import CodecModel
from tests.server.conftest import (
    ServerThread,
    connect,
    hello,
    receive_all,
    send_pcm,
    settle,
    start_server,
)


async def _roundtrip(running: ServerThread, pcm: np.ndarray, **fields: Any) -> tuple[bytes, Any]:
    """PCM out and JSON token packets of one roundtrip session."""
    async with connect(running.ws("/v1/roundtrip")) as ws:
        await hello(ws, return_tokens=True, **fields)
        await send_pcm(ws, pcm)
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    assert got.code == CloseCode.NORMAL, got.reason
    return b"".join(got.binary), [m["packet"] for m in got.of_type("packet")]


async def test_engine_process_equals_engine_thread(clip: np.ndarray) -> None:
    """Same session through an engine process and through the in-process thread: same
    bytes (the batched engine is exact whatever else shares its steps)."""
    pcm = clip[: 16000 * 2]
    threads = start_server(engine_processes=0)
    processes = start_server(engine_processes=2)
    try:
        assert threads.state.worker.processes == ()
        assert len(processes.state.worker.processes) == 2
        local = await _roundtrip(threads, pcm, bitrate_kbps=3)
        # two sessions at once on the two processes, one of them at another mode
        remote, other = await asyncio.gather(
            _roundtrip(processes, pcm, bitrate_kbps=3), _roundtrip(processes, pcm)
        )
        assert remote[0] == local[0] and remote[1] == local[1]
        assert len(remote[0]) == 2 * 320 * 100 and len(remote[1]) == 100
        assert other[1][0]["num_codebooks"] != remote[1][0]["num_codebooks"]
        assert {p.jobs for p in processes.state.worker.processes} == {0}  # both left
    finally:
        threads.stop()
        processes.stop()


async def test_child_metrics_reach_the_server(clip: np.ndarray) -> None:
    running = start_server(engine_processes=1)
    try:
        await _roundtrip(running, clip[:16000])
        async with httpx.AsyncClient(base_url=running.http) as client:
            text = (await client.get("/metrics")).text
        values = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }
        assert values['codecstream_frames_encoded_total{endpoint="roundtrip"}'] == 50
        assert values['codecstream_frames_decoded_total{endpoint="roundtrip"}'] == 50
        assert values['codecstream_batch_size_count{direction="encode"}'] == 50
        assert values["codecstream_engine_cpu_seconds_total"] >= 0
        process = running.state.worker.processes[0]  # slow-frame counts for admission
        assert process.frames_checked >= 50 and 0 <= process.frames_slow <= process.frames_checked
    finally:
        running.stop()


async def test_a_dead_engine_process_fails_its_sessions(
    clip: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_process, "RESPAWN_DELAY_S", 3600.0)  # no replacement yet
    running = start_server(engine_processes=1)
    try:
        process = running.state.worker.processes[0]
        async with connect(running.ws("/v1/roundtrip")) as ws:
            await hello(ws)
            await send_pcm(ws, clip[:3200])
            assert isinstance(await asyncio.wait_for(ws.recv(), 10), bytes)  # it runs
            assert process.pid is not None
            os.kill(process.pid, signal.SIGKILL)
            got = await receive_all(ws)
        assert got.code == CloseCode.INTERNAL_ERROR
        assert got.reason == "engine process exited unexpectedly"
        await settle(running)
        async with httpx.AsyncClient(base_url=running.http) as client:
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/healthz")).status_code == 200
        assert process.exited and process.respawning
    finally:
        running.stop()


async def _session_runs(running: ServerThread, pcm: np.ndarray) -> None:
    pcm_out, _ = await _roundtrip(running, pcm)
    assert len(pcm_out) == 2 * len(pcm)


async def test_a_dead_engine_process_is_replaced(
    clip: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed child is started again: a session that arrives before the replacement
    waits for it, and readiness comes back."""
    monkeypatch.setattr(engine_process, "RESPAWN_DELAY_S", 0.2)
    running = start_server(engine_processes=1)
    try:
        process = running.state.worker.processes[0]
        first_pid = process.pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        while not process.exited:  # the loop has seen the pipe close
            await asyncio.sleep(0.01)
        await _session_runs(running, clip[:3200])  # queued until the replacement runs
        assert process.pid not in (None, first_pid) and len(process.respawns) == 1
        async with httpx.AsyncClient(base_url=running.http) as client:
            for _ in range(200):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert (await client.get("/readyz")).status_code == 200
        await _session_runs(running, clip[:3200])
    finally:
        running.stop()


async def test_an_engine_process_that_keeps_dying_stays_dead(
    clip: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `MAX_RESPAWNS` a dead child is not replaced, and a new session fails at once
    with 1011 instead of waiting for nothing."""
    monkeypatch.setattr(engine_process, "MAX_RESPAWNS", 0)
    running = start_server(engine_processes=1)
    try:
        process = running.state.worker.processes[0]
        assert process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        while not process.exited:
            await asyncio.sleep(0.01)
        assert not process.respawning
        async with connect(running.ws("/v1/roundtrip")) as ws:
            await hello(ws)
            got = await receive_all(ws)
        assert got.code == CloseCode.INTERNAL_ERROR
        assert got.reason == "no engine process is running"
    finally:
        running.stop()


async def test_the_pipe_writer_never_blocks_the_loop() -> None:
    """Writes to a child that does not read stay with the writer (the loop goes on) and
    reach the pipe, in order and whole, once the child reads: a blocking write there froze
    the server when the child was itself blocked writing to a stalled loop."""
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    writer = PipeWriter(write_end, loop)
    messages = [("ops", [("in", i, bytes(1 << 20), 0.0)]) for i in range(4)]
    try:
        for message in messages:  # 4 MiB into a pipe of 64 KiB-1 MiB that nobody reads
            writer.write(message)
        assert writer.pending_bytes > 0
        reader, got = MessageReader(), []
        os.set_blocking(read_end, False)
        while len(got) < len(messages):
            await asyncio.sleep(0)  # the loop's writer callback refills the pipe
            with contextlib.suppress(BlockingIOError):
                got += reader.feed(os.read(read_end, 1 << 20))
        assert got == messages and writer.pending_bytes == 0
    finally:
        writer.close()
        os.close(read_end)
        os.close(write_end)


def test_the_pipe_writer_flushes_within_a_deadline_off_the_loop() -> None:
    """Shutdown path (`ProcessWorker.stop` with no loop to write): what the pipe takes
    goes; a reader that never reads costs at most the deadline."""
    loop = asyncio.new_event_loop()
    read_end, write_end = os.pipe()
    try:
        writer = PipeWriter(write_end, loop)
        writer._pending += encode_message(("stop",))
        assert writer.flush_blocking(1.0) and writer.pending_bytes == 0
        assert MessageReader().feed(os.read(read_end, 1 << 16)) == [("stop",)]
        writer._pending += bytes(8 << 20)  # more than any pipe holds, never read
        assert not writer.flush_blocking(0.2) and writer.pending_bytes > 0
    finally:
        loop.close()
        os.close(read_end)
        os.close(write_end)


def _messages() -> list[tuple[Any, ...]]:
    """Child-like messages: small ones and a tick's worth of PCM outputs (~400 KB)."""
    pcm = np.arange(320 * 600, dtype=np.int16).tobytes()
    return [("ready", 1234), ("out", [(7, [pcm])]), ("stats", {"a": [1.5, 2]}), ("out", [])]


@pytest.mark.parametrize("chunking", ["bytes", "random", "whole"])
def test_message_reader_reassembles_any_split(chunking: str) -> None:
    messages = _messages()
    read_end, write_end = os.pipe()

    def write_all() -> None:
        for message in messages:  # the large one fills the pipe: the write continues
            write_message(write_end, message)
        os.close(write_end)

    writer = threading.Thread(target=write_all)
    writer.start()
    stream = bytearray()
    while data := os.read(read_end, 1 << 16):
        stream += data
    writer.join()
    os.close(read_end)
    stream_bytes = bytes(stream)
    rng = random.Random(0)
    if chunking == "bytes":  # one byte at a time near both ends, the middle in one piece
        cuts = [*range(1, 200), *range(len(stream_bytes) - 200, len(stream_bytes))]
    elif chunking == "random":
        cuts = sorted(rng.sample(range(1, len(stream_bytes)), 50))
    else:
        cuts = []
    bounds = [0, *cuts, len(stream_bytes)]
    pieces = [stream_bytes[a:b] for a, b in itertools.pairwise(bounds)]
    reader = MessageReader()
    got = [m for piece in pieces for m in reader.feed(piece)]
    assert got == messages
    assert reader.pending_bytes == 0


def test_message_reader_keeps_a_partial_message_and_rejects_a_corrupt_length() -> None:
    reader = MessageReader()
    assert reader.feed(b"\x00\x00") == [] and reader.pending_bytes == 2
    assert reader.feed(b"\x00\x04\x80\x03N.") == [None]  # the length's last 2 bytes, the pickle
    with pytest.raises(ValueError, match="corrupt"):
        MessageReader().feed(struct.pack("!I", MAX_MESSAGE_BYTES + 1))


def test_the_loop_reads_a_message_that_arrives_in_pieces() -> None:
    """The loop's end of the child's pipe is non-blocking: half a message is kept, not
    taken for a dead child (`Connection.recv` raised BlockingIOError there, under load)."""
    worker = ProcessWorker(None, Metrics())
    read_end, write_end = os.pipe()
    worker._from_child = multiprocessing.connection.Connection(read_end)
    os.set_blocking(read_end, False)
    try:
        payload = pickle.dumps(("ready", 4321), protocol=pickle.HIGHEST_PROTOCOL)
        data = struct.pack("!I", len(payload)) + payload
        os.write(write_end, data[:3])
        worker._on_readable()
        os.write(write_end, data[3:-1])
        worker._on_readable()
        assert not worker.exited and worker.pid is None
        os.write(write_end, data[-1:])
        worker._on_readable()
        assert worker.pid == 4321 and not worker.exited
        os.close(write_end)
        worker._on_readable()  # end of file: the child is gone
        assert worker.exited
    finally:
        worker._from_child.close()


async def test_sessions_through_an_engine_process_on_uvloop(clip: np.ndarray) -> None:
    """A uvloop server (which makes the descriptors it watches non-blocking) runs sessions
    through an engine process as the asyncio one does."""
    running = start_server(engine_processes=1, event_loop="uvloop")
    try:
        process = running.state.worker.processes[0]
        assert type(process._loop).__module__.startswith("uvloop")
        results = await asyncio.gather(*(_roundtrip(running, clip[: 16000 * 3]) for _ in range(6)))
        assert all(len(pcm) == 2 * 320 * 150 for pcm, _ in results)
        assert not process.exited
    finally:
        running.stop()


def test_event_loop_setting() -> None:
    assert Settings().event_loop == "auto"
    assert parse_settings(["--event-loop", "asyncio"], {}).event_loop == "asyncio"
    assert Settings.from_env({"CODECSTREAM_EVENT_LOOP": "uvloop"}).event_loop == "uvloop"
    with pytest.raises(SettingsError, match="event_loop must be"):
        Settings(event_loop="trio")


def test_engine_processes_setting() -> None:
    assert Settings().engine_processes is None  # auto
    assert 1 <= Settings().engine_process_count <= MAX_AUTO_PROCESSES
    assert Settings(engine_processes=0).engine_process_count == 0
    assert Settings.from_env({"CODECSTREAM_ENGINE_PROCESSES": "3"}).engine_process_count == 3
    assert Settings.from_env({"CODECSTREAM_ENGINE_PROCESSES": "auto"}).engine_processes is None
    assert parse_settings(["--engine-processes", "0"], {}).engine_processes == 0
    with pytest.raises(SettingsError, match="CODECSTREAM_ENGINE_PROCESSES"):
        Settings.from_env({"CODECSTREAM_ENGINE_PROCESSES": "-1"})


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
@pytest.mark.parametrize("sides", [(True, False), (False, True), (True, True)])
def test_spec_latency_is_the_streams_latency(rate: int, sides: tuple[bool, bool]) -> None:
    model = CodecModel.load()
    spec = StreamJobSpec(
        endpoint="x",
        encode=sides[0],
        decode=sides[1],
        rate=rate,
        fmt=SampleFormat.S16LE,
        tokens=TokenOutput.NONE,
    )
    job = spec.build(model, lambda items: None)
    streams = [s for s in (job.encoder, job.decoder) if s is not None]
    expected = round(sum(s.algorithmic_delay_ms for s in streams), 4)
    assert spec.algorithmic_latency_ms(model.card) == expected


def test_engine_threads_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_module, "_available_cores", lambda: 2)
    assert Settings().engine_threads is None  # auto
    assert Settings().engine_thread_count == 2  # 1 process on 2 cores: 2 threads
    assert Settings(engine_processes=2).engine_thread_count == 1
    assert Settings(engine_processes=0).engine_thread_count == 1  # shares the loop's GIL
    monkeypatch.setattr(settings_module, "_available_cores", lambda: 64)
    assert Settings().engine_thread_count == 2  # capped: 8 processes, 2 threads each
    assert Settings(engine_threads=3).engine_thread_count == 3
    assert parse_settings(["--engine-threads", "auto"], {}).engine_threads is None
    assert Settings.from_env({"CODECSTREAM_ENGINE_THREADS": "4"}).engine_thread_count == 4
    with pytest.raises(SettingsError, match="CODECSTREAM_ENGINE_THREADS"):
        Settings.from_env({"CODECSTREAM_ENGINE_THREADS": "0"})
