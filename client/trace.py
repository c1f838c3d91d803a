"""Per-frame timing records of the call engine: the data model of latency profiling.

All times are seconds on the process clock (`time.perf_counter`, CLOCK_MONOTONIC on Linux)
except the fields named `*_us`, which are u32 microsecond timestamps as carried in packets
(`capture_us`, `client_send_us`: the sender's clock; `server_*_us`: the server's clock).

* `SendRecord`: one frame sent by a client: capture of its first sample, frame complete
  (`ready`), encoder step (`enc_start`, `enc_end`), handed to the socket (`sent`).
* `PlayRecord`: one real frame played by a client: arrival, jitter-buffer pop, decoder step
  end, playout of its first sample, and the packet's timestamps.
* `RoundtripRecord`: one frame through /v1/roundtrip (PCM up, PCM down).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PlayRecord", "RoundtripRecord", "SendRecord", "clock_us"]

_U32 = 0xFFFFFFFF


def clock_us(t: float) -> int:
    """`t` seconds as a u32 microsecond timestamp (modulo 2**32, as in packets)."""
    return round(t * 1e6) & _U32


@dataclass(frozen=True, slots=True)
class SendRecord:
    """Sender side of one frame (times in s, sender's clock)."""

    stream_id: int
    seq: int
    capture: float
    ready: float
    enc_start: float
    enc_end: float


@dataclass(frozen=True, slots=True)
class PlayRecord:
    """Receiver side of one real (not concealed) frame (times in s, receiver's clock).

    `capture_us` / `client_send_us` are the sender's packet timestamps, `server_recv_us` /
    `server_send_us` the server's (0 when the packet had no times block).
    """

    receiver: str
    stream_id: int
    seq: int
    capture_us: int
    client_send_us: int
    server_recv_us: int
    server_send_us: int
    arrival: float
    popped: float
    decoded: float
    played: float


@dataclass(frozen=True, slots=True)
class RoundtripRecord:
    """One frame through /v1/roundtrip (times in s, client's clock; `server_*_us` from the
    frame's `packet` message): capture of its first sample, the chunk that completed it was
    sent, its PCM arrived, its first sample was played."""

    client: str
    seq: int
    capture: float
    sent: float
    server_recv_us: int
    server_send_us: int
    arrival: float
    played: float
