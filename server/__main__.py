"""`codec-server` entry point.

Placeholder: serves only `/healthz` until the streaming server replaces it. The command line
(--host/--port, CODECSTREAM_HOST/CODECSTREAM_PORT) is what the README and Docker image rely on.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def create_app() -> FastAPI:
    """The ASGI application."""
    app = FastAPI(title="codecstream")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _port(parser: argparse.ArgumentParser, given: int | None) -> int:
    """--port if given, else CODECSTREAM_PORT, else the default."""
    if given is not None:
        return given
    raw = os.environ.get("CODECSTREAM_PORT", str(DEFAULT_PORT))
    try:
        return int(raw)
    except ValueError:
        parser.error(f"CODECSTREAM_PORT must be an integer, got {raw!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codec-server", description=__doc__)
    parser.add_argument(
        "--host",
        default=os.environ.get("CODECSTREAM_HOST", DEFAULT_HOST),
        help="address to bind (env CODECSTREAM_HOST, default %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=int,
        help=f"TCP port (env CODECSTREAM_PORT, default {DEFAULT_PORT})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=_port(parser, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
