"""`codec-client encode` and `decode`: audio files <-> bitstream files, locally or remotely."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

from client.audiofile import Audio, read_audio, write_audio
from client.errors import EXIT_OK, EXIT_USAGE, ClientError
from client.files import (
    CodecParams,
    add_mode_arguments,
    check_header,
    decode_local,
    describe_mode,
    encode_local,
    frames_to_audio,
    load_model,
    mode_from_args,
    payload_kbps,
    prepare_input,
    read_bitstream_file,
)
from client.progress import progress_bar
from client.remote import (
    decode_http,
    decode_remote,
    encode_http,
    encode_remote,
    open_decoder,
    open_encoder,
    params_from_ready,
)
from streaming.model import BitrateMode, CodecModel
from streaming.protocol import BitstreamHeader, SourceInfo, TokenFrame, write_bitstream

__all__ = ["MAX_OUTPUT_RATE", "add_decode", "add_encode", "run_decode", "run_encode"]

MAX_OUTPUT_RATE = 768_000
"""Highest `decode --rate`, Hz (the highest rate common audio hardware and formats use)."""


def add_common(parser: argparse.ArgumentParser) -> None:
    """--server, --api-key, --model, --quiet."""
    parser.add_argument(
        "--server",
        metavar="URL",
        help="code through this server (http://host:port) instead of the local engine",
    )
    parser.add_argument(
        "--transport",
        choices=("ws", "http"),
        default="ws",
        help="with --server: WebSocket streaming endpoints (default) or HTTP file endpoints",
    )
    parser.add_argument(
        "--api-key", metavar="KEY", help="server API key (default: $CODECSTREAM_API_KEY)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="local model directory (default: the bundled model)",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar, no summary line"
    )


def add_encode(sub: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    """The `encode` subcommand."""
    p = sub.add_parser("encode", help=help_text, description=help_text)
    p.add_argument("input", type=Path, help="audio file (WAV, FLAC, ...; any rate, mixed to mono)")
    p.add_argument("output", type=Path, help="bitstream file to write (.csb)")
    add_mode_arguments(
        p,
        "payload bitrate: 1, 3 or 6 kbps (the model's bitrate mode for that budget: codebooks "
        "and low band; default 6)",
    )
    p.add_argument(
        "--rate-cap",
        action="store_true",
        help="hold the payload to the mode's rate (bursts of at most 1 s of it) by narrowing or "
        "dropping the low band of frames over budget; costs quality on loud speech (local or "
        "WebSocket encoding)",
    )
    add_common(p)


def add_decode(sub: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    """The `decode` subcommand."""
    p = sub.add_parser("decode", help=help_text, description=help_text)
    p.add_argument("input", type=Path, help="bitstream file (.csb)")
    p.add_argument("output", type=Path, help="audio file to write (.wav, .flac, ...)")
    p.add_argument(
        "--rate",
        type=int,
        metavar="HZ",
        help="output sample rate (default: the original file's, else the model's)",
    )
    p.add_argument(
        "--float", action="store_true", help="write 32-bit float samples (default 16-bit PCM)"
    )
    add_common(p)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


# ---- encode -------------------------------------------------------------------------------


def run_encode(args: argparse.Namespace) -> int:
    """Encode args.input to args.output."""
    audio = read_audio(args.input)
    model = load_model(args.model)
    mode = mode_from_args(model.card, args)
    if args.rate_cap and args.server and args.transport == "http":
        raise ClientError("--rate-cap needs local or WebSocket encoding (not --transport http)")
    if args.server and args.transport == "http":
        data, frames = _encode_via_http(args, audio, model, mode)
    elif args.server:
        data, frames = asyncio.run(_encode_via_server(args, audio, model, mode))
    else:
        data, frames = encode_local(audio, model, mode, quiet=args.quiet, rate_cap=args.rate_cap)
    _write_bytes(args.output, data)
    seconds = frames * model.card.frame_ms / 1000.0
    total = 8 * len(data) / seconds / 1000 if seconds else 0.0
    _say(
        args,
        f"{args.output}: {frames} frames ({audio.seconds:.2f} s of {audio.rate} Hz audio), "
        f"{len(data)} bytes = {total:.2f} kbps; mode {describe_mode(mode)}, payload measured "
        f"{payload_kbps(data, seconds):.2f} kbps",
    )
    return EXIT_OK


async def _encode_via_server(
    args: argparse.Namespace, audio: Audio, model: CodecModel, mode: BitrateMode
) -> tuple[bytes, int]:
    session = await open_encoder(
        args.server, model.card.sample_rate, mode, args.api_key, rate_cap=args.rate_cap
    )
    params = params_from_ready(session.ready, model.card)
    prepared = prepare_input(audio, params)
    with progress_bar(prepared.frames, "encoding (server)", quiet=args.quiet) as bar:
        frames = await encode_remote(session, prepared, params, bar.update)
    return write_bitstream(params.header(prepared.source), frames), len(frames)


def _encode_via_http(
    args: argparse.Namespace, audio: Audio, model: CodecModel, mode: BitrateMode
) -> tuple[bytes, int]:
    params = CodecParams.from_card(model.card)
    prepared = prepare_input(audio, params)
    header, frames = encode_http(args.server, prepared, params, mode, args.api_key)
    params = dataclasses.replace(params, model_id=header.model_id)  # the server's model
    return write_bitstream(params.header(prepared.source), frames), len(frames)


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise ClientError(f"{path}: cannot write ({exc.strerror})") from None


# ---- decode -------------------------------------------------------------------------------


def run_decode(args: argparse.Namespace) -> int:
    """Decode args.input to args.output."""
    if args.rate is not None and not 0 < args.rate <= MAX_OUTPUT_RATE:
        raise ClientError(
            f"--rate must be a number of Hz in 1..{MAX_OUTPUT_RATE}, got {args.rate}",
            exit_code=EXIT_USAGE,
        )
    header, frames = read_bitstream_file(args.input)
    source = header.source
    model = load_model(args.model)
    if args.server and args.transport == "http":
        params = CodecParams.from_card(model.card)
        check_header(header, params, str(args.input))
        decoded = decode_http(
            args.server, args.input.read_bytes(), len(frames), params, args.api_key
        )
        audio = frames_to_audio(decoded, params, len(frames), source, args.rate)
    elif args.server:
        audio = asyncio.run(_decode_via_server(args, header, frames, source, model))
    else:
        check_header(header, CodecParams.from_card(model.card), str(args.input))
        audio = decode_local(frames, source, model, args.rate, quiet=args.quiet)
    write_audio(args.output, audio, subtype="FLOAT" if args.float else None)
    _say(
        args,
        f"{args.output}: {audio.samples.shape[0]} samples at {audio.rate} Hz "
        f"({audio.seconds:.2f} s) from {len(frames)} frames",
    )
    return EXIT_OK


async def _decode_via_server(
    args: argparse.Namespace,
    header: BitstreamHeader,
    frames: list[TokenFrame],
    source: SourceInfo | None,
    model: CodecModel,
) -> Audio:
    session = await open_decoder(args.server, model.card.sample_rate, args.api_key)
    params = params_from_ready(session.ready, model.card)
    try:
        check_header(header, params, str(args.input))
    except ClientError:
        await session.close()
        raise
    with progress_bar(len(frames), "decoding (server)", quiet=args.quiet) as bar:
        decoded = await decode_remote(session, frames, params, bar.update)
    return frames_to_audio(decoded, params, len(frames), source, args.rate)
