"""`server.outbox.Outbox`: lanes, order, bounds, the last item (unit tests, no server)."""

from __future__ import annotations

import asyncio

import pytest

from server.outbox import CONTROL_LIMIT, Outbox, OutboxFullError


def drain(box: Outbox[str]) -> list[str]:
    """Everything queued, in sending order (without waiting)."""

    async def run() -> list[str]:
        out = []
        while len(box):
            out.append(await box.get())
        return out

    return asyncio.run(run())


def test_urgent_before_normal_and_fifo_within_each_lane() -> None:
    box: Outbox[str] = Outbox()
    for item in ("m1", "m2"):
        box.put(item)
    box.put("u1", urgent=True)
    box.put("m3")
    box.put("u2", urgent=True)
    assert len(box) == 5 and box.urgent == 2
    assert drain(box) == ["u1", "u2", "m1", "m2", "m3"]


def test_bounded_normal_lane_drops_the_oldest_media_only() -> None:
    dropped: list[str] = []
    box: Outbox[str] = Outbox(2, on_drop=dropped.append)
    for i in range(5):
        box.put(f"m{i}")
    for i in range(3):
        box.put(f"u{i}", urgent=True)  # the urgent lane is not the drop-oldest lane
    assert dropped == ["m0", "m1", "m2"] and box.dropped == 3
    assert drain(box) == ["u0", "u1", "u2", "m3", "m4"]


def test_last_item_is_never_dropped_and_goes_out_after_what_was_queued() -> None:
    """A room receiver's `end`: more than `limit` media forwarded after it cannot push it
    out; they are discarded, and so is anything else queued after it."""
    dropped: list[str] = []
    box: Outbox[str] = Outbox(2, on_drop=dropped.append)
    box.put("m0")
    box.put("m1")
    box.put("u0", urgent=True)
    box.put_last("end")
    assert box.finished
    for i in range(2, 10):
        box.put(f"m{i}")
    box.put("u1", urgent=True)
    box.put_last("end again")
    assert dropped == [] and box.dropped == 0
    assert drain(box) == ["u0", "m0", "m1", "end"]
    assert len(box) == 0


def test_urgent_lane_is_bounded_and_refuses_the_overflow() -> None:
    refused: list[str] = []
    box: Outbox[str] = Outbox(urgent_limit=3, on_full=refused.append)
    for i in range(3):
        box.put(f"u{i}", urgent=True)
    assert box.urgent_full and refused == []
    box.put("u3", urgent=True)
    box.put("m0")  # the normal lane is not limited by the urgent bound
    assert refused == ["u3"] and box.urgent == 3
    assert drain(box) == ["u0", "u1", "u2", "m0"]
    assert not box.urgent_full


def test_urgent_overflow_without_handler_raises() -> None:
    box: Outbox[str] = Outbox()
    assert box.urgent_limit == CONTROL_LIMIT == 64
    for _ in range(CONTROL_LIMIT):
        box.put("pong", urgent=True)
    with pytest.raises(OutboxFullError):
        box.put("pong", urgent=True)
    assert box.urgent == CONTROL_LIMIT


async def test_get_waits_for_an_item() -> None:
    box: Outbox[str] = Outbox()
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    assert not getter.done()
    box.put_last("end")
    assert await getter == "end"
    box.put("late")  # finished: discarded
    assert len(box) == 0


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit"):
        Outbox(0)
    with pytest.raises(ValueError, match="urgent_limit"):
        Outbox(urgent_limit=0)
