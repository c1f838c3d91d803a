"""`codec-client stream`: stream an audio file to the server's token stream (/v1/encode).

The file is sent in 20 ms chunks at real-time pace (as a live source would; `--fast`: as
fast as the server takes it) and every token packet the server returns is printed (one line
per frame; `--json`: the JSON form of docs/protocol.md, one object per line) and/or saved
(`--save X.jsonl`: JSON lines, `--save X.csb`: a bitstream file).  At the end a summary gives
the token latency: from sending the chunk that completed a frame to receiving its packet.

Files at 8/16/24/48 kHz are sent at their own rate (the server resamples), others at 16 kHz.
With `--save X.csb` the client sends instead exactly what `codec-client encode` sends
(`client.files.prepare_input`: model-rate PCM, resampler delay compensated, zero-padded to
F = ceil((n + D) / N) frames), so the saved file is the one `encode` writes and decodes to
the original, aligned and at its exact length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from client.audiofile import Audio, read_audio, resample
from client.errors import EXIT_OK, ClientError, check_writable
from client.files import (
    add_mode_arguments,
    describe_mode,
    load_model,
    mode_from_args,
    prepare_input,
)
from client.remote import open_encoder, params_from_ready
from client.session import RESPONSE_TIMEOUT_S, Ready, Session, mode_fields
from streaming.framing import SUPPORTED_RATES
from streaming.model import BitrateMode, CodecModel, ModelCard
from streaming.protocol import (
    ProtocolError,
    SourceInfo,
    TokenPacket,
    decode_packet,
    packet_to_json,
    write_bitstream,
)

__all__ = ["add_stream", "run_stream"]


def add_stream(sub: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    """The `stream` subcommand."""
    p = sub.add_parser("stream", help=help_text, description=help_text)
    p.add_argument("input", type=Path, help="audio file (any rate; 8/16/24/48 kHz sent as is)")
    p.add_argument(
        "--server", metavar="URL", default="http://127.0.0.1:8000", help="default %(default)s"
    )
    add_mode_arguments(p, "bitrate: 1, 3 or 6 kbps (the model's mode for it; default 6)")
    p.add_argument("--json", action="store_true", help="print JSON lines (docs/protocol.md)")
    p.add_argument(
        "--save", type=Path, metavar="FILE", help="save the tokens: .jsonl (JSON lines) or .csb"
    )
    p.add_argument("--fast", action="store_true", help="send as fast as possible")
    p.add_argument("--chunk-ms", type=_positive_ms, default=20.0, help="PCM chunk, ms (default 20)")
    p.add_argument(
        "--api-key", metavar="KEY", help="server API key (default: $CODECSTREAM_API_KEY)"
    )
    p.add_argument("--model", type=Path, metavar="DIR", help="local model directory")
    p.add_argument("-q", "--quiet", action="store_true", help="print no tokens, only the summary")


def _positive_ms(text: str) -> float:
    """--chunk-ms: a positive, finite number of milliseconds (else a usage error, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of ms: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of ms, got {text!r}")
    return value


def _line(packet: TokenPacket) -> str:
    f = packet.frame
    codes = " ".join(str(c) for c in f.codes)
    low = f"  low {f.lowband_layout}: {' '.join(map(str, f.lowband))}" if f.lowband else ""
    return (
        f"seq {packet.seq:5d}  t {packet.timestamp_us / 1e6:8.2f} s  n {f.num_codebooks:2d}  "
        f"gain {f.gain_index:2d}  codes {codes}{low}"
    )


class _Collector:
    """Receives packets: prints, keeps, measures latency against the chunk send times."""

    def __init__(self, args: argparse.Namespace, out: TextIO, frame_samples: int) -> None:
        self.args = args
        self.out = out
        self.frame_samples = frame_samples
        self.packets: list[TokenPacket] = []
        self.sent: list[tuple[int, float]] = []  # (samples sent so far, time)
        self.latency_ms: list[float] = []
        self._next = 0

    def chunk_sent(self, total_samples: int) -> None:
        self.sent.append((total_samples, time.perf_counter()))

    def packet(self, packet: TokenPacket, now: float) -> None:
        self.packets.append(packet)
        k = len(self.packets)  # frames 0..k-1 complete: needs k * frame_samples sent
        need = k * self.frame_samples
        while self._next < len(self.sent) and self.sent[self._next][0] < need:
            self._next += 1  # frames complete in order: the search only moves forward
        if self._next < len(self.sent):
            self.latency_ms.append(1000.0 * (now - self.sent[self._next][1]))
        if self.args.quiet:
            return
        if self.args.json:
            self.out.write(json.dumps(packet_to_json(packet)) + "\n")
        else:
            self.out.write(_line(packet) + "\n")


@dataclass
class _Result:
    collector: _Collector
    end: dict[str, Any]
    ready: dict[str, Any]
    source: SourceInfo
    expected_frames: int | None
    """Frames the prepared input (--save .csb) must give; None for a file sent as is."""


def run_stream(args: argparse.Namespace) -> int:
    """Run `stream`."""
    if args.save is not None and args.save.suffix not in (".jsonl", ".csb"):
        raise ClientError(f"--save {args.save}: use a .jsonl or .csb file name")
    audio = read_audio(args.input)
    model = load_model(args.model)
    mode = mode_from_args(model.card, args)
    if args.save is not None:
        check_writable(args.save)  # before streaming, not after (the tokens would be lost)
    started = time.perf_counter()
    result = asyncio.run(_stream(args, audio, mode, model))
    elapsed = time.perf_counter() - started
    frames = len(result.collector.packets)
    if result.expected_frames is not None and frames != result.expected_frames:
        raise ClientError(f"the server returned {frames} frames, {result.expected_frames} expected")
    if args.save is not None:
        _save(args.save, result.collector.packets, result.ready, model, result.source)
    _summary(result.collector, result.end, audio, elapsed, mode, model.card)
    return EXIT_OK


async def _stream(
    args: argparse.Namespace, audio: Audio, mode: BitrateMode, model: CodecModel
) -> _Result:
    source = SourceInfo(audio.rate, len(audio.samples))
    expected: int | None = None
    if args.save is not None and args.save.suffix == ".csb":
        # what `encode --server` sends: the prepared model-rate PCM, in binary token mode
        session = await open_encoder(args.server, model.card.sample_rate, mode, args.api_key)
        prepared = prepare_input(audio, params_from_ready(session.ready, model.card))
        audio = Audio(prepared.pcm, model.card.sample_rate)
        source, expected = prepared.source, prepared.frames
    else:
        if audio.rate not in SUPPORTED_RATES:
            audio = Audio(resample(audio.samples, audio.rate, 16000), 16000)
        hello = {"sample_rate": audio.rate, "format": "f32le", **mode_fields(mode)}
        session = await Session.open(args.server, "/v1/encode", hello, api_key=args.api_key)
    ready = session.ready
    collector = _Collector(args, sys.stdout, ready.frame_samples)
    chunk = max(1, round(audio.rate * args.chunk_ms / 1000.0))

    async def send() -> None:
        start = time.perf_counter()
        for i in range(0, len(audio.samples), chunk):
            if not args.fast:
                delay = start + i / audio.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await session.send_bytes(audio.samples[i : i + chunk].astype("<f4").tobytes())
            collector.chunk_sent(min(i + chunk, len(audio.samples)))
        await session.send_json({"type": "end"})

    async def receive() -> None:
        async for message in session.messages(RESPONSE_TIMEOUT_S):
            if isinstance(message, bytes):
                collector.packet(_parse(message, ready), time.perf_counter())

    await asyncio.gather(send(), receive())
    return _Result(collector, session.end_message or {}, ready.raw, source, expected)


def _parse(message: bytes, ready: Ready) -> TokenPacket:
    try:
        return decode_packet(
            message,
            code_bits=int(ready["code_bits"]),
            gain_bits=int(ready["gain_bits"]),
            max_codebooks=int(ready["max_codebooks"]),
        )
    except ProtocolError as exc:
        raise ClientError(f"the server sent an invalid token packet: {exc}") from None


def _save(
    path: Path,
    packets: list[TokenPacket],
    ready: dict[str, Any],
    model: CodecModel,
    source: SourceInfo,
) -> None:
    try:
        if path.suffix == ".jsonl":
            lines = (json.dumps(packet_to_json(p)) + "\n" for p in packets)
            path.write_text("".join(lines), encoding="utf-8")
        else:
            params = params_from_ready(Ready(ready), model.card)
            path.write_bytes(write_bitstream(params.header(source), [p.frame for p in packets]))
    except OSError as exc:
        raise ClientError(f"{path}: cannot write ({exc.strerror})") from None


def _summary(
    collector: _Collector,
    end: dict[str, Any],
    audio: Audio,
    elapsed: float,
    mode: BitrateMode,
    card: ModelCard,
) -> None:
    lat = np.array(collector.latency_ms or [float("nan")])
    p50, p95 = np.percentile(lat, [50, 95])
    frames = collector.packets
    bits = sum(p.frame.bit_length(code_bits=card.code_bits, gain_bits=card.gain.bits)
               for p in frames)
    seconds = len(frames) * card.frame_ms / 1000.0
    measured = bits / seconds / 1000.0 if seconds else 0.0
    print(
        f"{len(frames)} frames for {audio.seconds:.2f} s of audio in {elapsed:.2f} s; "
        f"token latency p50 {p50:.1f} ms, p95 {p95:.1f} ms (chunk sent -> packet received); "
        f"server late frames {end.get('late_frames', '?')}; mode {describe_mode(mode)}, "
        f"payload measured {measured:.2f} kbps",
        file=sys.stderr,
    )
