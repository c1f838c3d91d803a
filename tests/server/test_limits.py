"""API keys, session limits and graceful shutdown against real servers."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import numpy as np

from server.codes import CloseCode
from tests.server.conftest import (
    HELLO,
    close_code_of,
    connect,
    hello,
    receive_all,
    send_pcm,
    settle,
    start_server,
)


async def test_api_keys_and_per_key_limit(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nfilekey:1\n", encoding="utf-8")
    running = start_server(api_keys=("alpha", "beta:1"), api_keys_file=keys_file)
    try:
        url = running.ws("/v1/encode")
        code, reason = await close_code_of(url, HELLO)
        assert code == CloseCode.UNAUTHORIZED and "missing API key" in reason
        code, reason = await close_code_of(url, HELLO, additional_headers={"X-API-Key": "nope"})
        assert code == CloseCode.UNAUTHORIZED and reason == "unknown API key"
        code, _ = await close_code_of(running.ws("/v1/rooms/r?api_key=wrong"), HELLO)
        assert code == CloseCode.UNAUTHORIZED
        # the three ways to give a key
        for kwargs, path in (
            ({"additional_headers": {"Authorization": "Bearer alpha"}}, "/v1/decode"),
            ({"additional_headers": {"X-API-Key": "alpha"}}, "/v1/decode"),
            ({}, "/v1/decode?api_key=alpha"),
        ):
            async with connect(running.ws(path), **kwargs) as ws:
                assert (await hello(ws))["endpoint"] == "decode"
        # per-key limit: beta may hold one session, alpha others meanwhile
        async with connect(running.ws("/v1/decode?api_key=beta")) as first:
            await hello(first)
            code, reason = await close_code_of(running.ws("/v1/decode?api_key=beta"), HELLO)
            assert code == CloseCode.TOO_MANY_SESSIONS and "API key" in reason
            async with connect(running.ws("/v1/decode?api_key=filekey")) as other:
                await hello(other)
        await settle(running)
        async with connect(running.ws("/v1/decode?api_key=beta")) as again:  # slot released
            await hello(again)
        async with httpx.AsyncClient(base_url=running.http) as client:
            denied = await client.get("/v1/models")
            assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
            assert (await client.post("/v1/encode", content=b"x")).status_code == 401
            ok = await client.get("/v1/models", headers={"Authorization": "Bearer alpha"})
            assert ok.status_code == 200
            assert (await client.get("/healthz")).status_code == 200
            metrics = (await client.get("/metrics")).text
        assert 'codecstream_auth_failures_total{reason="missing"}' in metrics
        assert 'codecstream_auth_failures_total{reason="unknown"}' in metrics
    finally:
        running.stop()


async def test_server_full() -> None:
    running = start_server(max_sessions=2)
    try:
        url = running.ws("/v1/decode")
        async with connect(url) as a, connect(url) as b:
            await hello(a)
            await hello(b)
            code, reason = await close_code_of(url, HELLO)
            assert code == CloseCode.TOO_MANY_SESSIONS and "server full" in reason
            async with httpx.AsyncClient(base_url=running.http) as client:
                busy = await client.post("/v1/encode", content=b"x")
            assert busy.status_code == 429
            await a.send(json.dumps({"type": "ping", "id": 1}))  # the two are unaffected
            assert json.loads(await a.recv())["type"] == "pong"
        await settle(running)
        async with connect(url) as c:  # slots freed on close
            await hello(c)
    finally:
        running.stop()


async def test_graceful_shutdown_closes_sessions_with_1001(clip: np.ndarray) -> None:
    running = start_server(shutdown_timeout_s=3.0)
    stopped = False
    try:
        async with (
            connect(running.ws("/v1/roundtrip")) as stream,
            connect(running.ws("/v1/rooms/bye")) as room,
            connect(running.ws("/v1/encode")) as waiting,
        ):
            await hello(stream)
            await hello(room, send="none", receive="pcm")
            await send_pcm(stream, clip[:3200])
            await asyncio.sleep(0.1)
            stopper = threading.Thread(target=running.stop)
            stopper.start()
            results = await asyncio.gather(
                receive_all(stream, 10), receive_all(room, 10), receive_all(waiting, 10)
            )
            await asyncio.to_thread(stopper.join, 20)
            stopped = True
        for got in results:
            assert (got.code, got.reason) == (CloseCode.GOING_AWAY, "server shutting down")
        # the stream got its output up to the shutdown, the room its PCM ticks
        assert results[0].binary and results[1].binary
        assert not running.thread.is_alive()
    finally:
        if not stopped:
            running.stop()


async def test_refused_connection_does_not_leak_slots() -> None:
    running = start_server(max_sessions=1, api_keys=("k",))
    try:
        for _ in range(3):
            code, _ = await close_code_of(running.ws("/v1/encode"), HELLO)
            assert code == CloseCode.UNAUTHORIZED
        async with connect(running.ws("/v1/encode?api_key=k")) as ws:
            await hello(ws)
        await settle(running)
    finally:
        running.stop()


async def test_client_that_vanishes_mid_stream_is_cleaned_up(clip: np.ndarray) -> None:
    running = start_server()
    try:
        ws = await connect(running.ws("/v1/roundtrip"))
        await hello(ws)
        await send_pcm(ws, clip)
        ws.transport.abort()  # no close frame
        await settle(running)
        async with connect(running.ws("/v1/encode")) as again:
            await hello(again)
    finally:
        running.stop()


async def test_client_that_stops_reading_is_closed_after_send_timeout() -> None:
    """Decoded 48 kHz float PCM (3840 bytes/frame) to a client that never reads: once the
    socket buffers are full the server's send blocks, and the watchdog closes with 4408."""
    running = start_server(send_timeout_s=0.5)
    try:
        from streaming.protocol import TokenFrame, TokenPacket, encode_packet

        packet = encode_packet(
            TokenPacket(1, 0, 0, TokenFrame(1, 40, (5,))), code_bits=10, gain_bits=6
        )
        ws = await connect(running.ws("/v1/decode"), max_queue=1)
        await hello(ws, sample_rate=48000, format="f32le")
        for _ in range(4000):  # 15 MB of output
            await ws.send(packet)
        await settle(running, active=0, timeout=30)
        ws.transport.abort()
        async with httpx.AsyncClient(base_url=running.http) as client:
            text = (await client.get("/metrics")).text
        assert 'codecstream_sessions_closed_total{code="4408",endpoint="decode"} 1.0' in text
    finally:
        running.stop()
