"""Errors the command line turns into a one-line message and an exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Final

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
"""A command failed: bad input file, server error, ..."""
EXIT_USAGE: Final = 2
"""Bad command line, or a needed resource (a sound device) does not exist."""


class ClientError(Exception):
    """A failure to report as `codec-client: error: <message>` with exit code `exit_code`."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


def check_writable(path: Path, label: str = "") -> None:
    """ClientError unless `path` can be written, checked before long work (without
    truncating an existing file, and leaving none behind); `label` prefixes the message,
    e.g. the option's name."""
    existed = path.exists()
    try:
        with path.open("ab"):
            pass
    except OSError as exc:
        raise ClientError(f"{label}{path}: cannot write ({exc.strerror})") from None
    if not existed:
        path.unlink(missing_ok=True)
