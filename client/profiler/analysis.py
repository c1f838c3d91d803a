"""From a finished simulation to the profile: stage budget, counters, signal check.

`analyze(clients, model)` returns a JSON-ready dict (the content of profile.json):

* `stages`: p50/p95/p99/mean/min/max of each stage (client.profiler.stages), ms;
* `e2e`: the mouth-to-ear delay of every frame on the timestamps (sender capture of its
  first sample to receiver playout, + the decoder overlap), `stage_sum` and the residual
  e2e - sum (0 up to rounding: the stages telescope);
* `signal`: the independent check: each receiver's speaker recording is located, in 0.5 s
  windows, in the offline decode of each sender's clip (client.files, the same engine) by
  the phase-insensitive measures of client.profiler.spectral (log-mel spectrograms, refined
  on the waveform where it agrees: a decoder with its own oscillator state plays the right
  audio with other harmonic phases than an offline decode); the lag gives the delay of real
  audio samples from capture to playout, compared with the timestamp e2e of the frame played
  at the window start (`residual_ms`), and each window's spectral similarity to the decode;
* `frames`: sent, played, late (after their playout tick), lost, concealed, dropped (by a
  catch-up: the jitter buffer's, or in roundtrip mode the speaker buffer's, whose dropped
  received PCM is `pcm_dropped_samples`), ...;
* `rtf`: encoder and decoder compute per frame / frame duration; the server stage likewise;
* `scheduler`: how late the simulated device ticks ran (an overloaded machine shows here).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from client.files import decode_frames_local, encode_pcm_local
from client.profiler.sim import RoundtripClient, SimClient, SimConfig
from client.profiler.spectral import (
    WAVEFORM_MATCH,
    locate,
    log_spectral_distance,
    similarity,
)
from client.profiler.stages import (
    ROUNDTRIP_STAGES,
    Breakdown,
    ClockOffset,
    StageStats,
    breakdown,
    estimate_offset,
    from_timestamps,
    room_hops,
    summarize,
    unwrap_us,
)
from client.virtual import VirtualAudio
from streaming.model import BitrateMode, CodecModel

__all__ = ["Participant", "Window", "analyze", "reference_decode", "signal_windows"]

F32: TypeAlias = npt.NDArray[np.float32]
F64: TypeAlias = npt.NDArray[np.float64]

WINDOW_S = 0.5
SEARCH_S = 0.1
MIN_SIMILARITY = 0.3
"""A window counts when its spectral similarity to the sender's decode reaches this (a
correct decode: about 0.8-1; other audio: about 0, client.profiler.spectral)."""


class Participant(Protocol):
    """What the signal check needs of a simulated client."""

    name: str
    participant_id: int
    block: int
    source: F32
    port: VirtualAudio
    tick_lag_ms: list[float]

    @property
    def config(self) -> SimConfig: ...


def reference_decode(model: CodecModel, source: F32, mode: BitrateMode | int) -> F32:
    """The offline decode of `source` (model rate) in bitrate `mode` (an int: that many
    codebooks without low band), aligned to it (decoder delay removed)."""
    card = model.card
    n, d = card.frame_size, card.output_delay_samples
    frames = -(-(source.shape[0] + d) // n)
    padded = np.zeros(frames * n, dtype=np.float32)
    padded[: source.shape[0]] = source
    tokens = encode_pcm_local(model, padded, mode)
    return decode_frames_local(model, tokens)[d : d + source.shape[0]]


class Window(NamedTuple):
    """One window of a receiver's recording located in a sender's reference decode."""

    time: float
    """Play time of the window start (s)."""
    delay: float
    """Measured delay of its samples from the sender's capture (s)."""
    similarity: float
    """Spectral similarity to the reference at that delay (client.profiler.spectral)."""
    lsd_db: float
    """Log-spectral distance to the reference at that delay (dB)."""
    refined: bool
    """Whether the lag was refined on the waveform (phase-coherent audio)."""
    expected: float
    """The timestamp e2e of the frame played at the window start (s)."""


def signal_windows(
    receiver: Participant,
    sender: Participant,
    reference: F32,
    expected: Callable[[float], float | None],
) -> list[Window]:
    """Measure the delay of real samples from `sender`'s microphone to `receiver`'s speaker.

    For each 0.5 s window of the receiver's recording, the matching stretch of the sender's
    reference decode is searched (`spectral.locate`: log-mel spectrograms, refined on the
    waveform where it agrees) within ±`SEARCH_S` of the delay `expected(t)` (the timestamp
    e2e at the window start; None: skip), so other senders in the mix cannot produce false
    matches; a window counts when its spectral similarity to the decode reaches
    `MIN_SIMILARITY`.
    """
    rate = receiver.port.rate
    rec = receiver.port.recording[: receiver.port.recorded]
    w = int(WINDOW_S * rate)
    out: list[Window] = []
    for i0 in range(0, rec.shape[0] - w, w):
        window = rec[i0 : i0 + w]
        if float(window @ window) < 1e-8 * w:
            continue
        t0 = receiver.port.play_time(i0)
        guess = expected(t0)
        if guess is None:
            continue
        centre = _source_index(sender, t0 - guess)
        j_lo = max(0, centre - int(SEARCH_S * rate))
        segment = reference[j_lo : min(centre + int(SEARCH_S * rate) + w, reference.shape[0])]
        if segment.shape[0] < w + 1:
            continue
        match = locate(window, segment, rate)
        k = int(match.offset)
        ref = segment[k : k + w]
        score = similarity(ref, window, rate)
        if score >= MIN_SIMILARITY:
            captured = sender.port.capture_time(j_lo + k) + (match.offset - k) / rate
            lsd = log_spectral_distance(ref, window, rate)
            out.append(Window(t0, t0 - captured, score, lsd, match.refined, guess))
    return out


def _source_index(sender: Participant, t: float) -> int:
    """Index of the sender's source sample captured at about time `t`."""
    port = sender.port
    times = port.ticks[: min(port.tick_count, port.ticks.shape[0])]
    block = int(np.searchsorted(times, t))
    end = int(np.clip(block, 0, max(times.shape[0] - 1, 0)))
    offset = round((t - float(times[end])) * port.rate) if times.shape[0] else 0
    return max(0, end * sender.block + sender.block - 1 + offset)


def _expected(played: F64, e2e: F64, frame_s: float) -> Callable[[float], float | None]:
    """The timestamp e2e (s) of the frame being played at time t, None if none is."""

    def at(t: float) -> float | None:
        f = int(np.searchsorted(played, t, side="right")) - 1
        if f < 0 or t - played[f] > frame_s:
            return None
        return float(e2e[f]) / 1000.0

    return at


def _signal_check(
    clients: Sequence[Participant], model: CodecModel, b: Breakdown, *, self_only: bool
) -> dict[str, Any]:
    residuals: list[float] = []
    delays: list[float] = []
    scores: list[float] = []
    distances: list[float] = []
    refined = 0
    refs = {
        c.participant_id: reference_decode(model, c.source, c.config.mode_for(model.card))
        for c in clients
    }
    receivers = np.array(b.receiver)
    frame_s = model.card.frame_ms / 1000.0
    for rx in clients:
        for tx in clients:
            if (tx is rx) != self_only:
                continue
            mask = (receivers == rx.name) & (b.sender == tx.participant_id)
            order = np.argsort(b.played[mask])
            expected = _expected(b.played[mask][order], b.e2e[mask][order], frame_s)
            for win in signal_windows(rx, tx, refs[tx.participant_id], expected):
                delays.append(1000.0 * win.delay)
                scores.append(win.similarity)
                distances.append(win.lsd_db)
                refined += win.refined
                residuals.append(1000.0 * (win.delay - win.expected))
    stats = StageStats.of(np.array(delays, dtype=np.float64)).as_dict()
    res = np.array(residuals, dtype=np.float64)
    return {
        "method": "speaker recording located in the offline decode of the sent clip on "
        f"log-mel spectrograms (1 ms hop; refined on the waveform where its normalised "
        f"correlation reaches {WAVEFORM_MATCH:g}), {WINDOW_S:g} s windows, lag searched "
        f"within +-{1000 * SEARCH_S:g} ms of the timestamp e2e, minimum spectral similarity "
        f"{MIN_SIMILARITY:g}",
        "windows": len(delays),
        "waveform_refined_windows": refined,
        "delay_ms": stats,
        "similarity_median": float(np.median(scores)) if scores else None,
        "lsd_db_median": float(np.median(distances)) if distances else None,
        "residual_ms": {
            "median": float(np.median(res)) if res.size else None,
            "p95_abs": float(np.percentile(np.abs(res), 95)) if res.size else None,
            "max_abs": float(np.abs(res).max()) if res.size else None,
        },
    }


def _room_frames(clients: Sequence[SimClient]) -> dict[str, int]:
    totals = {"sent": 0, "received": 0, "played": 0, "late": 0, "lost": 0, "concealed": 0}
    totals |= {"comfort_noise": 0, "dropped": 0, "playback_underrun_samples": 0}
    totals["pcm_dropped_samples"] = 0  # no PCM is received in a room of token clients
    for c in clients:
        stats = c.playout.stats()
        totals["sent"] += c.capture.packets_sent
        for key in ("received", "played", "late", "lost", "concealed", "comfort_noise"):
            totals[key] += int(getattr(stats, key))
        totals["dropped"] += stats.dropped
        totals["playback_underrun_samples"] += c.port.counters().playback_underrun
    return totals


def _roundtrip_frames(clients: Sequence[RoundtripClient]) -> dict[str, int]:
    totals = {"sent": 0, "received": 0, "played": 0, "late": 0, "lost": 0, "concealed": 0}
    totals |= {"comfort_noise": 0, "dropped": 0, "playback_underrun_samples": 0}
    totals["pcm_dropped_samples"] = 0
    for c in clients:
        totals["sent"] += c.frames_sent
        totals["received"] += c._frames_in
        totals["played"] += len(c.records)
        totals["dropped"] += c.frames_dropped
        totals["pcm_dropped_samples"] += c.pcm_dropped
        late = c.end.get("late_frames", 0)
        totals["late"] += late if isinstance(late, int) else 0
        totals["playback_underrun_samples"] += c.port.counters().playback_underrun
    return totals


def _rtf(
    frame_ms: float, enc: list[float], dec: list[float], server_p50: float
) -> dict[str, float]:
    return {
        "encode": float(np.mean(enc)) / frame_ms if enc else math.nan,
        "decode": float(np.mean(dec)) / frame_ms if dec else math.nan,
        "server_stage_p50": server_p50 / frame_ms,
    }


def _roundtrip_breakdown(
    clients: Sequence[RoundtripClient], overlap_ms: float
) -> tuple[Breakdown, ClockOffset]:
    records = [r for c in clients for r in c.records]
    hops = [
        (
            r.sent,
            unwrap_us(r.server_recv_us, r.arrival),
            unwrap_us(r.server_send_us, r.arrival),
            r.arrival,
        )
        for r in records
        if r.server_recv_us
    ]
    offset = estimate_offset(hops)
    rows = [
        (
            r.capture,
            r.sent,
            srv_recv - offset.seconds,
            srv_send - offset.seconds,
            r.arrival,
            r.played,
        )
        for r, (_, srv_recv, srv_send, _) in zip(
            (r for r in records if r.server_recv_us), hops, strict=True
        )
    ]
    ids = {c.name: c.participant_id for c in clients}
    senders = [ids[r.client] for r in records if r.server_recv_us]
    receivers = [r.client for r in records if r.server_recv_us]
    return from_timestamps(ROUNDTRIP_STAGES, rows, senders, receivers, overlap_ms), offset


def analyze(
    clients: Sequence[SimClient] | Sequence[RoundtripClient], model: CodecModel
) -> dict[str, Any]:
    """The profile of a finished run (see the module doc)."""
    card = model.card
    room = [c for c in clients if isinstance(c, SimClient)]
    trips = [c for c in clients if isinstance(c, RoundtripClient)]
    if room:
        plays = [r for c in room for r in c.playout.records]
        offset = estimate_offset(room_hops(plays))
        sends = [r for c in room for r in c.capture.records]
        b = breakdown(sends, plays, offset, card.output_delay_ms)
        frames = _room_frames(room)
        enc = [c.encode_stats.compute.mean for c in room if c.encode_stats.count]
        dec = [c.decode_stats.compute.mean for c in room if c.decode_stats.count]
        participants: Sequence[Participant] = room
    else:
        b, offset = _roundtrip_breakdown(trips, card.output_delay_ms)
        frames = _roundtrip_frames(trips)
        enc, dec = [], []
        participants = trips
    stats = summarize(b)
    residual = b.e2e - b.stage_sum
    lags = np.array([lag for c in participants for lag in c.tick_lag_ms], dtype=np.float64)
    return {
        "mode": "room" if room else "roundtrip",
        "stages": [
            {"key": s.key, "label": s.label, "description": s.description} | stats[s.key].as_dict()
            for s in b.stages
        ],
        "e2e": stats["e2e"].as_dict(),
        "stage_sum": stats["stage_sum"].as_dict(),
        "residual_ms": {
            "mean": float(residual.mean()) if residual.size else None,
            "max_abs": float(np.abs(residual).max()) if residual.size else None,
        },
        "signal": _signal_check(participants, model, b, self_only=not room),
        "clock_offset": {"seconds": offset.seconds, "method": offset.method},
        "frames": frames,
        "rtf": _rtf(card.frame_ms, enc, dec, stats["server"].p50),
        "scheduler": {"tick_lag_ms": StageStats.of(lags).as_dict()},
        "per_client": [_client(c) for c in participants],
        "samples": {s.key: b.values[s.key].tolist() for s in b.stages} | {"e2e": b.e2e.tolist()},
    }


def _client(c: Participant) -> dict[str, Any]:
    out: dict[str, Any] = {"name": c.name, "participant_id": c.participant_id}
    if isinstance(c, SimClient):
        stats = c.playout.stats()
        out |= {
            "sent": c.capture.packets_sent,
            "played": stats.played,
            "late": stats.late,
            "lost": stats.lost,
            "concealed": stats.concealed,
        }
    elif isinstance(c, RoundtripClient):
        out |= {
            "sent": c.frames_sent,
            "played": len(c.records),
            "dropped": c.frames_dropped,
            "pcm_dropped_s": c.pcm_dropped_s,
        }
    out["server_end"] = getattr(c, "end", {})
    return out
