"""WebSocket sessions with a codecstream server (docs/protocol.md, "WebSocket sessions").

`Session.open(server, path, hello)` connects (API key as `Authorization: Bearer`), sends the
hello, waits for `ready` and returns the session; `recv()` yields binary media (`bytes`) or
decoded JSON control/event messages (`dict`); `finish()` sends `end`, collects everything the
server still sends up to its `end` message and the 1000 close.  Any close other than 1000
becomes a `ClientError` quoting the server's close code and reason.

`server` is a base URL: `ws://`, `wss://`, `http://` or `https://` (the latter two are
mapped to WebSocket), host and port, optional path prefix; the API key comes from the
`api_key` argument or the `CODECSTREAM_API_KEY` environment variable.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from client.errors import EXIT_USAGE, ClientError

if TYPE_CHECKING:  # streaming.model loads onnxruntime: only its type is needed here
    from streaming.model import BitrateMode

__all__ = ["API_KEY_ENV", "Message", "Ready", "Session", "http_url", "mode_fields", "ws_url"]

API_KEY_ENV = "CODECSTREAM_API_KEY"
PROTOCOL_VERSION = 1
OPEN_TIMEOUT_S = 10.0
RESPONSE_TIMEOUT_S = 60.0
"""Longest silence of a server that owes us output (file coding, token streams), s."""

Message = bytes | dict[str, Any]
"""A received message: binary media, or a JSON object (text message)."""


def _bad_server(server: str, problem: str) -> ClientError:
    """The usage error (exit code 2) of a malformed --server URL."""
    return ClientError(
        f"--server {server!r}: {problem}; expected a URL such as http://127.0.0.1:8000",
        exit_code=EXIT_USAGE,
    )


def _split(server: str) -> tuple[str, str, str]:
    """(scheme, netloc, path prefix) of a server URL; a bare host:port means http.

    A malformed URL (no host, a port that is not a number in 1..65535, an unclosed IPv6
    bracket, spaces or control characters) is a usage error (`_bad_server`)."""
    url = server if "://" in server else "http://" + server
    try:
        parts = urlsplit(url)
        port = parts.port  # parsed lazily: raises ValueError for a bad port
    except ValueError as exc:
        raise _bad_server(server, f"not a valid URL ({exc})") from None
    if not parts.hostname:
        raise _bad_server(server, "no host name")
    if port == 0:
        raise _bad_server(server, "port 0")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise _bad_server(server, "spaces or control characters in the URL")
    return parts.scheme.lower(), parts.netloc, parts.path.rstrip("/")


def ws_url(server: str, path: str) -> str:
    """WebSocket URL of `path` on `server` (http -> ws, https -> wss)."""
    scheme, netloc, prefix = _split(server)
    mapped = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(scheme)
    if mapped is None:
        raise _bad_server(server, f"unsupported scheme {scheme!r}")
    return urlunsplit((mapped, netloc, prefix + path, "", ""))


def http_url(server: str, path: str) -> str:
    """HTTP URL of `path` on `server` (ws -> http, wss -> https)."""
    scheme, netloc, prefix = _split(server)
    mapped = {"http": "http", "https": "https", "ws": "http", "wss": "https"}.get(scheme)
    if mapped is None:
        raise _bad_server(server, f"unsupported scheme {scheme!r}")
    return urlunsplit((mapped, netloc, prefix + path, "", ""))


def mode_fields(mode: BitrateMode) -> dict[str, int]:
    """The hello / set_bitrate fields (and HTTP query) of an exact bitrate mode:
    `num_codebooks`, plus `lowband_layout` when the mode sends a low band."""
    fields = {"num_codebooks": mode.num_codebooks}
    if mode.lowband_layout:
        fields["lowband_layout"] = mode.lowband_layout
    return fields


def api_key_headers(api_key: str | None) -> dict[str, str]:
    """`Authorization: Bearer KEY` for `api_key` (or $CODECSTREAM_API_KEY), else nothing."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def closed_error(exc: ConnectionClosed, url: str) -> ClientError:
    """A ClientError quoting the close code and reason the server sent."""
    frame = exc.rcvd
    if frame is None:
        return ClientError(f"{url}: connection lost without a close frame")
    reason = f": {frame.reason}" if frame.reason else ""
    return ClientError(f"{url}: the server closed the session with {frame.code}{reason}")


@dataclass(frozen=True)
class Ready:
    """The server's `ready` message (all fields in `raw`; the common ones typed)."""

    raw: dict[str, Any] = field(repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def get(self, key: str, default: Any = None) -> Any:
        """A field of the message, or `default`."""
        return self.raw.get(key, default)

    @property
    def stream_id(self) -> int:
        """Stream id of the packets this session produces (participant id in rooms)."""
        return int(self.raw.get("stream_id", 0))

    @property
    def frame_samples(self) -> int:
        """Client-rate samples per 20 ms frame."""
        return int(self.raw.get("frame_samples", self.raw.get("frame_size", 320)))


class Session:
    """One open, handshaken WebSocket session (see the module doc)."""

    def __init__(self, ws: ClientConnection, url: str, ready: Ready) -> None:
        self.ws = ws
        self.url = url
        self.ready = ready
        self.end_message: dict[str, Any] | None = None

    @classmethod
    async def open(
        cls,
        server: str,
        path: str,
        hello: dict[str, Any],
        *,
        api_key: str | None = None,
        timeout: float = OPEN_TIMEOUT_S,
    ) -> Session:
        """Connect to `path` on `server`, send `hello` (type and version are added), wait
        for `ready`.  ClientError on connection failure, refusal or a non-ready answer."""
        url = ws_url(server, path)
        try:
            ws = await connect(
                url,
                additional_headers=api_key_headers(api_key),
                compression=None,
                open_timeout=timeout,
                max_size=None,
                proxy=None,
            )
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise ClientError(f"cannot connect to {url}: {exc}") from None
        except ValueError as exc:  # what urllib / the resolver refuse beyond `_split`'s checks
            raise _bad_server(server, f"not a valid URL ({exc})") from None
        session = cls(ws, url, Ready({}))
        message = {"type": "hello", "version": PROTOCOL_VERSION, **hello}
        try:
            await ws.send(json.dumps(message))
            answer = await asyncio.wait_for(session._recv_text(), timeout)
        except ConnectionClosed as exc:
            raise closed_error(exc, url) from None
        except TimeoutError:
            await ws.close()
            raise ClientError(f"{url}: no ready message within {timeout:g} s") from None
        if answer.get("type") != "ready":
            await ws.close()
            raise ClientError(f"{url}: expected ready, got {json.dumps(answer)[:200]}")
        session.ready = Ready(answer)
        return session

    async def _recv_text(self) -> dict[str, Any]:
        while True:
            message = await self.ws.recv()
            if isinstance(message, str):
                return _parse(message, self.url)

    @property
    def normal_close(self) -> tuple[int, str] | None:
        """(code, reason) of the server's close frame when it is a normal close (1000, or
        1001 "going away": what `recv` turns into the end of the messages), else None (not
        closed, or another code)."""
        frame = self.ws.protocol.close_rcvd
        if frame is None or frame.code not in (1000, 1001):
            return None
        return int(frame.code), str(frame.reason)

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary message; ClientError if the server closed the session."""
        try:
            await self.ws.send(data)
        except ConnectionClosed as exc:
            raise closed_error(exc, self.url) from None

    async def send_json(self, message: dict[str, Any]) -> None:
        """Send one text message (a JSON object)."""
        try:
            await self.ws.send(json.dumps(message))
        except ConnectionClosed as exc:
            raise closed_error(exc, self.url) from None

    async def recv(self, timeout: float | None = None) -> Message | None:
        """The next message: bytes (binary) or dict (text); None after a normal close
        (1000/1001 or the server's `end`).  ClientError for any other close, or when nothing
        arrives within `timeout` seconds (None: wait forever)."""
        try:
            message = await asyncio.wait_for(self.ws.recv(), timeout)
        except TimeoutError:
            await self.ws.close(1000, "client timeout")
            raise ClientError(
                f"{self.url}: the server sent nothing for {timeout:g} s; giving up"
            ) from None
        except ConnectionClosed as exc:
            if self.normal_close is not None:
                return None
            raise closed_error(exc, self.url) from None
        if isinstance(message, str):
            parsed = _parse(message, self.url)
            if parsed.get("type") == "end":
                self.end_message = parsed
            return parsed
        return message

    async def messages(self, timeout: float | None = None) -> AsyncIterator[Message]:
        """Every message until the session closes normally (`timeout`: as for `recv`)."""
        while (message := await self.recv(timeout)) is not None:
            yield message

    async def finish(self, timeout: float | None = RESPONSE_TIMEOUT_S) -> list[Message]:
        """Send `end`, then return every message received until the server's close (its
        `end` message is kept in `end_message`, not returned)."""
        await self.send_json({"type": "end"})
        rest: list[Message] = []
        async for message in self.messages(timeout):
            if isinstance(message, dict) and message.get("type") == "end":
                continue
            rest.append(message)
        return rest

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the WebSocket (no `end`: output in flight is lost)."""
        await self.ws.close(code, reason)


def _parse(text: str, url: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise ClientError(f"{url}: the server sent invalid JSON: {text[:200]!r}") from None
    if not isinstance(value, dict):
        raise ClientError(f"{url}: the server sent a non-object message: {text[:200]!r}")
    return value
