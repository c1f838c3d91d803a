"""WebSocket sessions of the stream endpoints (`/v1/encode`, `/v1/decode`, `/v1/roundtrip`).

`Session` is the life cycle every WebSocket endpoint shares (rooms subclass it):

1. `run()` starts `_serve()` as a task and waits for the session's close decision (a future
   set exactly once by `close()`, by whoever decides first: the receiver, the sender, the
   engine worker's `Fatal`, the server's shutdown);
2. `_serve()`: hello within `handshake_timeout` (`_handshake`), `_start` (engine job, ready
   message), the sender task, then the receive loop (`_on_binary` / `_on_control`);
3. on close: both tasks are cancelled, the close frame goes out with the code and reason
   (unless the client closed first), the engine job is removed, the lease released, metrics
   counted.

Every client error raises `SessionError(code, reason)` (server.codes); the reason is cut to
the 123 bytes a close frame allows.

`StreamSession` adds the stream endpoints: PCM or token packets in, submitted in order to a
`StreamJob` on the engine worker; outputs come back through `_sink` into the `Outbox` and go
out from one sender task.  Flow control: the receive loop stops reading while more than
`max_backlog_ms` of input has not been answered (sent), which lets TCP slow down a client that
sends faster than real time.

Every session also flow-controls its control replies: the receive loop stops reading while
`CONTROL_LIMIT` (64) replies are owed to the client (`pong`s and events unsent in the
outbox's urgent lane, plus `set_bitrate` / `flush` requests whose reply has not been sent),
so a client that sends pings or `set_bitrate`s and does not read holds at most 64 replies
on the server and is closed with 4408 by the send timeout.  An event that finds the urgent
lane full (the client does not read) closes the session with 4408 at once.

After `end` the session keeps receiving (and ignores what comes) until its `end` reply is
sent, so that a client that disconnects meanwhile is noticed.  The `end` reply is the
outbox's last item: never dropped, sent after the output queued before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final

from starlette.websockets import WebSocket, WebSocketDisconnect

from server.auth import Lease
from server.codes import CloseCode, SessionError, close_reason, protocol_error_close
from server.engine_worker import Fatal, Job, Out
from server.jobs import EndMark, FlushMark, SetMode, StreamJobSpec, TokenOutput
from server.messages import (
    PROTOCOL_VERSION,
    Control,
    End,
    Endpoint,
    Flush,
    Hello,
    PacketMessage,
    Ping,
    SetBitrate,
    clock_us,
    mode_fields,
    parse_control,
    parse_hello,
    parse_text,
    to_text,
)
from server.outbox import CONTROL_LIMIT, Outbox
from server.state import AppState
from streaming.protocol import ProtocolError, decode_packet

__all__ = ["PeerGoneError", "Session", "StreamSession"]

log = logging.getLogger("codecstream.session")

_U32: Final = struct.Struct(">I")
_CLOSE_TIMEOUT_S: Final = 1.0
_CLIENT_ERRORS: Final = frozenset(
    {
        CloseCode.UNSUPPORTED_DATA,
        CloseCode.INVALID_PAYLOAD,
        CloseCode.MESSAGE_TOO_BIG,
        CloseCode.BAD_REQUEST,
        CloseCode.UNAUTHORIZED,
        CloseCode.TIMEOUT,
        CloseCode.ROOM_FULL,
        CloseCode.UNSUPPORTED_FORMAT,
        CloseCode.MALFORMED_PACKET,
        CloseCode.UNSUPPORTED_VERSION,
        CloseCode.TOO_MANY_SESSIONS,
    }
)


class PeerGoneError(Exception):
    """The client closed the connection (`code` from its close frame, 1006 if none)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _gone_on_send(exc: BaseException) -> PeerGoneError:
    """The `PeerGoneError` of a send that failed because the client had gone: its close code
    when the WebSocket layer knows it, else 1006."""
    code = exc.code if isinstance(exc, WebSocketDisconnect) else 0
    return PeerGoneError(int(code) if code else 1006)


_PEER_CODES: Final = frozenset(range(1000, 1016))
"""Close codes a client's own close is counted under as they are (RFC 6455 and the IANA
registry); any other code a client sends (3000-4999, ...) is counted as "other", so clients
cannot create label series at will."""


def closed_label(code: int, by_server: bool) -> str:
    """The `code` label of `codecstream_sessions_closed_total` for a close with `code`,
    decided by the server (`by_server`) or by the client."""
    return str(code) if by_server or code in _PEER_CODES else "other"


class Session:
    """One WebSocket session (see the module docstring).  Subclasses set `endpoint` and
    implement `_start`, `_on_binary`, `_on_control`, `_cleanup`."""

    endpoint: Endpoint = Endpoint.ENCODE
    idle_timeout: bool = True
    """Close with 4408 after `idle_timeout_s` without a client message."""

    def __init__(self, state: AppState, ws: WebSocket, lease: Lease) -> None:
        self.state = state
        self.ws = ws
        self.lease = lease
        self.settings = state.settings
        self.card = state.card
        self.metrics = state.metrics
        self.session_id = uuid.uuid4().hex
        self.hello: Hello | None = None
        self.outbox: Outbox[Out] = self._make_outbox()
        self._closing: asyncio.Future[tuple[int, str, bool]] = (
            asyncio.get_running_loop().create_future()
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._reading = True
        self._progress = asyncio.Event()  # set by the sender after each message
        self._reading_paused = False  # the receive loop waits for `_backlog_full` to clear
        self._pending_controls = 0  # set_bitrate / flush requests whose reply is not sent
        self._rx_since: float | None = None  # waiting for a client message since (s)
        self._tx_since: float | None = None  # a send blocked since (s)
        label = self.endpoint.value
        self._bytes_in = self.metrics.bytes_received.labels(label)
        self._bytes_out = self.metrics.bytes_sent.labels(label)

    def _make_outbox(self) -> Outbox[Out]:
        return Outbox(on_full=self._outbox_full)

    def _outbox_full(self, item: Out) -> None:
        """An urgent message found the urgent lane full: the client does not read."""
        self.close(
            CloseCode.TIMEOUT,
            f"send queue full: {self.outbox.urgent_limit} control messages unsent, "
            "the client is not reading",
        )

    def __repr__(self) -> str:
        state = "closing" if self.closing else "open"
        return f"<{type(self).__name__} {self.endpoint.value} {self.session_id[:8]} {state}>"

    # ---- close ----------------------------------------------------------------------------

    def close(self, code: CloseCode, reason: str) -> None:
        """Close with `code` and `reason` (the first decision wins; returns at once)."""
        if not self._closing.done():
            self._closing.set_result((int(code), reason, True))

    def _peer_gone(self, code: int) -> None:
        if not self._closing.done():
            self._closing.set_result((code, "", False))

    @property
    def closing(self) -> bool:
        """True once the close is decided."""
        return self._closing.done()

    # ---- life cycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the session until it closes (never raises)."""
        self.state.register(self)
        serve = asyncio.create_task(self._guarded(self._serve()))
        self._tasks.append(serve)
        try:
            code, reason, send = await self._closing
            while not all(task.done() for task in self._tasks):
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if send:
                # bounded: a client that does not read cannot take the close frame either
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                        await self.ws.close(code, close_reason(reason))
            self._count_close(code, by_server=send)
            if code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
                log.info(
                    "session %s (%s) closed %d %s",
                    self.session_id[:8],
                    self.endpoint.value,
                    code,
                    reason,
                )
        finally:
            for task in self._tasks:  # when run() itself was cancelled (server exit)
                task.cancel()
            try:
                self._cleanup()
            finally:
                self.lease.release()
                self.state.unregister(self)

    def _count_close(self, code: int, *, by_server: bool) -> None:
        """Count a close: by code (a client's own code through `closed_label`), and as a
        protocol error when the server closed on a client error."""
        label = closed_label(code, by_server)
        self.metrics.sessions_closed.labels(self.endpoint.value, label).inc()
        if by_server and code in _CLIENT_ERRORS:
            self.metrics.protocol_errors.labels(str(code)).inc()

    async def _guarded(self, body: Any) -> None:
        """Run a coroutine of the session; turn its end into a close decision."""
        try:
            await body
        except SessionError as exc:
            self.close(exc.code, exc.reason)
        except PeerGoneError as exc:
            self._peer_gone(exc.code)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("session %s failed", self.session_id[:8])
            self.close(CloseCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")

    async def _serve(self) -> None:
        hello = await self._handshake()
        self.hello = hello
        await self._start(hello)
        self._tasks.append(asyncio.create_task(self._guarded(self._send_loop())))
        await self._receive_loop()
        await self._ignore_input()  # after `end`: until the sender closes or the peer goes

    async def _ignore_input(self) -> None:
        """Read and drop client messages (after `end`) until the client disconnects: a
        disconnect is noticed even while the `end` reply waits (no idle timeout here)."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise PeerGoneError(int(message.get("code") or 1005))

    def check_timeouts(self, now: float) -> None:
        """Close with 4408 when idle or blocked on a send for too long (called by the
        server's watchdog a few times per second; cheaper than a timer per message)."""
        since = self._rx_since
        if self.idle_timeout and since is not None:
            limit = self.settings.idle_timeout_s
            if now - since > limit:
                self.close(CloseCode.TIMEOUT, f"idle timeout: no message for {limit:g} s")
        since = self._tx_since
        if since is not None:
            limit = self.settings.send_timeout_s
            if now - since > limit:
                self.close(
                    CloseCode.TIMEOUT, f"send blocked for {limit:g} s: the client is not reading"
                )

    async def _receive(self) -> Mapping[str, Any]:
        self._rx_since = time.perf_counter()
        try:
            message: Mapping[str, Any] = await self.ws.receive()
        finally:
            self._rx_since = None
        if message["type"] == "websocket.disconnect":
            raise PeerGoneError(int(message.get("code") or 1005))
        return message

    async def _handshake(self) -> Hello:
        timeout = self.settings.handshake_timeout_s
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for may swallow a cancellation
            async with asyncio.timeout(timeout):
                message = await self.ws.receive()
        except TimeoutError:
            raise SessionError(
                CloseCode.TIMEOUT, f"handshake timeout: no hello within {timeout:g} s"
            ) from None
        if message["type"] == "websocket.disconnect":
            raise PeerGoneError(int(message.get("code") or 1005))
        text = message.get("text")
        if text is None:
            raise SessionError(
                CloseCode.UNSUPPORTED_DATA,
                "binary message before the hello: the first message must be a JSON hello",
            )
        self._bytes_in.inc(len(text))
        return parse_hello(parse_text(text), self.endpoint, self.card)

    async def _receive_loop(self) -> None:
        limit = self.settings.max_message_bytes
        while self._reading:
            if self._backlog_full():
                await self._wait_backlog()
            message = await self._receive()
            data = message.get("bytes")
            if data is not None:
                if len(data) > limit:
                    raise SessionError(
                        CloseCode.MESSAGE_TOO_BIG,
                        f"message of {len(data)} bytes exceeds the limit of {limit} bytes",
                    )
                self._bytes_in.inc(len(data))
                self._on_binary(data)
                continue
            text = message.get("text") or ""
            if len(text) > limit:
                raise SessionError(
                    CloseCode.MESSAGE_TOO_BIG,
                    f"message of {len(text)} characters exceeds the limit of {limit} bytes",
                )
            self._bytes_in.inc(len(text))
            assert self.hello is not None
            control = self._parse_control(text)
            if isinstance(control, Ping):
                reply: dict[str, Any] = {
                    "type": "pong",
                    "server_time_us": clock_us(time.perf_counter()),
                }
                if control.has_id:
                    reply["id"] = control.id
                self.outbox.put(Out(to_text(reply)), urgent=True)
            else:
                self._on_control(control)

    def _parse_control(self, text: str) -> Control:
        """The control message of `text` (SessionError to close with); a JSON token packet
        that fails to parse is counted in `codecstream_packet_errors_total` as a binary one."""
        assert self.hello is not None
        try:
            return parse_control(parse_text(text), self.hello, self.card)
        except SessionError as exc:
            if exc.packet_error is not None:
                self.metrics.packet_errors.labels(exc.packet_error.value).inc()
            raise

    def _backlog_full(self) -> bool:
        """Flow control: True while too much input is unanswered (then the receive loop
        waits for the sender's progress before reading on).  Here: `CONTROL_LIMIT` control
        replies owed (queued urgent messages and requests awaiting their reply)."""
        return self.outbox.urgent + self._pending_controls >= CONTROL_LIMIT

    async def _wait_backlog(self) -> None:
        """Wait while `_backlog_full` (each message sent may make room)."""
        self._reading_paused = True
        try:
            while self._backlog_full() and not self.closing:
                self._progress.clear()
                await self._progress.wait()
        finally:
            self._reading_paused = False

    @property
    def reading_paused(self) -> bool:
        """True while flow control holds the client's input unread.  It stays True while
        the message that would make room is in flight (taken from the outbox, blocked in
        the send), when `_backlog_full` itself may already read False."""
        return self._reading_paused

    async def _send_loop(self) -> None:
        ws = self.ws
        while not self.closing:
            item = await self.outbox.get()
            data = item.data
            self._tx_since = time.perf_counter()
            try:
                if isinstance(data, str):
                    await ws.send_text(data)
                elif data:
                    if item.stamp >= 0:
                        stamped = bytearray(data)
                        _U32.pack_into(stamped, item.stamp, clock_us(self._tx_since))
                        data = bytes(stamped)
                    await ws.send_bytes(data)
            except (RuntimeError, OSError, WebSocketDisconnect) as exc:
                raise _gone_on_send(exc) from exc
            finally:
                self._tx_since = None
            self._bytes_out.inc(len(data))
            if item.reply and self._pending_controls:
                self._pending_controls -= 1
            self._sent(item)
            self._progress.set()
            if item.close:
                self.close(CloseCode.NORMAL, "end of stream")
                return

    def _sent(self, item: Out) -> None:
        """Flow control hook: `item` went out."""

    def _sink(self, items: list[Any]) -> None:
        """Outputs of the engine job (on the loop)."""
        for item in items:
            if isinstance(item, Fatal):
                self.close(item.code, item.reason)
                return
            if isinstance(item, Out) and item.close:
                self.outbox.put_last(item)  # `end`: never dropped, nothing after it
            else:
                self.outbox.put(item)

    def _ready_fields(self, hello: Hello) -> dict[str, Any]:
        card = self.card
        return {
            "type": "ready",
            "version": PROTOCOL_VERSION,
            "endpoint": self.endpoint.value,
            "session_id": self.session_id,
            "model_id": card.model_id,
            "random_weights": card.random_weights,
            "sample_rate": hello.sample_rate,
            "format": hello.fmt.value,
            "sample_rate_model": card.sample_rate,
            "frame_size": card.frame_size,
            "frame_ms": card.frame_ms,
            "frame_samples": card.frame_size * hello.sample_rate // card.sample_rate,
            **mode_fields(hello.mode),
            "rate_cap": hello.rate_cap,
            "max_codebooks": card.num_codebooks,
            "code_bits": card.code_bits,
            "gain_bits": card.gain.bits,
            "timestamps": hello.timestamps,
            "max_message_bytes": self.settings.max_message_bytes,
            "idle_timeout_s": self.settings.idle_timeout_s if self.idle_timeout else None,
        }

    async def _send_ready(self, ready: dict[str, Any]) -> None:
        """Send the `ready` reply (before the sender task runs); a client that has already
        gone (e.g. its close frame came with its hello) is a `PeerGoneError`, not a failure."""
        text = to_text(ready)
        try:
            await self.ws.send_text(text)
        except (RuntimeError, OSError, WebSocketDisconnect) as exc:
            raise _gone_on_send(exc) from exc
        self._bytes_out.inc(len(text))

    # ---- subclass hooks -------------------------------------------------------------------

    async def _start(self, hello: Hello) -> None:
        raise NotImplementedError

    def _on_binary(self, data: bytes) -> None:
        raise NotImplementedError

    def _on_control(self, control: Control) -> None:
        raise NotImplementedError

    def _cleanup(self) -> None:
        """Release engine resources (runs once, whatever the end)."""

    # ---- helpers --------------------------------------------------------------------------

    def _pcm_ms(self, data: bytes) -> float:
        """Duration of a PCM message, ms; 1007 when it is not a whole number of samples."""
        hello = self.hello
        assert hello is not None
        size = hello.fmt.sample_bytes
        if len(data) % size:
            raise SessionError(
                CloseCode.INVALID_PAYLOAD,
                f"PCM message of {len(data)} bytes is not a whole number of {hello.fmt.value} "
                f"samples ({size} bytes each)",
            )
        return 1000.0 * (len(data) // size) / hello.sample_rate

    def _decode_packet(self, data: bytes) -> Any:
        card = self.card
        try:
            return decode_packet(
                data,
                code_bits=card.code_bits,
                gain_bits=card.gain.bits,
                max_codebooks=card.num_codebooks,
            )
        except ProtocolError as exc:
            self.metrics.packet_errors.labels(exc.code.value).inc()
            raise protocol_error_close(exc) from None


class StreamSession(Session):
    """`/v1/encode`, `/v1/decode` or `/v1/roundtrip` (set `endpoint` per instance)."""

    def __init__(self, state: AppState, ws: WebSocket, lease: Lease, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        super().__init__(state, ws, lease)
        self.job: Job | None = None
        self.stream_id = 0
        self._submitted_ms = 0.0
        self._done_ms = 0.0

    async def _start(self, hello: Hello) -> None:
        state = self.state
        endpoint = self.endpoint
        self.stream_id = hello.stream_id if hello.stream_id is not None else state.new_stream_id()
        if endpoint is Endpoint.ROUNDTRIP:
            tokens = TokenOutput.JSON if hello.return_tokens else TokenOutput.NONE
        elif endpoint is Endpoint.ENCODE:
            tokens = TokenOutput(hello.tokens.value)
        else:
            tokens = TokenOutput.NONE
        spec = StreamJobSpec(
            endpoint=endpoint.value,
            encode=endpoint is not Endpoint.DECODE,
            decode=endpoint is not Endpoint.ENCODE,
            rate=hello.sample_rate,
            fmt=hello.fmt,
            mode=hello.mode,
            rate_cap=hello.rate_cap,
            tokens=tokens,
            stream_id=self.stream_id,
            timestamps=hello.timestamps,
        )
        job = state.worker.stream_job(spec, self._sink)
        ready = self._ready_fields(hello)
        ready.update(
            stream_id=self.stream_id,
            tokens=hello.tokens.value,
            return_tokens=hello.return_tokens,
            algorithmic_latency_ms=spec.algorithmic_latency_ms(self.card),
        )
        await self._send_ready(ready)
        self.job = job
        state.worker.add(job)

    def _submit(self, item: object) -> None:
        assert self.job is not None
        self.state.worker.submit(self.job, item)

    def _on_binary(self, data: bytes) -> None:
        if self.endpoint is Endpoint.DECODE:
            packet = self._decode_packet(data)
            self._submit(packet.frame)
            self._submitted_ms += self.card.frame_ms
            return
        ms = self._pcm_ms(data)
        if data:
            self._submit(bytes(data))
            self._submitted_ms += ms

    def _on_control(self, control: Control) -> None:
        if isinstance(control, SetBitrate):
            self._submit(SetMode(control.mode))
            self._pending_controls += 1  # encode, roundtrip: the job replies `bitrate`
        elif isinstance(control, Flush):
            self._submit(FlushMark())
            self._pending_controls += 1  # replied `flushed`
        elif isinstance(control, End):
            self._submit(EndMark())
            self._reading = False
        elif isinstance(control, PacketMessage):
            self._submit(control.packet.frame)
            self._submitted_ms += self.card.frame_ms

    @property
    def unanswered_ms(self) -> float:
        """Input received and not yet answered by a sent output, ms (>= 0): what flow
        control bounds by `max_backlog_ms`."""
        return self._submitted_ms - self._done_ms

    def _backlog_full(self) -> bool:
        return self.unanswered_ms > self.settings.max_backlog_ms or super()._backlog_full()

    def _sent(self, item: Out) -> None:
        if item.frames:
            # A flush pads the last partial frame: its output answers more than was sent.
            # Capped, so that repeated tiny chunks + flush never build up credit for a later
            # flood (the answered time never runs ahead of the input).
            self._done_ms = min(self._done_ms + item.frames * self.card.frame_ms,
                                self._submitted_ms)

    def _cleanup(self) -> None:
        if self.job is not None:
            self.state.worker.remove(self.job)
            self.job = None
