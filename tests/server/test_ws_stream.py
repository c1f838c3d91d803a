"""The stream WebSocket endpoints against a real server with a real speech clip.

The bundled model may have random weights: the checks are about behaviour (frame counts,
packet contents, sizes, order, close codes, timestamps), plus a sanity check of the audio
(length, finite values), never its quality.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import numpy as np

from server.codes import CloseCode
from streaming.protocol import (
    TokenPacket,
    decode_packet,
    encode_packet,
    packet_from_json,
    packet_to_json,
    ts_diff,
)
from tests.server.conftest import (
    Received,
    ServerThread,
    connect,
    hello,
    receive_all,
    send_pcm,
)

Q, CODE_BITS, GAIN_BITS = 12, 10, 6


def frames_of(samples: int, frame: int = 320) -> int:
    return math.ceil(samples / frame)


def packets(got: Received) -> list[TokenPacket]:
    return [
        decode_packet(m, code_bits=CODE_BITS, gain_bits=GAIN_BITS, max_codebooks=Q)
        for m in got.binary
    ]


async def encode_clip(server: ServerThread, pcm: np.ndarray, **fields: object) -> Received:
    async with connect(server.ws("/v1/encode")) as ws:
        ready = await hello(ws, **fields)
        assert ready["endpoint"] == "encode"
        await send_pcm(ws, pcm)
        await ws.send(json.dumps({"type": "end"}))
        return await receive_all(ws)


async def test_encode_one_packet_per_frame(server: ServerThread, clip: np.ndarray) -> None:
    async with connect(server.ws("/v1/encode")) as ws:
        ready = await hello(ws, bitrate_kbps=3)
        assert ready["num_codebooks"] == 5 and ready["bitrate_kbps"] == 3.0
        assert ready["frame_size"] == 320 and ready["sample_rate_model"] == 16000
        assert ready["max_codebooks"] == Q and ready["code_bits"] == CODE_BITS
        assert ready["algorithmic_latency_ms"] == 20.0
        await send_pcm(ws, clip, chunk=333)  # chunking that does not align with frames
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    assert got.code == CloseCode.NORMAL
    expected = frames_of(len(clip))
    pkts = packets(got)
    assert len(pkts) == expected
    assert [p.seq for p in pkts] == list(range(expected))
    assert [p.timestamp_us for p in pkts] == [20000 * i for i in range(expected)]
    assert {p.stream_id for p in pkts} == {ready["stream_id"]}
    assert all(p.num_codebooks == 5 and p.times is None for p in pkts)
    assert all(len(m) == 14 + 8 for m in got.binary)  # 60 bits -> 8 bytes of payload
    (end,) = got.of_type("end")
    assert end["frames"] == expected and end["dropped_frames"] == 0


async def test_encode_is_chunking_invariant_and_matches_decode_roundtrip(
    server: ServerThread, clip: np.ndarray
) -> None:
    a = packets(await encode_clip(server, clip))
    async with connect(server.ws("/v1/encode")) as ws:
        await hello(ws)
        await send_pcm(ws, clip, chunk=4000)
        await ws.send(json.dumps({"type": "end"}))
        b = packets(await receive_all(ws))
    assert [p.frame for p in a] == [p.frame for p in b]
    assert all(p.num_codebooks == 11 for p in a)  # default 6 kbps


async def test_encode_json_tokens_with_timestamps(server: ServerThread, clip: np.ndarray) -> None:
    part = clip[:3200]  # 10 frames
    t0 = time.perf_counter()
    got = await encode_clip(server, part, tokens="json", timestamps=True, stream_id=77)
    assert not got.binary
    messages = got.of_type("packet")
    assert len(messages) == 10
    pkts = [
        packet_from_json(m["packet"], code_bits=CODE_BITS, gain_bits=GAIN_BITS, max_codebooks=Q)
        for m in messages
    ]
    assert all(p.stream_id == 77 and p.times is not None for p in pkts)
    for p in pkts:
        assert p.times is not None and p.times.client_send_us == 0
        assert 0 <= ts_diff(p.times.server_send_us, p.times.server_recv_us) < 5_000_000
    assert time.perf_counter() - t0 < 10


async def test_binary_timestamps_are_stamped_at_send(
    server: ServerThread, clip: np.ndarray
) -> None:
    pkts = packets(await encode_clip(server, clip[:1600], timestamps=True))
    assert len(pkts) == 5
    for p in pkts:
        assert p.times is not None
        assert p.times.server_recv_us != 0 and p.times.server_send_us != 0
        assert 0 <= ts_diff(p.times.server_send_us, p.times.server_recv_us) < 5_000_000


async def test_decode_pcm_length(server: ServerThread, clip: np.ndarray) -> None:
    pkts = packets(await encode_clip(server, clip))
    async with connect(server.ws("/v1/decode")) as ws:
        ready = await hello(ws)
        assert ready["algorithmic_latency_ms"] == 5.0
        for p in pkts:
            await ws.send(encode_packet(p, code_bits=CODE_BITS, gain_bits=GAIN_BITS))
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    assert got.code == CloseCode.NORMAL
    pcm = np.frombuffer(b"".join(got.binary), dtype="<i2")
    assert len(pcm) == 320 * len(pkts)
    assert all(len(m) == 640 for m in got.binary)
    assert got.of_type("end")[0]["frames"] == len(pkts)


async def test_decode_json_packets_at_48k_float(server: ServerThread, clip: np.ndarray) -> None:
    pkts = packets(await encode_clip(server, clip[:6400]))  # 20 frames
    async with connect(server.ws("/v1/decode")) as ws:
        ready = await hello(ws, tokens="json", sample_rate=48000, format="f32le")
        assert ready["frame_samples"] == 960
        for p in pkts:
            await ws.send(json.dumps({"type": "packet", "packet": packet_to_json(p)}))
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    pcm = np.frombuffer(b"".join(got.binary), dtype="<f4")
    # 20 frames x 960 samples, plus what the output resampler still held at the end
    assert 960 * 20 <= len(pcm) <= 960 * 20 + 200
    assert np.all(np.isfinite(pcm)) and np.max(np.abs(pcm)) <= 1.0


async def test_roundtrip_pcm_and_tokens(server: ServerThread, clip: np.ndarray) -> None:
    async with connect(server.ws("/v1/roundtrip")) as ws:
        ready = await hello(ws, return_tokens=True, num_codebooks=1)
        assert ready["tokens"] == "json" and ready["algorithmic_latency_ms"] == 25.0
        await send_pcm(ws, clip)
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    n = frames_of(len(clip))
    assert got.code == CloseCode.NORMAL
    pcm = np.frombuffer(b"".join(got.binary), dtype="<i2")
    assert len(pcm) == 320 * n
    assert np.all(np.isfinite(pcm.astype(np.float32)))
    tokens = got.of_type("packet")
    assert len(tokens) == n
    assert all(m["packet"]["num_codebooks"] == 1 for m in tokens)
    assert got.of_type("end")[0]["frames"] == n


async def test_set_bitrate_applies_from_the_next_frame(
    server: ServerThread, clip: np.ndarray
) -> None:
    async with connect(server.ws("/v1/encode")) as ws:
        await hello(ws, num_codebooks=11)
        await send_pcm(ws, clip[:3200])  # 10 whole frames
        await ws.send(json.dumps({"type": "set_bitrate", "bitrate_kbps": 1}))
        await send_pcm(ws, clip[3200:6400])
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    counts = [p.num_codebooks for p in packets(got)]
    assert counts == [11] * 10 + [1] * 10
    (reply,) = got.of_type("bitrate")
    assert reply == {"type": "bitrate", "num_codebooks": 1, "bitrate_kbps": 1.0, "from_frame": 10}


async def test_flush_pads_and_keeps_the_session(server: ServerThread, clip: np.ndarray) -> None:
    async with connect(server.ws("/v1/encode")) as ws:
        await hello(ws)
        await send_pcm(ws, clip[:500])  # 1 frame + 180 samples
        await ws.send(json.dumps({"type": "flush"}))
        first: list[bytes | str] = []
        while True:
            message = await asyncio.wait_for(ws.recv(), 10)
            first.append(message)
            if isinstance(message, str) and json.loads(message)["type"] == "flushed":
                break
        assert json.loads(first[-1]) == {"type": "flushed", "frames": 2}
        assert sum(isinstance(m, bytes) for m in first) == 2
        await send_pcm(ws, clip[:320])
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    assert len(got.binary) == 1 and got.of_type("end")[0]["frames"] == 3


async def test_ping_is_answered_ahead_of_media(server: ServerThread) -> None:
    async with connect(server.ws("/v1/decode")) as ws:
        await hello(ws)
        await ws.send(json.dumps({"type": "ping", "id": {"n": 5}}))
        pong = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert pong["type"] == "pong" and pong["id"] == {"n": 5}
        assert 0 <= pong["server_time_us"] < 2**32
        await ws.send(json.dumps({"type": "ping"}))
        assert "id" not in json.loads(await asyncio.wait_for(ws.recv(), 5))


async def test_faster_than_real_time_client_is_paced_not_dropped(
    server: ServerThread, clip: np.ndarray
) -> None:
    """10 s of audio in one burst: all of it is encoded, in order (flow control)."""
    long = np.tile(clip, 3)
    got = await encode_clip(server, long)
    assert len(got.binary) == frames_of(len(long))
    assert [p.seq for p in packets(got)] == list(range(len(got.binary)))
