"""Errors the command line turns into a one-line message and an exit code."""

from __future__ import annotations

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
