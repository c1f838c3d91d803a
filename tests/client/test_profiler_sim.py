"""The profiler's simulated roundtrip client (client.profiler.sim) without a server: its
speaker buffer after a network stall, and the log that time-stamps the frames it sends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from client.audio import PCM_CATCHUP_MARGIN_FRAMES
from client.profiler.analysis import _client, _roundtrip_frames
from client.profiler.report import _counters
from client.profiler.sim import RoundtripClient, SendLog, SimConfig
from streaming.model import CodecModel

TICK_S = 0.02  # 20 ms device blocks


class ScriptedServer:
    """Stands in for a roundtrip client's Session: takes the PCM it sends and answers one
    `packet` + one PCM message per complete frame (every sample of frame k = k / 1000, so
    the recording tells which frame plays), holding its answers during the ticks in `stall`
    (then they all arrive at once).  `messages()` also ticks the client's virtual device as
    `RoundtripClient.run` does, and notes the speaker buffer after each tick's messages."""

    def __init__(self, client: RoundtripClient, ticks: int, stall: range) -> None:
        self.client = client
        self.ticks = ticks
        self.stall = stall
        self.received = 0  # samples
        self.frames_out = 0
        self.levels: list[int] = []  # samples queued for the speaker

    async def send_bytes(self, data: bytes) -> None:
        self.received += len(data) // 4

    async def messages(self) -> AsyncIterator[bytes | dict[str, Any]]:
        c = self.client
        for tick in range(self.ticks):
            c.port.advance(tick * TICK_S)
            await c._send_captured()
            c._resolve()
            if tick in self.stall:
                continue
            while (self.frames_out + 1) * c.frame <= self.received:
                k = self.frames_out
                times = {"server_recv_us": 1000 + k, "server_send_us": 2000 + k}
                yield {"type": "packet", "packet": {"seq": k & 0xFFFF, "times": times}}
                yield np.full(c.frame, k / 1000.0, dtype="<f4").tobytes()
                self.frames_out += 1
            self.levels.append(c.port.playback_queued)


async def run_scripted(
    model: CodecModel, ticks: int, stall: range, playout_ms: float = 20.0
) -> tuple[RoundtripClient, ScriptedServer]:
    """A roundtrip client (speaker buffer `playout_ms`) run for `ticks` against a
    ScriptedServer stalling during `stall`."""
    rate = model.card.sample_rate
    config = SimConfig("x", "r", clients=1, seconds=ticks * TICK_S, playout_ms=playout_ms)
    client = RoundtripClient(0, model, np.zeros(rate * 2, np.float32), config)
    server = ScriptedServer(client, ticks, stall)
    client.session = server  # type: ignore[assignment]
    await client._receive()
    return client, server


# ---- the speaker buffer of the PCM that comes back -------------------------------------------


async def test_the_speaker_buffer_comes_back_after_a_network_stall(model: CodecModel) -> None:
    """The network holds the server's answers for 0.5 s and then delivers them at once: as in
    `codec-client call --receive pcm`, the oldest audio is dropped (and counted) down to
    --playout-ms instead of keeping the stall's delay for the rest of the run."""
    ticks, stall = 300, range(100, 125)
    client, server = await run_scripted(model, ticks, stall)
    rate, frame = model.card.sample_rate, client.frame
    prime = int(0.020 * rate)
    limit = prime + (PCM_CATCHUP_MARGIN_FRAMES + 1) * frame  # right after a chunk is queued
    assert max(server.levels) <= limit
    # after the burst the speaker plays frames sent at most playout + margin + 1 frames ago
    rec = client.port.recording[: client.port.recorded]
    for tick in range(150, ticks):
        playing = round(float(rec[tick * frame + frame // 2]) * 1000.0)  # frame index
        assert 0 <= tick - playing <= 1 + PCM_CATCHUP_MARGIN_FRAMES + 1
    # most of the 0.5 s burst was dropped: what came at once beyond playout + margin
    assert 0.4 <= client.pcm_dropped_s <= 0.5
    assert client.pcm_dropped == round(client.pcm_dropped_s * rate)
    # a dropped frame never played: no record; every frame is played, dropped or queued
    recorded = {r.seq for r in client.records}
    assert client.frames_dropped > 0
    assert len(recorded) + client.frames_dropped + len(client._pending) == client._frames_in
    assert set(range(100, 125)) - recorded  # frames of the burst are among the dropped
    played = [r.played for r in client.records]
    assert played == sorted(played)


async def test_a_steady_roundtrip_drops_nothing(model: CodecModel) -> None:
    client, server = await run_scripted(model, 200, range(0))
    assert client.pcm_dropped == 0 and client.frames_dropped == 0
    assert max(server.levels) <= int(0.020 * model.card.sample_rate) + client.frame


async def test_the_profile_counts_what_the_speaker_buffer_dropped(model: CodecModel) -> None:
    """The drop reaches profile.json's `frames` and `per_client` and the report's counters."""
    client, _ = await run_scripted(model, 200, range(50, 75))
    frames = _roundtrip_frames([client])
    assert frames["pcm_dropped_samples"] == client.pcm_dropped > 0
    assert frames["dropped"] == client.frames_dropped > 0
    assert frames["played"] == len(client.records)
    per_client = _client(client)
    assert per_client["pcm_dropped_s"] == client.pcm_dropped / model.card.sample_rate
    assert per_client["dropped"] == client.frames_dropped
    profile = {
        "frames": frames,
        "rtf": {"encode": None, "decode": None, "server_stage_p50": 0.1},
        "scheduler": {"tick_lag_ms": {"p50": 0.1, "p95": 0.2, "max": 0.3}},
        "clock_offset": {"seconds": 0.0, "method": "same clock"},
    }
    text = _counters(profile)
    assert f"dropped {client.frames_dropped}," in text
    assert f"speaker catch-up dropped {client.pcm_dropped} samples" in text


# ---- the log of what was sent --------------------------------------------------------------


def scan(log: list[tuple[int, float]], samples: int) -> float | None:
    """The former `RoundtripClient._sent_time`: a scan of the whole (total, time) log."""
    for total, t in log:
        if total >= samples:
            return t
    return None


class RecordingLog(SendLog):
    """A SendLog that records every call and its answer (the sequence a run produced)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.calls: list[tuple[str, int, float | None]] = []

    def add(self, n: int, t: float) -> None:
        super().add(n, t)
        self.calls.append(("add", n, t))

    def time_of(self, samples: int) -> float | None:
        answer = super().time_of(samples)
        self.calls.append(("time_of", samples, answer))
        return answer


def replay_with_scan(calls: list[tuple[str, int, float | None]]) -> int:
    """Check every `time_of` answer of `calls` against the scan of the full log; return how
    many answers were checked."""
    log: list[tuple[int, float]] = []
    checked = 0
    for op, value, answer in calls:
        if op == "add":
            assert answer is not None
            log.append(((log[-1][0] if log else 0) + value, answer))
        else:
            assert answer == scan(log, value), (value, answer)
            checked += 1
    return checked


async def test_send_times_equal_the_scan_of_the_whole_log_on_a_recorded_run(
    model: CodecModel,
) -> None:
    """The sequence of sends and questions of a real (scripted) run, stall included: the
    bounded log gives the answers the former linear scan gave."""
    rate = model.card.sample_rate
    config = SimConfig("x", "r", clients=1, seconds=6.0, playout_ms=20.0)
    client = RoundtripClient(0, model, np.zeros(rate * 2, np.float32), config)
    client.sends = RecordingLog(client.sends.capacity)
    server = ScriptedServer(client, 300, range(100, 125))
    client.session = server  # type: ignore[assignment]
    await client._receive()
    calls = client.sends.calls  # type: ignore[attr-defined]
    assert replay_with_scan(calls) == len(client.records) > 250


def test_send_times_equal_the_scan_with_odd_chunks_and_repeated_questions() -> None:
    """Chunks of varying size, questions in non-decreasing order (repeated, between chunk
    ends, ahead of what was sent), some ticks without a question."""
    rng = np.random.default_rng(7)
    log = RecordingLog(10_000)
    asked = 0
    for tick in range(5000):
        log.add(int(rng.integers(1, 700)), tick * 0.02)
        for _ in range(int(rng.integers(0, 3))):
            asked = min(asked + int(rng.integers(0, 900)), log.total + 400)
            log.time_of(asked)
    assert replay_with_scan(log.calls) > 4000
    answers = [c[2] for c in log.calls if c[0] == "time_of"]
    assert any(a is None for a in answers) and any(a is not None for a in answers)


def test_the_send_log_stays_bounded_over_a_long_run() -> None:
    """600 s of 20 ms sends: with the frames coming back 3 ticks later only the last few
    entries are kept; with nothing coming back at most `capacity`, and a question about a
    forgotten entry gets no answer rather than a wrong one."""
    log = SendLog(3001)
    for tick in range(30_000):
        log.add(320, tick * 0.02)
        if tick >= 3:
            assert log.time_of((tick - 2) * 320) == pytest.approx((tick - 3) * 0.02)
        assert len(log) <= 4
    silent = SendLog(3001)
    for tick in range(30_000):
        silent.add(320, tick * 0.02)
    assert len(silent) == 3001
    assert silent.time_of(320) is None  # sent 600 s ago: forgotten
    assert silent.time_of(27_000 * 320) == pytest.approx(26_999 * 0.02)
    assert silent.time_of(30_001 * 320) is None  # not sent yet
