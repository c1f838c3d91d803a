"""Per-session queue of outgoing messages, drained by the session's one sender task.

Two lanes: `urgent` (control replies such as `pong`, sent ahead of queued media) and the
normal lane.  The normal lane is unbounded for stream sessions (their input is flow
controlled, which bounds the output too) or bounded to `limit` messages with the oldest
dropped (room receivers: a slow reader loses old audio instead of growing a backlog).
Loop-only (not thread-safe).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Outbox"]

T = TypeVar("T")


class Outbox(Generic[T]):
    """FIFO of messages with an urgent lane and an optional drop-oldest bound."""

    def __init__(
        self, limit: int | None = None, on_drop: Callable[[T], None] | None = None
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.on_drop = on_drop
        self._urgent: deque[T] = deque()
        self._normal: deque[T] = deque()
        self._ready = asyncio.Event()
        self.dropped = 0
        """Messages dropped because the bounded lane was full."""

    def __len__(self) -> int:
        return len(self._urgent) + len(self._normal)

    def put(self, item: T, *, urgent: bool = False) -> None:
        """Queue `item` (never blocks); drops the oldest normal item when over `limit`."""
        if urgent:
            self._urgent.append(item)
        else:
            self._normal.append(item)
            if self.limit is not None and len(self._normal) > self.limit:
                old = self._normal.popleft()
                self.dropped += 1
                if self.on_drop is not None:
                    self.on_drop(old)
        self._ready.set()

    async def get(self) -> T:
        """The next item, urgent ones first; waits while empty."""
        while True:
            if self._urgent:
                return self._urgent.popleft()
            if self._normal:
                return self._normal.popleft()
            self._ready.clear()
            await self._ready.wait()
