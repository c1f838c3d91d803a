"""A simulated sound device: a file plays into the microphone, the speaker is recorded.

`VirtualAudio` is an `AudioPort` driven by explicit clock ticks instead of a sound card, so
the profiler can run many clients on one machine without devices.  Each `advance(now)`
stands for one device block of `block` samples:

* microphone: the next block of `source` (zeros once it is exhausted) enters the capture
  FIFO; its last sample is captured at `now`, the first `block - 1` samples earlier;
* speaker: one block is taken from the playback FIFO (zero-padded on underrun) and starts
  playing at `now`; it is appended to `recording` (preallocated, `record_s` long).

The tick times are kept (`ticks`, preallocated for `record_s`), so `capture_time(j)` and
`play_time(i)` map a source or recording sample index to its time exactly, whatever the
scheduling jitter of the ticks.

Sizes in samples at `rate`, times in seconds on the caller's clock.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from client.audio import AudioCounters, LockedRing

__all__ = ["VirtualAudio"]

F32: TypeAlias = npt.NDArray[np.float32]


class VirtualAudio:
    """File-fed microphone and recording speaker, paced by `advance` (see module doc)."""

    def __init__(self, rate: int, source: F32, *, block: int, record_s: float = 0.0) -> None:
        self._rate = rate
        self.block = block
        self.source = np.ascontiguousarray(source, dtype=np.float32)
        self.capture = LockedRing(rate)
        self.playback = LockedRing(rate)
        self._mic_pos = 0  # source samples fed
        self._mic_time = 0.0  # capture time of the last sample fed
        self._cap_read = 0
        self._spk_time = 0.0  # playout time of the last block's first sample
        self._spk_start = 0  # playback position of that sample
        self._zeros: F32 = np.zeros(block, dtype=np.float32)
        self._block: F32 = np.zeros(block, dtype=np.float32)
        self.recording: F32 = np.zeros(int(record_s * rate), dtype=np.float32)
        self.recorded = 0
        self.record_start: float | None = None
        """Playout time of `recording[0]`, s."""
        self.ticks: npt.NDArray[np.float64] = np.zeros(
            -(-self.recording.shape[0] // block) + 1, dtype=np.float64
        )
        self.tick_count = 0

    # ---- driving --------------------------------------------------------------------------

    def advance(self, now: float) -> None:
        """One device block at time `now`: feed the microphone, then play one block."""
        self._feed(now)
        self._play(now)
        if self.tick_count < self.ticks.shape[0]:
            self.ticks[self.tick_count] = now
        self.tick_count += 1

    def capture_time(self, index: int) -> float:
        """When source sample `index` was captured (s); needs its tick to be recorded."""
        block, offset = divmod(index, self.block)
        return float(self.ticks[block]) - (self.block - 1 - offset) / self._rate

    def play_time(self, index: int) -> float:
        """When `recording[index]` started playing (s)."""
        block, offset = divmod(index, self.block)
        return float(self.ticks[block]) + offset / self._rate

    def _feed(self, now: float) -> None:
        part = self.source[self._mic_pos : self._mic_pos + self.block]
        self.capture.write(part)
        if part.shape[0] < self.block:
            self.capture.write(self._zeros[: self.block - part.shape[0]])
        self._mic_pos += self.block
        self._mic_time = now

    def _play(self, now: float) -> None:
        self._spk_start = self.playback.total_out
        self._spk_time = now
        if self.playback.total_in:
            self.playback.read_into(self._block, pad=True)
        else:  # nothing to play yet: silence, not an underrun
            self._block.fill(0.0)
        if self.record_start is None:
            self.record_start = now
        room = self.recording.shape[0] - self.recorded
        n = min(room, self.block)
        self.recording[self.recorded : self.recorded + n] = self._block[:n]
        self.recorded += n

    @property
    def source_done(self) -> bool:
        """True once the whole source has been fed to the microphone."""
        return bool(self._mic_pos >= self.source.shape[0])

    # ---- AudioPort ------------------------------------------------------------------------

    @property
    def rate(self) -> int:
        """Sample rate, Hz."""
        return self._rate

    @property
    def capture_available(self) -> int:
        """Captured samples waiting."""
        return self.capture.available

    def read_capture(self, out: F32) -> tuple[int, float]:
        """Move captured samples into `out`; (count, capture time of the first one, s)."""
        first = self._cap_read
        n = self.capture.read_into(out)
        self._cap_read += n
        end = self.capture.total_in  # the sample at end - 1 was captured at _mic_time
        return n, self._mic_time - (end - 1 - first) / self._rate

    @property
    def playback_queued(self) -> int:
        """Samples queued for playback."""
        return self.playback.available

    @property
    def playback_written(self) -> int:
        """Cumulative samples written for playback."""
        return self.playback.total_in

    def write_playback(self, samples: F32) -> int:
        """Queue samples for playback."""
        return self.playback.write(samples)

    def played_time(self, position: int) -> float | None:
        """Playout time of write position `position` (exact once it has been played)."""
        return self._spk_time + (position - self._spk_start) / self._rate

    def counters(self) -> AudioCounters:
        """Glitch counters (no device-level events in a simulation)."""
        return AudioCounters(
            capture_dropped=self.capture.overflow,
            playback_underrun=self.playback.underrun,
            playback_dropped=self.playback.overflow,
        )
