"""Server benchmark: how many concurrent real-time round-trip sessions one server sustains.

Starts `codec-server` (python -m server, bundled model, default settings but the session
limit) in a subprocess on a free loopback port, then, for N = 10, 20, 30, 40, 50, 75, 100, 150
concurrent WebSocket clients on /v1/roundtrip, each streams a real speech clip
(../shared/data/dev) in 20 ms PCM chunks at real time (phases spread over the frame period)
and measures, per frame, the round-trip latency: from handing chunk k to the socket to
receiving its decoded PCM.  A level counts as sustained when p99 <= one frame period (20 ms)
and at most 1 % of the frames are late (round trip > 20 ms).  Server-side figures come from
its /metrics (late frames, mean batch size, mean compute per frame) and /proc (CPU of the
process, and of its engine threads: `codecstream_engine_cpu_seconds_total`, summed over the
`--engine-workers` threads, so it can exceed 100 %).

The clients run in this process (one asyncio loop, `websockets`), separate from the server
process but on the same machine, so on a small machine they compete with the server for CPU:
the result is a lower bound for the server alone.  To keep them light, every client sends
slices of one PCM buffer prepared once (no per-frame conversion) and its reader only stamps
arrival times.  The server runs with its default settings (engine workers, batching window)
unless `--server-arg` says otherwise; the JSON records both.

Writes benchmarks/results/server.json, docs/img/server_sessions.png and the "Server" section
of docs/benchmarks.md (between its markers; the rest of the file is kept).

    python benchmarks/bench_server.py            # ~10 s per level, < 3 min
    python benchmarks/bench_server.py --quick    # 3 levels of 3 s, < 30 s
    python benchmarks/bench_server.py --ramp 80 --ramp-interval 0.5   # admission at capacity

The levels run the server with its admission control off (`--max-slow-percent 100`: they
measure the engine past capacity); `--ramp N` keeps it on and reports how many of N
sessions arriving one by one were admitted and how the admitted ones fared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import websockets

ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / ".." / "shared" / "data" / "dev" / "ls_1688__1688-142285-0006.flac"
RESULTS = ROOT / "benchmarks" / "results" / "server.json"
PLOT = ROOT / "docs" / "img" / "server_sessions.png"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION_BEGIN = "<!-- bench_server:begin -->"
SECTION_END = "<!-- bench_server:end -->"
FRAME_S = 0.02
CHUNK = 320  # samples per 20 ms at 16 kHz
LEVELS = (10, 20, 30, 40, 50, 75, 100, 150)
QUICK_LEVELS = (10, 25, 50)
WARMUP_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        body: bytes = response.read()
        return body.decode()


def descendants(pid: int) -> list[int]:
    """Live child processes of `pid`, recursively (Linux /proc/PID/task/TID/children)."""
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids = [int(x) for x in children.read_text().split()]
        except (OSError, ValueError):
            continue
        for kid in kids:
            found += [kid, *descendants(kid)]
    return found


class ServerProcess:
    """`python -m server` in a subprocess on a free loopback port."""

    def __init__(self, extra: list[str], *, admission: bool = False) -> None:
        """`admission`: keep the server's admission control at capacity (off by default:
        the levels measure the engine past it)."""
        self.port = free_port()
        admit = [] if admission else ["--max-slow-percent", "100"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [
            sys.executable,
            "-m",
            "server",
            "--port",
            str(self.port),
            "--max-sessions",
            "4096",
            "--log-level",
            "warning",
            *admit,
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"server exited: {err[-2000:]}")
            with contextlib.suppress(OSError):
                if '"ready"' in http_get(f"http://127.0.0.1:{self.port}/readyz"):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready after 60 s")
            time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        """Summed values of the metrics of interest."""
        text = http_get(f"http://127.0.0.1:{self.port}/metrics")
        out: dict[str, float] = {}
        pattern = re.compile(
            r"^(codecstream_frames_late_total|codecstream_batch_size_(?:sum|count)|"
            r"codecstream_engine_cpu_seconds_total|codecstream_engine_slow_percent|"
            r"codecstream_frame_compute_seconds_(?:sum|count)|"
            r"codecstream_frame_queue_seconds_(?:sum|count))(\{[^}]*\})? (\S+)$"
        )
        for line in text.splitlines():
            m = pattern.match(line)
            if m:
                name = m.group(1) + (
                    "_encode" if 'direction="encode"' in (m.group(2) or "") else ""
                )
                out[name] = out.get(name, 0.0) + float(m.group(3))
        return out

    def cpu_seconds(self) -> float | None:
        """user + system CPU time of the server process and of its live child processes (the
        engine processes), s (Linux /proc)."""
        total = 0.0
        for pid in (self.proc.pid, *descendants(self.proc.pid)):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                if pid == self.proc.pid:
                    return None
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def client(
    url: str,
    pcm: bytes,
    start: float,
    seconds: float,
    latencies: list[float],
    counts: list[int],
    measure_from: float | None = None,
) -> None:
    """One real-time round-trip session: send a chunk every 20 ms, time each frame back
    (those sent from `measure_from`, default `WARMUP_S` after `start`)."""
    frames = int(seconds / FRAME_S)
    since = start + WARMUP_S if measure_from is None else measure_from
    sent: list[float] = [0.0] * frames
    nbytes = 2 * CHUNK
    async with websockets.connect(url, compression=None, open_timeout=30, max_queue=None) as ws:
        await ws.send(json.dumps({"type": "hello", "version": 1}))
        json.loads(await ws.recv())

        async def reader() -> None:
            k = 0
            async for message in ws:
                if isinstance(message, bytes):
                    if k < frames and sent[k] and sent[k] >= since:
                        latencies.append(time.perf_counter() - sent[k])
                    k += 1
                    counts[1] += 1

        task = asyncio.create_task(reader())
        total = len(pcm) // nbytes
        for k in range(frames):
            delay = start + k * FRAME_S - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            i = k % total
            sent[k] = time.perf_counter()
            await ws.send(pcm[i * nbytes : (i + 1) * nbytes])
            counts[0] += 1
        await ws.send(json.dumps({"type": "end"}))
        with contextlib.suppress(asyncio.TimeoutError, websockets.ConnectionClosed):
            await asyncio.wait_for(task, 10)


async def run_level(server: ServerProcess, n: int, seconds: float, pcm: bytes) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{server.port}/v1/roundtrip"
    latencies: list[float] = []
    counts = [0, 0]
    before, cpu0, t0 = server.metrics(), server.cpu_seconds(), time.perf_counter()
    own0 = time.process_time()
    base = time.perf_counter() + 1.0 + n * 0.004  # time to connect everybody
    tasks = [
        client(url, pcm, base + random.random() * FRAME_S, seconds, latencies, counts)
        for _ in range(n)
    ]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    after, cpu1, t1 = server.metrics(), server.cpu_seconds(), time.perf_counter()
    own1 = time.process_time()
    ms = np.asarray(latencies) * 1000.0
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    row: dict[str, Any] = {
        "sessions": n,
        "seconds": seconds,
        "frames_measured": int(ms.size),
        "frames_sent": counts[0],
        "frames_received": counts[1],
        "p50_ms": float(np.percentile(ms, 50)) if ms.size else math.nan,
        "p90_ms": float(np.percentile(ms, 90)) if ms.size else math.nan,
        "p99_ms": float(np.percentile(ms, 99)) if ms.size else math.nan,
        "max_ms": float(ms.max()) if ms.size else math.nan,
        "late_fraction": float(np.mean(ms > FRAME_S * 1000)) if ms.size else math.nan,
        "server_late_frames": delta.get("codecstream_frames_late_total", 0.0),
        "mean_batch_encode": _ratio(
            delta, "codecstream_batch_size_sum_encode", "codecstream_batch_size_count_encode"
        ),
        "mean_compute_ms": 1000
        * _ratio(
            delta,
            "codecstream_frame_compute_seconds_sum",
            "codecstream_frame_compute_seconds_count",
        ),
        "mean_queue_ms": 1000
        * _ratio(
            delta, "codecstream_frame_queue_seconds_sum", "codecstream_frame_queue_seconds_count"
        ),
        "server_cpu_percent": (
            100 * (cpu1 - cpu0) / (t1 - t0) if cpu0 is not None and cpu1 is not None else None
        ),
        "client_cpu_percent": 100 * (own1 - own0) / (t1 - t0),
        "engine_cpu_percent": 100
        * delta.get("codecstream_engine_cpu_seconds_total", 0.0)
        / (t1 - t0),
        "engine_slow_percent": after.get("codecstream_engine_slow_percent", math.nan),
        "errors": errors[:3],
        "error_count": len(errors),
    }
    row["sustained"] = bool(
        not errors and row["p99_ms"] <= FRAME_S * 1000 and row["late_fraction"] <= 0.01
    )
    return row


def _ratio(d: dict[str, float], num: str, den: str) -> float:
    return d.get(num, 0.0) / d[den] if d.get(den) else math.nan


def server_defaults() -> dict[str, Any]:
    """The engine settings the server uses when not given on the command line."""
    sys.path.insert(0, str(ROOT))
    from server.settings import Settings

    d = Settings()
    return {
        "engine_processes": d.engine_process_count,
        "engine_workers": d.engine_workers,
        "engine_threads": d.engine_thread_count,
        "batch_window_ms": d.batch_window_ms,
        "event_loop": d.event_loop,
    }


def load_pcm() -> bytes:
    if not CLIP.is_file():
        raise SystemExit(f"speech clip {CLIP} missing: ../shared/data/dev is needed")
    pcm, rate = sf.read(CLIP, dtype="int16")
    assert rate == 16000
    return bytes(np.asarray(pcm, dtype="<i2").tobytes())


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["levels"]
    n = [r["sessions"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(n, [r["p50_ms"] for r in rows], "o-", label="round trip p50")
    ax.plot(n, [r["p99_ms"] for r in rows], "s-", label="round trip p99")
    ax.axhline(FRAME_S * 1000, color="grey", ls="--", label="frame period (20 ms)")
    ax.set_xlabel("concurrent real-time round-trip sessions")
    ax.set_ylabel("ms (log)")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.bar(
        n,
        [100 * r["late_fraction"] for r in rows],
        width=max(n) / 40,
        alpha=0.25,
        color="red",
        label="late frames (%)",
    )
    ax2.set_ylabel("late frames, %")
    ax2.set_ylim(0, max(10.0, 1.2 * max(100 * r["late_fraction"] for r in rows)))
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    lines = ax.get_legend_handles_labels()
    bars = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + bars[0], lines[1] + bars[1], loc="upper left", fontsize=8)
    ax.set_title(f"codec-server round trip, {result['model_id']}, {result['machine']['cpus']} CPUs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    model_text = (
        "the tiny RANDOM-WEIGHT placeholder" if result["random_weights"] else "the bundled model"
    )
    lines = [
        SECTION_BEGIN,
        "## Server",
        "",
        f"`python benchmarks/bench_server.py{' --quick' if result['quick'] else ''}` "
        f"(JSON: `benchmarks/results/server.json`). Model `{result['model_id']}`, "
        f"{m['cpus']} CPU cores ({m['machine']}), {result['date']}, "
        f"{result['seconds_per_level']:g} s per level; server: {engine_text(result)}.",
        "",
        "N clients stream a real speech clip to `/v1/roundtrip` in real time (20 ms s16le "
        "chunks at 16 kHz, phases spread over the period); round trip = from sending chunk k to "
        "receiving its decoded PCM (encode + decode + queueing + loopback network, without the "
        "25 ms algorithmic latency). Sustained: p99 <= 20 ms and <= 1 % of frames over 20 ms. "
        "Server columns from its /metrics: late frames, streams per ONNX call, time of a batched "
        "step and the mean engine queueing per frame (batching window included); CPU from /proc "
        "(100 % = one core; server = its process and its engine processes; the engine figure "
        "sums the engine threads, wherever they run).",
        "",
        "**Caveats**: the clients run on the same machine (one Python process, competing with "
        "the server for the CPU: their share is in the last column), the model is "
        f"{model_text}, and this host's speed varies by up to 2x between days: compare only "
        "rows of one run.",
        "",
        "| sessions | round trip p50 | p90 | p99 | max | late (> 20 ms) | server late | mean batch "
        "| batched step | engine queue | server CPU (engine) | clients CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["levels"]:
        cpu = "-"
        if r["server_cpu_percent"] is not None:
            cpu = f"{r['server_cpu_percent']:.0f} % ({r.get('engine_cpu_percent', 0):.0f} %)"
        lines.append(
            f"| {r['sessions']} | {r['p50_ms']:.1f} ms | {r['p90_ms']:.1f} ms | "
            f"{r['p99_ms']:.1f} ms | {r['max_ms']:.0f} ms | {100 * r['late_fraction']:.2f} % | "
            f"{r['server_late_frames']:.0f} | {r['mean_batch_encode']:.1f} | "
            f"{r['mean_compute_ms']:.2f} ms | {r['mean_queue_ms']:.2f} ms | {cpu} | "
            f"{r['client_cpu_percent']:.0f} % |"
        )
    best = result["max_sustained_sessions"]
    lines += [
        "",
        f"Sustained in real time on this machine: **{best} sessions** "
        f"(largest level tried: {result['levels'][-1]['sessions']})."
        if best
        else "No level was sustained on this machine.",
        "",
        "![server sessions](img/server_sessions.png)",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def engine_text(result: dict[str, Any]) -> str:
    """The server's engine settings of a run, e.g. `2 engine processes, 6 ms batching
    window`."""
    d = dict(result.get("server_defaults") or {})
    args = [part for arg in result.get("server_args") or [] for part in arg.split("=", 1)]
    flags = (
        ("--engine-processes", "engine_processes"),
        ("--engine-workers", "engine_workers"),
        ("--engine-threads", "engine_threads"),
        ("--batch-window-ms", "batch_window_ms"),
    )
    for flag, key in flags:
        if flag in args and args.index(flag) + 1 < len(args):
            d[key] = args[args.index(flag) + 1]
    if not d:
        return "default settings"
    extra = f" (arguments {' '.join(result.get('server_args') or [])})" if args else ""
    processes = int(d.get("engine_processes", 0))
    threads = d.get("engine_threads")
    plural = "s" if str(threads) != "1" else ""
    per_process = f" of {threads} onnxruntime thread{plural}" if threads else ""
    where = (
        f"{processes} engine process{'es' if processes != 1 else ''}{per_process}"
        if processes
        else f"{d.get('engine_workers', '?')} engine thread(s) in the server process"
    )
    return f"{where}, {float(d.get('batch_window_ms', 0)):g} ms batching window{extra}"


def write_section(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


async def sweep(
    server: ServerProcess, levels: tuple[int, ...], seconds: float, budget_s: float
) -> list[dict[str, Any]]:
    pcm = load_pcm()
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for n in levels:
        if rows and time.monotonic() - t0 + seconds + 2 + n * 0.004 > budget_s:
            print(f"stopping before {n} sessions: time budget", flush=True)
            break
        row = await run_level(server, n, seconds, pcm)
        rows.append(row)
        print(
            f"{n:4d} sessions: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, "
            f"late {100 * row['late_fraction']:.2f} %, batch {row['mean_batch_encode']:.1f}, "
            f"cpu server {row['server_cpu_percent'] or 0:.0f} % (engine "
            f"{row['engine_cpu_percent']:.0f} %) clients "
            f"{row['client_cpu_percent']:.0f} %, engine slow {row['engine_slow_percent']:.1f} %, "
            f"errors {row['error_count']}",
            flush=True,
        )
        if row["late_fraction"] > 0.5 or row["error_count"] > n // 4:
            print("overloaded: stopping the sweep", flush=True)
            break
    return rows


async def ramp(server: ServerProcess, n: int, interval: float, hold: float) -> dict[str, Any]:
    """Sessions arrive one every `interval` s up to `n` and all stream until `hold` s after
    the last arrival; the round trips of the admitted sessions are measured over that hold.
    A session the server refuses (4429, at capacity) counts as refused."""
    url = f"ws://127.0.0.1:{server.port}/v1/roundtrip"
    pcm = load_pcm()
    latencies: list[float] = []
    counts = [0, 0]
    t0 = time.perf_counter() + 0.5
    end = t0 + n * interval + hold
    measure_from = t0 + n * interval

    async def session(k: int) -> str:
        start = t0 + k * interval
        await asyncio.sleep(max(start - time.perf_counter() - 0.05, 0.0))
        try:
            await client(url, pcm, start, end - start, latencies, counts, measure_from)
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            return "refused" if code == 4429 else f"closed {code}"
        return "admitted"

    outcomes = await asyncio.gather(*(session(k) for k in range(n)), return_exceptions=True)
    ms = np.asarray(latencies) * 1000.0
    labels = [o if isinstance(o, str) else repr(o) for o in outcomes]
    return {
        "arrivals": n,
        "interval_s": interval,
        "hold_s": hold,
        "admitted": labels.count("admitted"),
        "refused": labels.count("refused"),
        "other": sorted({o for o in labels if o not in ("admitted", "refused")})[:3],
        "p50_ms": float(np.percentile(ms, 50)) if ms.size else math.nan,
        "p99_ms": float(np.percentile(ms, 99)) if ms.size else math.nan,
        "late_fraction": float(np.mean(ms > FRAME_S * 1000)) if ms.size else math.nan,
    }


def run_clients(main: Any, loop: str) -> Any:
    """Run the clients' coroutine on uvloop (lighter per message) or asyncio's own loop."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 levels of 3 s (< 30 s)")
    parser.add_argument("--levels", type=str, help="comma-separated session counts")
    parser.add_argument("--seconds", type=float, help="seconds per level")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra codec-server argument (repeatable)"
    )
    parser.add_argument(
        "--client-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of the clients (default uvloop: less of the CPU they share with the "
        "server)",
    )
    parser.add_argument(
        "--ramp",
        type=int,
        metavar="N",
        help="instead of levels: N sessions arriving one every --ramp-interval s, all held "
        "--seconds after the last; prints admitted/refused and the admitted ones' round trips "
        "(server with its default admission control unless --server-arg says otherwise)",
    )
    parser.add_argument("--ramp-interval", type=float, default=0.25, help="s between arrivals")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--replot", action="store_true", help="rewrite plot and doc from the saved JSON"
    )
    args = parser.parse_args(argv)
    if args.replot:
        saved = json.loads(RESULTS.read_text(encoding="utf-8"))
        plot(saved, PLOT)
        write_section(DOC, markdown(saved))
        return 0
    levels = (
        tuple(int(x) for x in args.levels.split(","))
        if args.levels
        else QUICK_LEVELS
        if args.quick
        else LEVELS
    )
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    budget = 22.0 if args.quick else 165.0
    random.seed(0)
    if args.ramp:
        server = ServerProcess(args.server_arg, admission=True)
        try:
            outcome = run_clients(ramp(server, args.ramp, args.ramp_interval, seconds),
                                  args.client_loop)
        finally:
            server.stop()
        print(json.dumps({"server_args": args.server_arg, **outcome}))
        return 0
    server = ServerProcess(args.server_arg)
    try:
        card = json.loads(http_get(f"http://127.0.0.1:{server.port}/v1/models"))["models"][0]
        rows = run_clients(sweep(server, levels, seconds, budget), args.client_loop)
    finally:
        server.stop()
    sustained = [r["sessions"] for r in rows if r["sustained"]]
    result = {
        "benchmark": "bench_server",
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
        "model_id": card["model_id"],
        "random_weights": card["random_weights"],
        "seconds_per_level": seconds,
        "server_args": args.server_arg,
        "client_loop": args.client_loop,
        "server_defaults": server_defaults(),
        "machine": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "criterion": "p99 round trip <= 20 ms and <= 1 % of frames over 20 ms",
        "levels": rows,
        "max_sustained_sessions": max(sustained) if sustained else 0,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "levels"}, indent=1))
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        plot(result, PLOT)
        write_section(DOC, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
