"""Streaming engine benchmark: per-frame compute, memory per stream, streams per process.

Measures, on ONE onnxruntime thread (intra- and inter-op threads = 1):

* per-frame encoder and decoder step time of a stream run alone (p50, p99, real-time
  factor = compute time / audio time), and the 48 kHz client resampling cost per frame;
* memory per stream: the recurrent ONNX state (card) and everything a stream allocates;
* duplex ticks for B = 1..128 streams: every stream pushes one frame of PCM, is encoded, its
  tokens are pushed into a decoder stream, decoded and pulled.  Unbatched: each stream steps
  alone (2 ONNX calls per stream); batched: one `BatchEngine` call per direction.  A process
  sustains B real-time duplex streams while the p99 tick fits in one frame period;
* the whole machine: one engine process per CPU core, all ticking back to back at once (a
  harsher load than real-time pacing: no idle time between ticks, shared memory bandwidth),
  B batched streams each; the machine sustains cores x B streams while every process's p99
  tick fits in one frame period.

Writes benchmarks/results/engine.json, docs/img/engine_batching.png and the "Streaming engine"
section of docs/benchmarks.md (between its markers; the rest of the file is kept).

    python benchmarks/bench_engine.py            # < 60 s
    python benchmarks/bench_engine.py --quick    # a few seconds, smaller sweep
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from streaming.batch import BatchEngine  # noqa: E402
from streaming.framing import Resampler  # noqa: E402
from streaming.model import BitrateMode, CodecModel  # noqa: E402
from streaming.stream import DecoderStream, EncoderStream  # noqa: E402

SECTION_BEGIN = "<!-- bench_engine:begin -->"
SECTION_END = "<!-- bench_engine:end -->"


def speech(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """Synthetic speech-like int16 test signal (harmonic glide, syllable envelope, noise)."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    phase = 2 * np.pi * np.cumsum(140 + 40 * np.sin(2 * np.pi * 0.7 * t)) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.6 + 0.4 * np.sin(8 * np.pi * t))
    x = 0.25 * x + 0.02 * rng.standard_normal(n)
    return np.clip(x * 32767, -32768, 32767).astype(np.int16)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan


def per_frame(model: CodecModel, frames: int, kbps: float) -> dict[str, Any]:
    """Encoder / decoder step time of one stream alone at the `kbps` mode, ms per frame."""
    card = model.card
    enc, dec = EncoderStream(model, max_buffered_ms=frames * card.frame_ms + 100), None
    enc.set_bitrate(kbps)
    enc.push(speech(card.sample_rate, frames * card.frame_ms / 1000 + 0.1))
    dec = DecoderStream(model, max_pending_frames=4, max_buffered_ms=200)
    enc_ms: list[float] = []
    dec_ms: list[float] = []
    for _ in range(frames):
        t0 = time.perf_counter()
        frame = enc.step()
        t1 = time.perf_counter()
        assert frame is not None
        dec.push(frame)
        t2 = time.perf_counter()
        dec.step()
        t3 = time.perf_counter()
        dec.pull()
        enc_ms.append(1000 * (t1 - t0))
        dec_ms.append(1000 * (t3 - t2))
    out: dict[str, Any] = {"frames": frames}
    for name, values in (("encode", enc_ms), ("decode", dec_ms)):
        p50, p99 = pct(values, 50), pct(values, 99)
        out[name] = {
            "p50_ms": p50,
            "p99_ms": p99,
            "mean_ms": float(np.mean(values)),
            "rtf_p50": p50 / card.frame_ms,
            "rtf_p99": p99 / card.frame_ms,
        }
    return out


def resampling(model: CodecModel, frames: int) -> dict[str, Any]:
    """Cost per frame of 48 kHz client audio: 48k -> model rate and back, ms."""
    card = model.card
    down, up = Resampler(48000, card.sample_rate), Resampler(card.sample_rate, 48000)
    n_in = card.frame_size * 48000 // card.sample_rate
    x = speech(48000, n_in * frames / 48000).astype(np.float32) / np.float32(32768)
    mid = np.zeros(down.max_output(n_in), np.float32)
    out = np.zeros(up.max_output(card.frame_size), np.float32)
    d_ms, u_ms = [], []
    for k in range(frames):
        t0 = time.perf_counter()
        got = down.process(x[k * n_in : (k + 1) * n_in], mid)
        t1 = time.perf_counter()
        up.process(mid[: min(got, card.frame_size)], out)
        t2 = time.perf_counter()
        d_ms.append(1000 * (t1 - t0))
        u_ms.append(1000 * (t2 - t1))
    return {
        "down_48k_p50_ms": pct(d_ms, 50),
        "up_48k_p50_ms": pct(u_ms, 50),
        "down_delay_ms": down.delay_ms,
        "up_delay_ms": up.delay_ms,
    }


def duplex_ticks(model: CodecModel, batch: int, ticks: int, batched: bool,
                 kbps: float) -> dict[str, Any]:
    """Time of `ticks` duplex ticks of `batch` streams (PCM in -> tokens -> PCM out) at the
    `kbps` mode (codebooks and low band), ms."""
    card = model.card
    n = card.frame_size
    audio = speech(card.sample_rate, (ticks + 2) * card.frame_ms / 1000, seed=batch)
    encs = [EncoderStream(model, max_buffered_ms=200) for _ in range(batch)]
    for enc in encs:
        enc.set_bitrate(kbps)
    decs = [DecoderStream(model, max_pending_frames=4, max_buffered_ms=200) for _ in range(batch)]
    engine = BatchEngine(model, capacity=batch)
    tick_ms: list[float] = []
    enc_ms: list[float] = []
    dec_ms: list[float] = []
    for k in range(ticks + 2):  # 2 warm-up ticks
        chunk = audio[k * n : (k + 1) * n]
        t0 = time.perf_counter()
        for s in encs:
            s.push(chunk)
        t1 = time.perf_counter()
        frames = engine.encode_step(encs) if batched else [s.step() for s in encs]
        t2 = time.perf_counter()
        for d, f in zip(decs, frames, strict=True):
            assert f is not None
            d.push(f)
        t3 = time.perf_counter()
        if batched:
            engine.decode_step(decs)
        else:
            for d in decs:
                d.step()
        t4 = time.perf_counter()
        for d in decs:
            d.pull()
        t5 = time.perf_counter()
        if k >= 2:
            tick_ms.append(1000 * (t5 - t0))
            enc_ms.append(1000 * (t2 - t1))
            dec_ms.append(1000 * (t4 - t3))
    p50, p99 = pct(tick_ms, 50), pct(tick_ms, 99)
    return {
        "batch": batch,
        "batched": batched,
        "tick_p50_ms": p50,
        "tick_p99_ms": p99,
        "encode_p50_ms": pct(enc_ms, 50),
        "decode_p50_ms": pct(dec_ms, 50),
        "per_stream_p50_ms": p50 / batch,
        "realtime": p99 <= card.frame_ms,
    }


def _machine_worker(model_dir: str | None, batch: int, ticks: int, kbps: float, start: Any,
                    queue: Any) -> None:
    """One engine process of the machine measurement: waits for the common start, then runs
    batched duplex ticks and reports its row."""
    model = CodecModel.load(Path(model_dir) if model_dir else None, threads=1)
    duplex_ticks(model, batch, 3, True, kbps)  # warm-up outside the measured window
    start.wait()
    queue.put(duplex_ticks(model, batch, ticks, True, kbps))


def machine_capacity(model_dir: Path | None, per_process: list[int], ticks: int,
                     frame_ms: float, kbps: float) -> dict[str, Any]:
    """Concurrent real-time duplex streams of the whole machine: for each B in `per_process`,
    one process per core runs B batched streams at once; sustained while every process's
    p99 tick fits in a frame period."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    processes_n = os.cpu_count() or 1
    rows = []
    for batch in per_process:
        start, queue = ctx.Barrier(processes_n), ctx.Queue()
        procs = [ctx.Process(target=_machine_worker,
                             args=(str(model_dir) if model_dir else None, batch, ticks, kbps,
                                   start, queue))
                 for _ in range(processes_n)]
        for proc in procs:
            proc.start()
        results = [queue.get() for _ in procs]
        for proc in procs:
            proc.join()
        worst_p99 = max(r["tick_p99_ms"] for r in results)
        row = {"processes": processes_n, "streams_per_process": batch,
               "streams": processes_n * batch, "worst_tick_p99_ms": worst_p99,
               "tick_p50_ms": float(np.median([r["tick_p50_ms"] for r in results])),
               "realtime": worst_p99 <= frame_ms}
        rows.append(row)
        print(f"machine: {processes_n} x {batch} streams, worst p99 tick {worst_p99:.2f} ms",
              flush=True)
    sustained = max((r["streams"] for r in rows if r["realtime"]), default=0)
    return {"rows": rows, "sustained_streams": sustained}


def capacity(rows: list[dict[str, Any]], frame_ms: float) -> dict[str, Any]:
    """Largest swept B whose p99 tick fits a frame, and a linear extrapolation of B."""
    fitting = [r["batch"] for r in rows if r["realtime"]]
    best = max(fitting, default=0)
    last = rows[-1]
    extrapolated = int(frame_ms / last["per_stream_p50_ms"])
    return {
        "max_swept_realtime_streams": best,
        "all_swept_sizes_realtime": all(r["realtime"] for r in rows),
        "extrapolated_streams": extrapolated,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame_ms = result["model"]["frame_ms"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (
        ("unbatched", "unbatched (1 ONNX call per stream)", "o--"),
        ("batched", "BatchEngine (1 call per direction)", "s-"),
    ):
        rows = result["duplex"][key]
        b = [r["batch"] for r in rows]
        ax1.plot(b, [r["tick_p99_ms"] for r in rows], style, label=f"{label}, p99")
        ax2.plot(b, [r["per_stream_p50_ms"] for r in rows], style, label=label)
    ax1.axhline(frame_ms, color="red", lw=1, label=f"frame period {frame_ms:g} ms")
    sizes = [r["batch"] for r in result["duplex"]["batched"]]
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
    ax1.set_yscale("log")
    ax1.set_xlabel("concurrent duplex streams B")
    ax1.set_ylabel("time per tick (ms)")
    ax1.set_title("One duplex tick: B frames encoded + decoded")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("concurrent duplex streams B")
    ax2.set_ylabel("ms per stream per tick (p50)")
    ax2.set_title("Cost per stream")
    ax2.legend(fontsize=8)
    tag = " (RANDOM-WEIGHT tiny model)" if result["model"]["random_weights"] else ""
    fig.suptitle(f"Streaming engine, 1 thread, model {result['model']['model_id']}{tag}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mode_text(mode: dict[str, Any] | None) -> str:
    if mode is None:
        return ""
    low = (f" + low-band layout {mode['lowband_layout']}" if mode["lowband_layout"] else
           ", no low band")
    return (f"Streams encode at the {mode['kbps']:g} kbps mode ({mode['num_codebooks']} "
            f"codebook{'s' if mode['num_codebooks'] != 1 else ''}{low}); the encoder graph runs "
            "only the quantizer stages a batch needs.")


def markdown(result: dict[str, Any]) -> str:
    m, pf, mem = result["model"], result["per_frame"], result["memory"]
    rs = result["resampling"]
    caps = result["capacity"]
    lines = [
        SECTION_BEGIN,
        "## Streaming engine",
        "",
        "`python benchmarks/bench_engine.py` (JSON: `benchmarks/results/engine.json`). "
        f"Model `{m['model_id']}`, one onnxruntime thread, {result['machine']['cpus']} CPU "
        f"cores ({result['machine']['processor']}), onnxruntime {result['machine']['onnxruntime']}"
        f", {result['date']}{', --quick' if result['quick'] else ''}. "
        + _mode_text(result.get("mode")),
        "",
    ]
    if m["random_weights"]:
        lines += [
            "**These numbers are for the tiny RANDOM-WEIGHT placeholder model** bundled until the "
            "trained model lands; they will be re-run on the trained model (same interface, "
            "likely larger). The benchmark machine was shared with a training job, so "
            "tails (p99) are noisy.",
            "",
        ]
    lines += [
        "| per frame (20 ms audio), one stream alone | p50 | p99 | real-time factor (p50) |",
        "|---|---|---|---|",
    ]
    for name in ("encode", "decode"):
        r = pf[name]
        lines.append(
            f"| {name} step | {r['p50_ms']:.3f} ms | {r['p99_ms']:.3f} ms | {r['rtf_p50']:.4f} |"
        )
    lines += [
        "",
        f"A 48 kHz client adds resampling: {rs['down_48k_p50_ms']:.3f} ms (48 kHz to the model "
        f"rate) + {rs['up_48k_p50_ms']:.3f} ms (back) per frame (p50), and "
        f"{rs['down_delay_ms']:.3f} + {rs['up_delay_ms']:.3f} ms of filter delay.",
        "",
        f"Memory per stream: recurrent ONNX state {mem['encoder_state_bytes']} B (encoder) + "
        f"{mem['decoder_state_bytes']} B (decoder); everything a duplex stream allocates "
        f"(double-buffered state, resampler, 1 s PCM buffers) "
        f"{mem['duplex_stream_bytes'] / 1024:.0f} KiB at 16 kHz, "
        f"{mem['duplex_stream_48k_bytes'] / 1024:.0f} KiB at 48 kHz.",
        "",
        "Duplex ticks (B streams each push 20 ms of PCM, are encoded, decoded and pulled):",
        "",
        "| B | unbatched p50 / p99 | batched p50 / p99 | batched per stream |",
        "|---|---|---|---|",
    ]
    for u, b in zip(result["duplex"]["unbatched"], result["duplex"]["batched"], strict=True):
        lines.append(
            f"| {u['batch']} | {u['tick_p50_ms']:.2f} / {u['tick_p99_ms']:.2f} ms | "
            f"{b['tick_p50_ms']:.2f} / {b['tick_p99_ms']:.2f} ms | "
            f"{b['per_stream_p50_ms']:.3f} ms |"
        )
    cu, cb = caps["unbatched"], caps["batched"]
    mc_rows = result["machine_capacity"]["rows"]

    def cap_text(c: dict[str, Any]) -> str:
        swept = c["max_swept_realtime_streams"]
        more = "+" if c["all_swept_sizes_realtime"] else ""
        return (
            f"{swept}{more} measured (p99 tick <= {m['frame_ms']:g} ms), "
            f"~{c['extrapolated_streams']} extrapolated"
        )

    lines += [
        "",
        f"Real-time duplex streams per process (one core): unbatched {cap_text(cu)}; "
        f"batched {cap_text(cb)}.",
        "",
        f"The whole machine ({mc_rows[0]['processes']} engine processes, one per core, all "
        "ticking back to back at once, B batched streams each): "
        + ", ".join(f"{r['streams']} streams: worst p99 tick {r['worst_tick_p99_ms']:.1f} ms"
                    for r in mc_rows)
        + f"; **{result['machine_capacity']['sustained_streams']} concurrent real-time duplex "
        "streams sustained**.",
        "",
        "A real server also spends time on the network, packets and jitter buffers: keep "
        "headroom below these figures.",
        "",
        "![engine batching](img/engine_batching.png)",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _mode_fields(mode: BitrateMode) -> dict[str, Any]:
    return {"num_codebooks": mode.num_codebooks, "lowband_layout": mode.lowband_layout,
            "nominal_kbps": mode.kbps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sweep, a few seconds")
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: bundled)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/engine.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/img/engine_batching.png")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs/benchmarks.md")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument("--kbps", type=float, default=6.0,
                        help="bitrate mode of the encoder streams (default 6: the richest call "
                             "mode, 3 codebooks + low band)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model = CodecModel.load(args.model, threads=1)
    card = model.card
    frames = 150 if args.quick else 500
    sizes = [1, 2, 4, 8, 16, 32, 64] if args.quick else [1, 2, 4, 8, 16, 32, 64, 128]
    ticks = 15 if args.quick else 100

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "quick": args.quick,
        "model": {
            "model_id": card.model_id,
            "random_weights": card.random_weights,
            "sample_rate": card.sample_rate,
            "frame_size": card.frame_size,
            "frame_ms": card.frame_ms,
            "num_codebooks": card.num_codebooks,
        },
        "mode": {"kbps": args.kbps, **_mode_fields(card.mode_for_bitrate(args.kbps))},
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "onnxruntime": ort.__version__,
            "threads": 1,
        },
    }
    print(f"model {card.model_id} (random weights: {card.random_weights})", flush=True)
    result["per_frame"] = per_frame(model, frames, args.kbps)
    print("per frame:", json.dumps(result["per_frame"]), flush=True)
    result["resampling"] = resampling(model, frames)

    enc16, dec16 = EncoderStream(model), DecoderStream(model)
    enc48, dec48 = EncoderStream(model, rate=48000), DecoderStream(model, rate=48000)
    result["memory"] = {
        "encoder_state_bytes": card.encoder.state_nbytes,
        "decoder_state_bytes": card.decoder.state_nbytes,
        "duplex_stream_bytes": enc16.nbytes + dec16.nbytes,
        "duplex_stream_48k_bytes": enc48.nbytes + dec48.nbytes,
        "batch_engine_bytes_at_128": BatchEngine(model, capacity=128).nbytes,
    }

    result["duplex"] = {"unbatched": [], "batched": []}
    for b in sizes:
        for key, batched in (("unbatched", False), ("batched", True)):
            row = duplex_ticks(model, b, ticks, batched, args.kbps)
            result["duplex"][key].append(row)
            print(
                f"B={b:4d} {key:9s} tick p50 {row['tick_p50_ms']:7.2f} ms "
                f"p99 {row['tick_p99_ms']:7.2f} ms  per stream {row['per_stream_p50_ms']:.3f} ms",
                flush=True,
            )
    result["capacity"] = {
        key: capacity(rows, card.frame_ms) for key, rows in result["duplex"].items()
    }
    machine_sizes = [32, 50] if args.quick else [32, 40, 48, 50, 56, 64]
    result["machine_capacity"] = machine_capacity(args.model, machine_sizes,
                                                  ticks, card.frame_ms, args.kbps)
    result["elapsed_s"] = time.perf_counter() - started

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(result, args.plot)
    if not args.no_doc:
        write_section(args.doc, markdown(result))
    print(f"capacity: {json.dumps(result['capacity'])}")
    print(f"wrote {args.out}, {args.plot}" + ("" if args.no_doc else f", {args.doc}"))
    print(f"elapsed {result['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
