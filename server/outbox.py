"""Per-session queue of outgoing messages, drained by the session's one sender task.

Three parts, sent in this order:

* the `urgent` lane: control replies and events (`pong`, room `bitrate` replies, `joined`,
  `left`), sent ahead of queued media.  Bounded to `urgent_limit` messages (`CONTROL_LIMIT`):
  the session stops reading while it is full (flow control of the client's own requests), and
  a message that would overflow it (an event the client did not ask for) is refused and
  handed to `on_full` (the session closes with 4408: the client does not read);
* the normal lane: media and in-order replies.  Unbounded for stream sessions (their input
  is flow controlled, which bounds the output too) or bounded to `limit` messages with the
  oldest dropped (room receivers: a slow reader loses old audio instead of growing a
  backlog);
* the `last` item (`put_last`: the `end` reply, which closes the session): sent after
  everything queued before it and never dropped.  Once it is queued the outbox is
  *finished*: later messages are discarded, so a stream of forwarded media can neither push
  it out nor delay it.

Loop-only (not thread-safe).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final, Generic, TypeVar

__all__ = ["CONTROL_LIMIT", "Outbox", "OutboxFullError"]

T = TypeVar("T")

CONTROL_LIMIT: Final = 64
"""Most control replies and events that may wait unsent in one session's urgent lane; also
the most control requests (`set_bitrate`, `flush`) that may wait for their reply."""


class OutboxFullError(Exception):
    """An urgent message found the urgent lane full (raised only without `on_full`)."""


class Outbox(Generic[T]):
    """FIFO of messages with a bounded urgent lane, an optional drop-oldest bound on the
    normal lane and a final item that is never dropped."""

    def __init__(
        self,
        limit: int | None = None,
        on_drop: Callable[[T], None] | None = None,
        *,
        urgent_limit: int = CONTROL_LIMIT,
        on_full: Callable[[T], None] | None = None,
    ) -> None:
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1")
        if urgent_limit < 1:
            raise ValueError("urgent_limit must be >= 1")
        self.limit = limit
        self.on_drop = on_drop
        self.urgent_limit = urgent_limit
        self.on_full = on_full
        self._urgent: deque[T] = deque()
        self._normal: deque[T] = deque()
        self._last: deque[T] = deque(maxlen=1)
        self._finished = False
        self._ready = asyncio.Event()
        self.dropped = 0
        """Messages dropped because the bounded normal lane was full."""

    def __len__(self) -> int:
        return len(self._urgent) + len(self._normal) + len(self._last)

    @property
    def urgent(self) -> int:
        """Messages waiting in the urgent lane."""
        return len(self._urgent)

    @property
    def urgent_full(self) -> bool:
        """True while the urgent lane holds `urgent_limit` messages."""
        return len(self._urgent) >= self.urgent_limit

    @property
    def finished(self) -> bool:
        """True once the last item is queued (later messages are discarded)."""
        return self._finished

    def put(self, item: T, *, urgent: bool = False) -> None:
        """Queue `item` (never blocks).  Normal lane: drops the oldest normal item when over
        `limit`.  Urgent lane: when full, `item` is refused and handed to `on_full`
        (`OutboxFullError` without one).  Discarded once the outbox is finished."""
        if self._finished:
            return
        if urgent:
            if len(self._urgent) >= self.urgent_limit:
                if self.on_full is None:
                    raise OutboxFullError(f"urgent lane full ({self.urgent_limit} messages)")
                self.on_full(item)
                return
            self._urgent.append(item)
        else:
            self._normal.append(item)
            if self.limit is not None and len(self._normal) > self.limit:
                old = self._normal.popleft()
                self.dropped += 1
                if self.on_drop is not None:
                    self.on_drop(old)
        self._ready.set()

    def put_last(self, item: T) -> None:
        """Queue the final `item`: sent after everything already queued, never dropped;
        the outbox is finished from now on (ignored when it already is)."""
        if self._finished:
            return
        self._finished = True
        self._last.append(item)
        self._ready.set()

    async def get(self) -> T:
        """The next item: urgent ones first, then the normal lane, then the last item;
        waits while empty."""
        while True:
            if self._urgent:
                return self._urgent.popleft()
            if self._normal:
                return self._normal.popleft()
            if self._last:
                return self._last.popleft()
            self._ready.clear()
            await self._ready.wait()
