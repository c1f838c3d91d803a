"""HTTP endpoints against a real server: health, models, metrics, file encode/decode."""

from __future__ import annotations

import asyncio
import io
import json
import math
import struct
import wave

import httpx
import numpy as np
import pytest

from server.wav import WavError, read_wav
from streaming.framing import Resampler
from streaming.model import ModelCard, default_model_dir
from streaming.protocol import (
    BitstreamHeader,
    BitstreamWriter,
    TokenFrame,
    decode_file_header,
    frame_stream_bits,
    packet_from_json,
    read_bitstream,
)
from tests.server.conftest import (
    ServerThread,
    connect,
    hello,
    receive_all,
    send_pcm,
    settle,
    start_server,
)

CARD = ModelCard.from_file(default_model_dir() / "card.json")


def bitstream(frames: int, model_id: str = CARD.model_id, *, streamed: bool = False) -> bytes:
    """A bitstream file of `frames` one-codebook frames in the bundled model's parameters
    (`streamed`: with the unknown frame count, as a live recording writes it)."""
    header = BitstreamHeader(
        model_id, CARD.sample_rate, CARD.frame_size, CARD.code_bits, CARD.gain.bits,
        CARD.num_codebooks,
    )
    writer = BitstreamWriter(header)
    writer.add_frames([TokenFrame(1, 30, (7,))] * frames)
    return writer.drain(final=True) if streamed else writer.getvalue()


def _with_header_length(data: bytes, length: int) -> bytes:
    """`data` with the file header's header-length field (u16 at byte 6) set to `length`."""
    patched = bytearray(data)
    struct.pack_into(">H", patched, 6, length)
    return bytes(patched)


def raw_wav(rate: int, samples: int) -> bytes:
    """A mono 16-bit WAV of `samples` zeros whose fmt chunk says `rate` Hz (any u32, even
    0, which `wave` refuses to write)."""
    data = b"\x00\x00" * samples
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2 & 0xFFFFFFFF, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def wav_bytes(pcm: np.ndarray, rate: int = 16000, channels: int = 1) -> bytes:
    """A 16-bit WAV file of int16 `pcm` (duplicated to `channels`)."""
    data = np.repeat(pcm[:, None], channels, axis=1) if channels > 1 else pcm
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.ascontiguousarray(data, dtype="<i2").tobytes())
    return buffer.getvalue()


async def test_health_ready_models(server: ServerThread) -> None:
    async with httpx.AsyncClient(base_url=server.http) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["model_id"] == CARD.model_id
        models = (await client.get("/v1/models")).json()["models"]
    (model,) = models
    six = CARD.mode_for_bitrate(6)
    assert model["num_codebooks"] == 12 and model["default_num_codebooks"] == six.num_codebooks
    assert model["bitrates_kbps"]["1"] == 1.05 and model["card"]["frame_size"] == 320
    assert model["bitrates_kbps"]["12"] == round(CARD.bitrate_kbps(12), 4)
    # the named modes: what bitrate_kbps 1, 3 and 6 select
    assert set(model["modes"]) == {"1", "3", "6"}
    for kbps, entry in model["modes"].items():
        mode = CARD.mode_for_bitrate(float(kbps))
        assert entry == {
            "num_codebooks": mode.num_codebooks,
            "lowband_layout": mode.lowband_layout,
            "bitrate_kbps": round(mode.kbps, 4),
        }
    assert model["modes"]["1"]["lowband_layout"] == 0
    assert model["modes"]["6"]["lowband_layout"] != 0
    assert model["default_mode"] == model["modes"]["6"]
    assert set(model["lowband_layouts"]) == {"1", "2"}
    assert model["lowband_layouts"]["1"]["band_hz"] == [0.0, 800.0]


def file_bits(frames: list[TokenFrame]) -> int:
    """Bits of the frame payloads of a bitstream file (one continuous bit stream)."""
    return frame_stream_bits(frames, code_bits=CARD.code_bits, gain_bits=CARD.gain.bits)


async def test_http_encode_decode_round_trip(server: ServerThread, clip: np.ndarray) -> None:
    frames = math.ceil(len(clip) / 320)
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
        encoded = await client.post("/v1/encode?bitrate_kbps=1", content=wav_bytes(clip))
        assert encoded.status_code == 200, encoded.text
        assert encoded.headers["x-codecstream-frames"] == str(frames)
        assert encoded.headers["x-codecstream-num-codebooks"] == "1"
        assert encoded.headers["x-codecstream-lowband-layout"] == "0"
        assert encoded.headers["x-codecstream-bitrate-kbps"] == "1.05"
        header, tokens = read_bitstream(encoded.content)
        assert header.model_id == CARD.model_id and header.num_frames == frames
        assert all(t.num_codebooks == 1 and t.lowband_layout == 0 for t in tokens)
        # 1 codebook: 10 bits of code, 1 for the repeated mode, 2-9 for the gain per frame
        # (21 in a packet): the file size is the bitrate
        bits = file_bits(tokens)
        assert 13 * frames <= bits <= 20 * frames
        assert len(encoded.content) == 26 + len(header.model_id) + math.ceil(bits / 8)
        decoded = await client.post("/v1/decode", content=encoded.content)
        assert decoded.status_code == 200 and decoded.headers["content-type"] == "audio/wav"
        pcm, rate = read_wav(decoded.content)
        assert rate == 16000 and len(pcm) == 320 * frames and np.all(np.isfinite(pcm))
        up = await client.post("/v1/decode?sample_rate=48000", content=encoded.content)
        pcm48, rate48 = read_wav(up.content)
        assert rate48 == 48000 and 960 * frames <= len(pcm48) <= 960 * frames + 200


async def test_http_encode_decode_round_trip_at_6_kbps(
    server: ServerThread, clip: np.ndarray
) -> None:
    """6 kbps selects the card's low-band mode: the headers report it, the frames carry the
    low band, the file size is the sum of the frames' bits, the decode has the right length."""
    mode = CARD.mode_for_bitrate(6)
    frames = math.ceil(len(clip) / 320)
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
        encoded = await client.post("/v1/encode?bitrate_kbps=6", content=wav_bytes(clip))
        assert encoded.status_code == 200, encoded.text
        headers = encoded.headers
        assert headers["x-codecstream-num-codebooks"] == str(mode.num_codebooks)
        assert headers["x-codecstream-lowband-layout"] == str(mode.lowband_layout)
        assert float(headers["x-codecstream-bitrate-kbps"]) == round(mode.kbps, 4)
        _, tokens = read_bitstream(encoded.content)
        assert len(tokens) == frames
        assert all(t.num_codebooks == mode.num_codebooks for t in tokens)
        layouts = [t.lowband_layout for t in tokens]
        assert set(layouts) <= {0, mode.lowband_layout}
        assert layouts.count(mode.lowband_layout) > frames // 2
        _, header_size = decode_file_header(encoded.content)
        assert len(encoded.content) == header_size + math.ceil(file_bits(tokens) / 8)
        decoded = await client.post("/v1/decode", content=encoded.content)
        assert decoded.status_code == 200, decoded.text
        assert decoded.headers["x-codecstream-frames"] == str(frames)
        pcm, rate = read_wav(decoded.content)
        assert rate == 16000 and len(pcm) == 320 * frames and np.all(np.isfinite(pcm))
        assert np.max(np.abs(pcm)) > 0


async def test_http_encode_matches_websocket_encode(server: ServerThread, clip: np.ndarray) -> None:
    """The same exact mode (expert: codebooks and a low-band layout) on both transports."""
    part = clip[:8000]
    query = "/v1/encode?num_codebooks=3&lowband_layout=1"
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
        response = await client.post(query, content=wav_bytes(part))
    assert response.headers["x-codecstream-lowband-layout"] == "1"
    _, http_frames = read_bitstream(response.content)
    async with connect(server.ws("/v1/encode")) as ws:
        ready = await hello(ws, num_codebooks=3, lowband_layout=1, tokens="json")
        assert ready["bitrate_kbps"] == round(CARD.bitrate_kbps(3, 1), 4)
        await send_pcm(ws, part)
        await ws.send(json.dumps({"type": "end"}))
        got = await receive_all(ws)
    ws_frames = [
        packet_from_json(m["packet"], code_bits=10, gain_bits=6, max_codebooks=12).frame
        for m in got.of_type("packet")
    ]
    assert http_frames == ws_frames
    assert {f.lowband_layout for f in ws_frames} <= {0, 1}
    assert any(f.lowband_layout == 1 for f in ws_frames)


async def test_stereo_and_8k_wav_are_accepted(server: ServerThread, clip: np.ndarray) -> None:
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
        stereo = await client.post("/v1/encode", content=wav_bytes(clip[:3200], channels=2))
        assert stereo.status_code == 200 and stereo.headers["x-codecstream-frames"] == "10"
        low = await client.post("/v1/encode", content=wav_bytes(clip[:1600], rate=8000))
        # 1600 samples at 8 kHz = 200 ms = 10 frames, plus the resampler delay padding
        assert low.status_code == 200 and int(low.headers["x-codecstream-frames"]) in (10, 11)


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/v1/encode", b"", 400, "empty_body"),
        ("/v1/encode", b"hello", 415, "bad_wav"),
        ("/v1/encode?bitrate_kbps=0.2", b"x", 400, "bad_query"),
        ("/v1/encode?num_codebooks=99", b"x", 400, "bad_query"),
        ("/v1/encode?bitrate_kbps=3&num_codebooks=2", b"x", 400, "bad_query"),
        ("/v1/encode?lowband_layout=1", b"x", 400, "bad_query"),
        ("/v1/encode?bitrate_kbps=6&lowband_layout=1", b"x", 400, "bad_query"),
        ("/v1/encode?num_codebooks=2&lowband_layout=3", b"x", 400, "bad_query"),
        ("/v1/encode?num_codebooks=2&lowband_layout=-1", b"x", 400, "bad_query"),
        ("/v1/encode?foo=1", b"x", 400, "bad_query"),
        ("/v1/decode", b"CSTR\x01", 422, "unknown_version"),  # a version-1 file
        ("/v1/decode", b"CSTR\x02", 422, "truncated"),
        ("/v1/decode", b"RIFF", 422, "bad_magic"),
        ("/v1/decode?sample_rate=44100", b"x", 415, "unsupported_rate"),
        # integers are ASCII digits: '²' passes str.isdigit() but int() raised (500 before);
        # '٣' / '٨٠٠٠' (Arabic-Indic) were read as 3 / 8000; 5000 digits made int() raise
        ("/v1/encode?num_codebooks=%C2%B2", b"x", 400, "bad_query"),
        ("/v1/encode?num_codebooks=%D9%A3", b"x", 400, "bad_query"),
        pytest.param(
            "/v1/encode?num_codebooks=" + "1" * 5000, b"x", 400, "bad_query",
            id="num_codebooks-5000-digits",
        ),
        ("/v1/encode?num_codebooks=2&lowband_layout=%C2%B2", b"x", 400, "bad_query"),
        ("/v1/decode?sample_rate=%C2%B2", b"x", 415, "unsupported_rate"),
        ("/v1/decode?sample_rate=%D9%A8%D9%A0%D9%A0%D9%A0", b"x", 415, "unsupported_rate"),
        pytest.param(
            "/v1/decode?sample_rate=" + "1" * 5000, b"x", 415, "unsupported_rate",
            id="sample_rate-5000-digits",
        ),
        ("/v1/decode?sample_rate=%2B16000", b"x", 415, "unsupported_rate"),
        # bitrate_kbps: an ASCII decimal number (float() alone takes '٣', '1_0', ' 6')
        ("/v1/encode?bitrate_kbps=%D9%A3", b"x", 400, "bad_query"),
        ("/v1/encode?bitrate_kbps=1_0", b"x", 400, "bad_query"),
        ("/v1/encode?bitrate_kbps=%206", b"x", 400, "bad_query"),
        ("/v1/encode?bitrate_kbps=inf", b"x", 400, "bad_query"),
        ("/v1/encode?bitrate_kbps=1e999", b"x", 400, "bad_query"),
        # a WAV header saying 0 Hz (a ZeroDivisionError, 500, before) or 1 Hz: the rate is
        # checked before the duration, so 601 samples at 1 Hz (601 s > 600) is 415, not 413
        pytest.param("/v1/encode", raw_wav(0, 320), 415, "unsupported_rate", id="wav-0Hz"),
        pytest.param(
            "/v1/encode", raw_wav(0, 0), 415, "unsupported_rate", id="wav-0Hz-empty"
        ),
        pytest.param(
            "/v1/encode", raw_wav(1, 601), 415, "unsupported_rate", id="wav-1Hz-601s"
        ),
        # a header length over 1024 is a malformed header (422 `oversized`), not long audio
        pytest.param(
            "/v1/decode", _with_header_length(bitstream(5), 2000), 422, "oversized",
            id="header-length-2000",
        ),
    ],
)
async def test_http_errors(
    server: ServerThread, path: str, body: bytes, status: int, error: str
) -> None:
    async with httpx.AsyncClient(base_url=server.http) as client:
        response = await client.post(path, content=body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error and response.json()["detail"]


@pytest.mark.parametrize(
    "query", ["?bitrate_kbps=6", "?bitrate_kbps=6.0", "?bitrate_kbps=.6e1", "?num_codebooks=03"]
)
async def test_http_encode_takes_ascii_decimal_queries(
    server: ServerThread, clip: np.ndarray, query: str
) -> None:
    """The strict query parsing still takes every plain ASCII spelling."""
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
        response = await client.post("/v1/encode" + query, content=wav_bytes(clip[:640]))
    assert response.status_code == 200, response.text
    expected = CARD.mode_for_bitrate(6).num_codebooks if "kbps" in query else 3
    assert response.headers["x-codecstream-num-codebooks"] == str(expected)


@pytest.mark.parametrize(("rate", "frames"), [(8000, 0), (24000, 2), (48000, 3)])
async def test_http_decode_length_at_other_rates(
    server: ServerThread, rate: int, frames: int
) -> None:
    """At a rate other than the model's, /v1/decode gives `frames` x frame_size x rate /
    16000 samples plus the output resampler's delay (its flush at the end: 34 samples at
    8 kHz, 51 at 24 kHz, 102 at 48 kHz), a 0-frame file included; at 16 kHz exactly
    320 per frame."""
    tail = Resampler(CARD.sample_rate, rate).delay_out_samples
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
        response = await client.post(f"/v1/decode?sample_rate={rate}", content=bitstream(frames))
        plain = await client.post("/v1/decode", content=bitstream(frames))
    assert response.status_code == 200, response.text
    pcm, got_rate = read_wav(response.content)
    assert got_rate == rate
    assert len(pcm) == frames * CARD.frame_size * rate // CARD.sample_rate + tail
    assert response.headers["x-codecstream-samples"] == str(len(pcm))
    assert len(read_wav(plain.content)[0]) == frames * CARD.frame_size


async def test_http_rejects_unsupported_rate_and_foreign_model(
    server: ServerThread, clip: np.ndarray
) -> None:
    writer = BitstreamWriter(BitstreamHeader("other-model", 16000, 320, 10, 6, 12))
    writer.add(TokenFrame(1, 3, (7,)))
    async with httpx.AsyncClient(base_url=server.http) as client:
        rate = await client.post("/v1/encode", content=wav_bytes(clip[:800], rate=44100))
        foreign = await client.post("/v1/decode", content=writer.getvalue())
    assert rate.status_code == 415 and "44100" in rate.json()["detail"]
    assert foreign.status_code == 422 and foreign.json()["error"] == "model_mismatch"


async def test_metrics_text(server: ServerThread, clip: np.ndarray) -> None:
    async with connect(server.ws("/v1/roundtrip")) as ws:
        await hello(ws)
        await send_pcm(ws, clip[:3200])
        await ws.send(json.dumps({"type": "end"}))
        await receive_all(ws)
    async with httpx.AsyncClient(base_url=server.http) as client:
        response = await client.get("/metrics")
    text = response.text
    assert response.headers["content-type"].startswith("text/plain")
    for needle in (
        'codecstream_sessions_total{endpoint="roundtrip"}',
        'codecstream_sessions_active{endpoint="roundtrip"} 0.0',
        'codecstream_frames_encoded_total{endpoint="roundtrip"}',
        'codecstream_frames_decoded_total{endpoint="roundtrip"}',
        "codecstream_frame_compute_seconds_bucket",
        "codecstream_frame_queue_seconds_bucket",
        'codecstream_batch_size_count{direction="encode"}',
        'codecstream_bytes_received_total{endpoint="roundtrip"}',
        'codecstream_bytes_sent_total{endpoint="roundtrip"}',
        "codecstream_rooms_active",
        "codecstream_room_participants",
        'codecstream_sessions_closed_total{code="1000",endpoint="roundtrip"}',
        "codecstream_engine_alive 1.0",
        f'codecstream_model_info{{model_id="{CARD.model_id}",'
        f'random_weights="{str(CARD.random_weights).lower()}"}} 1.0',
    ):
        assert needle in text, needle
    encoded = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('codecstream_frames_encoded_total{endpoint="roundtrip"}')
    ]
    assert encoded and encoded[0] >= 10


def test_wav_reader_formats() -> None:
    pcm = (np.sin(np.arange(400) / 5) * 20000).astype(np.int16)
    samples, rate = read_wav(wav_bytes(pcm))
    assert rate == 16000 and np.allclose(samples, pcm / 32768.0)
    float_wav = _float_wav(pcm.astype(np.float32) / 32768.0, 24000)
    samples, rate = read_wav(float_wav)
    assert rate == 24000 and np.allclose(samples, pcm / 32768.0)
    with pytest.raises(WavError) as info:
        read_wav(b"RIFF\x00\x00\x00\x00WAVEdata\x00\x00\x00\x00")
    assert info.value.status == 400


def test_wav_reader_clips_float_samples_and_zeroes_non_finite_ones() -> None:
    """Float WAV samples are clipped to [-1, 1] and non-finite ones become 0 (what
    docs/protocol.md says of float32 PCM), before any down-mix."""
    loud = np.array([0.5, 1.5, -3.0, np.inf, -np.inf, np.nan, 1e30, -0.25], dtype=np.float32)
    samples, _ = read_wav(_float_wav(loud, 16000))
    assert samples.tolist() == [0.5, 1.0, -1.0, 0.0, 0.0, 0.0, 1.0, -0.25]


def _float_wav(x: np.ndarray, rate: int) -> bytes:
    import struct

    data = x.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


async def test_a_stalled_upload_gets_408_and_frees_its_session_slot(clip: np.ndarray) -> None:
    """A body that stops arriving is answered 408 after `upload_timeout_s`, and its
    session slot goes back: a server with one slot then admits a WebSocket session."""
    running = start_server(engine_processes=0, max_sessions=1, upload_timeout_s=0.3)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"POST /v1/decode HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nCSTR")
        await writer.drain()
        head = await asyncio.wait_for(reader.read(1 << 16), 10)
        writer.close()
        assert head.startswith(b"HTTP/1.1 408 ") and b'"upload_timeout"' in head
        await settle(running)
        async with connect(running.ws("/v1/encode")) as ws:
            assert (await hello(ws))["type"] == "ready"
    finally:
        running.stop()


async def test_a_graceful_shutdown_answers_an_upload_in_flight_with_503() -> None:
    """A file request still uploading when the server shuts down is answered 503
    `shutting_down` (as WebSocket sessions get 1001), not cut off or a bare 500."""
    running = start_server(engine_processes=0, upload_timeout_s=600, shutdown_timeout_s=5)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    try:
        writer.write(b"POST /v1/encode HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nRIFF")
        await writer.drain()
        await settle(running, active=1)  # the request holds its session slot
        await asyncio.to_thread(running.stop)
        response = await asyncio.wait_for(reader.read(1 << 16), 10)
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), head
    assert json.loads(body)["error"] == "shutting_down"
    assert not running.thread.is_alive()


async def test_http_encode_refuses_audio_over_max_file_seconds(clip: np.ndarray) -> None:
    running = start_server(engine_processes=0, max_file_seconds=1.0)
    try:
        async with httpx.AsyncClient(base_url=running.http) as client:
            ok = await client.post("/v1/encode", content=wav_bytes(clip[:16000]))
            long = await client.post("/v1/encode", content=wav_bytes(clip[:16001]))
        assert ok.status_code == 200
        assert long.status_code == 413 and long.json()["error"] == "too_long"
        assert "limit is 1 s" in long.json()["detail"]
    finally:
        running.stop()


async def test_http_decode_refuses_bitstreams_over_max_file_seconds() -> None:
    """A bitstream that would decode to more than `max_file_seconds` is 413 `too_long`,
    counted or streamed: the parser stops at the limit (an all-zero streamed body decodes
    to ~0.6 frames per byte, ~385x its size in PCM)."""
    running = start_server(engine_processes=0, max_file_seconds=0.1)  # 5 frames
    card = running.state.card
    header = BitstreamHeader(
        card.model_id, 16000, 320, card.code_bits, card.gain.bits, card.num_codebooks
    )
    bodies = {}
    for n in (5, 6):
        writer = BitstreamWriter(header)
        writer.add_frames([TokenFrame(1, 30, (7,))] * n)
        bodies[n, "counted"] = writer.getvalue()
        bodies[n, "streamed"] = writer.drain(final=True)
    try:
        async with httpx.AsyncClient(base_url=running.http) as client:
            for streamed in (False, True):
                # another model's file is 422 model_mismatch however long (413 before)
                foreign = bitstream(6, "other-model", streamed=streamed)
                response = await client.post("/v1/decode", content=foreign)
                assert response.status_code == 422, (streamed, response.text)
                assert response.json()["error"] == "model_mismatch"
            for (n, kind), body in bodies.items():
                response = await client.post("/v1/decode", content=body)
                if n == 5:
                    assert response.status_code == 200, (kind, response.text)
                    assert response.headers["X-Codecstream-Frames"] == "5"
                else:
                    assert response.status_code == 413, kind
                    assert response.json()["error"] == "too_long"
                    said = {
                        "counted": "the header says 6 frames; the limit is 5",
                        "streamed": "more than 5 frames (the limit)",
                    }[kind]
                    assert response.json()["detail"].startswith(said)
    finally:
        running.stop()
