"""The mouth-to-ear stage budget of every played frame, and its statistics.

A frame captured by client A and played by client B crosses these stages (times on one
clock; `*_us` packet fields are converted with their wraparound and the server clock offset):

| stage | from | to |
|---|---|---|
| capture | first sample captured (A) | frame complete in the encoder (A) |
| encode | frame complete | encoder step done (queue + compute) |
| uplink | encoder step done | server received (A's send queue, WebSocket, TCP) |
| server | server received | server sent (parsing, forwarding or coding, queues) |
| downlink | server sent | arrival at B |
| jitter | arrival at B | B's playout tick took it from the jitter buffer |
| decode | playout tick | decoder step done (compute; earlier streams of the mix) |
| playback | decoder step done | the frame's first sample is played (B's device buffer) |
| overlap | | the decoder's synthesis delay D (+ resampling): algorithmic, constant |

The stages telescope: their sum is `played + overlap - captured`, the frame's mouth-to-ear
delay on the timestamps.  Against /v1/roundtrip (the server codes, the client sends and
plays PCM) the stages are `ROUNDTRIP_STAGES`: capture, uplink, server (encode + decode),
downlink, playback, overlap.  An independent measurement (the played signal cross-correlated
with the offline decode of what was sent, `client.profiler.signal`) checks it; the report
gives the residual.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from client.trace import PlayRecord, SendRecord, clock_us
from streaming.protocol import ts_diff

__all__ = [
    "ROUNDTRIP_STAGES",
    "STAGES",
    "Breakdown",
    "ClockOffset",
    "Stage",
    "StageStats",
    "breakdown",
    "estimate_offset",
    "from_timestamps",
    "room_hops",
    "summarize",
    "unwrap_us",
]

F64: TypeAlias = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Stage:
    """One stage of the budget: `key`, display `label`, what it spans."""

    key: str
    label: str
    description: str


STAGES: tuple[Stage, ...] = (
    Stage("capture", "capture buffering", "first sample captured -> frame complete"),
    Stage("encode", "encode", "frame complete -> encoded (queue + compute)"),
    Stage("uplink", "network client->server", "encoded -> server received (queues + network)"),
    Stage("server", "server", "server received -> server sent"),
    Stage("downlink", "network server->client", "server sent -> arrival"),
    Stage("jitter", "jitter buffer", "arrival -> playout tick"),
    Stage("decode", "decode", "playout tick -> decoded"),
    Stage("playback", "playback buffering", "decoded -> first sample played"),
    Stage("overlap", "codec overlap", "decoder synthesis delay (algorithmic)"),
)
"""Stages of a call through a room (clients encode and decode)."""

ROUNDTRIP_STAGES: tuple[Stage, ...] = (
    Stage("capture", "capture buffering", "first sample captured -> frame's last chunk sent"),
    Stage("uplink", "network client->server", "chunk sent -> server received"),
    Stage("server", "server encode+decode", "server received -> server sent"),
    Stage("downlink", "network server->client", "server sent -> PCM arrival"),
    Stage("playback", "playback buffering", "PCM arrival -> first sample played"),
    Stage("overlap", "codec overlap", "decoder synthesis delay (algorithmic)"),
)
"""Stages of /v1/roundtrip (the server encodes and decodes, the client sends/plays PCM)."""


def unwrap_us(value_us: int, reference_s: float) -> float:
    """A u32 µs timestamp as seconds on the clock of `reference_s` (within ±35 min of it)."""
    return reference_s + ts_diff(value_us, clock_us(reference_s)) / 1e6


@dataclass(frozen=True)
class ClockOffset:
    """Server clock minus client clock, s, and how it was obtained."""

    seconds: float
    method: str


def estimate_offset(
    hops: Sequence[tuple[float, float, float, float]], same_clock_tolerance_s: float = 0.002
) -> ClockOffset:
    """Server-minus-client clock offset from (client sent, server received, server sent,
    client arrival) times, the server's on its own clock: NTP-style, half the difference of
    the smallest (2nd percentile) apparent uplink and downlink delays.  Within
    `same_clock_tolerance_s` of 0 the clocks are taken as one (same machine, same monotonic
    clock) and the offset is 0."""
    if not hops:
        return ClockOffset(0.0, "no server timestamps")
    # a low percentile rather than the minimum: robust to a few mis-stamped packets
    up = float(np.percentile([h[1] - h[0] for h in hops], 2))
    down = float(np.percentile([h[3] - h[2] for h in hops], 2))
    theta = (up - down) / 2.0
    if abs(theta) <= same_clock_tolerance_s:
        return ClockOffset(0.0, "same clock (offset estimate within 2 ms of 0)")
    return ClockOffset(theta, "estimated: symmetric minimum one-way delays")


def room_hops(plays: Iterable[PlayRecord]) -> list[tuple[float, float, float, float]]:
    """(sent, server received, server sent, arrival) of every played packet with times."""
    return [
        (
            unwrap_us(r.client_send_us, r.arrival),
            unwrap_us(r.server_recv_us, r.arrival),
            unwrap_us(r.server_send_us, r.arrival),
            r.arrival,
        )
        for r in plays
        if r.server_recv_us
    ]


@dataclass(frozen=True)
class Breakdown:
    """Stage durations (ms) of every joined frame: `values[stage]` [F], `e2e` [F], plus
    who sent and played each frame and when it was played (s)."""

    stages: tuple[Stage, ...]
    values: dict[str, F64]
    e2e: F64
    sender: npt.NDArray[np.int64]
    receiver: list[str]
    played: F64
    captured: F64

    def __len__(self) -> int:
        return int(self.e2e.shape[0])

    @property
    def stage_sum(self) -> F64:
        """Sum of the stages of every frame, ms."""
        total = np.zeros(len(self), dtype=np.float64)
        for v in self.values.values():
            total += v
        return total


def from_timestamps(
    stages: tuple[Stage, ...],
    rows: Sequence[tuple[float, ...]],
    senders: Sequence[int],
    receivers: Sequence[str],
    overlap_ms: float,
) -> Breakdown:
    """A breakdown from per-frame timestamps (s): row i holds the boundaries of the stages
    but the last (constant `overlap_ms`), first = capture, last = playout."""
    t = np.array(rows, dtype=np.float64).reshape(-1, len(stages))
    steps = np.diff(t, axis=1) * 1000.0
    values = {stage.key: steps[:, i].copy() for i, stage in enumerate(stages[:-1])}
    values[stages[-1].key] = np.full(t.shape[0], overlap_ms)
    e2e = (t[:, -1] - t[:, 0]) * 1000.0 + overlap_ms
    return Breakdown(
        stages,
        values,
        e2e,
        np.array(senders, dtype=np.int64),
        list(receivers),
        t[:, -1].copy(),
        t[:, 0].copy(),
    )


def breakdown(
    sends: Iterable[SendRecord],
    plays: Sequence[PlayRecord],
    offset: ClockOffset,
    overlap_ms: float,
) -> Breakdown:
    """Room calls: join sender and receiver records on (stream id, seq), split each frame."""
    index = {(s.stream_id, s.seq): s for s in sends}
    rows: list[tuple[float, ...]] = []
    senders: list[int] = []
    receivers: list[str] = []
    for r in plays:
        s = index.get((r.stream_id, r.seq))
        if s is None or not r.server_recv_us:
            continue
        srv_recv = unwrap_us(r.server_recv_us, r.arrival) - offset.seconds
        srv_send = unwrap_us(r.server_send_us, r.arrival) - offset.seconds
        rows.append(
            (
                s.capture,
                s.ready,
                s.enc_end,
                srv_recv,
                srv_send,
                r.arrival,
                r.popped,
                r.decoded,
                r.played,
            )
        )
        senders.append(r.stream_id)
        receivers.append(r.receiver)
    return from_timestamps(STAGES, rows, senders, receivers, overlap_ms)


@dataclass(frozen=True)
class StageStats:
    """Distribution of one quantity, ms."""

    count: int
    mean: float
    min: float
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: F64) -> StageStats:
        """Statistics of `values` (nan when empty)."""
        if values.shape[0] == 0:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan)
        p50, p95, p99 = np.percentile(values, [50, 95, 99])
        return cls(
            int(values.shape[0]),
            float(values.mean()),
            float(values.min()),
            float(p50),
            float(p95),
            float(p99),
            float(values.max()),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (nan as None)."""
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in self.__dict__.items()
        }


def summarize(b: Breakdown) -> dict[str, StageStats]:
    """Statistics of every stage, of the end-to-end delay ("e2e") and of the stage sum."""
    out = {s.key: StageStats.of(b.values[s.key]) for s in b.stages}
    out["e2e"] = StageStats.of(b.e2e)
    out["stage_sum"] = StageStats.of(b.stage_sum)
    return out
