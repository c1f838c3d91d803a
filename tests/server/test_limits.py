"""API keys, session limits and graceful shutdown against real servers."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection

from server.codes import CloseCode
from server.outbox import CONTROL_LIMIT
from tests.server.conftest import (
    HELLO,
    ServerThread,
    close_code_of,
    connect,
    hello,
    non_reading_client,
    receive_all,
    send_pcm,
    settle,
    small_buffer_socket,
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
            # a proxy's own Bearer token does not hide the client's valid key
            ({"additional_headers": {"Authorization": "Bearer proxy", "X-API-Key": "alpha"}},
             "/v1/decode"),
            ({"additional_headers": {"X-API-Key": "proxy"}}, "/v1/decode?api_key=alpha"),
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


# ---- control replies of a client that does not read ---------------------------------------


def session_of(running: ServerThread, ready: dict[str, Any]) -> Any:
    """The server's session object of the connection that got `ready`."""
    (session,) = [s for s in running.state.sessions if s.session_id == ready["session_id"]]
    return session


class Flood:
    """Sends `messages` in turn, over and over, in the background until `stop()` (never
    reads)."""

    def __init__(self, ws: ClientConnection, *messages: str) -> None:
        self.sent = 0
        self._stopped = False
        self.task = asyncio.create_task(self._run(ws, messages))

    async def _run(self, ws: ClientConnection, messages: tuple[str, ...]) -> None:
        while not self._stopped:
            await ws.send(messages[self.sent % len(messages)])
            self.sent += 1
            if self.sent % 64 == 0:
                await asyncio.sleep(0)  # a send that never blocks would starve the test

    def stop(self) -> None:
        self._stopped = True


FLOOD_LIMIT_BYTES = 64 << 20
"""A flood this large without the server pausing its reading is a failure of flow control
(it pauses after its outbox limit plus the socket buffers: a few MB)."""

FLOOD_SEND_TIMEOUT_S = 600.0
"""`send_timeout_s` of the flood tests' servers: their sends block while the client floods
without reading, and on a loaded machine filling the buffers may take longer than the
default 10 s; the send timeout has its own test."""


@pytest.fixture(scope="module")
def flood_server() -> Iterator[ServerThread]:
    """A server whose send timeout never races a slow flood (`FLOOD_SEND_TIMEOUT_S`)."""
    running = start_server(send_timeout_s=FLOOD_SEND_TIMEOUT_S)
    yield running
    running.stop()


async def flood_until_server_stops_reading(
    running: ServerThread, ws: ClientConnection, session: Any, *messages: str
) -> tuple[Flood, int]:
    """Flood `messages` without reading until the server has stopped reading the session
    (flow control) and nothing moves any more; (the flood, most messages ever seen in the
    session's outbox).  The flood is stopped when this returns or fails."""
    registry = running.state.metrics.registry
    labels = {"endpoint": session.endpoint.value}

    def received() -> float:
        return registry.get_sample_value("codecstream_bytes_received_total", labels) or 0.0

    flood = Flood(ws, *messages)
    peak = 0
    loop = asyncio.get_running_loop()
    hang_guard = loop.time() + 120  # only against a hang: the check is on volume, not time
    try:
        while True:
            # The server must stop reading once its outbox and the kernel's socket buffers
            # (a few MB on loopback) are full, however slowly a loaded machine floods it.
            volume = sum(len(m) for m in messages) * flood.sent / len(messages)
            assert volume < FLOOD_LIMIT_BYTES, f"the server kept reading ({flood.sent} sent)"
            assert loop.time() < hang_guard, f"no stall and no progress ({flood.sent} sent)"
            assert not session.closing and not flood.task.done()
            before = received()
            await asyncio.sleep(0.05)
            peak = max(peak, len(session.outbox))
            if session.reading_paused and received() == before:  # stalled by flow control
                return flood, peak
    finally:
        flood.stop()


async def read_replies(ws: ClientConnection, flood: Flood, session: Any) -> list[dict[str, Any]]:
    """Read until every message of the (stopped) flood got its reply."""
    replies: list[dict[str, Any]] = []
    while not flood.task.done() or len(replies) < flood.sent:
        try:
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        except TimeoutError:
            raise AssertionError(  # what both ends were doing, should this ever happen
                f"no reply for 10 s: {len(replies)} replies to {flood.sent} messages, flood "
                f"{'done' if flood.task.done() else 'sending'}, client write buffer "
                f"{ws.transport.get_write_buffer_size()} B; server outbox {len(session.outbox)} "
                f"({session.outbox.urgent} urgent), {session._pending_controls} requests "
                f"unanswered, reading paused {session.reading_paused}, send blocked "
                f"{session._tx_since is not None}, closing {session.closing}"
            ) from None
    await flood.task
    return replies


@pytest.mark.parametrize("path", ["/v1/encode", "/v1/rooms/pings"])
async def test_ping_flood_without_reading_is_flow_controlled(
    flood_server: ServerThread, path: str
) -> None:
    """A client that sends pings and does not read: the server holds at most CONTROL_LIMIT
    pongs, stops reading (TCP slows the client down), and answers every ping once the client
    reads."""
    server = flood_server
    fields = {"send": "none", "receive": "none"} if "rooms" in path else {}
    async with non_reading_client(server, path) as ws:
        ready = await hello(ws, **fields)
        session = session_of(server, ready)
        ping = json.dumps({"type": "ping", "id": "x" * 240})
        flood, peak = await flood_until_server_stops_reading(server, ws, session, ping)
        assert peak <= CONTROL_LIMIT and len(session.outbox) <= CONTROL_LIMIT
        assert not session.closing
        pongs = await read_replies(ws, flood, session)
        assert len(pongs) == flood.sent
        assert all(
            p == {"type": "pong", "id": "x" * 240, "server_time_us": p["server_time_us"]}
            for p in pongs
        )
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    assert got.of_type("end") and got.code == CloseCode.NORMAL


async def test_set_bitrate_flood_without_reading_is_flow_controlled() -> None:
    """`bitrate` replies wait in the stream's ordered lane, pongs in the urgent lane: at
    most CONTROL_LIMIT replies of both kinds are owed, then the server stops reading; every
    request is answered once the client reads."""
    running = start_server(engine_processes=0, send_timeout_s=FLOOD_SEND_TIMEOUT_S)
    try:
        async with non_reading_client(running, "/v1/encode") as ws:
            session = session_of(running, await hello(ws))
            request = json.dumps({"type": "set_bitrate", "num_codebooks": 1})
            ping = json.dumps({"type": "ping", "id": "x" * 240})
            flood, peak = await flood_until_server_stops_reading(
                running, ws, session, request, ping
            )
            assert peak <= CONTROL_LIMIT and len(session.outbox) <= CONTROL_LIMIT
            assert session.outbox.urgent + session._pending_controls <= CONTROL_LIMIT
            replies = await read_replies(ws, flood, session)
            bitrates = [r for r in replies if r["type"] == "bitrate"]
            assert len(bitrates) == (flood.sent + 1) // 2
            assert len(replies) - len(bitrates) == flood.sent // 2  # the pongs
            assert bitrates[-1] == {
                "type": "bitrate",
                "num_codebooks": 1,
                "lowband_layout": 0,
                "bitrate_kbps": bitrates[0]["bitrate_kbps"],
                "from_frame": 0,
            }
            await ws.send(json.dumps({"type": "end"}))
            got = await receive_all(ws)
        assert got.of_type("end") and got.code == CloseCode.NORMAL
    finally:
        running.stop()


async def test_client_that_floods_and_vanishes_is_cleaned_up(
    flood_server: ServerThread,
) -> None:
    """While its reading is paused (flow control), a client that disconnects is still
    noticed: lease and room slot are released well before any timeout."""
    server = flood_server
    url = server.ws("/v1/rooms/vanish")
    async with connect(url) as other:
        await hello(other, send="none", receive="none")
        ws = await connect(url, max_queue=1, sock=small_buffer_socket(server.port))
        session = session_of(server, await hello(ws, send="none", receive="none"))
        ping = json.dumps({"type": "ping", "id": "x" * 240})
        flood, _ = await flood_until_server_stops_reading(server, ws, session, ping)
        ws.transport.abort()
        await settle(server, active=1)
        flood.task.cancel()
        await asyncio.gather(flood.task, return_exceptions=True)
        assert list(server.state.rooms.rooms["vanish"].participants) == [1]


async def test_flush_padding_builds_up_no_flow_control_credit(server: ServerThread) -> None:
    """A flush pads a one-sample chunk out to a whole frame: that output answers the one
    sample, not 20 ms, so cycles of tiny chunks and flushes leave nothing unanswered and no
    credit (before the fix: -19.94 ms per cycle, room for a later flood past
    `max_backlog_ms`)."""
    async with connect(server.ws("/v1/encode")) as ws:
        session = session_of(server, await hello(ws))
        for _ in range(10):
            await ws.send(b"\x01\x00")  # one s16le sample
            await ws.send(json.dumps({"type": "flush"}))
            packets = 0
            while True:
                message = await asyncio.wait_for(ws.recv(), 10)
                if isinstance(message, bytes):
                    packets += 1
                    continue
                assert json.loads(message)["type"] == "flushed"
                break
            assert packets == 1  # the padded frame
        assert session.unanswered_ms == 0.0
        await ws.send(b"\x00\x00" * 160)  # 10 ms, half a frame: unanswered until a flush
        await settle_until(lambda: session.unanswered_ms > 0)
        assert session.unanswered_ms == pytest.approx(10.0)
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    assert got.of_type("end") and got.code == CloseCode.NORMAL


async def settle_until(condition: Any, timeout: float = 5.0) -> None:
    """Wait (polling the loop) until `condition()` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
