"""The FastAPI application: `create_app(settings)`.

The lifespan loads the model (`CodecModel.load`, off the event loop), starts the engine
worker threads and publishes an `AppState` as `app.state.codec`; on exit it closes every
session with 1001 ("server shutting down") and stops the worker.  `server.runner.CodecServer`
runs that close before uvicorn tears connections down (uvicorn alone would send 1012).

Routes: the HTTP endpoints of `server.http_api` and four WebSockets:
`/v1/encode`, `/v1/decode`, `/v1/roundtrip` (`server.session.StreamSession`) and
`/v1/rooms/{room_id}` (`server.rooms.RoomSession`); protocol in docs/protocol.md.
Every WebSocket is accepted, then checked (API key: 4401; session limits, and for the stream
endpoints the engine's capacity (`server.capacity`): 4429) before its hello.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

from fastapi import FastAPI, WebSocket
from fastapi.middleware.cors import CORSMiddleware

from server.auth import AuthError, Lease
from server.codes import CloseCode, SessionError, close_reason
from server.engine_pool import EnginePool
from server.http_api import EXPOSED_HEADERS, router
from server.messages import Endpoint
from server.metrics import Metrics
from server.rooms import RoomRegistry, RoomSession
from server.session import Session, StreamSession
from server.settings import MIN_BACKLOG_FRAMES, Settings, SettingsError
from server.state import AppState
from streaming.model import CodecModel, ModelCard

__all__ = ["create_app"]

log = logging.getLogger("codecstream.server")

SessionFactory = Callable[[AppState, WebSocket, Lease], Session]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app for `settings` (default: `Settings.from_env()`)."""
    settings = settings or Settings.from_env()
    settings.key_limits()  # fail fast on invalid keys
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await _start(settings, metrics)
        app.state.codec = state
        state.start_watchdog()
        try:
            yield
        finally:
            await state.close_all(settings.shutdown_timeout_s)
            await state.stop_watchdog()
            await asyncio.to_thread(state.worker.stop)
            log.info("engine worker stopped")

    app = FastAPI(title="codecstream", version="1", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.codec = None
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=list(EXPOSED_HEADERS),  # readable by a browser page
        )
    app.include_router(router)
    _websockets(app)
    return app


async def _start(settings: Settings, metrics: Metrics) -> AppState:
    # process-wide: an engine thread returning from onnxruntime (which releases the GIL)
    # must get it back quickly while the event loop is busy (Python's default is 5 ms)
    sys.setswitchinterval(settings.switch_interval_ms / 1000.0)
    # the server process's own model (rooms, HTTP file jobs; every session with engine
    # processes 0) runs beside the event loop: 1 thread unless set
    model = await asyncio.to_thread(
        CodecModel.load, settings.model_dir, settings.engine_threads or 1
    )
    card = model.card
    _check_backlog(settings, card)
    metrics.model_info.labels(card.model_id, str(card.random_weights).lower()).set(1)
    worker = EnginePool(
        model,
        metrics,
        workers=settings.engine_workers,
        batch_window_s=settings.batch_window_ms / 1000.0,
        processes=settings.engine_process_count,
        model_dir=settings.model_dir,
        engine_threads=settings.engine_thread_count,
        switch_interval_ms=settings.switch_interval_ms,
    )
    worker.start(asyncio.get_running_loop())
    try:
        await worker.ready()
    except RuntimeError:
        await asyncio.to_thread(worker.stop)
        raise
    log.info(
        "engine: %d engine process(es) for the stream sessions (pids %s, %d onnxruntime "
        "thread(s) each), %d engine thread(s) for %s",
        len(worker.processes),
        ", ".join(str(p.pid) for p in worker.processes) or "-",
        settings.engine_thread_count,
        len(worker.workers),
        "rooms and HTTP file jobs" if worker.processes else "every session",
    )
    metrics.add_latency_source(worker.latency_summary)
    state = AppState(settings, model, worker, metrics, RoomRegistry(metrics))
    log.info(
        "model %s loaded from %s (%d Hz, %d codebooks, %.1f ms algorithmic latency)",
        card.model_id,
        model.path,
        card.sample_rate,
        card.num_codebooks,
        card.algorithmic_latency_ms,
    )
    if card.random_weights:
        log.warning(
            "model %s has RANDOM WEIGHTS (untrained placeholder): audio is noise", card.model_id
        )
    if not state.admission.enabled:
        log.warning(
            "NO API KEYS CONFIGURED: authentication is DISABLED, every client is "
            "accepted (set CODECSTREAM_API_KEYS or --api-key)"
        )
    else:
        log.info("authentication enabled: %d API key(s)", len(state.admission.limits))
    return state


def _check_backlog(settings: Settings, card: ModelCard) -> None:
    """SettingsError when `max_backlog_ms` is below `MIN_BACKLOG_FRAMES` frames of the loaded
    model (the parse-time floor `MIN_BACKLOG_MS` assumes 20 ms frames; a session whose
    backlog limit is under a frame stops reading for good, see `server.settings`)."""
    least_ms = MIN_BACKLOG_FRAMES * card.frame_ms
    if settings.max_backlog_ms < least_ms:
        raise SettingsError(
            f"max_backlog_ms must be >= {least_ms:g} ms ({MIN_BACKLOG_FRAMES} frames of model "
            f"{card.model_id}), got {settings.max_backlog_ms:g}"
        )


def _stream(endpoint: Endpoint) -> SessionFactory:
    def factory(state: AppState, ws: WebSocket, lease: Lease) -> Session:
        return StreamSession(state, ws, lease, endpoint)

    return factory


async def _serve(ws: WebSocket, endpoint: Endpoint, factory: SessionFactory) -> None:
    lease = await _admit(ws, endpoint)
    if lease is not None:
        await factory(ws.app.state.codec, ws, lease).run()


def _websockets(app: FastAPI) -> None:
    @app.websocket("/v1/encode")
    async def ws_encode(ws: WebSocket) -> None:
        await _serve(ws, Endpoint.ENCODE, _stream(Endpoint.ENCODE))

    @app.websocket("/v1/decode")
    async def ws_decode(ws: WebSocket) -> None:
        await _serve(ws, Endpoint.DECODE, _stream(Endpoint.DECODE))

    @app.websocket("/v1/roundtrip")
    async def ws_roundtrip(ws: WebSocket) -> None:
        await _serve(ws, Endpoint.ROUNDTRIP, _stream(Endpoint.ROUNDTRIP))

    @app.websocket("/v1/rooms/{room_id}")
    async def ws_room(ws: WebSocket, room_id: str) -> None:
        def factory(state: AppState, ws: WebSocket, lease: Lease) -> Session:
            return RoomSession(state, ws, lease, room_id)

        await _serve(ws, Endpoint.ROOM, factory)


async def _admit(ws: WebSocket, endpoint: Endpoint) -> Lease | None:
    """Accept, then check key and limits; close (and count) a refused connection."""
    await ws.accept()
    state: AppState | None = ws.app.state.codec
    if state is None or state.shutting_down:
        await _refuse(
            ws, None, endpoint, SessionError(CloseCode.GOING_AWAY, "server shutting down")
        )
        return None
    try:
        key = state.admission.authenticate(ws.headers, ws.query_params)
        if endpoint in _STREAM_ENDPOINTS:
            _check_capacity(state)
        return state.admission.acquire(key, endpoint.value)
    except AuthError as exc:
        await _refuse(ws, state, endpoint, SessionError(CloseCode.UNAUTHORIZED, exc.message))
    except SessionError as exc:
        await _refuse(ws, state, endpoint, exc)
    return None


_STREAM_ENDPOINTS: Final = frozenset({Endpoint.ENCODE, Endpoint.DECODE, Endpoint.ROUNDTRIP})
"""Sessions that step the engine every frame (rooms forward tokens; PCM participants are
few and join their room's worker)."""


def _check_capacity(state: AppState) -> None:
    """SessionError 4429 while the engine is short of time (`server.capacity`)."""
    limit = state.settings.max_slow_percent
    slow = state.worker.stream_slow_percent()
    if limit < 100.0 and slow > limit:
        state.metrics.sessions_refused.labels("capacity").inc()
        raise SessionError(
            CloseCode.TOO_MANY_SESSIONS,
            f"server at capacity: {slow:.1f} % of the engine's frames slow (limit "
            f"{limit:g} %), retry later or elsewhere",
        )


async def _refuse(
    ws: WebSocket, state: AppState | None, endpoint: Endpoint, error: SessionError
) -> None:
    if state is not None:
        state.metrics.sessions_closed.labels(endpoint.value, str(int(error.code))).inc()
        state.metrics.protocol_errors.labels(str(int(error.code))).inc()
    with contextlib.suppress(Exception):
        await ws.close(int(error.code), close_reason(error.reason))
