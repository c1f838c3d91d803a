"""What the app shares between requests: settings, model, engine worker, metrics, sessions.

One `AppState` per app, created by the lifespan (`server.app`); sessions reach it through
`app.state.codec`.  `close_all` is the graceful shutdown: every live session closes with
1001 and a reason, and the call waits (bounded) until they are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Protocol

from server.auth import Admission
from server.codes import CloseCode
from server.engine_pool import EnginePool
from server.metrics import Metrics
from server.settings import Settings
from streaming.model import CodecModel

if TYPE_CHECKING:
    from server.rooms import RoomRegistry

__all__ = ["AppState", "Closable"]

_WATCHDOG_PERIOD_S = 0.1
"""How often idle and send timeouts are checked (their resolution), s."""

log = logging.getLogger("codecstream.server")


class Closable(Protocol):
    """A live session the server can close."""

    def close(self, code: CloseCode, reason: str) -> None:
        """Ask the session to close with `code` / `reason` (returns at once)."""

    def check_timeouts(self, now: float) -> None:
        """Close the session when one of its timeouts expired at `now` (s, perf_counter)."""


class AppState:
    """Shared state of one app (loop-only except the engine pool's thread-safe API)."""

    def __init__(
        self,
        settings: Settings,
        model: CodecModel,
        worker: EnginePool,
        metrics: Metrics,
        rooms: RoomRegistry,
    ) -> None:
        self.settings = settings
        self.model = model
        self.card = model.card
        self.worker = worker
        self.metrics = metrics
        self.admission = Admission(settings, metrics)
        self.rooms = rooms
        self.sessions: set[Closable] = set()
        self.shutting_down = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.next_stream_id = 1
        self._watchdog: asyncio.Task[None] | None = None

    def start_watchdog(self, period_s: float = _WATCHDOG_PERIOD_S) -> None:
        """Check every session's idle and send timeouts, and sample the engine's slow frames
        (`server.capacity`), every `period_s` seconds."""
        self._watchdog = asyncio.create_task(self._watch(period_s))

    async def _watch(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.worker.sample_slowness()
            self.metrics.engine_slow_percent.set(self.worker.stream_slow_percent())
            now = time.perf_counter()
            for session in list(self.sessions):
                try:
                    session.check_timeouts(now)
                except Exception:  # never let one session stop the watchdog
                    log.exception("timeout check failed")

    async def stop_watchdog(self) -> None:
        """Stop the timeout checks."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None

    def new_stream_id(self) -> int:
        """A fresh u32 stream id (1, 2, ...; wraps)."""
        sid = self.next_stream_id
        self.next_stream_id = sid % 0xFFFFFFFF + 1
        return sid

    def register(self, session: Closable) -> None:
        """A session started."""
        self.sessions.add(session)
        self._idle.clear()

    def unregister(self, session: Closable) -> None:
        """A session ended."""
        self.sessions.discard(session)
        if not self.sessions:
            self._idle.set()

    async def close_all(self, timeout: float) -> None:
        """Close every session with 1001 and wait up to `timeout` s for them to end."""
        self.shutting_down = True
        sessions = list(self.sessions)
        if sessions:
            log.info("closing %d session(s) with 1001", len(sessions))
        for session in sessions:
            session.close(CloseCode.GOING_AWAY, "server shutting down")
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            log.warning(
                "%d session(s) still open after %.1f s: %s",
                len(self.sessions),
                timeout,
                ", ".join(repr(s) for s in self.sessions),
            )
