"""Voice-call rooms against a real server: forwarding, mixing, events, isolation, limits."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from typing import Any

import numpy as np
import pytest
import websockets

from server.codes import CloseCode
from server.outbox import CONTROL_LIMIT
from streaming.protocol import PacketTimes, TokenFrame, TokenPacket, encode_packet, ts_diff
from tests.server.conftest import (
    CARD,
    CODE_BITS,
    GAIN_BITS,
    OTHER_CLIP,
    ServerThread,
    close_code_of,
    connect,
    encode_with_server,
    hello,
    load_clip,
    non_reading_client,
    parse_packets,
    receive_all,
    settle,
    start_server,
)
from tests.server.test_limits import session_of

FRAMES = 30


@pytest.fixture(scope="module")
def token_packets(server: ServerThread) -> list[TokenPacket]:
    """Real token frames of a speech clip (from the server's encoder) as client packets."""

    async def run() -> list[TokenPacket]:
        got = await encode_with_server(
            server, load_clip(OTHER_CLIP)[: 320 * FRAMES], bitrate_kbps=3
        )
        return parse_packets(got.binary)

    packets = asyncio.run(run())
    assert len(packets) == FRAMES
    return packets


def client_packets(packets: list[TokenPacket], stream_id: int, times: bool) -> list[bytes]:
    out = []
    for p in packets:
        p = dataclasses.replace(
            p, stream_id=stream_id, times=PacketTimes(123456) if times else None
        )
        out.append(encode_packet(p, code_bits=CODE_BITS, gain_bits=GAIN_BITS))
    return out


async def drain(
    ws: Any, seconds: float, *, expect: int | None = None, event: str | None = None
) -> tuple[list[bytes], list[dict[str, Any]]]:
    """Messages received within `seconds` (without closing); stops 0.1 s after `expect`
    binary messages or an event of type `event` arrived."""
    binary: list[bytes] = []
    text: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (left := end - loop.time()) > 0:
        if (expect is not None and len(binary) >= expect) or (
            event is not None and any(m["type"] == event for m in text)
        ):
            end = min(end, loop.time() + 0.1)
            expect = event = None
            left = end - loop.time()
        try:
            message = await asyncio.wait_for(ws.recv(), left)
        except TimeoutError:
            break
        if isinstance(message, bytes):
            binary.append(message)
        else:
            text.append(json.loads(message))
    return binary, text


async def test_two_token_participants_exchange_packets_unchanged(
    server: ServerThread, token_packets: list[TokenPacket]
) -> None:
    url = server.ws("/v1/rooms/two")
    async with connect(url) as a, connect(url) as b:
        ra = await hello(a, send="tokens", receive="tokens", name="alice")
        assert ra["participants"] == [] and ra["room_id"] == "two"
        rb = await hello(b, send="tokens", receive="tokens", name="bob")
        pa, pb = ra["participant_id"], rb["participant_id"]
        assert rb["participants"] == [
            {"participant_id": pa, "send": "tokens", "receive": "tokens", "name": "alice"}
        ]
        joined = json.loads(await asyncio.wait_for(a.recv(), 5))
        assert joined == {
            "type": "joined",
            "participant_id": pb,
            "send": "tokens",
            "receive": "tokens",
            "name": "bob",
        }
        sent_a = client_packets(token_packets, stream_id=999, times=True)
        sent_b = client_packets(token_packets[:10], stream_id=5, times=False)
        for data in sent_a:
            await a.send(data)
        for data in sent_b:
            await b.send(data)
        got_b, _ = await drain(b, 5.0, expect=FRAMES)
        got_a, _ = await drain(a, 5.0, expect=10)
        await a.send(json.dumps({"type": "end"}))
        end_a = await receive_all(a)
        _, events = await drain(b, 5.0, event="left")
    assert len(got_b) == FRAMES and len(got_a) == 10  # nobody gets its own packets
    for sent, got in zip(sent_a, got_b, strict=True):
        assert len(got) == len(sent)
        assert got[:4] == sent[:4]
        assert int.from_bytes(got[4:8], "big") == pa  # stream id rewritten
        assert got[8:18] == sent[8:18]  # seq, timestamp, client_send_us unchanged
        assert got[26:] == sent[26:]  # payload byte for byte
    for p in parse_packets(got_b):
        assert p.times is not None and p.times.client_send_us == 123456
        assert p.times.server_recv_us and p.times.server_send_us
        assert 0 <= ts_diff(p.times.server_send_us, p.times.server_recv_us) < 1_000_000
    for sent, got in zip(sent_b, got_a, strict=True):
        assert got[:4] == sent[:4] and got[8:] == sent[8:]
        assert int.from_bytes(got[4:8], "big") == pb
    assert end_a.code == CloseCode.NORMAL
    assert end_a.of_type("end")[0] == {
        "type": "end",
        "frames": FRAMES,
        "late_frames": 0,
        "dropped_frames": 0,
    }
    assert {"type": "left", "participant_id": pa, "reason": "end"} in events


async def test_three_participants_tokens_pcm_sender_and_mixed_pcm_receiver(
    server: ServerThread, token_packets: list[TokenPacket]
) -> None:
    """A sends tokens, B sends PCM (server encodes), C sends tokens and receives the mix."""
    url = server.ws("/v1/rooms/three")
    speech = load_clip(OTHER_CLIP)
    async with connect(url) as a, connect(url) as b, connect(url) as c:
        pa = (await hello(a, send="tokens", receive="tokens"))["participant_id"]
        rb = await hello(b, send="pcm", receive="tokens", num_codebooks=2, timestamps=True)
        pb = rb["participant_id"]
        rc = await hello(c, send="tokens", receive="pcm", sample_rate=8000)
        pc = rc["participant_id"]
        assert rc["frame_samples"] == 160
        packets_a = client_packets(token_packets, stream_id=1, times=False)
        packets_c = client_packets(token_packets[: FRAMES // 2], stream_id=1, times=False)
        pcm_b = speech[: 320 * FRAMES].astype("<i2").tobytes()
        for i in range(FRAMES):  # real time: one frame per participant every 20 ms
            await a.send(packets_a[i])
            await b.send(pcm_b[640 * i : 640 * (i + 1)])
            if i < len(packets_c):
                await c.send(packets_c[i])
            await asyncio.sleep(0.02)
        (got_a, _), (got_b, _), (got_c, ev_c) = await asyncio.gather(
            drain(a, 5.0, expect=FRAMES * 3 // 2),
            drain(b, 5.0, expect=FRAMES * 3 // 2),
            drain(c, 0.5),
        )
    ids_a = [p.stream_id for p in parse_packets(got_a)]
    ids_b = [p.stream_id for p in parse_packets(got_b)]
    assert sorted(set(ids_a)) == sorted({pb, pc}) and ids_a.count(pc) == FRAMES // 2
    assert ids_a.count(pb) == FRAMES  # B's PCM, encoded by the server
    assert sorted(set(ids_b)) == sorted({pa, pc})
    assert ids_b.count(pa) == FRAMES and ids_b.count(pc) == FRAMES // 2
    from_b = [p for p in parse_packets(got_a) if p.stream_id == pb]
    assert [p.seq for p in from_b] == list(range(FRAMES))
    assert all(p.num_codebooks == 2 and p.times is not None for p in from_b)
    # C: one 20 ms message of 8 kHz s16le per tick, the mix of A and B
    assert got_c and all(len(m) == 320 for m in got_c[1:-1])
    assert FRAMES - 5 <= len(got_c) <= FRAMES + 60
    mix = np.frombuffer(b"".join(got_c), dtype="<i2").astype(np.float32)
    assert np.all(np.isfinite(mix)) and np.abs(mix).max() > 0
    assert not any(m["type"] == "left" for m in ev_c)


async def test_room_isolation_and_left_on_disconnect(
    server: ServerThread, token_packets: list[TokenPacket]
) -> None:
    async with (
        connect(server.ws("/v1/rooms/iso-a")) as a,
        connect(server.ws("/v1/rooms/iso-b")) as other,
    ):
        await hello(other, send="none", receive="tokens")
        await hello(a, send="tokens", receive="none")
        async with connect(server.ws("/v1/rooms/iso-a")) as b:
            pb = (await hello(b, send="none", receive="tokens"))["participant_id"]
            for data in client_packets(token_packets[:5], 1, False):
                await a.send(data)
            got_b, _ = await drain(b, 5.0, expect=5)
        assert len(got_b) == 5
        got_other, events = await drain(other, 0.2)
        assert got_other == [] and events == []  # another room hears nothing
        _, events_a = await drain(a, 5.0, event="left")
        assert {"type": "left", "participant_id": pb, "reason": "closed"} in events_a


async def test_room_full_and_over_real_time_sender() -> None:
    running = start_server(room_max_participants=2, max_backlog_ms=200)
    try:
        url = running.ws("/v1/rooms/full")
        async with connect(url) as a, connect(url) as b:
            await hello(a, send="tokens", receive="none")
            await hello(b, send="none", receive="tokens")
            code, reason = await close_code_of(
                url, json.dumps({"type": "hello", "version": 1, "send": "none", "receive": "none"})
            )
            assert code == CloseCode.ROOM_FULL and "full" in reason
            packets = parse_packets(
                (await encode_with_server(running, load_clip()[: 320 * 40])).binary
            )
            for data in client_packets(packets, 1, False):  # 800 ms at once, burst is 200 ms
                await a.send(data)
            await a.send(json.dumps({"type": "end"}))
            end = (await receive_all(a)).of_type("end")[0]
            got_b, _ = await drain(b, 5.0, expect=end["frames"])
        assert end["frames"] + end["dropped_frames"] == 40
        assert 8 <= end["frames"] <= 14 and len(got_b) == end["frames"]
    finally:
        running.stop()


async def test_room_set_bitrate_for_pcm_sender(server: ServerThread) -> None:
    url = server.ws("/v1/rooms/rate")
    pcm = load_clip()[: 320 * 6].astype("<i2").tobytes()
    async with connect(url) as a, connect(url) as b:
        await hello(b, send="none", receive="tokens")
        await hello(a, send="pcm", receive="none", bitrate_kbps=6)
        await a.send(pcm[: 640 * 3])
        await a.send(json.dumps({"type": "set_bitrate", "num_codebooks": 1}))
        await a.send(pcm[640 * 3 :])
        reply = json.loads(await asyncio.wait_for(a.recv(), 5))
        got, _ = await drain(b, 5.0, expect=6)
    assert reply == {
        "type": "bitrate",
        "num_codebooks": 1,
        "lowband_layout": 0,
        "bitrate_kbps": round(CARD.bitrate_kbps(1), 4),
        "from_frame": 3,
    }
    six = CARD.mode_for_bitrate(6)
    frames = [p.frame for p in parse_packets(got)]
    assert [f.num_codebooks for f in frames] == [six.num_codebooks] * 3 + [1] * 3
    assert {f.lowband_layout for f in frames[:3]} <= {0, six.lowband_layout}
    assert {f.lowband_layout for f in frames[3:]} == {0}


async def test_listener_without_senders_gets_silence(server: ServerThread) -> None:
    async with connect(server.ws("/v1/rooms/alone")) as ws:
        await hello(ws, send="none", receive="pcm", format="f32le")
        got, _ = await drain(ws, 0.3)
    assert 5 <= len(got) <= 25
    assert all(np.frombuffer(m, dtype="<f4").max(initial=0) == 0 for m in got)


async def test_room_survives_a_participant_error(server: ServerThread) -> None:
    url = server.ws("/v1/rooms/err")
    async with connect(url) as a, connect(url) as b:
        await hello(a, send="tokens", receive="tokens")
        pb = (await hello(b, send="tokens", receive="tokens"))["participant_id"]
        await b.send(b"\xc5\x02")  # truncated
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(b.recv(), 5)
        assert b.close_code == CloseCode.MALFORMED_PACKET
        _, events = await drain(a, 5.0, event="left")
        assert {"type": "left", "participant_id": pb, "reason": "error"} in [
            e for e in events if e["type"] == "left"
        ]
        await a.send(json.dumps({"type": "ping"}))
        assert json.loads(await asyncio.wait_for(a.recv(), 5))["type"] == "pong"


async def block_sends(running: ServerThread, ws: Any, session: Any) -> tuple[int, int]:
    """Send pings in small batches, each read and answered by the server before the next,
    without reading the pongs, until the server's sends block (the pongs stay queued and
    nothing more goes out); (pongs then queued, pings sent).  Fewer than CONTROL_LIMIT
    pongs are queued, so the server still reads the session."""
    registry = running.state.metrics.registry
    labels = {"endpoint": session.endpoint.value}

    def total(name: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    ping = json.dumps({"type": "ping", "id": "x" * 240})
    pings = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        assert loop.time() < deadline, f"the sends never blocked ({pings} pings)"
        batch = CONTROL_LIMIT - 1 - session.outbox.urgent  # never a full urgent lane
        expected = total("codecstream_bytes_received_total") + batch * len(ping)
        for _ in range(batch):
            await ws.send(ping)
        pings += batch
        while total("codecstream_bytes_received_total") < expected:
            assert loop.time() < deadline, f"the server stopped reading ({pings} pings)"
            await asyncio.sleep(0.001)
        if session.outbox.urgent:
            sent = total("codecstream_bytes_sent_total")
            await asyncio.sleep(0.05)
            if total("codecstream_bytes_sent_total") == sent and session.outbox.urgent:
                return int(session.outbox.urgent), pings


async def test_end_reply_is_not_pushed_out_by_packets_forwarded_after_it() -> None:
    """B's `end` is queued behind replies its client has not read yet; A then sends more
    than `send_queue` packets.  B still gets `end` and the 1000 close, and its lease and
    room slot are released (the packets forwarded after `end` are discarded)."""
    running = start_server(send_queue=3, engine_processes=0)
    try:
        path = "/v1/rooms/evict"
        async with non_reading_client(running, path) as b, connect(running.ws(path)) as a:
            session_b = session_of(running, await hello(b, send="none", receive="tokens"))
            await hello(a, send="tokens", receive="none")
            assert json.loads(await asyncio.wait_for(b.recv(), 5))["type"] == "joined"
            # 1. B's sender blocks (B sends pings and does not read) with pongs queued but
            #    B's reading not paused
            queued, pings = await block_sends(running, b, session_b)
            assert 0 < queued < CONTROL_LIMIT
            # 2. B ends: the `end` reply is queued behind the unsent pongs
            await b.send(json.dumps({"type": "end"}))
            while not session_b.outbox.finished:
                await asyncio.sleep(0.005)
            assert session_b.outbox.urgent > 0 and not session_b.closing
            # 3. A sends more packets than B's send queue holds (and a ping: all handled)
            packet = encode_packet(
                TokenPacket(0, 0, 0, TokenFrame(1, 30, (5,))),
                code_bits=CODE_BITS,
                gain_bits=GAIN_BITS,
            )
            for _ in range(10):
                await a.send(packet)
            await a.send(json.dumps({"type": "ping"}))
            assert json.loads(await asyncio.wait_for(a.recv(), 5))["type"] == "pong"
            # 4. B reads everything: the rest of its pongs, `end`, then the close
            got = await receive_all(b, timeout=15)
            assert len(got.of_type("pong")) == pings
            assert got.text[-1]["type"] == "end" and got.code == CloseCode.NORMAL
            assert got.binary == []  # forwarded after `end`: discarded
            await settle(running, active=1)
            assert list(running.state.rooms.rooms["evict"].participants) == [2]
            _, events = await drain(a, 5.0, event="left")
            assert {"type": "left", "participant_id": 1, "reason": "end"} in events
        await settle(running, active=0)
        assert running.state.rooms.rooms == {}
    finally:
        running.stop()


async def test_events_to_a_participant_that_does_not_read_close_it_with_4408(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Events (`joined`, `left`) are never dropped; when CONTROL_LIMIT of them (and other
    control replies) wait unsent, one more closes the participant with 4408 (its client
    does not read, so the close frame itself may not get through: the server's metrics and
    log say why)."""
    caplog.set_level(logging.INFO, logger="codecstream.session")
    running = start_server(engine_processes=0)
    try:
        path = "/v1/rooms/events"
        url = running.ws(path)
        async with non_reading_client(running, path) as b, connect(url) as a:
            session_b = session_of(running, await hello(b, send="none", receive="none"))
            await hello(a, send="none", receive="none")
            queued, _ = await block_sends(running, b, session_b)
            visits = 0
            while not session_b.closing:  # each visit: `joined` and `left` to B (and A)
                assert visits < CONTROL_LIMIT, "the events never overflowed"
                async with connect(url) as visitor:
                    await hello(visitor, send="none", receive="none")
                visits += 1
                for kind in ("joined", "left"):
                    assert json.loads(await asyncio.wait_for(a.recv(), 5))["type"] == kind
            assert 2 * visits >= CONTROL_LIMIT - queued
            left = json.loads(await asyncio.wait_for(a.recv(), 5))
            assert left == {"type": "left", "participant_id": 1, "reason": "error"}
            got = await receive_all(b, timeout=15)
        assert got.code is not None  # closed (4408, or 1006 when the frame did not fit)
        await settle(running, active=0)
        value = running.state.metrics.registry.get_sample_value(
            "codecstream_sessions_closed_total", {"endpoint": "room", "code": "4408"}
        )
        assert value == 1.0
        reason = (
            f"send queue full: {CONTROL_LIMIT} control messages unsent, the client is not reading"
        )
        assert any(reason in r.getMessage() for r in caplog.records)
    finally:
        running.stop()
