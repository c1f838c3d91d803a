"""`codec-client call`: a full-duplex voice call in a server room (client.call)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

from client.call import CallClient, CallOptions, CallStats
from client.devices import (
    DeviceAudio,
    describe_devices,
    load_sounddevice,
    pick_rate,
    resolve_device,
)
from client.errors import EXIT_OK, EXIT_USAGE, ClientError, check_writable
from client.files import add_mode_arguments, describe_mode, load_model, mode_from_args

__all__ = ["add_call", "format_status", "run_call"]

METER_WIDTH = 20
METER_FLOOR_DB = -60.0
MAX_PLAYOUT_MS = 5000.0
MAX_BLOCK_MS = 500.0


def add_call(sub: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    """The `call` subcommand."""
    p = sub.add_parser("call", help=help_text, description=help_text)
    p.add_argument(
        "--server",
        metavar="URL",
        default="http://127.0.0.1:8000",
        help="server base URL (default %(default)s)",
    )
    p.add_argument("--room", default="demo", help="room name (default %(default)s)")
    p.add_argument("--name", default="", help="display name shown to the others")
    add_mode_arguments(p, "bitrate of what you send: 1, 3 or 6 kbps (default 6)")
    p.add_argument(
        "--rate-cap",
        action="store_true",
        help="hold what you send to the mode's rate (bursts of at most 1 s of it) by trimming "
        "the low band of frames over budget (for links that cannot take a burst; costs quality "
        "on loud speech); with --send pcm the server's encoder does it",
    )
    p.add_argument(
        "--send",
        choices=("tokens", "pcm"),
        default="tokens",
        help="tokens: encode here, send 1-6 kbps (default); pcm: thin client, the server encodes",
    )
    p.add_argument(
        "--receive",
        choices=("tokens", "pcm"),
        help="tokens: decode and mix here; pcm: the server mixes (default: as --send)",
    )
    p.add_argument("--input-device", metavar="D", help="microphone: index or name substring")
    p.add_argument("--output-device", metavar="D", help="speaker: index or name substring")
    p.add_argument("--list-devices", action="store_true", help="list sound devices and exit")
    p.add_argument(
        "--mute-key",
        default="m",
        metavar="KEY",
        help="type KEY + Enter to mute/unmute (default %(default)s); q + Enter hangs up",
    )
    p.add_argument(
        "--playout-ms",
        type=float,
        default=40.0,
        help="speaker buffer kept filled, ms, > 0 (default %(default)s)",
    )
    p.add_argument(
        "--block-ms",
        type=float,
        default=10.0,
        help="sound device block, ms, > 0 (default %(default)s)",
    )
    p.add_argument(
        "--timestamps",
        action="store_true",
        help="add the 12-byte times block to every packet (latency profiling)",
    )
    p.add_argument("--duration", type=float, metavar="S", help="hang up after S seconds")
    p.add_argument(
        "--stats-json", type=Path, metavar="FILE", help="write the final counters as JSON to FILE"
    )
    p.add_argument(
        "--api-key", metavar="KEY", help="server API key (default: $CODECSTREAM_API_KEY)"
    )
    p.add_argument("--model", type=Path, metavar="DIR", help="local model directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no status line")


def _meter(db: float) -> str:
    """A level bar: METER_WIDTH cells from METER_FLOOR_DB to 0 dBFS."""
    fill = round(METER_WIDTH * min(max(1.0 - db / METER_FLOOR_DB, 0.0), 1.0))
    return "#" * fill + "-" * (METER_WIDTH - fill)


def format_status(s: CallStats) -> str:
    """The one-line status: mic meter, mute, peers, packets, jitter-buffer and audio counters."""
    p, a = s.playout, s.audio
    mic = "MUTED " if s.muted else ""
    return (
        f"mic [{_meter(s.mic_db)}] {max(s.mic_db, -99.0):4.0f} dB {mic}| peers {s.peers} "
        f"| sent {s.sent} recv {p.received} played {p.played} late {p.late} "
        f"lost {p.lost} concealed {p.concealed} cn {p.comfort_noise} "
        f"| xruns in {a.input_overflows + a.capture_dropped} "
        f"out {a.output_underflows} underrun {a.playback_underrun}"
    )


class _StatusPrinter:
    """Status on `stream`: one line redrawn in place on a terminal, a line every 2 s else."""

    def __init__(self, stream: TextIO, quiet: bool) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self._calls = 0

    def __call__(self, stats: CallStats) -> None:
        if self.quiet:
            return
        self._calls += 1
        line = format_status(stats)
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        elif self._calls % 8 == 0:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")


def _key_thread(client: CallClient, mute_key: str, out: TextIO) -> None:
    """Read lines from stdin: `mute_key` toggles mute, q hangs up (ends at EOF)."""

    def loop() -> None:
        for line in sys.stdin:
            word = line.strip().lower()
            if word == mute_key.lower():
                state = client.toggle_mute()
                out.write("\nmuted\n" if state else "\nunmuted\n")
            elif word in ("q", "quit"):
                client.hangup()
                return

    if sys.stdin is not None and not sys.stdin.closed:
        threading.Thread(target=loop, name="keys", daemon=True).start()


def _check_options(args: argparse.Namespace) -> None:
    """ClientError (exit 2) for a buffer size the call cannot run with."""
    for option, value, limit in (
        ("--playout-ms", args.playout_ms, MAX_PLAYOUT_MS),
        ("--block-ms", args.block_ms, MAX_BLOCK_MS),
    ):
        if not (math.isfinite(value) and 0.0 < value <= limit):
            raise ClientError(
                f"{option} must be > 0 and at most {limit:g} ms, got {value:g}",
                exit_code=EXIT_USAGE,
            )



def _write_stats(path: Path, stats: CallStats) -> None:
    try:
        path.write_text(json.dumps(stats.as_dict(), indent=2) + "\n")
    except OSError as exc:
        raise ClientError(f"--stats-json {path}: cannot write ({exc.strerror})") from None


def _open_audio(args: argparse.Namespace) -> DeviceAudio:
    sd = load_sounddevice()
    in_index, _ = resolve_device(sd, args.input_device, "input")
    out_index, _ = resolve_device(sd, args.output_device, "output")
    rate = pick_rate(sd, in_index, out_index, preferred=16000)
    block = max(1, round(rate * args.block_ms / 1000.0))
    capture_ms = max(1000.0, 4.0 * args.block_ms)
    playback_ms = max(1000.0, 2.0 * args.playout_ms + 4.0 * args.block_ms)
    return DeviceAudio(
        sd, in_index, out_index, rate, block=block, capture_ms=capture_ms, playback_ms=playback_ms
    )


def run_call(args: argparse.Namespace) -> int:
    """Run `call`."""
    if args.list_devices:
        print(describe_devices(load_sounddevice()))
        return EXIT_OK
    _check_options(args)
    if args.stats_json is not None:
        check_writable(args.stats_json, "--stats-json ")
    model = load_model(args.model)
    options = CallOptions(
        server=args.server,
        room=args.room,
        name=args.name,
        send=args.send,
        receive=args.receive or args.send,
        mode=mode_from_args(model.card, args),
        rate_cap=args.rate_cap,
        timestamps=args.timestamps,
        api_key=args.api_key,
        playout_ms=args.playout_ms,
        duration_s=args.duration,
    )
    audio = _open_audio(args)
    try:
        stats = asyncio.run(_call(CallClient(model, audio, options), args))
    finally:
        audio.close()
    if not args.quiet:
        print(format_status(stats), file=sys.stderr)
    if args.stats_json is not None:
        _write_stats(args.stats_json, stats)
    closed = stats.closed_by_server
    if closed is not None:
        reason = f": {closed['reason']}" if closed.get("reason") else ""
        raise ClientError(f"the server ended the call with {closed['code']}{reason}")
    return EXIT_OK


async def _call(client: CallClient, args: argparse.Namespace) -> CallStats:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, client.hangup_requested.set)
    printer = _StatusPrinter(sys.stderr, args.quiet)
    if not args.quiet:
        print(
            f"joining room {args.room!r} on {args.server} ({client.options.send} up, "
            f"{client.options.receive} down); {args.mute_key} + Enter: mute, q + Enter or "
            "Ctrl-C: hang up",
            file=sys.stderr,
        )
    _key_thread(client, args.mute_key, sys.stderr)

    def joined(c: CallClient) -> None:
        if not args.quiet:
            ready = c.session.ready if c.session is not None else None
            pid = ready.stream_id if ready is not None else "?"
            print(
                f"joined room {args.room!r} as participant {pid} ({len(c.peers)} other(s) "
                f"here); audio {c.audio.rate} Hz, sending {describe_mode(c.mode)}",
                file=sys.stderr,
                flush=True,
            )

    try:
        return await client.run(printer, joined)
    finally:
        printer.done()
