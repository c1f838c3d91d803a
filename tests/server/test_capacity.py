"""Admission at capacity (server/capacity.py): the slow-frame meter, the setting, and a real
server that refuses new stream sessions while its engine is short of time."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from server.capacity import IDLE_S, MIN_FRAMES, SAMPLE_S, SMOOTHING, SlowFrameMeter
from server.codes import CloseCode
from server.settings import Settings, SettingsError, parse_settings
from tests.server.conftest import (
    HELLO,
    close_code_of,
    connect,
    hello,
    receive_all,
    send_pcm,
    start_server,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_meter_samples_smooths_and_decays_when_idle() -> None:
    clock = FakeClock()
    meter = SlowFrameMeter(clock)
    assert meter.update(0, 0) == 0.0  # the first call is the baseline
    clock.now += SAMPLE_S / 2
    assert meter.update(500, 500) == 0.0  # too soon for a sample
    clock.now += SAMPLE_S / 2
    assert meter.update(500, 500) == pytest.approx(100 * SMOOTHING)  # all late
    clock.now += SAMPLE_S
    assert meter.update(500 + MIN_FRAMES - 1, 500) == pytest.approx(100 * SMOOTHING)  # waits
    clock.now += SAMPLE_S
    first = 100 * SMOOTHING
    expected = first + SMOOTHING * (0.0 - first)
    assert meter.update(1000, 500) == pytest.approx(expected)  # none late in this sample
    clock.now += IDLE_S
    assert meter.update(1000, 500) == 0.0  # idle: room, whatever came before
    assert meter.update(0, 0) == 0.0  # counts went back (a restarted process): new baseline


def test_meter_never_exceeds_100_percent() -> None:
    clock = FakeClock()
    meter = SlowFrameMeter(clock)
    meter.update(0, 0)
    for k in range(1, 41):
        clock.now += SAMPLE_S
        late = meter.update(1000 * k, 5000 * k)  # more misses than checks: capped
    assert late == pytest.approx(100.0, abs=1e-3)


def test_max_slow_percent_setting() -> None:
    assert Settings().max_slow_percent == 2.0
    assert parse_settings(["--max-slow-percent", "100"], {}).max_slow_percent == 100.0
    env = {"CODECSTREAM_MAX_SLOW_PERCENT": "2.5"}
    assert Settings.from_env(env).max_slow_percent == 2.5
    with pytest.raises(SettingsError, match="CODECSTREAM_MAX_SLOW_PERCENT"):
        Settings.from_env({"CODECSTREAM_MAX_SLOW_PERCENT": "101"})
    with pytest.raises(SettingsError, match="max_slow_percent"):
        Settings(max_slow_percent=-1.0)


async def _wait_slow(running: object, above: float, timeout: float = 10.0) -> float:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (slow := running.state.worker.stream_slow_percent()) <= above:  # type: ignore[attr-defined]
        assert loop.time() < end, f"slow frames stayed at {slow} %"
        await asyncio.sleep(0.05)
    return float(slow)


async def test_server_at_capacity_refuses_new_stream_sessions(clip: np.ndarray) -> None:
    """An engine whose frames are all slow (a slow threshold of 0 s): new encode,
    decode and roundtrip sessions get 4429 'server at capacity'; rooms, HTTP and the
    session already running are unaffected; the refusals are counted."""
    running = start_server(engine_processes=0)
    try:
        async with connect(running.ws("/v1/roundtrip")) as running_session:
            await hello(running_session)
            worker = running.state.worker.workers[0]
            worker.slow_s = 0.0  # every frame is slow from now on
            await send_pcm(running_session, clip[: 16000 * 3])
            slow = await _wait_slow(running, 0.5)
            assert slow >= 10.0
            for path in ("/v1/roundtrip", "/v1/encode", "/v1/decode"):
                code, reason = await close_code_of(running.ws(path), HELLO)
                assert code == CloseCode.TOO_MANY_SESSIONS, (path, code, reason)
                assert reason.startswith("server at capacity: ") and "slow" in reason
            async with connect(running.ws("/v1/rooms/cap")) as room:  # rooms still join
                assert (await hello(room, send="tokens", receive="tokens"))["type"] == "ready"
            await send_pcm(running_session, clip[:3200])  # the running session goes on
            await running_session.send(json.dumps({"type": "end"}))
            got = await receive_all(running_session)
            assert got.code == CloseCode.NORMAL and got.binary
        async with httpx.AsyncClient(base_url=running.http) as client:
            text = (await client.get("/metrics")).text
        assert 'codecstream_sessions_refused_total{reason="capacity"} 3.0' in text
        assert "codecstream_engine_slow_percent " in text
    finally:
        running.stop()


async def test_max_slow_percent_100_never_refuses(clip: np.ndarray) -> None:
    running = start_server(engine_processes=0, max_slow_percent=100.0)
    try:
        async with connect(running.ws("/v1/roundtrip")) as first:
            await hello(first)
            running.state.worker.workers[0].slow_s = 0.0
            await send_pcm(first, clip[: 16000 * 3])
            await _wait_slow(running, 10.0)
            async with connect(running.ws("/v1/roundtrip")) as second:
                assert (await hello(second))["type"] == "ready"
    finally:
        running.stop()
