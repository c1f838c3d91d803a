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
from streaming.lowband import LAYOUTS
from streaming.protocol import (
    PacketTimes,
    TokenFrame,
    TokenPacket,
    decode_packet,
    encode_packet,
    max_packet_size,
    packet_from_json,
    packet_to_json,
    ts_diff,
)
from tests.server.conftest import (
    CARD,
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


def nominal(kbps: float) -> dict[str, object]:
    """How replies report the card's mode for `kbps`."""
    mode = CARD.mode_for_bitrate(kbps)
    return {
        "num_codebooks": mode.num_codebooks,
        "lowband_layout": mode.lowband_layout,
        "bitrate_kbps": round(mode.kbps, 4),
    }


def payload_bytes(frame: TokenFrame) -> int:
    return -(-frame.bit_length(code_bits=CODE_BITS, gain_bits=GAIN_BITS) // 8)


async def test_encode_one_packet_per_frame(server: ServerThread, clip: np.ndarray) -> None:
    mode = CARD.mode_for_bitrate(3)
    async with connect(server.ws("/v1/encode")) as ws:
        ready = await hello(ws, bitrate_kbps=3)
        assert {k: ready[k] for k in ("num_codebooks", "lowband_layout", "bitrate_kbps")} == (
            nominal(3)
        )
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
    assert all(p.num_codebooks == mode.num_codebooks and p.times is None for p in pkts)
    layouts = [p.frame.lowband_layout for p in pkts]
    assert set(layouts) <= {0, mode.lowband_layout}  # quiet frames may go without low band
    assert layouts.count(mode.lowband_layout) > expected // 2  # speech frames have it
    assert [len(m) for m in got.binary] == [14 + payload_bytes(p.frame) for p in pkts]
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
    six = CARD.mode_for_bitrate(6)  # the default
    assert all(p.num_codebooks == six.num_codebooks for p in a)
    layouts = [p.frame.lowband_layout for p in a]
    assert set(layouts) <= {0, six.lowband_layout} and six.lowband_layout in layouts


async def test_encode_at_6_kbps_sends_the_low_band(server: ServerThread, clip: np.ndarray) -> None:
    """6 kbps is the card's low-band mode: JSON packets carry "lowband" {layout, indices}."""
    mode = CARD.mode_for_bitrate(6)
    assert mode.lowband_layout != 0
    async with connect(server.ws("/v1/encode")) as ws:
        ready = await hello(ws, bitrate_kbps=6, tokens="json")
        assert {k: ready[k] for k in ("num_codebooks", "lowband_layout", "bitrate_kbps")} == (
            nominal(6)
        )
        await send_pcm(ws, clip[:16000])
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    messages = [m["packet"] for m in got.of_type("packet")]
    assert len(messages) == 50
    with_low = [m for m in messages if "lowband" in m]
    assert len(with_low) > 25
    bins = LAYOUTS[mode.lowband_layout].bins
    for m in with_low:
        assert m["lowband"]["layout"] == mode.lowband_layout
        assert len(m["lowband"]["indices"]) == bins
    assert all(m["num_codebooks"] == mode.num_codebooks for m in messages)


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
    pkts = packets(await encode_clip(server, clip))  # 6 kbps: with low band
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
    frames = [p.frame for p in packets(got)]
    assert [f.num_codebooks for f in frames] == [11] * 10 + [1] * 10
    assert {f.lowband_layout for f in frames} == {0}
    (reply,) = got.of_type("bitrate")
    assert reply == {
        "type": "bitrate",
        "num_codebooks": 1,
        "lowband_layout": 0,
        "bitrate_kbps": 1.05,
        "from_frame": 10,
    }


async def test_set_bitrate_switches_between_low_band_and_plain_modes(
    server: ServerThread, clip: np.ndarray
) -> None:
    """6 kbps (low band) -> 4 codebooks (none) -> 3 kbps -> an explicit expert mode: each
    from the frame after the message, the low band included."""
    speech = clip[6 * 320 :]  # from frame 6 on: 40 frames of speech
    six, three = CARD.mode_for_bitrate(6), CARD.mode_for_bitrate(3)
    async with connect(server.ws("/v1/encode")) as ws:
        await hello(ws, bitrate_kbps=6)
        await send_pcm(ws, speech[:3200])
        await ws.send(json.dumps({"type": "set_bitrate", "num_codebooks": 4}))
        await send_pcm(ws, speech[3200:6400])
        await ws.send(json.dumps({"type": "set_bitrate", "bitrate_kbps": 3}))
        await send_pcm(ws, speech[6400:9600])
        expert = {"type": "set_bitrate", "num_codebooks": 5, "lowband_layout": 2}
        await ws.send(json.dumps(expert))
        await send_pcm(ws, speech[9600:12800])
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    frames = [p.frame for p in packets(got)]
    assert len(frames) == 40
    counts = [f.num_codebooks for f in frames]
    assert counts == [six.num_codebooks] * 10 + [4] * 10 + [three.num_codebooks] * 10 + [5] * 10
    layouts = [f.lowband_layout for f in frames]
    assert layouts[10:20] == [0] * 10
    # low-band modes: every speech frame has the mode's layout (very quiet ones might not)
    for part, layout in (
        (layouts[:10], six.lowband_layout),
        (layouts[20:30], three.lowband_layout),
        (layouts[30:], 2),
    ):
        assert set(part) <= {0, layout} and part.count(layout) >= 8, (part, layout)
    assert all(len(f.lowband) == LAYOUTS[2].bins for f in frames[30:] if f.lowband_layout)
    replies = got.of_type("bitrate")
    assert replies == [
        {
            "type": "bitrate",
            "num_codebooks": 4,
            "lowband_layout": 0,
            "bitrate_kbps": round(CARD.bitrate_kbps(4), 4),
            "from_frame": 10,
        },
        {"type": "bitrate", **nominal(3), "from_frame": 20},
        {
            "type": "bitrate",
            "num_codebooks": 5,
            "lowband_layout": 2,
            "bitrate_kbps": round(CARD.bitrate_kbps(5, 2), 4),
            "from_frame": 30,
        },
    ]


async def test_roundtrip_in_a_low_band_mode(server: ServerThread, clip: np.ndarray) -> None:
    """Through the server's encoder and decoder at 6 kbps (low band): finite PCM of the
    right length, the returned tokens carry the low band, and /v1/decode of those tokens
    gives the same PCM."""
    mode = CARD.mode_for_bitrate(6)
    part = clip[:32000]  # 100 frames
    async with connect(server.ws("/v1/roundtrip")) as ws:
        ready = await hello(ws, bitrate_kbps=6, return_tokens=True)
        assert ready["lowband_layout"] == mode.lowband_layout
        await send_pcm(ws, part)
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    assert got.code == CloseCode.NORMAL
    pcm = np.frombuffer(b"".join(got.binary), dtype="<i2")
    assert len(pcm) == 320 * 100 and np.abs(pcm.astype(np.int32)).max() > 0
    pkts = [
        packet_from_json(m["packet"], code_bits=CODE_BITS, gain_bits=GAIN_BITS, max_codebooks=Q)
        for m in got.of_type("packet")
    ]
    assert len(pkts) == 100
    assert sum(p.frame.lowband_layout == mode.lowband_layout for p in pkts) > 50
    async with connect(server.ws("/v1/decode")) as ws:
        await hello(ws)
        for p in pkts:
            await ws.send(encode_packet(p, code_bits=CODE_BITS, gain_bits=GAIN_BITS))
        await ws.send(json.dumps({"type": "end"}))
        decoded = await receive_all(ws)
    assert np.array_equal(np.frombuffer(b"".join(decoded.binary), dtype="<i2"), pcm)


async def test_decode_accepts_the_largest_packet(server: ServerThread) -> None:
    """Q codebooks, times and the longest low band of any layout: exactly `max_packet_size`
    bytes, within the session's packet limit."""
    longest: tuple[int, tuple[int, ...], int] | None = None
    for layout_id, spec in LAYOUTS.items():
        m, width = spec.max_index, 2 * spec.max_index + 1
        indices: list[int] = []
        bits = 0
        for pair in range(spec.bins // 2):
            lengths = spec.pair_code(pair).lengths
            symbol = max(range(len(lengths)), key=lengths.__getitem__)
            bits += lengths[symbol]
            indices += [symbol // width - m, symbol % width - m]
        if longest is None or bits > longest[2]:
            longest = (layout_id, tuple(indices), bits)
    assert longest is not None
    frame = TokenFrame(Q, 63, (1023,) * Q, longest[0], longest[1])
    packet = TokenPacket(1, 0, 0, frame, PacketTimes(1, 2, 3))
    data = encode_packet(packet, code_bits=CODE_BITS, gain_bits=GAIN_BITS)
    assert len(data) == max_packet_size(code_bits=CODE_BITS, gain_bits=GAIN_BITS, max_codebooks=Q)
    async with connect(server.ws("/v1/decode")) as ws:
        await hello(ws)
        await ws.send(data)
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    assert got.code == CloseCode.NORMAL and got.of_type("end")[0]["frames"] == 1
    assert len(b"".join(got.binary)) == 640


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
