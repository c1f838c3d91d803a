"""Running the app under uvicorn with the server's settings and a graceful shutdown.

`CodecServer` is a `uvicorn.Server` whose shutdown first stops accepting connections, then
closes every session with 1001 "server shutting down" (waiting up to `shutdown_timeout_s`),
and only then lets uvicorn close what is left (uvicorn alone closes WebSockets with 1012).
`make_config` maps the settings onto uvicorn: WebSocket message limit (`max_message_bytes`,
over it the WebSocket layer closes with 1009), keepalive pings, no per-message compression
(small real-time messages), graceful timeout.
"""

from __future__ import annotations

import contextlib
import logging
import socket

import uvicorn
from fastapi import FastAPI

from server.settings import Settings
from server.state import AppState

__all__ = ["CodecServer", "make_config", "serve"]

log = logging.getLogger("codecstream.server")


def make_config(app: FastAPI, settings: Settings, **overrides: object) -> uvicorn.Config:
    """uvicorn configuration of `app` for `settings` (`overrides`: extra Config arguments)."""
    options: dict[str, object] = {
        "host": settings.host,
        "port": settings.port,
        "ws_max_size": settings.max_message_bytes,
        "ws_ping_interval": settings.keepalive_interval_s,
        "ws_ping_timeout": settings.keepalive_timeout_s,
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": int(settings.shutdown_timeout_s) + 1,
        "log_level": settings.log_level,
        "lifespan": "on",
        "loop": settings.event_loop,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)  # type: ignore[arg-type]


class CodecServer(uvicorn.Server):
    """uvicorn server that closes sessions with 1001 before tearing connections down."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.codec_app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        state: AppState | None = getattr(self.codec_app.state, "codec", None)
        if state is not None:
            with contextlib.suppress(Exception):
                await state.close_all(state.settings.shutdown_timeout_s)
        await super().shutdown(sockets)


def serve(settings: Settings) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM."""
    from server.app import create_app

    app = create_app(settings)
    CodecServer(make_config(app, settings), app).run()
