"""WebSocket close codes of the session protocol (docs/protocol.md, "Close codes").

One enum, `CloseCode`: RFC 6455 codes where they fit (1000, 1001, 1003, 1007, 1009, 1011) and
application codes 4000-4999 modelled on the HTTP status of the same meaning (4400 bad request,
4401 unauthorised, ...).  `SessionError` carries a code and a precise reason from wherever a
session fails to the one place that closes the socket.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from streaming.protocol import ErrorCode, ProtocolError

__all__ = [
    "MAX_REASON_BYTES",
    "CloseCode",
    "SessionError",
    "close_reason",
    "protocol_error_close",
]

MAX_REASON_BYTES: Final = 123
"""Longest close reason RFC 6455 allows (a control frame payload is 125 bytes, 2 are the code)."""


class CloseCode(IntEnum):
    """Close codes the server sends (and the ones it reports for peer closes)."""

    NORMAL = 1000
    """After `end`, or the client closed normally."""
    GOING_AWAY = 1001
    """The server is shutting down."""
    UNSUPPORTED_DATA = 1003
    """A binary message where only text is valid (before the hello, room `send: none`)."""
    INVALID_PAYLOAD = 1007
    """Text that is not a JSON object (or not UTF-8); PCM that is not whole samples."""
    MESSAGE_TOO_BIG = 1009
    """A message over `max_message_bytes`, or an `oversized` token packet."""
    INTERNAL_ERROR = 1011
    """A server bug or engine failure."""
    BAD_REQUEST = 4400
    """Invalid hello or control message, second hello, bad room id."""
    UNAUTHORIZED = 4401
    """Missing or unknown API key."""
    TIMEOUT = 4408
    """Handshake, idle or send timeout."""
    ROOM_FULL = 4409
    """The room has `room_max_participants` participants."""
    UNSUPPORTED_FORMAT = 4415
    """`sample_rate` or `format` not supported."""
    MALFORMED_PACKET = 4422
    """A token packet fails validation (reason starts with the `ErrorCode`)."""
    UNSUPPORTED_VERSION = 4426
    """Hello `version` is not the protocol version."""
    TOO_MANY_SESSIONS = 4429
    """Server full, or too many sessions for the API key."""


def close_reason(text: str) -> str:
    """`text` cut to at most 123 bytes of UTF-8 (never in the middle of a character)."""
    data = text.encode("utf-8")
    if len(data) <= MAX_REASON_BYTES:
        return text
    return data[: MAX_REASON_BYTES - 3].decode("utf-8", errors="ignore") + "..."


class SessionError(Exception):
    """A session must close with `code` and the human-readable `reason`; `packet_error`: the
    `ErrorCode` when the cause is a token packet that failed to parse (for the metrics)."""

    def __init__(
        self, code: CloseCode, reason: str, packet_error: ErrorCode | None = None
    ) -> None:
        super().__init__(f"{int(code)} {reason}")
        self.code = code
        self.reason = reason
        self.packet_error = packet_error


def protocol_error_close(error: ProtocolError) -> SessionError:
    """The close for a token packet that failed `decode_packet` / `packet_from_json`:
    1009 for `oversized`, 4422 for every other code; the reason is `"<code>: <message>"`."""
    code = (
        CloseCode.MESSAGE_TOO_BIG
        if error.code is ErrorCode.OVERSIZED
        else CloseCode.MALFORMED_PACKET
    )
    return SessionError(code, str(error), error.code)
