"""`codec-server`: the codecstream server with the bundled model, no configuration needed.

    codec-server                       # http://127.0.0.1:8000, bundled model, no auth
    codec-server --host 0.0.0.0 --port 9000 --api-key k1 --api-key k2:4 --max-sessions 128
    CODECSTREAM_API_KEYS=k1,k2:4 codec-server

Every option also reads an environment variable (`codec-server --help` lists them; see
docs/server.md).  At start the log names the model id, whether its weights are random (the
untrained placeholder) and whether authentication is enabled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from server.runner import serve
from server.settings import parse_settings

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings (environment + command line), then serve until interrupted."""
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    serve(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
