"""`codec-client profile`: mouth-to-ear latency of N simulated clients against a server.

Each client is file-fed at real-time pace and records what it plays (no sound device); see
client.profiler.  Writes the stage table to stdout and profile.json, stage_budget.png,
stage_cdf.png, stage_box.png and report.html to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from client.audiofile import read_audio, resample
from client.errors import EXIT_OK, ClientError
from client.files import add_mode_arguments, load_model, mode_from_args
from client.profiler.analysis import analyze
from client.profiler.report import format_table, write_reports
from client.profiler.sim import F32, SimConfig, run_room, run_roundtrip

__all__ = ["add_profile", "run_profile", "test_signal"]

ROTATE_S = 1.37
"""Client i speaks the input rotated by i * ROTATE_S seconds (distinct, uncorrelated)."""


def add_profile(sub: argparse._SubParsersAction[argparse.ArgumentParser], help_text: str) -> None:
    """The `profile` subcommand."""
    p = sub.add_parser("profile", help=help_text, description=help_text)
    p.add_argument(
        "--server", metavar="URL", default="http://127.0.0.1:8000", help="default %(default)s"
    )
    p.add_argument("--clients", type=int, default=2, help="simulated clients (default 2)")
    p.add_argument("--seconds", type=float, default=10.0, help="audio per client (default 10)")
    add_mode_arguments(p, "bitrate: 1, 3 or 6 kbps (the model's mode for it; default 6)")
    p.add_argument(
        "--mode",
        choices=("room", "roundtrip"),
        default="room",
        help="room: clients call each other, coding locally (default); roundtrip: each "
        "client sends PCM to /v1/roundtrip and plays what comes back",
    )
    p.add_argument("--room", help="room name (default: a fresh one per run)")
    p.add_argument("--input", type=Path, metavar="FILE", help="speech to send (default: synthetic)")
    p.add_argument(
        "--block-ms", type=float, default=20.0, help="simulated device block, ms (default 20)"
    )
    p.add_argument(
        "--playout-ms", type=float, default=20.0, help="speaker buffer kept, ms (default 20)"
    )
    p.add_argument("--out", type=Path, default=Path("profile"), help="report directory")
    p.add_argument(
        "--api-key", metavar="KEY", help="server API key (default: $CODECSTREAM_API_KEY)"
    )
    p.add_argument("--model", type=Path, metavar="DIR", help="local model directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no table on stdout")


def test_signal(rate: int, seconds: float, seed: int = 0) -> F32:
    """Synthetic speech-like test signal: a gliding harmonic tone (110-190 Hz) with syllable
    bursts (4 Hz) and a little noise, float32 at `rate`."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    f0 = 150 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.maximum(np.sin(2 * np.pi * 2.0 * t), 0.0) ** 0.5
    x = 0.2 * voiced * envelope + 0.005 * rng.standard_normal(n)
    return x.astype(np.float32)


def _sources(args: argparse.Namespace, rate: int) -> list[F32]:
    n = int(args.seconds * rate)
    if args.input is not None:
        audio = read_audio(args.input)
        base = resample(audio.samples, audio.rate, rate)
    else:
        base = test_signal(rate, max(args.seconds, 8.0))
    reps = -(-(n + int(ROTATE_S * rate * args.clients)) // base.shape[0])
    loop = np.tile(base, reps)
    return [np.ascontiguousarray(loop[int(ROTATE_S * rate * i) :][:n]) for i in range(args.clients)]


def run_profile(args: argparse.Namespace) -> int:
    """Run `profile`."""
    if args.clients < 1 or (args.mode == "room" and args.clients < 2):
        raise ClientError("--clients: a room needs at least 2 clients, roundtrip at least 1")
    if not 0 < args.seconds <= 600:
        raise ClientError("--seconds must be in (0, 600]")
    model = load_model(args.model)
    config = SimConfig(
        server=args.server,
        room=args.room or f"profile-{os.getpid()}-{int(time.time())}",
        clients=args.clients,
        seconds=args.seconds,
        mode=mode_from_args(model.card, args),
        block_ms=args.block_ms,
        playout_ms=args.playout_ms,
        api_key=args.api_key,
    )
    sources = _sources(args, model.card.sample_rate)
    started = time.perf_counter()
    if args.mode == "room":
        profile = analyze(asyncio.run(run_room(model, sources, config)), model)
    else:
        profile = analyze(asyncio.run(run_roundtrip(model, sources, config)), model)
    wall = time.perf_counter() - started
    profile["config"] = _config(args, config, model, wall)
    paths = write_reports(profile, args.out)
    if not args.quiet:
        print(format_table(profile))
        print(f"reports: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return EXIT_OK


def _config(args: argparse.Namespace, config: SimConfig, model: Any, wall: float) -> dict[str, Any]:
    card = model.card
    return {
        "server": config.server,
        "mode": args.mode,
        "room": config.room if args.mode == "room" else None,
        "clients": config.clients,
        "seconds": config.seconds,
        "num_codebooks": config.mode_for(card).num_codebooks,
        "lowband_layout": config.mode_for(card).lowband_layout,
        "bitrate_kbps": config.mode_for(card).kbps,
        "block_ms": config.block_ms,
        "playout_ms": config.playout_ms,
        "input": str(args.input) if args.input else "synthetic test signal",
        "model_id": card.model_id,
        "random_weights": card.random_weights,
        "wall_s": wall,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_count": os.cpu_count(),
    }
