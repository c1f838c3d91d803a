"""Text messages of the session protocol: hello, control messages, server messages.

`parse_text` turns a text message into a JSON object (1007 if it is not one); `parse_hello`
validates the first message of a session against its endpoint (docs/protocol.md, "Hello");
`parse_control` validates every later text message.  Every failure raises `SessionError`
with the close code of the table in docs/protocol.md and a reason naming the field.

Bitrates are **modes** (`streaming.model.BitrateMode`: codebooks kept and low-band layout):
`bitrate_kbps` selects the card's mode for that budget (`ModelCard.mode_for_bitrate`),
`num_codebooks` an exact count without low band, or with `lowband_layout` (0, 1, 2) an exact
mode (expert use).  Replies report a mode with `mode_fields`.

Server messages are built by `ready_message` & co and serialised by `to_text` (compact JSON).
Times on the wire are the server clock in microseconds modulo 2**32 (`clock_us`), derived
from `time.perf_counter` (seconds), the clock of every latency record of the engine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from server.codes import CloseCode, SessionError, protocol_error_close
from streaming.framing import SUPPORTED_RATES, SampleFormat
from streaming.lowband import LOWBAND_LAYOUT_NONE
from streaming.model import BitrateMode, ModelCard
from streaming.protocol import (
    ProtocolError,
    TokenPacket,
    packet_from_json,
    reject_json_constant,
)

__all__ = [
    "MAX_PING_ID_BYTES",
    "PROTOCOL_VERSION",
    "Control",
    "End",
    "Endpoint",
    "Flush",
    "Hello",
    "Media",
    "PacketMessage",
    "Ping",
    "SetBitrate",
    "TokenForm",
    "clock_us",
    "default_mode",
    "lowband_layouts",
    "mode_fields",
    "mode_of",
    "named_modes",
    "parse_control",
    "parse_hello",
    "parse_text",
    "to_text",
]

PROTOCOL_VERSION: Final = 1
"""Version of the session protocol (hello `version`)."""

DEFAULT_BITRATE_KBPS: Final = 6.0
"""Bitrate budget of produced frames when the hello names none (`default_mode`)."""

NAMED_BITRATES_KBPS: Final = (1.0, 3.0, 6.0)
"""The advertised bitrates: /v1/models lists the mode each one selects (`named_modes`)."""

MAX_NAME_CHARS: Final = 64
"""Longest room display name."""

MAX_PING_ID_BYTES: Final = 256
"""Longest ping `id`, as compact JSON (the form the pong echoes it in): every ping is
answered ahead of queued media, so a bigger id would let a client make the server queue
large replies."""


def clock_us(seconds: float) -> int:
    """A `time.perf_counter` reading (s) as the wire clock: µs modulo 2**32."""
    return int(seconds * 1e6) & 0xFFFFFFFF


def to_text(message: dict[str, Any]) -> str:
    """Compact JSON text of a server message."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


class Endpoint(StrEnum):
    """The four WebSocket endpoints (ready `endpoint`)."""

    ENCODE = "encode"
    DECODE = "decode"
    ROUNDTRIP = "roundtrip"
    ROOM = "room"


class Media(StrEnum):
    """What a room participant sends or receives."""

    TOKENS = "tokens"
    PCM = "pcm"
    NONE = "none"


class TokenForm(StrEnum):
    """How token packets travel: binary packets or JSON `packet` text messages."""

    BINARY = "binary"
    JSON = "json"


@dataclass(frozen=True)
class Hello:
    """A validated hello.  `mode` (codebooks and low-band layout of produced frames) is
    resolved from `bitrate_kbps`, `num_codebooks` [+ `lowband_layout`] or the default; on
    endpoints that produce no frames it is all Q codebooks without low band."""

    endpoint: Endpoint
    sample_rate: int
    fmt: SampleFormat
    mode: BitrateMode
    tokens: TokenForm
    return_tokens: bool
    timestamps: bool
    stream_id: int | None
    send: Media
    receive: Media
    name: str
    rate_cap: bool = False
    """Hold produced frames to the mode's nominal rate (`EncoderStream(rate_cap=True)`)."""

    @property
    def num_codebooks(self) -> int:
        """Codebooks kept per produced frame (`mode.num_codebooks`)."""
        return self.mode.num_codebooks

    @property
    def lowband_layout(self) -> int:
        """Low-band layout of produced frames (`mode.lowband_layout`, 0: none)."""
        return self.mode.lowband_layout

    @property
    def sends_pcm(self) -> bool:
        """The client sends PCM (encode, roundtrip, room `send: pcm`)."""
        if self.endpoint is Endpoint.ROOM:
            return self.send is Media.PCM
        return self.endpoint is not Endpoint.DECODE

    @property
    def receives_pcm(self) -> bool:
        """The server sends PCM (decode, roundtrip, room `receive: pcm`)."""
        if self.endpoint is Endpoint.ROOM:
            return self.receive is Media.PCM
        return self.endpoint is not Endpoint.ENCODE


# ---- control messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class SetBitrate:
    """`set_bitrate`: encode with `mode` (codebooks and low-band layout) from the next frame
    on."""

    mode: BitrateMode


@dataclass(frozen=True)
class Flush:
    """`flush`: pad to a whole frame and process everything received."""


@dataclass(frozen=True)
class End:
    """`end`: flush, send `end`, close 1000."""


@dataclass(frozen=True)
class Ping:
    """`ping`: answer `pong` at once; `id` is echoed (`has_id` False: no id given)."""

    id: Any
    has_id: bool


@dataclass(frozen=True)
class PacketMessage:
    """A token packet in JSON form (decode with `tokens: json`)."""

    packet: TokenPacket


Control = SetBitrate | Flush | End | Ping | PacketMessage


# ---- parsing helpers ----------------------------------------------------------------------


def _finite_float(text: str) -> float:
    """`json.loads` hook: a JSON number too large for a double (it would become inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


MAX_INT_DIGITS: Final = 4300
"""Longest JSON integer parsed (Python's own limit for int(str)); a longer one is 1007."""


def _bounded_int(text: str) -> int:
    """`json.loads` hook: an integer literal, refused (ValueError) past `MAX_INT_DIGITS`
    digits with a message for the client rather than Python's own."""
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"integer of {digits} digits is out of range")
    return int(text)


def parse_text(text: str) -> dict[str, Any]:
    """The JSON object of a text message; 1007 when it is not JSON (NaN, Infinity, numbers
    beyond a double or integers beyond `MAX_INT_DIGITS` digits, and nesting too deep to
    parse included) or not an object."""
    try:
        value = json.loads(
            text,
            parse_constant=reject_json_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except ValueError as exc:
        raise SessionError(CloseCode.INVALID_PAYLOAD, f"text message is not JSON: {exc}") from None
    except RecursionError:
        raise SessionError(
            CloseCode.INVALID_PAYLOAD, "text message is not JSON: nested too deeply"
        ) from None
    if not isinstance(value, dict):
        raise SessionError(
            CloseCode.INVALID_PAYLOAD,
            f"text message must be a JSON object, got {type(value).__name__}",
        )
    return value


def _bad(reason: str) -> SessionError:
    return SessionError(CloseCode.BAD_REQUEST, reason)


def _show(value: object, limit: int = 40) -> str:
    """At most `limit` characters of `value` as JSON, for a close reason (never raises: a
    value nested too deeply to serialise is shown by its type)."""
    try:
        return json.dumps(value)[:limit]
    except (ValueError, RecursionError):
        return type(value).__name__


def _get_int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = obj[key]
    if type(value) is not int:
        raise _bad(f"{key} must be an integer, got {_show(value)}")
    if not lo <= value <= hi:
        raise _bad(f"{key} must be in {lo}..{hi}, got {value}")
    return value


def _get_bool(obj: dict[str, Any], key: str) -> bool:
    value = obj[key]
    if type(value) is not bool:
        raise _bad(f"{key} must be true or false, got {_show(value)}")
    return value


def _get_choice(obj: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = obj[key]
    if not isinstance(value, str) or value not in choices:
        raise _bad(f"{key} must be one of {', '.join(choices)}, got {_show(value)}")
    return value


def _get_kbps(obj: dict[str, Any]) -> float:
    """`bitrate_kbps` as a finite float (4400 for a non-number, or one no double holds)."""
    kbps = obj["bitrate_kbps"]
    if isinstance(kbps, bool) or not isinstance(kbps, (int, float)):
        raise _bad(f"bitrate_kbps must be a number, got {_show(kbps)}")
    try:
        value = float(kbps)
    except OverflowError:  # an int beyond the range of a double
        value = math.inf
    if not math.isfinite(value):
        raise _bad(f"bitrate_kbps is out of range, got {_show(kbps)}")
    return value


def mode_of(card: ModelCard, num_codebooks: int, lowband_layout: int = LOWBAND_LAYOUT_NONE
            ) -> BitrateMode:
    """The mode of an explicit codebook count and low-band layout (values already checked),
    with its nominal bitrate (`ModelCard.mode`)."""
    return card.mode(num_codebooks, lowband_layout)


def lowband_layouts(card: ModelCard) -> list[int]:
    """Low-band layouts `card` can send: 0 (none) and every layout within its `lowband_bins`."""
    return list(card.lowband_layouts)


def _mode(obj: dict[str, Any], card: ModelCard, default: BitrateMode | None) -> BitrateMode:
    """The mode of `obj`: `bitrate_kbps` (the card's mode for that budget), or `num_codebooks`
    with an optional `lowband_layout` (default 0), else `default`."""
    has_n, has_kbps = "num_codebooks" in obj, "bitrate_kbps" in obj
    if has_n and has_kbps:
        raise _bad("give bitrate_kbps or num_codebooks, not both")
    if "lowband_layout" in obj and not has_n:
        raise _bad("lowband_layout is only valid together with num_codebooks (bitrate_kbps "
                   "chooses the layout itself)")
    if has_n:
        n = _get_int(obj, "num_codebooks", 1, card.num_codebooks)
        layout = LOWBAND_LAYOUT_NONE
        if "lowband_layout" in obj:
            value = obj["lowband_layout"]
            layouts = lowband_layouts(card)
            if type(value) is not int or value not in layouts:
                raise _bad(
                    f"lowband_layout must be one of {', '.join(map(str, layouts))}, "
                    f"got {_show(value)}"
                )
            layout = value
        return mode_of(card, n, layout)
    if has_kbps:
        kbps = _get_kbps(obj)
        try:
            return card.mode_for_bitrate(kbps)
        except ValueError as exc:
            raise _bad(f"bitrate_kbps: {exc}") from None
    if default is None:
        raise _bad("give bitrate_kbps or num_codebooks")
    return default


def default_mode(card: ModelCard) -> BitrateMode:
    """The mode of the default bitrate (6 kbps), or all Q codebooks when even 1 codebook is
    above it."""
    try:
        return card.mode_for_bitrate(DEFAULT_BITRATE_KBPS)
    except ValueError:
        return mode_of(card, card.num_codebooks)


def named_modes(card: ModelCard) -> dict[float, BitrateMode]:
    """The mode each advertised bitrate (1, 3, 6 kbps) selects on `card` (bitrates below the
    card's lowest one are left out)."""
    out: dict[float, BitrateMode] = {}
    for kbps in NAMED_BITRATES_KBPS:
        try:
            out[kbps] = card.mode_for_bitrate(kbps)
        except ValueError:
            continue
    return out


def mode_fields(mode: BitrateMode) -> dict[str, Any]:
    """How replies report a mode: `num_codebooks`, `lowband_layout`, `bitrate_kbps` (the
    mode's nominal payload bitrate, kbps: `ModelCard.bitrate_kbps`)."""
    return {
        "num_codebooks": mode.num_codebooks,
        "lowband_layout": mode.lowband_layout,
        "bitrate_kbps": mode.kbps,
    }


# ---- hello --------------------------------------------------------------------------------

_PCM_FIELDS: Final = ("sample_rate", "format")
_BITRATE_FIELDS: Final = ("bitrate_kbps", "num_codebooks", "lowband_layout")
"""The mode's fields: in a hello and in `set_bitrate`."""
_PRODUCER_FIELDS: Final = (*_BITRATE_FIELDS, "rate_cap")
"""Fields of a hello whose session produces frames (the cap is chosen once, in the hello)."""
_ALL_FIELDS: Final = frozenset(
    {
        "type",
        "version",
        "tokens",
        "return_tokens",
        "timestamps",
        "stream_id",
        "send",
        "receive",
        "name",
        *_PCM_FIELDS,
        *_PRODUCER_FIELDS,
    }
)


def _allowed_fields(endpoint: Endpoint, send: Media, receive: Media) -> set[str]:
    fields = {"type", "version"}
    if endpoint is Endpoint.ENCODE:
        fields |= {*_PCM_FIELDS, *_PRODUCER_FIELDS, "tokens", "timestamps", "stream_id"}
    elif endpoint is Endpoint.DECODE:
        fields |= {*_PCM_FIELDS, "tokens"}
    elif endpoint is Endpoint.ROUNDTRIP:
        fields |= {
            *_PCM_FIELDS,
            *_PRODUCER_FIELDS,
            "tokens",
            "return_tokens",
            "timestamps",
            "stream_id",
        }
    else:
        fields |= {"send", "receive", "name"}
        if Media.PCM in (send, receive):
            fields |= set(_PCM_FIELDS)
        if send is Media.PCM:
            fields |= {*_PRODUCER_FIELDS, "timestamps"}
    return fields


def _check_head(obj: dict[str, Any]) -> None:
    kind = obj.get("type")
    if kind != "hello":
        raise _bad(f"the first message must be a hello, got type {_show(kind)}")
    if "version" not in obj:
        raise _bad("hello: required field version is missing")
    version = obj["version"]
    if type(version) is not int:
        raise _bad(f"version must be an integer, got {_show(version)}")
    if version != PROTOCOL_VERSION:
        raise SessionError(
            CloseCode.UNSUPPORTED_VERSION,
            f"protocol version {version} is not supported (this server speaks {PROTOCOL_VERSION})",
        )


def _room_media(obj: dict[str, Any]) -> tuple[Media, Media]:
    choices = tuple(m.value for m in Media)
    for key in ("send", "receive"):
        if key not in obj:
            raise _bad(f"hello: required field {key} is missing (rooms need send and receive)")
    return Media(_get_choice(obj, "send", choices)), Media(_get_choice(obj, "receive", choices))


def _pcm_format(obj: dict[str, Any], card: ModelCard) -> tuple[int, SampleFormat]:
    rate = card.sample_rate
    if "sample_rate" in obj:
        value = obj["sample_rate"]
        if type(value) is not int or value not in SUPPORTED_RATES:
            raise SessionError(
                CloseCode.UNSUPPORTED_FORMAT,
                f"sample_rate {_show(value, 20)} is not supported (use "
                f"{', '.join(map(str, SUPPORTED_RATES))})",
            )
        rate = value
    fmt = SampleFormat.S16LE
    if "format" in obj:
        value = obj["format"]
        formats = tuple(f.value for f in SampleFormat)
        if not isinstance(value, str) or value not in formats:
            raise SessionError(
                CloseCode.UNSUPPORTED_FORMAT,
                f"format {_show(value, 20)} is not supported (use {' or '.join(formats)})",
            )
        fmt = SampleFormat(value)
    return rate, fmt


def _tokens(obj: dict[str, Any], endpoint: Endpoint) -> TokenForm:
    default = TokenForm.JSON if endpoint is Endpoint.ROUNDTRIP else TokenForm.BINARY
    if "tokens" not in obj:
        return default
    form = TokenForm(_get_choice(obj, "tokens", tuple(t.value for t in TokenForm)))
    if endpoint is Endpoint.ROUNDTRIP and form is not TokenForm.JSON:
        raise _bad('roundtrip sends tokens as JSON text messages: tokens must be "json"')
    return form


def parse_hello(obj: dict[str, Any], endpoint: Endpoint, card: ModelCard) -> Hello:
    """Validate the first message of a session on `endpoint` (docs/protocol.md, "Hello")."""
    _check_head(obj)
    unknown = sorted(set(obj) - _ALL_FIELDS)
    if unknown:
        raise _bad(f"hello: unknown field {unknown[0]!r}")
    send = receive = Media.NONE
    if endpoint is Endpoint.ROOM:
        send, receive = _room_media(obj)
    allowed = _allowed_fields(endpoint, send, receive)
    misplaced = sorted(set(obj) - allowed)
    if misplaced:
        where = (
            f"/v1/{endpoint.value}"
            if endpoint is not Endpoint.ROOM
            else (f"a room participant with send {send.value}, receive {receive.value}")
        )
        raise _bad(f"hello: field {misplaced[0]!r} is not valid for {where}")
    rate, fmt = _pcm_format(obj, card)
    produces = endpoint in (Endpoint.ENCODE, Endpoint.ROUNDTRIP) or send is Media.PCM
    mode = _mode(obj, card, default_mode(card)) if produces else mode_of(card, card.num_codebooks)
    name = obj.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS:
        raise _bad(f"name must be a string of at most {MAX_NAME_CHARS} characters")
    return Hello(
        endpoint=endpoint,
        sample_rate=rate,
        fmt=fmt,
        mode=mode,
        tokens=_tokens(obj, endpoint),
        return_tokens=_get_bool(obj, "return_tokens") if "return_tokens" in obj else False,
        timestamps=_get_bool(obj, "timestamps") if "timestamps" in obj else False,
        stream_id=_get_int(obj, "stream_id", 0, 0xFFFFFFFF) if "stream_id" in obj else None,
        send=send,
        receive=receive,
        name=name,
        rate_cap=_get_bool(obj, "rate_cap") if "rate_cap" in obj else False,
    )


# ---- control messages ---------------------------------------------------------------------

_CONTROL_FIELDS: Final[dict[str, frozenset[str]]] = {
    "set_bitrate": frozenset({"type", *_BITRATE_FIELDS}),
    "flush": frozenset({"type"}),
    "end": frozenset({"type"}),
    "ping": frozenset({"type", "id"}),
    "packet": frozenset({"type", "packet"}),
}


def _control_allowed(kind: str, hello: Hello) -> bool:
    endpoint = hello.endpoint
    if kind == "set_bitrate":
        return endpoint in (Endpoint.ENCODE, Endpoint.ROUNDTRIP) or hello.send is Media.PCM
    if kind == "flush":
        return endpoint is not Endpoint.ROOM
    if kind == "packet":
        return endpoint is Endpoint.DECODE and hello.tokens is TokenForm.JSON
    return True


def _ping(obj: dict[str, Any]) -> Ping:
    """A ping whose `id` (if any) the pong can echo: compact JSON of at most
    `MAX_PING_ID_BYTES` bytes (else 4400)."""
    if "id" not in obj:
        return Ping(None, False)
    value = obj["id"]
    try:
        size = len(json.dumps(value, separators=(",", ":"), allow_nan=False))
    except ValueError:  # NaN or Infinity (only in a dict that did not come from parse_text)
        raise _bad("ping: id must be a JSON value (no NaN or Infinity)") from None
    except RecursionError:
        raise _bad(
            f"ping: id is nested too deeply, at most {MAX_PING_ID_BYTES} bytes of JSON allowed"
        ) from None
    if size > MAX_PING_ID_BYTES:
        raise _bad(f"ping: id is {size} bytes of JSON, at most {MAX_PING_ID_BYTES} allowed")
    return Ping(value, True)


def parse_control(obj: dict[str, Any], hello: Hello, card: ModelCard) -> Control:
    """Validate a text message after the hello (docs/protocol.md, "Control messages")."""
    kind = obj.get("type")
    if kind == "hello":
        raise _bad("hello already received")
    if not isinstance(kind, str) or kind not in _CONTROL_FIELDS:
        raise _bad(f"unknown message type {_show(kind)}")
    extra = sorted(set(obj) - _CONTROL_FIELDS[kind])
    if extra:
        raise _bad(f"{kind}: unknown field {extra[0]!r}")
    if not _control_allowed(kind, hello):
        where = (
            "this room participant"
            if hello.endpoint is Endpoint.ROOM
            else (f"/v1/{hello.endpoint.value} with these hello options")
        )
        raise _bad(f"{kind} is not valid on {where}")
    if kind == "set_bitrate":
        return SetBitrate(_mode(obj, card, None))
    if kind == "flush":
        return Flush()
    if kind == "end":
        return End()
    if kind == "ping":
        return _ping(obj)
    if "packet" not in obj:
        raise _bad("packet: required field packet is missing")
    try:
        packet = packet_from_json(
            obj["packet"],
            code_bits=card.code_bits,
            gain_bits=card.gain.bits,
            max_codebooks=card.num_codebooks,
        )
    except ProtocolError as exc:
        raise protocol_error_close(exc) from None
    return PacketMessage(packet)
