"""Fixed-capacity float32 sample ring buffer with overflow and underrun accounting.

Sizes are in samples (of whatever rate the owner uses).  The storage is one preallocated
numpy array; writes and reads copy at most two contiguous slices (wraparound) and never
allocate.  Nothing is lost silently:

* `overflow`: samples dropped because the ring was full when they were written (by default
  the newest samples that do not fit are dropped; with `drop_oldest=True` the oldest buffered
  samples are overwritten instead, which keeps the latest audio and bounds the delay);
* `underrun`: samples a `read_into(..., pad=True)` was asked for but that were missing
  (zeros were returned in their place).
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = ["RingBuffer"]

F32: TypeAlias = npt.NDArray[np.float32]


class RingBuffer:
    """Preallocated float32 FIFO of `capacity` samples.

    Not thread-safe (one producer and one consumer on the same thread / event loop).
    """

    __slots__ = ("_buf", "_capacity", "_count", "_head", "drop_oldest", "overflow", "underrun")

    def __init__(self, capacity: int, *, drop_oldest: bool = False) -> None:
        """`capacity`: samples the ring holds (> 0).  `drop_oldest`: see the module doc."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = int(capacity)
        self._buf: F32 = np.zeros(self._capacity, dtype=np.float32)
        self._head = 0  # index of the oldest sample
        self._count = 0  # samples buffered
        self.drop_oldest = drop_oldest
        self.overflow = 0
        """Samples dropped on write because the ring was full (total since reset)."""
        self.underrun = 0
        """Samples requested by padded reads but missing (total since reset)."""

    # ---- sizes ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Samples the ring can hold."""
        return self._capacity

    @property
    def available(self) -> int:
        """Samples buffered (readable)."""
        return self._count

    @property
    def free(self) -> int:
        """Samples that can be written without overflow."""
        return self._capacity - self._count

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated storage."""
        return int(self._buf.nbytes)

    # ---- writing --------------------------------------------------------------------------

    def write(self, data: npt.ArrayLike) -> int:
        """Append `data` (1-D, converted to float32); return the samples actually stored.

        When it does not fit, the excess is dropped (newest, or oldest buffered with
        `drop_oldest`) and counted in `overflow`.
        """
        src = np.asarray(data, dtype=np.float32)
        if src.ndim != 1:
            raise ValueError(f"RingBuffer.write takes a 1-D array, got shape {src.shape}")
        n = int(src.shape[0])
        cap = self._capacity
        if self.drop_oldest:
            if n > cap:
                self.overflow += n - cap
                src = src[n - cap :]
                n = cap
            excess = n - self.free
            if excess > 0:
                self.overflow += excess
                self._head = (self._head + excess) % cap
                self._count -= excess
        elif n > self.free:
            self.overflow += n - self.free
            n = self.free
            src = src[:n]
        if n == 0:
            return 0
        tail = (self._head + self._count) % cap
        first = min(n, cap - tail)
        self._buf[tail : tail + first] = src[:first]
        if first < n:
            self._buf[: n - first] = src[first:]
        self._count += n
        return n

    def write_zeros(self, n: int) -> int:
        """Append `n` zero samples (same overflow rules as `write`); return samples stored."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if self.drop_oldest:
            if n > self._capacity:
                self.overflow += n - self._capacity
                n = self._capacity
            excess = n - self.free
            if excess > 0:
                self.discard(excess)
                self.overflow += excess
        elif n > self.free:
            self.overflow += n - self.free
            n = self.free
        cap = self._capacity
        tail = (self._head + self._count) % cap
        first = min(n, cap - tail)
        self._buf[tail : tail + first] = 0.0
        if first < n:
            self._buf[: n - first] = 0.0
        self._count += n
        return n

    # ---- reading --------------------------------------------------------------------------

    def peek_into(self, out: F32, offset: int = 0) -> int:
        """Copy up to `len(out)` samples starting `offset` samples after the oldest, without
        consuming them; return the number copied (the rest of `out` is untouched)."""
        if offset < 0:
            raise ValueError("offset must be >= 0")
        n = max(0, min(int(out.shape[0]), self._count - offset))
        if n == 0:
            return 0
        cap = self._capacity
        start = (self._head + offset) % cap
        first = min(n, cap - start)
        out[:first] = self._buf[start : start + first]
        if first < n:
            out[first:n] = self._buf[: n - first]
        return n

    def discard(self, n: int) -> int:
        """Drop up to `n` of the oldest samples; return the number dropped."""
        if n < 0:
            raise ValueError("n must be >= 0")
        n = min(n, self._count)
        self._head = (self._head + n) % self._capacity
        self._count -= n
        if self._count == 0:
            self._head = 0
        return n

    def read_into(self, out: F32, *, pad: bool = False) -> int:
        """Consume up to `len(out)` samples into `out`; return the number read.

        With `pad=True` a short read fills the rest of `out` with zeros and adds the missing
        count to `underrun` (a playout that must output `len(out)` samples now).
        """
        n = self.peek_into(out)
        self.discard(n)
        if pad and n < out.shape[0]:
            out[n:] = 0.0
            self.underrun += out.shape[0] - n
        return n

    def read(self, n: int | None = None, *, pad: bool = False) -> F32:
        """Consume and return up to `n` samples (all with None) as a new array.

        With `pad=True` the result has exactly `n` samples (zeros for the missing ones, counted
        in `underrun`).  Allocates the result; hot paths use `read_into`.
        """
        size = self._count if n is None else n
        if size < 0:
            raise ValueError("n must be >= 0")
        out = np.empty(size if pad else min(size, self._count), dtype=np.float32)
        self.read_into(out, pad=pad)
        return out

    def peek(self, n: int | None = None, offset: int = 0) -> F32:
        """Return (without consuming) up to `n` samples from `offset` as a new array."""
        size = max(0, self._count - offset) if n is None else min(n, max(0, self._count - offset))
        out = np.empty(size, dtype=np.float32)
        self.peek_into(out, offset)
        return out

    # ---- state ----------------------------------------------------------------------------

    def clear(self) -> None:
        """Drop all buffered samples (not counted as overflow); counters are kept."""
        self._head = 0
        self._count = 0

    def reset(self) -> None:
        """Empty the ring and zero the overflow / underrun counters."""
        self.clear()
        self._buf.fill(0.0)
        self.overflow = 0
        self.underrun = 0

    def __repr__(self) -> str:
        return (
            f"RingBuffer(capacity={self._capacity}, available={self._count}, "
            f"overflow={self.overflow}, underrun={self.underrun})"
        )
