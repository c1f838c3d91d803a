"""Every bad input gets its documented close code (docs/protocol.md, "Close codes"), and a
bad client never disturbs a concurrent good session."""

from __future__ import annotations

import asyncio
import contextlib
import json

import numpy as np
import pytest

from server.codes import CloseCode
from streaming.protocol import TokenFrame, TokenPacket, encode_packet, max_packet_size
from tests.server.conftest import (
    HELLO,
    ServerThread,
    close_code_of,
    connect,
    hello,
    receive_all,
    send_pcm,
    settle,
    start_server,
)


def hello_with(**fields: object) -> str:
    return json.dumps({"type": "hello", "version": 1, **fields})


GOOD_PACKET = encode_packet(
    TokenPacket(1, 0, 0, TokenFrame(1, 33, (1023,))), code_bits=10, gain_bits=6
)
MAX_PACKET = max_packet_size(code_bits=10, gain_bits=6, max_codebooks=12)
"""Largest valid packet of the bundled model (times, Q codebooks, the longest low band)."""

NESTED = "[" * 50_000 + "]" * 50_000
"""JSON text nested far deeper than any parser recursion limit."""


def ping_with_id(id_json: str) -> str:
    """A ping whose `id` is the JSON text `id_json`, given verbatim."""
    return '{"type":"ping","id":' + id_json + "}"


def _sample(server: ServerThread, name: str, labels: dict[str, str]) -> float:
    """The server's current value of metric sample `name` with `labels` (0 if absent)."""
    return server.state.metrics.registry.get_sample_value(name, labels) or 0.0


# (path, messages, close code, text the reason must contain)
BAD_CASES: list[tuple[str, list[str | bytes], int, str]] = [
    ("/v1/encode", [NESTED], CloseCode.INVALID_PAYLOAD, "nested too deeply"),
    ("/v1/encode", [HELLO, NESTED], CloseCode.INVALID_PAYLOAD, "nested too deeply"),
    ("/v1/encode", [HELLO, ping_with_id("NaN")], CloseCode.INVALID_PAYLOAD, "NaN"),
    ("/v1/encode", [HELLO, ping_with_id("Infinity")], CloseCode.INVALID_PAYLOAD, "Infinity"),
    ("/v1/encode", [HELLO, ping_with_id("[-Infinity]")], CloseCode.INVALID_PAYLOAD, "Infinity"),
    ("/v1/encode", [HELLO, ping_with_id("1e400")], CloseCode.INVALID_PAYLOAD, "out of range"),
    ("/v1/encode", [hello_with(bitrate_kbps=float("nan"))], CloseCode.INVALID_PAYLOAD, "NaN"),
    (
        "/v1/encode",
        ['{"type":"hello","version":1,"bitrate_kbps":1' + "0" * 400 + "}"],
        CloseCode.BAD_REQUEST,
        "bitrate_kbps is out of range",
    ),
    (
        "/v1/encode",
        ['{"type":"hello","version":1,"bitrate_kbps":1' + "0" * 5000 + "}"],
        CloseCode.INVALID_PAYLOAD,
        "integer of 5001 digits is out of range",
    ),
    (
        "/v1/encode",
        [HELLO, json.dumps({"type": "set_bitrate", "bitrate_kbps": 10**400})],
        CloseCode.BAD_REQUEST,
        "bitrate_kbps is out of range",
    ),
    (
        "/v1/encode",
        [HELLO, ping_with_id(json.dumps("x" * 255))],  # 257 bytes of JSON
        CloseCode.BAD_REQUEST,
        "ping: id is 257 bytes of JSON, at most 256 allowed",
    ),
    (
        "/v1/rooms/r1",
        [hello_with(send="none", receive="none"), ping_with_id(json.dumps([0] * 1000))],
        CloseCode.BAD_REQUEST,
        "ping: id is",
    ),
    (
        "/v1/decode",
        [hello_with(tokens="json"), json.dumps({"type": "packet", "packet": "[" * 50_000})],
        CloseCode.MALFORMED_PACKET,
        "corrupt: packet is not valid JSON: nested too deeply",
    ),
    (
        "/v1/decode",
        [hello_with(tokens="json"), json.dumps({"type": "packet", "packet": '{"seq": NaN}'})],
        CloseCode.MALFORMED_PACKET,
        "corrupt",
    ),
    ("/v1/encode", ["{not json"], CloseCode.INVALID_PAYLOAD, "not JSON"),
    ("/v1/encode", ["[1, 2]"], CloseCode.INVALID_PAYLOAD, "JSON object"),
    ("/v1/encode", [json.dumps({"type": "flush"})], CloseCode.BAD_REQUEST, "hello"),
    ("/v1/encode", [hello_with(version=2)], CloseCode.UNSUPPORTED_VERSION, "version 2"),
    ("/v1/encode", [json.dumps({"type": "hello"})], CloseCode.BAD_REQUEST, "version"),
    ("/v1/encode", [hello_with(version="1")], CloseCode.BAD_REQUEST, "version"),
    ("/v1/encode", [hello_with(sample_rate=44100)], CloseCode.UNSUPPORTED_FORMAT, "44100"),
    ("/v1/decode", [hello_with(format="s24le")], CloseCode.UNSUPPORTED_FORMAT, "s24le"),
    ("/v1/encode", [hello_with(sample_rate="16000")], CloseCode.UNSUPPORTED_FORMAT, '"16000"'),
    ("/v1/encode", [hello_with(sample_rate=16000.0)], CloseCode.UNSUPPORTED_FORMAT, "16000.0"),
    ("/v1/decode", [hello_with(format=None)], CloseCode.UNSUPPORTED_FORMAT, "format null"),
    ("/v1/encode", [hello_with(bitrate=6)], CloseCode.BAD_REQUEST, "'bitrate'"),
    ("/v1/encode", [hello_with(return_tokens=True)], CloseCode.BAD_REQUEST, "return_tokens"),
    ("/v1/decode", [hello_with(bitrate_kbps=3)], CloseCode.BAD_REQUEST, "bitrate_kbps"),
    (
        "/v1/encode",
        [hello_with(bitrate_kbps=3, num_codebooks=2)],
        CloseCode.BAD_REQUEST,
        "not both",
    ),
    ("/v1/encode", [hello_with(bitrate_kbps=0.5)], CloseCode.BAD_REQUEST, "below"),
    ("/v1/encode", [hello_with(num_codebooks=13)], CloseCode.BAD_REQUEST, "1..12"),
    ("/v1/encode", [hello_with(num_codebooks=True)], CloseCode.BAD_REQUEST, "integer"),
    ("/v1/encode", [hello_with(lowband_layout=1)], CloseCode.BAD_REQUEST, "lowband_layout"),
    (
        "/v1/encode",
        [hello_with(num_codebooks=2, lowband_layout=9)],
        CloseCode.BAD_REQUEST,
        "lowband_layout must be one of 0, 1, 2",
    ),
    (
        "/v1/encode",
        [hello_with(bitrate_kbps=6, lowband_layout=2)],
        CloseCode.BAD_REQUEST,
        "only valid together with num_codebooks",
    ),
    ("/v1/decode", [hello_with(lowband_layout=0)], CloseCode.BAD_REQUEST, "lowband_layout"),
    ("/v1/roundtrip", [hello_with(tokens="binary")], CloseCode.BAD_REQUEST, "json"),
    ("/v1/encode", [b"\x00\x01"], CloseCode.UNSUPPORTED_DATA, "before the hello"),
    ("/v1/decode", [HELLO, b"\xc5\x02\x01"], CloseCode.MALFORMED_PACKET, "truncated"),
    ("/v1/decode", [HELLO, b"\x00" * 17], CloseCode.MALFORMED_PACKET, "bad_magic"),
    (
        "/v1/decode",
        [HELLO, b"\xc5\x01" + GOOD_PACKET[2:]],  # a version-1 packet
        CloseCode.MALFORMED_PACKET,
        "unknown_version",
    ),
    ("/v1/decode", [HELLO, GOOD_PACKET + b"\x00"], CloseCode.MALFORMED_PACKET, "trailing_data"),
    (
        "/v1/decode",
        [HELLO, b"\xc5\x02\x01\x00" + b"\x00" * (MAX_PACKET - 3)],
        CloseCode.MESSAGE_TOO_BIG,
        "oversized",
    ),
    (
        "/v1/decode",
        [hello_with(tokens="json"), json.dumps({"type": "packet", "packet": {}})],
        CloseCode.MALFORMED_PACKET,
        "bad_field",
    ),
    (
        "/v1/decode",
        [HELLO, json.dumps({"type": "packet", "packet": {}})],
        CloseCode.BAD_REQUEST,
        "not valid",
    ),
    ("/v1/encode", [HELLO, b"\x00\x01\x02"], CloseCode.INVALID_PAYLOAD, "whole number"),
    ("/v1/encode", [HELLO, "nope"], CloseCode.INVALID_PAYLOAD, "not JSON"),
    ("/v1/encode", [HELLO, json.dumps({"type": "jump"})], CloseCode.BAD_REQUEST, "unknown"),
    (
        "/v1/encode",
        [HELLO, json.dumps({"type": "flush", "now": 1})],
        CloseCode.BAD_REQUEST,
        "'now'",
    ),
    ("/v1/encode", [HELLO, HELLO], CloseCode.BAD_REQUEST, "already"),
    (
        "/v1/decode",
        [HELLO, json.dumps({"type": "set_bitrate", "num_codebooks": 2})],
        CloseCode.BAD_REQUEST,
        "not valid",
    ),
    (
        "/v1/encode",
        [HELLO, json.dumps({"type": "set_bitrate", "bitrate_kbps": 0})],
        CloseCode.BAD_REQUEST,
        "below",
    ),
    (
        "/v1/rooms/bad%20room",
        [hello_with(send="none", receive="none")],
        CloseCode.BAD_REQUEST,
        "room_id",
    ),
    ("/v1/rooms/r1", [HELLO], CloseCode.BAD_REQUEST, "send"),
    ("/v1/rooms/r1", [hello_with(send="video", receive="none")], CloseCode.BAD_REQUEST, "send"),
    (
        "/v1/rooms/r1",
        [hello_with(send="tokens", receive="tokens", sample_rate=16000)],
        CloseCode.BAD_REQUEST,
        "sample_rate",
    ),
    (
        "/v1/rooms/r1",
        [hello_with(send="none", receive="tokens"), b"\x00\x00"],
        CloseCode.UNSUPPORTED_DATA,
        "none",
    ),
    (
        "/v1/rooms/r1",
        [hello_with(send="tokens", receive="none"), b"\xc5"],
        CloseCode.MALFORMED_PACKET,
        "truncated",
    ),
    (
        "/v1/rooms/r1",
        [hello_with(send="none", receive="none"), json.dumps({"type": "flush"})],
        CloseCode.BAD_REQUEST,
        "not valid",
    ),
]


@pytest.mark.parametrize(("path", "messages", "code", "reason"), BAD_CASES)
async def test_bad_input_gets_its_close_code(
    server: ServerThread, path: str, messages: list[str | bytes], code: int, reason: str
) -> None:
    got_code, got_reason = await close_code_of(server.ws(path), *messages)
    assert (got_code, reason in got_reason) == (code, True), got_reason
    assert len(got_reason.encode()) <= 123


async def test_ping_id_up_to_the_cap_is_echoed(server: ServerThread) -> None:
    ids: list[object] = ["x" * 254, None, {"n": [1, 2.5, "é"]}, 10**100]  # "x"*254: 256 bytes
    async with connect(server.ws("/v1/encode")) as ws:
        await hello(ws)
        for ping_id in ids:
            await ws.send(json.dumps({"type": "ping", "id": ping_id}))
            pong = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert (pong["type"], pong["id"]) == ("pong", ping_id)
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    assert got.code == CloseCode.NORMAL


async def test_message_over_the_limit_is_1009(server: ServerThread) -> None:
    limit = server.settings.max_message_bytes
    code, _ = await close_code_of(server.ws("/v1/encode"), HELLO, b"\x00" * (limit + 2))
    assert code == CloseCode.MESSAGE_TOO_BIG


async def test_handshake_and_idle_timeouts() -> None:
    running = start_server(handshake_timeout_s=0.3, idle_timeout_s=0.4)
    try:
        code, reason = await close_code_of(running.ws("/v1/encode"))
        assert code == CloseCode.TIMEOUT and "handshake" in reason
        async with connect(running.ws("/v1/encode")) as ws:
            await hello(ws)
            got = await receive_all(ws, timeout=5)
        assert got.code == CloseCode.TIMEOUT and "idle" in got.reason
        # rooms have no idle timeout
        async with connect(running.ws("/v1/rooms/quiet")) as ws:
            await hello(ws, send="tokens", receive="tokens")
            await asyncio.sleep(0.8)
            await ws.send(json.dumps({"type": "ping", "id": 1}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"
    finally:
        running.stop()


async def test_bad_clients_do_not_disturb_a_good_session(
    server: ServerThread, clip: np.ndarray
) -> None:
    async def good() -> bytes:
        async with connect(server.ws("/v1/roundtrip")) as ws:
            await hello(ws)
            data = clip.astype("<i2").tobytes()
            for i in range(0, len(data), 6400):  # 200 ms chunks, ~5x real time
                await ws.send(data[i : i + 6400])
                await asyncio.sleep(0.04)
            await ws.send(json.dumps({"type": "end"}))
            got = await receive_all(ws)
        assert got.code == CloseCode.NORMAL
        return b"".join(got.binary)

    async def bad() -> list[int]:
        codes = []
        for path, messages, code, _ in BAD_CASES:
            got, _ = await close_code_of(server.ws(path), *messages)
            codes.append(got)
            assert got == code
        return codes

    reference = await good()
    concurrent, codes = await asyncio.gather(good(), bad())
    assert concurrent == reference  # bit-identical output despite the bad clients
    assert len(codes) == len(BAD_CASES)


async def test_metrics_count_the_errors(server: ServerThread) -> None:
    """Packet errors are counted by error code, binary and JSON packets alike."""
    bad_field = {"error": "bad_field"}
    before = _sample(server, "codecstream_packet_errors_total", bad_field)
    await close_code_of(server.ws("/v1/decode"), HELLO, b"\xc5\x02\x01")
    json_packet = json.dumps({"type": "packet", "packet": {}})
    await close_code_of(server.ws("/v1/decode"), hello_with(tokens="json"), json_packet)
    import httpx

    async with httpx.AsyncClient() as client:
        text = (await client.get(server.http + "/metrics")).text
    assert 'codecstream_protocol_errors_total{code="4422"}' in text
    assert 'codecstream_packet_errors_total{error="truncated"}' in text
    assert _sample(server, "codecstream_packet_errors_total", bad_field) == before + 1
    assert 'codecstream_sessions_closed_total{code="4422",endpoint="decode"}' in text


async def test_pcm_after_end_is_ignored(server: ServerThread, clip: np.ndarray) -> None:
    async with connect(server.ws("/v1/encode")) as ws:
        await hello(ws)
        await send_pcm(ws, clip[:640])
        await ws.send(json.dumps({"type": "end"}))
        await ws.send(b"\x00\x01\x02")  # would be 1007 before `end`
        got = await receive_all(ws)
    assert got.code == CloseCode.NORMAL and len(got.binary) == 2


def _masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client WebSocket frame (FIN, masked with a zero key: payload unchanged)."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload


async def _hello_and_close_in_one_write(port: int, path: str, hello_json: str) -> None:
    """Open a WebSocket by hand and send the hello and a 1000 close frame in one write (a
    client that gives up at once), then wait for the server to hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    writer.write(_masked_frame(1, hello_json.encode()) + _masked_frame(8, b"\x03\xe8"))
    await writer.drain()
    await asyncio.wait_for(reader.read(), 10)  # until the server closes the connection
    writer.close()


@pytest.mark.parametrize("path", ["/v1/encode", "/v1/rooms/quick"])
async def test_a_client_that_closes_right_after_its_hello_is_no_server_failure(
    server: ServerThread, path: str
) -> None:
    """The hello and the close frame in one write: the `ready` reply finds the client gone.
    That is the client's close (counted as such), not an internal error (1011, "session
    failed" in the log), and in a room the others hear nothing of a participant they were
    never told had joined."""
    fields = {"send": "tokens", "receive": "tokens"} if "rooms" in path else {}
    endpoint = "room" if "rooms" in path else "encode"
    def closed(*codes: str) -> float:
        return sum(
            _sample(server, "codecstream_sessions_closed_total", {"endpoint": endpoint, "code": c})
            for c in codes
        )

    async with connect(server.ws("/v1/rooms/quick")) as watcher:
        await hello(watcher, send="none", receive="tokens")
        before = closed("1000", "1005", "1006"), closed(str(int(CloseCode.INTERNAL_ERROR)))
        for _ in range(5):
            await _hello_and_close_in_one_write(server.port, path, hello_with(**fields))
        await settle(server, active=1)
        after = closed("1000", "1005", "1006"), closed(str(int(CloseCode.INTERNAL_ERROR)))
        assert (after[0] - before[0], after[1] - before[1]) == (5, 0)
        events: list[dict[str, object]] = []
        with contextlib.suppress(TimeoutError):
            while True:
                events.append(json.loads(await asyncio.wait_for(watcher.recv(), 0.3)))
        if "rooms" in path:  # each one either joined and left, or was never mentioned
            joined = [e["participant_id"] for e in events if e["type"] == "joined"]
            left = [e["participant_id"] for e in events if e["type"] == "left"]
            assert left == joined
            assert all(e["reason"] == "closed" for e in events if e["type"] == "left")


async def test_a_client_close_code_is_counted_but_never_as_a_protocol_error(
    server: ServerThread,
) -> None:
    """A client closing with its own code: standard codes are counted as they are, others
    under "other" (clients cannot create label series at will), and no client close counts
    as a protocol error (those are the server's closes on a client's error)."""
    def counts() -> tuple[float, ...]:
        closed = "codecstream_sessions_closed_total"
        return (
            _sample(server, closed, {"endpoint": "encode", "code": "other"}),
            _sample(server, closed, {"endpoint": "encode", "code": "1003"}),
            _sample(server, closed, {"endpoint": "encode", "code": "4998"}),
            _sample(server, "codecstream_protocol_errors_total", {"code": "4400"}),
            _sample(server, "codecstream_protocol_errors_total", {"code": "1003"}),
        )

    before = counts()
    for code in (4998, 4997, 4400, 1003):
        async with connect(server.ws("/v1/encode")) as ws:
            await hello(ws)
            await ws.close(code)
    await settle(server)
    assert tuple(a - b for a, b in zip(counts(), before, strict=True)) == (3, 1, 0, 0, 0)
