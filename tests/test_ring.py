"""RingBuffer (streaming/ring.py): FIFO order across wraparound, overflow and underrun counts."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from streaming.ring import RingBuffer


def arange(start: int, stop: int) -> np.ndarray:
    return np.arange(start, stop, dtype=np.float32)


def test_fifo_order_across_wraparound() -> None:
    ring = RingBuffer(8)
    assert ring.write(arange(0, 6)) == 6
    np.testing.assert_array_equal(ring.read(4), arange(0, 4))
    assert ring.write(arange(6, 12)) == 6  # wraps: tail at 6, 2 slots then 4 from index 0
    assert ring.available == 8 and ring.free == 0
    np.testing.assert_array_equal(ring.read(), arange(4, 12))
    assert ring.available == 0
    assert ring.overflow == 0 and ring.underrun == 0


def test_overflow_drops_newest_and_counts() -> None:
    ring = RingBuffer(5)
    assert ring.write(arange(0, 3)) == 3
    assert ring.write(arange(3, 10)) == 2
    assert ring.overflow == 5
    np.testing.assert_array_equal(ring.read(), arange(0, 5))


def test_overflow_drop_oldest_keeps_latest() -> None:
    ring = RingBuffer(5, drop_oldest=True)
    ring.write(arange(0, 3))
    ring.write(arange(3, 7))
    assert ring.overflow == 2
    np.testing.assert_array_equal(ring.read(), arange(2, 7))
    ring.write(arange(0, 12))  # more than the capacity in one write
    assert ring.overflow == 2 + 7
    np.testing.assert_array_equal(ring.read(), arange(7, 12))


def test_padded_read_counts_underrun() -> None:
    ring = RingBuffer(8)
    ring.write(arange(1, 4))
    out = np.full(5, 9.0, dtype=np.float32)
    assert ring.read_into(out, pad=True) == 3
    np.testing.assert_array_equal(out, [1, 2, 3, 0, 0])
    assert ring.underrun == 2
    assert ring.read_into(out) == 0  # an unpadded short read is not an underrun
    assert ring.underrun == 2
    assert ring.read(4, pad=True).tolist() == [0, 0, 0, 0]
    assert ring.underrun == 6


def test_peek_discard_and_zeros() -> None:
    ring = RingBuffer(6)
    ring.write(arange(0, 4))
    np.testing.assert_array_equal(ring.peek(2, offset=1), [1, 2])
    assert ring.available == 4
    assert ring.discard(3) == 3
    ring.write_zeros(3)
    np.testing.assert_array_equal(ring.read(), [3, 0, 0, 0])
    assert ring.write_zeros(10) == 6
    assert ring.overflow == 4


def test_reset_clears_data_and_counters() -> None:
    ring = RingBuffer(4)
    ring.write(arange(0, 9))
    ring.read(8, pad=True)
    assert ring.overflow and ring.underrun
    ring.reset()
    assert (ring.available, ring.overflow, ring.underrun) == (0, 0, 0)
    ring.write(arange(5, 8))
    np.testing.assert_array_equal(ring.read(), arange(5, 8))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        RingBuffer(0)
    with pytest.raises(ValueError):
        RingBuffer(4).write(np.zeros((2, 2), dtype=np.float32))


@pytest.mark.parametrize("drop_oldest", [False, True])
def test_random_operations_match_a_reference_queue(drop_oldest: bool) -> None:
    rng = np.random.default_rng(7)
    ring = RingBuffer(13, drop_oldest=drop_oldest)
    model: deque[float] = deque()
    overflow = underrun = 0
    counter = 0
    for _ in range(400):
        if rng.random() < 0.5:
            n = int(rng.integers(0, 20))
            data = np.arange(counter, counter + n, dtype=np.float32)
            counter += n
            ring.write(data)
            for v in data.tolist():
                if len(model) < 13:
                    model.append(v)
                elif drop_oldest:
                    model.popleft()
                    model.append(v)
                    overflow += 1
                else:
                    overflow += 1
        else:
            n = int(rng.integers(0, 20))
            got = ring.read(n, pad=True)
            want = [model.popleft() for _ in range(min(n, len(model)))]
            underrun += n - len(want)
            assert got.tolist() == want + [0.0] * (n - len(want))
        assert ring.available == len(model)
        assert (ring.overflow, ring.underrun) == (overflow, underrun)
