"""Client-controlled text never escapes the documented close codes (server/messages.py,
docs/protocol.md "Close codes"): unit level, without a server.

End-to-end close codes of the same inputs are in tests/server/test_ws_errors.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.codes import CloseCode, SessionError
from server.messages import (
    MAX_PING_ID_BYTES,
    Endpoint,
    Hello,
    PacketMessage,
    Ping,
    parse_control,
    parse_hello,
    parse_text,
    to_text,
)
from streaming.model import ModelCard, default_model_dir

CARD = ModelCard.from_file(default_model_dir() / "card.json")


def nested(depth: int) -> list[Any]:
    """A list nested `depth` levels deep (built directly: no parser involved)."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def close_code(func: Any, *args: Any) -> tuple[int, str]:
    """The (close code, reason) of the SessionError `func(*args)` raises."""
    with pytest.raises(SessionError) as info:
        func(*args)
    return int(info.value.code), info.value.reason


def encode_hello() -> Hello:
    return parse_hello({"type": "hello", "version": 1}, Endpoint.ENCODE, CARD)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a":' * 100_000, "nested too deeply"),
        ('{"type":"ping","id":NaN}', "NaN is not a JSON value"),
        ('{"type":"ping","id":Infinity}', "Infinity is not a JSON value"),
        ('{"type":"ping","id":[-Infinity]}', "-Infinity is not a JSON value"),
        ('{"type":"hello","version":1,"bitrate_kbps":1e400}', "number 1e400 is out of range"),
    ],
)
def test_text_that_is_not_strict_json_is_1007(text: str, reason: str) -> None:
    code, got = close_code(parse_text, text)
    assert code == CloseCode.INVALID_PAYLOAD
    assert got.startswith("text message is not JSON: ") and reason in got


def test_large_but_finite_numbers_still_parse() -> None:
    assert parse_text('{"a": 1e308, "b": -1e308, "c": 1e-400}') == {
        "a": 1e308,
        "b": -1e308,
        "c": 0.0,
    }


def test_bitrate_beyond_a_double_is_4400() -> None:
    hello = parse_text('{"type":"hello","version":1,"bitrate_kbps":1' + "0" * 400 + "}")
    code, reason = close_code(parse_hello, hello, Endpoint.ENCODE, CARD)
    assert code == CloseCode.BAD_REQUEST
    assert reason.startswith("bitrate_kbps is out of range, got 1000")
    control = {"type": "set_bitrate", "bitrate_kbps": -(10**400)}
    code, _ = close_code(parse_control, control, encode_hello(), CARD)
    assert code == CloseCode.BAD_REQUEST


def test_field_nested_too_deeply_to_show_is_still_4400() -> None:
    hello = {"type": "hello", "version": 1, "num_codebooks": nested(100_000)}
    code, reason = close_code(parse_hello, hello, Endpoint.ENCODE, CARD)
    assert (code, reason) == (CloseCode.BAD_REQUEST, "num_codebooks must be an integer, got list")


def test_ping_id_is_echoed_up_to_the_cap() -> None:
    assert MAX_PING_ID_BYTES == 256
    biggest = "x" * (MAX_PING_ID_BYTES - 2)  # plus its two quotes
    ping = parse_control({"type": "ping", "id": biggest}, encode_hello(), CARD)
    assert ping == Ping(biggest, True)
    pong = to_text({"type": "pong", "id": ping.id, "server_time_us": 1})
    assert json.loads(pong)["id"] == biggest
    assert parse_control({"type": "ping"}, encode_hello(), CARD) == Ping(None, False)


@pytest.mark.parametrize(
    ("ping_id", "reason"),
    [
        ("x" * (MAX_PING_ID_BYTES - 1), "ping: id is 257 bytes of JSON, at most 256 allowed"),
        ("é" * 50, "ping: id is 302 bytes of JSON, at most 256 allowed"),  # as \\u00e9
        (list(range(1000)), "ping: id is 3891 bytes of JSON, at most 256 allowed"),
        (nested(100_000), "ping: id is nested too deeply, at most 256 bytes of JSON allowed"),
        (float("nan"), "ping: id must be a JSON value (no NaN or Infinity)"),
    ],
)
def test_ping_id_over_the_cap_or_unechoable_is_4400(ping_id: object, reason: str) -> None:
    code, got = close_code(parse_control, {"type": "ping", "id": ping_id}, encode_hello(), CARD)
    assert (code, got) == (CloseCode.BAD_REQUEST, reason)


def test_json_packet_text_that_does_not_parse_is_4422() -> None:
    hello = parse_hello({"type": "hello", "version": 1, "tokens": "json"}, Endpoint.DECODE, CARD)
    for text in ("[" * 100_000, '{"seq": NaN}'):
        code, reason = close_code(parse_control, {"type": "packet", "packet": text}, hello, CARD)
        assert code == CloseCode.MALFORMED_PACKET and reason.startswith("corrupt: ")
    packet = {
        "version": 2.0,
        "stream_id": 1,
        "seq": 0,
        "timestamp_us": 0,
        "num_codebooks": 1,
        "gain_index": 0,
        "codes": [0],
    }
    code, reason = close_code(parse_control, {"type": "packet", "packet": packet}, hello, CARD)
    assert (code, reason) == (
        CloseCode.MALFORMED_PACKET,
        "bad_field: version must be an int, got float",
    )
    packet["version"] = 2
    assert isinstance(
        parse_control({"type": "packet", "packet": packet}, hello, CARD), PacketMessage
    )
