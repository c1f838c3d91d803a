"""Per-frame latency records and fixed-size aggregate statistics.

The engine never reads a clock of its own choosing: streams and the batch engine take a
`clock` callable (default `time.perf_counter`, seconds) or explicit `now` values, so tests are
deterministic.  For every frame they produce a `FrameLatency`:

* `ready`: when the frame's input was complete (the `push` that completed the PCM frame, or
  that delivered the token frame), s;
* `start`, `end`: around the step that computed it (batched: the whole batch step), s;
* `queue_ms = start - ready`, `compute_ms = end - start`;
* `algorithmic_ms`: the delay the signal path adds by construction (card + resampling):
  encoder frames carry frame + input-resampler delay, decoder frames carry the card's output
  delay + output-resampler delay, so encoder + decoder = the card's algorithmic latency
  (frame + output delay, 25 ms on the default card) + resampling;
* `total_ms = algorithmic_ms + queue_ms + compute_ms`.

`LatencyStats` aggregates records into three fixed `Histogram`s (queue, compute, total):
log-spaced bins, constant memory whatever the number of frames, percentiles with a relative
resolution of 10**(1/bins_per_decade) (about 6 % with the default 40 bins per decade).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = ["FrameLatency", "Histogram", "LatencyStats"]

I64: TypeAlias = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class FrameLatency:
    """Latency of one frame.  Times in seconds on the caller's clock, durations in ms."""

    index: int
    """Frame number in its stream (0 = first frame since creation / reset)."""
    ready: float
    start: float
    end: float
    batch_size: int
    """Streams computed by the same ONNX call (1 = unbatched)."""
    algorithmic_ms: float

    @property
    def queue_ms(self) -> float:
        """Time from input complete to compute start, ms."""
        return 1000.0 * (self.start - self.ready)

    @property
    def compute_ms(self) -> float:
        """Time of the (batched) step, ms."""
        return 1000.0 * (self.end - self.start)

    @property
    def total_ms(self) -> float:
        """algorithmic + queue + compute, ms."""
        return self.algorithmic_ms + 1000.0 * (self.end - self.ready)


class Histogram:
    """Counts of non-negative values (ms) in fixed log-spaced bins; constant memory.

    Bin 0 holds everything below `lo` (zero included), the last bin everything at or above
    `hi`.  Exact count, sum, min and max are kept alongside.
    """

    __slots__ = (
        "_counts",
        "_log_lo",
        "_scale",
        "bins_per_decade",
        "count",
        "hi",
        "lo",
        "max",
        "min",
        "total",
    )

    def __init__(self, lo: float = 1e-3, hi: float = 1e5, bins_per_decade: int = 40) -> None:
        """`lo`, `hi`: range in ms (> 0); `bins_per_decade`: resolution."""
        if not 0.0 < lo < hi or bins_per_decade < 1:
            raise ValueError("need 0 < lo < hi and bins_per_decade >= 1")
        self.lo = lo
        self.hi = hi
        self.bins_per_decade = bins_per_decade
        nbins = math.ceil(math.log10(hi / lo) * bins_per_decade) + 2
        self._counts: I64 = np.zeros(nbins, dtype=np.int64)
        self._log_lo = math.log10(lo)
        self._scale = float(bins_per_decade)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def _bin(self, value: float) -> int:
        if value < self.lo:
            return 0
        if value >= self.hi:
            return len(self._counts) - 1
        return 1 + int((math.log10(value) - self._log_lo) * self._scale)

    def _bin_value(self, index: int) -> float:
        """Representative value of a bin (geometric centre)."""
        if index == 0:
            return self.lo / 2
        return float(10.0 ** (self._log_lo + (index - 0.5) / self._scale))

    def add(self, value: float) -> None:
        """Record one value (ms; negative values are clamped to 0)."""
        v = value if value > 0.0 else 0.0
        self._counts[self._bin(v)] += 1
        self.count += 1
        self.total += v
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v

    @property
    def mean(self) -> float:
        """Mean of the recorded values (nan when empty)."""
        return self.total / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """Approximate q-quantile (0 <= q <= 1), clamped to [min, max]; nan when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError("q must be in [0, 1]")
        if not self.count:
            return math.nan
        if q <= 0.0:
            return self.min
        if q >= 1.0:
            return self.max
        rank = q * self.count
        cumulative = np.cumsum(self._counts)
        index = int(np.searchsorted(cumulative, rank, side="left"))
        return min(max(self._bin_value(index), self.min), self.max)

    def merge(self, other: Histogram) -> None:
        """Add the counts of `other` (same lo, hi, bins_per_decade) into this one."""
        if (other.lo, other.hi, other.bins_per_decade) != (self.lo, self.hi, self.bins_per_decade):
            raise ValueError("histograms with different bins cannot be merged")
        self._counts += other._counts
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def reset(self) -> None:
        """Forget every value."""
        self._counts.fill(0)
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def summary(self) -> dict[str, float]:
        """{"count", "mean", "min", "p50", "p95", "p99", "max"} (ms; nan when empty)."""
        empty = not self.count
        return {
            "count": float(self.count),
            "mean": self.mean,
            "min": math.nan if empty else self.min,
            "p50": self.quantile(0.50),
            "p95": self.quantile(0.95),
            "p99": self.quantile(0.99),
            "max": math.nan if empty else self.max,
        }


class LatencyStats:
    """Aggregate of many `FrameLatency` records (one or many streams): fixed memory.

    Share one instance between the streams of a server to get its overall percentiles.
    """

    __slots__ = ("algorithmic_ms", "compute", "count", "queue", "total")

    def __init__(self, bins_per_decade: int = 40) -> None:
        self.queue = Histogram(bins_per_decade=bins_per_decade)
        self.compute = Histogram(bins_per_decade=bins_per_decade)
        self.total = Histogram(bins_per_decade=bins_per_decade)
        self.count = 0
        self.algorithmic_ms = 0.0
        """Algorithmic delay of the last record, ms."""

    def add(self, record: FrameLatency) -> None:
        """Record one frame."""
        self.queue.add(record.queue_ms)
        self.compute.add(record.compute_ms)
        self.total.add(record.total_ms)
        self.algorithmic_ms = record.algorithmic_ms
        self.count += 1

    def merge(self, other: LatencyStats) -> None:
        """Add the records of `other`."""
        self.queue.merge(other.queue)
        self.compute.merge(other.compute)
        self.total.merge(other.total)
        self.count += other.count
        if other.count:
            self.algorithmic_ms = other.algorithmic_ms

    def reset(self) -> None:
        """Forget every record."""
        self.queue.reset()
        self.compute.reset()
        self.total.reset()
        self.count = 0
        self.algorithmic_ms = 0.0

    def summary(self) -> dict[str, float]:
        """Flat dict for metrics: count, algorithmic_ms, and {queue,compute,total}_{mean,p50,
        p95,p99,max}_ms."""
        out: dict[str, float] = {"count": float(self.count), "algorithmic_ms": self.algorithmic_ms}
        for name, hist in (("queue", self.queue), ("compute", self.compute), ("total", self.total)):
            s = hist.summary()
            for key in ("mean", "p50", "p95", "p99", "max"):
                out[f"{name}_{key}_ms"] = s[key]
        return out
