"""Whether the engine can take one more real-time stream: the share of slow frames.

Every frame an engine worker steps has a budget of one frame period (20 ms) from the moment
its input was ready to its output; the batching window fills up to half of it on purpose
(`server.engine_worker.TARGET_FRACTION`), the rest is the event loop's and the network's.
A frame that took the engine more than 3/4 of the period (`SLOW_FRACTION`) is **slow**:
while the engine keeps up almost none are, and once the sessions ask for more than the
machine gives they climb for every session on the worker, not only the newest.  So the
server refuses a new stream session (4429, "server at capacity") while, on the worker that
would take it, more than `Settings.max_slow_percent` of the recent frames were slow, and the
sessions already running keep what real time is left.  The signal is measured, not
modelled: the engine's work per frame shrinks with bigger batches and its CPU share varies
with everything else on the machine, so neither its busy time nor its CPU time says where
real time ends (on a 2-core machine the engine was busy 96 % of the time at 30 sessions,
which it held with p99 12 ms).  Measured there (docs/benchmarks.md): slow frames 0-0.1 % up
to 50 sustained sessions, 10 % at 60 (7.5 % of round trips late).

`SlowFrameMeter` turns a worker's cumulative counts (`EngineWorker.frames_checked`,
`frames_slow`; engine processes report them every 0.5 s) into a smoothed percentage: one
sample per `SAMPLE_S` of wall time with at least `MIN_FRAMES` frames (or after `IDLE_S`
with fewer, which an idle engine gives: its value replaces the old one), smoothed
exponentially with weight `SMOOTHING` (about 1.5 s of memory).  A burst of sessions that
all connect within one sample is not stopped by it; sessions that arrive one by one, as
calls do, are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["IDLE_S", "MIN_FRAMES", "SAMPLE_S", "SMOOTHING", "SlowFrameMeter"]

SAMPLE_S: Final = 0.5
"""Shortest wall time, s, between two samples of a meter."""
MIN_FRAMES: Final = 50
"""Fewest frames a sample needs (fewer: the sample waits for more)."""
IDLE_S: Final = 2.0
"""A sample is taken after this long even with fewer than `MIN_FRAMES` frames, and replaces
the smoothed value (an engine that next to idle has room, whatever came before)."""
SMOOTHING: Final = 0.3
"""Weight of a new sample in the smoothed percentage (0.3 per 0.5 s: ~1.5 s of memory)."""


class SlowFrameMeter:
    """Smoothed percentage of a worker's frames that were slow.

    `update(checks, misses)` takes the worker's cumulative counts and may be called as often
    as wanted (a sample is taken once `SAMPLE_S` s have passed and `MIN_FRAMES` frames were
    checked since the last one, or `IDLE_S` s have passed); `slow_percent` is the smoothed
    value, 0 until the first sample.  `clock`: seconds (default `time.monotonic`).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.slow_percent = 0.0
        self._last_time: float | None = None
        self._last_checks = 0
        self._last_misses = 0

    def update(self, checks: int, misses: int) -> float:
        """Sample the cumulative counts if due; the smoothed slow percentage."""
        now = self.clock()
        if self._last_time is None or checks < self._last_checks:  # first, or a restart
            self._last_time, self._last_checks, self._last_misses = now, checks, misses
            return self.slow_percent
        frames = checks - self._last_checks
        elapsed = now - self._last_time
        if elapsed < SAMPLE_S or (frames < MIN_FRAMES and elapsed < IDLE_S):
            return self.slow_percent
        slow = min(max(misses - self._last_misses, 0), frames)
        sample = 100.0 * slow / frames if frames else 0.0
        if frames < MIN_FRAMES:  # next to idle: there is room, whatever came before
            self.slow_percent = sample
        else:
            self.slow_percent += SMOOTHING * (sample - self.slow_percent)
        self._last_time, self._last_checks, self._last_misses = now, checks, misses
        return self.slow_percent
