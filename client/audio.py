"""Real-time audio plumbing shared by sound devices and the simulated (file-fed) clients.

An `AudioPort` is a capture FIFO and a playback FIFO at one device rate, plus the clock
mapping the latency figures need:

* capture: the producer (a PortAudio callback, or a clock-paced file reader) appends
  samples; `read_capture` hands them to the encoding side together with the capture time of
  the first sample handed out;
* playback: the decoding side appends samples (`write_playback`); the consumer (the output
  callback, or a clock-paced virtual speaker) takes them, zero-padding and counting an
  underrun when the FIFO is empty; `played_time(position)` tells when the sample at a given
  cumulative write position was (or, for a device, is estimated to be) played.

Both FIFOs are preallocated `streaming.ring.RingBuffer`s.  A `LockedRing` guards one with a
lock held only for the copy itself (a few microseconds), so the callback side never waits
behind computation: encoding, decoding and network I/O happen in other threads/tasks.  A
speaker fed with PCM received from a server (`codec-client call --receive pcm`, the
profiler's roundtrip clients) is held near its playout target by `PcmHold`.
Times are seconds on `time.perf_counter` (CLOCK_MONOTONIC on Linux); sizes are samples at
the device rate.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from streaming.ring import RingBuffer

__all__ = [
    "PCM_CATCHUP_MARGIN_FRAMES",
    "AudioCounters",
    "AudioPort",
    "LockedRing",
    "PcmHold",
    "TimeMark",
]

F32: TypeAlias = npt.NDArray[np.float32]
F64: TypeAlias = npt.NDArray[np.float64]

PCM_CATCHUP_MARGIN_FRAMES = 2
"""Received PCM: frames queued beyond the playout target before the oldest are dropped (as
`JitterConfig.catchup_margin_frames` for tokens)."""


class LockedRing:
    """A `RingBuffer` shared by one producer thread and one consumer thread.

    Every method holds the lock only while copying; nothing allocates.  `total_in` /
    `total_out` count samples stored / consumed since creation (real samples: padding and
    dropped samples are not counted).
    """

    __slots__ = ("_lock", "ring", "total_in", "total_out")

    def __init__(self, capacity: int, *, drop_oldest: bool = False) -> None:
        self.ring = RingBuffer(capacity, drop_oldest=drop_oldest)
        self._lock = threading.Lock()
        self.total_in = 0
        self.total_out = 0

    @property
    def available(self) -> int:
        """Samples buffered."""
        return self.ring.available

    @property
    def overflow(self) -> int:
        """Samples dropped because the ring was full."""
        return self.ring.overflow

    @property
    def underrun(self) -> int:
        """Samples padded reads lacked (zeros instead)."""
        return self.ring.underrun

    def write(self, data: F32) -> int:
        """Append `data`; return the samples stored (the excess is counted as overflow)."""
        with self._lock:
            n = self.ring.write(data)
            self.total_in += n
        return n

    def write_zeros(self, n: int) -> int:
        """Append `n` zero samples; return the samples stored."""
        with self._lock:
            stored = self.ring.write_zeros(n)
            self.total_in += stored
        return stored

    def read_into(self, out: F32, *, pad: bool = False) -> int:
        """Consume up to len(out) samples into `out` (zero-padded with `pad`); return real
        samples read."""
        with self._lock:
            n = self.ring.read_into(out, pad=pad)
            self.total_out += n
        return n

    def discard(self, n: int) -> int:
        """Drop up to `n` of the oldest samples (counted as consumed, not as overflow);
        return how many."""
        with self._lock:
            dropped = self.ring.discard(n)
            self.total_out += dropped
        return dropped

    def clear(self) -> None:
        """Drop everything buffered (not counted as overflow)."""
        with self._lock:
            self.total_out += self.ring.available
            self.ring.clear()


@dataclass(frozen=True)
class PcmHold:
    """How a speaker buffer fed with PCM received from a server (the server's mix, or its
    decode of what we sent) is held near the playout target; sizes in samples at the device
    rate.

    Before each received chunk is queued (`settle`): an empty buffer (the start, or an
    underrun) is primed with `prime` samples of silence; a buffer holding more than
    `catchup` samples (the burst after a network stall, or a server clock faster than the
    speaker's) has its oldest audio dropped down to `prime`, so a stall never adds lasting
    delay.
    """

    prime: int
    catchup: int

    @classmethod
    def for_playout(cls, playout_ms: float, rate: int, frame_ms: float) -> PcmHold:
        """The hold of a `playout_ms` target at `rate` Hz with `frame_ms` frames: `prime` =
        the target (at least one sample), `catchup` = the target +
        PCM_CATCHUP_MARGIN_FRAMES frames."""
        prime = max(1, int(playout_ms * rate / 1000.0))
        frame = max(1, round(rate * frame_ms / 1000.0))
        return cls(prime, prime + PCM_CATCHUP_MARGIN_FRAMES * frame)

    def settle(self, ring: LockedRing) -> int:
        """Prime or catch up `ring` before a received chunk is written to it (see the class
        doc); return the samples dropped (0 unless it caught up)."""
        queued = ring.available
        if queued == 0:
            ring.write_zeros(self.prime)
        elif queued > self.catchup:
            return ring.discard(queued - self.prime)
        return 0


class TimeMark:
    """The latest (position, time) pair written by a callback, read by another thread.

    `position` is a cumulative sample count, `time` the perf_counter time of that position.
    A sequence lock over a preallocated array: the writer (one thread) never allocates or
    waits, a reader never sees a torn pair.
    """

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: F64 = np.zeros(3, dtype=np.float64)  # sequence, position, time

    def set(self, position: float, time: float) -> None:
        """Writer side (one thread only): odd sequence while writing, even when done."""
        data = self._data
        data[0] += 1.0
        data[1] = position
        data[2] = time
        data[0] += 1.0

    def get(self) -> tuple[float, float] | None:
        """(position, time) of the last complete write; None before the first."""
        data = self._data
        for _ in range(100):
            seq = float(data[0])
            if seq % 2.0:
                continue
            position, time = float(data[1]), float(data[2])
            if seq == float(data[0]):
                return (position, time) if seq else None
        return None


@dataclass
class AudioCounters:
    """Glitch counters of an `AudioPort` (events and samples)."""

    input_overflows: int = 0
    """Capture callbacks that reported lost input (device level), or capture FIFO overflows."""
    output_underflows: int = 0
    """Playback callbacks that reported an underflow (device level)."""
    capture_dropped: int = 0
    """Samples dropped because the capture FIFO was full (the encoder fell behind)."""
    playback_underrun: int = 0
    """Samples of silence played because the playback FIFO was empty."""
    playback_dropped: int = 0
    """Samples dropped because the playback FIFO was full."""


class AudioPort(Protocol):
    """A capture + playback endpoint at `rate` Hz (a sound device or a simulation)."""

    @property
    def rate(self) -> int:
        """Device sample rate, Hz."""
        ...

    @property
    def capture_available(self) -> int:
        """Captured samples waiting to be read."""
        ...

    def read_capture(self, out: F32) -> tuple[int, float]:
        """Move up to len(out) captured samples into `out`; return (count, capture time in s
        of the first of them)."""
        ...

    @property
    def playback_queued(self) -> int:
        """Samples written and not yet played."""
        ...

    @property
    def playback_written(self) -> int:
        """Cumulative samples written for playback (the position of the next write)."""
        ...

    def write_playback(self, samples: F32) -> int:
        """Queue samples for playback; return how many were stored."""
        ...

    def played_time(self, position: int) -> float | None:
        """When the sample at cumulative write `position` is played (s); None if unknown."""
        ...

    def counters(self) -> AudioCounters:
        """Snapshot of the glitch counters."""
        ...
