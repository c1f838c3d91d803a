"""Settings: defaults, environment, command line, API keys; message parsing units."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from server.app import _check_backlog
from server.codes import CloseCode, SessionError, close_reason
from server.messages import (
    End,
    Endpoint,
    Ping,
    SetBitrate,
    default_mode,
    mode_of,
    parse_control,
    parse_hello,
)
from server.settings import (
    MAX_DURATION_S,
    MAX_SWITCH_INTERVAL_MS,
    MIN_BACKLOG_MS,
    Settings,
    SettingsError,
    build_parser,
    parse_api_keys,
    parse_settings,
)
from streaming.model import CodecModel
from streaming.protocol import TokenFrame, TokenPacket, encode_packet
from tests.server.conftest import (
    CARD,
    CODE_BITS,
    GAIN_BITS,
    connect,
    hello,
    load_clip,
    receive_all,
    send_pcm,
    start_server,
)


def test_defaults() -> None:
    s = Settings()
    assert (s.host, s.port, s.model_dir, s.max_sessions) == ("127.0.0.1", 8000, None, 256)
    assert s.idle_timeout_s == 30.0 and s.handshake_timeout_s == 10.0
    assert not s.auth_enabled and s.key_limits() == {} and s.cors_origins == ()


def test_environment_and_command_line() -> None:
    env = {
        "CODECSTREAM_PORT": "9000",
        "CODECSTREAM_MAX_SESSIONS": "12",
        "CODECSTREAM_API_KEYS": "a, b:3",
        "CODECSTREAM_IDLE_TIMEOUT": "2.5",
        "CODECSTREAM_MODEL": "/models/x",
    }
    s = Settings.from_env(env)
    assert (s.port, s.max_sessions, s.idle_timeout_s) == (9000, 12, 2.5)
    assert s.model_dir == Path("/models/x")
    assert s.key_limits() == {"a": 12, "b": 3}  # per-key default capped at max_sessions
    t = parse_settings(["--port", "9100", "--api-key", "c", "--api-key", "d:2,e"], env)
    assert t.port == 9100 and t.key_limits() == {"c": 12, "d": 2, "e": 12}
    assert t.max_sessions == 12  # from the environment


def test_invalid_values_name_the_setting() -> None:
    with pytest.raises(SettingsError, match="CODECSTREAM_PORT"):
        Settings.from_env({"CODECSTREAM_PORT": "http"})
    with pytest.raises(SettingsError, match="CODECSTREAM_MAX_SESSIONS"):
        Settings.from_env({"CODECSTREAM_MAX_SESSIONS": "0"})
    with pytest.raises(SettingsError, match="limit"):
        Settings(api_keys=("a:x",)).key_limits()
    with pytest.raises(SystemExit):
        parse_settings(["--idle-timeout", "-1"], {})


def test_api_keys_parsing(tmp_path: Path) -> None:
    assert parse_api_keys("k1,k2:4\n# c\n k3 # trailing\n") == {"k1": None, "k2": 4, "k3": None}
    with pytest.raises(ValueError, match="twice"):
        parse_api_keys("a,a")
    keys = tmp_path / "keys.txt"
    keys.write_text("x:2\ny\n", encoding="utf-8")
    s = Settings(api_keys=("z",), api_keys_file=keys, max_sessions_per_key=5)
    assert s.auth_enabled and s.key_limits() == {"z": 5, "x": 2, "y": 5}
    with pytest.raises(SettingsError, match="cannot read"):
        Settings(api_keys_file=tmp_path / "missing").key_limits()


def test_a_hash_is_part_of_a_key_given_by_flag_or_environment() -> None:
    """'#' starts a comment only in the keys file: a flag or environment key keeps it (its
    prefix before '#' is no key), and the keys after it are kept too."""
    s = parse_settings(["--api-key", "Xk#9fQ2", "--api-key", "k2:4"], {})
    assert s.key_limits() == {"Xk#9fQ2": 16, "k2": 4}
    env = {"CODECSTREAM_API_KEYS": "team1,s3cr#t,team3:2"}
    assert Settings.from_env(env).key_limits() == {"team1": 16, "s3cr#t": 16, "team3": 2}
    assert parse_api_keys("a#b,#c", comments=False) == {"a#b": None, "#c": None}


def test_keys_file_comments_never_cut_a_key(tmp_path: Path) -> None:
    """In the keys file '#' starts a comment at the start of a line or entry or after
    whitespace; a '#' inside a key is an error (not a shorter key)."""
    text = "# team keys\nk1,k2:4 # trailing\nk3,# k4 commented out\n"
    assert parse_api_keys(text) == {"k1": None, "k2": 4, "k3": None}
    keys = tmp_path / "keys.txt"
    for line in ("ab#cd", "ok,ab#cd", "k:4#x"):
        keys.write_text(f"{line}\n", encoding="utf-8")
        with pytest.raises(SettingsError, match="cannot contain '#'"):
            Settings(api_keys_file=keys).key_limits()


def test_keys_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_bytes("\ufeffkey1\nkey2:4\n".encode())
    assert Settings(api_keys_file=keys).key_limits() == {"key1": 16, "key2": 4}


FLOAT_SETTINGS = [f for f in dataclasses.fields(Settings) if f.type == "float"]
"""Every float setting (`from __future__ import annotations`: the types are strings)."""


def _flag_of(name: str) -> str:
    return "--" + name.removesuffix("_s").replace("_", "-")


@pytest.mark.parametrize("raw", ["inf", "-inf", "nan", "1e300"])
@pytest.mark.parametrize("name", [f.name for f in FLOAT_SETTINGS])
def test_float_settings_must_be_finite_and_bounded(name: str, raw: str) -> None:
    """inf crashed the start (int(inf) in make_config), /v1/decode (500) and silently made
    the switch interval 0: refused on the command line, in the environment and in
    `Settings(...)`, each error naming the setting."""
    env = next(f.metadata["env"] for f in FLOAT_SETTINGS if f.name == name)
    with pytest.raises(SettingsError, match=env):
        Settings.from_env({env: raw})
    with pytest.raises(SystemExit):
        parse_settings([f"{_flag_of(name)}={raw}"], {})
    with pytest.raises(SettingsError, match=name):
        Settings(**{name: float(raw)})


def test_upper_bounds_of_durations_and_switch_interval() -> None:
    day = parse_settings(["--shutdown-timeout", f"{MAX_DURATION_S:g}"], {})
    assert day.shutdown_timeout_s == MAX_DURATION_S
    with pytest.raises(SettingsError, match="shutdown_timeout_s"):
        Settings(shutdown_timeout_s=MAX_DURATION_S + 1)
    env = {"CODECSTREAM_MAX_FILE_SECONDS": f"{MAX_DURATION_S + 1:g}"}
    with pytest.raises(SettingsError, match="CODECSTREAM_MAX_FILE_SECONDS"):
        Settings.from_env(env)
    assert Settings(switch_interval_ms=MAX_SWITCH_INTERVAL_MS).switch_interval_ms == 1000.0
    with pytest.raises(SettingsError, match="switch_interval_ms"):
        Settings(switch_interval_ms=MAX_SWITCH_INTERVAL_MS + 1)
    with pytest.raises(SettingsError, match="CODECSTREAM_SWITCH_INTERVAL_MS"):
        Settings.from_env({"CODECSTREAM_SWITCH_INTERVAL_MS": "0"})
    assert Settings(batch_window_ms=0.0).batch_window_ms == 0.0


def test_max_backlog_below_two_frames_is_refused() -> None:
    """Below a frame an encode session stopped reading for good and a room sender had every
    packet dropped: at least `MIN_BACKLOG_MS` (2 frames of 20 ms), and at start 2 frames of
    the loaded model."""
    assert 2 * CARD.frame_ms == MIN_BACKLOG_MS
    with pytest.raises(SettingsError, match="CODECSTREAM_MAX_BACKLOG_MS"):
        Settings.from_env({"CODECSTREAM_MAX_BACKLOG_MS": "10"})
    with pytest.raises(SystemExit):
        parse_settings(["--max-backlog-ms", "39.9"], {})
    with pytest.raises(SettingsError, match="max_backlog_ms"):
        Settings(max_backlog_ms=15.0)
    assert parse_settings(["--max-backlog-ms", "40"], {}).max_backlog_ms == MIN_BACKLOG_MS
    _check_backlog(Settings(max_backlog_ms=MIN_BACKLOG_MS), CARD)
    long_frames = dataclasses.replace(CARD, frame_size=2 * CARD.frame_size)  # 40 ms frames
    with pytest.raises(SettingsError, match="max_backlog_ms must be >= 80 ms"):
        _check_backlog(Settings(max_backlog_ms=60.0), long_frames)


async def test_sessions_work_at_the_least_max_backlog() -> None:
    """At `MIN_BACKLOG_MS`: an 8 kHz encode session (the resampler holds 4.25 ms more than a
    frame's remainder) ending on a partial frame reads its `end` and finishes; a room token
    sender's 2 packets sent at once are both taken (the budget holds 2 frames)."""
    running = start_server(max_backlog_ms=MIN_BACKLOG_MS, engine_processes=0)
    try:
        async with connect(running.ws("/v1/encode")) as ws:
            await hello(ws, sample_rate=8000)
            await send_pcm(ws, load_clip()[: 8000 + 120], chunk=8000)  # 1 s, then 15 ms
            await ws.send(json.dumps({"type": "end"}))
            got = await receive_all(ws)
        assert got.code == 1000 and len(got.of_type("end")) == 1
        assert len(got.binary) >= 50
        async with connect(running.ws("/v1/rooms/floor")) as ws:
            await hello(ws, send="tokens", receive="none")
            for seq in range(2):
                packet = TokenPacket(0, seq, seq * 20_000, TokenFrame(1, 3, (7,)))
                await ws.send(encode_packet(packet, code_bits=CODE_BITS, gain_bits=GAIN_BITS))
            await ws.send(json.dumps({"type": "end"}))
            end = (await receive_all(ws)).of_type("end")[0]
        assert (end["frames"], end["dropped_frames"]) == (2, 0)
    finally:
        running.stop()


def test_every_setting_has_a_flag() -> None:
    help_text = build_parser().format_help()
    for flag in (
        "--host",
        "--port",
        "--model",
        "--api-key",
        "--api-keys-file",
        "--max-sessions",
        "--max-sessions-per-key",
        "--max-message-bytes",
        "--idle-timeout",
        "--handshake-timeout",
        "--keepalive-interval",
        "--send-queue",
        "--room-max-participants",
        "--engine-threads",
        "--cors-origins",
    ):
        assert flag in help_text, flag


def test_close_reason_fits_a_close_frame() -> None:
    assert close_reason("short") == "short"
    long = close_reason("é" * 200)
    assert len(long.encode()) <= 123 and long.endswith("...")


def test_hello_and_control_parsing() -> None:
    card = CodecModel.load().card
    h = parse_hello({"type": "hello", "version": 1, "bitrate_kbps": 3.2}, Endpoint.ENCODE, card)
    assert h.mode == card.mode_for_bitrate(3.2) and h.sample_rate == 16000 and h.sends_pcm
    assert (h.num_codebooks, h.lowband_layout) == (h.mode.num_codebooks, h.mode.lowband_layout)
    room = parse_hello(
        {"type": "hello", "version": 1, "send": "pcm", "receive": "none", "sample_rate": 48000},
        Endpoint.ROOM,
        card,
    )
    assert room.sends_pcm and not room.receives_pcm and room.mode == card.mode_for_bitrate(6)
    assert default_mode(card) == card.mode_for_bitrate(6)
    plain = parse_control({"type": "set_bitrate", "num_codebooks": 2}, h, card)
    assert plain == SetBitrate(mode_of(card, 2))
    assert plain.mode.lowband_layout == 0 and plain.mode.kbps == card.bitrate_kbps(2)
    assert parse_control({"type": "end"}, h, card) == End()
    assert parse_control({"type": "ping", "id": None}, h, card) == Ping(None, True)
    with pytest.raises(SessionError) as info:
        parse_hello({"type": "hello", "version": 1, "stream_id": -1}, Endpoint.ENCODE, card)
    assert info.value.code == CloseCode.BAD_REQUEST and "stream_id" in info.value.reason


def test_bitrate_modes_in_hello_and_set_bitrate() -> None:
    """bitrate_kbps selects the card's mode (low band included); num_codebooks an exact count
    without low band, or with lowband_layout an exact mode; decode sessions report Q."""
    card = CodecModel.load().card
    base = {"type": "hello", "version": 1}
    for kbps in (1, 3, 6, 6.5):
        h = parse_hello({**base, "bitrate_kbps": kbps}, Endpoint.ROUNDTRIP, card)
        assert h.mode == card.mode_for_bitrate(kbps)
    expert = parse_hello({**base, "num_codebooks": 3, "lowband_layout": 2}, Endpoint.ENCODE, card)
    assert expert.mode == mode_of(card, 3, 2)
    assert expert.mode.kbps == card.bitrate_kbps(3, 2)
    none = parse_hello({**base, "num_codebooks": 4, "lowband_layout": 0}, Endpoint.ENCODE, card)
    assert none.mode == mode_of(card, 4)
    decode = parse_hello(base, Endpoint.DECODE, card)
    assert decode.mode == mode_of(card, card.num_codebooks)
    control = parse_control({"type": "set_bitrate", "bitrate_kbps": 6}, expert, card)
    assert control == SetBitrate(card.mode_for_bitrate(6))
    control = parse_control(
        {"type": "set_bitrate", "num_codebooks": 1, "lowband_layout": 1}, expert, card
    )
    assert control == SetBitrate(mode_of(card, 1, 1))
    bad: list[tuple[dict[str, object], str]] = [
        ({"lowband_layout": 1}, "only valid together with num_codebooks"),
        ({"bitrate_kbps": 6, "lowband_layout": 1}, "only valid together with num_codebooks"),
        ({"num_codebooks": 2, "lowband_layout": 3}, "lowband_layout must be one of 0, 1, 2"),
        ({"num_codebooks": 2, "lowband_layout": True}, "lowband_layout must be one of"),
        ({"num_codebooks": 2, "lowband_layout": "1"}, "lowband_layout must be one of"),
        ({"num_codebooks": 0, "lowband_layout": 1}, "num_codebooks must be in 1..12"),
        ({"bitrate_kbps": 0.5}, "below the lowest bitrate"),
    ]
    for fields, reason in bad:
        with pytest.raises(SessionError) as info:
            parse_hello({**base, **fields}, Endpoint.ENCODE, card)
        assert info.value.code == CloseCode.BAD_REQUEST and reason in info.value.reason, fields
        with pytest.raises(SessionError) as info:
            parse_control({"type": "set_bitrate", **fields}, expert, card)
        assert info.value.code == CloseCode.BAD_REQUEST and reason in info.value.reason, fields
    with pytest.raises(SessionError) as info:
        parse_hello({**base, "lowband_layout": 1}, Endpoint.DECODE, card)
    assert "not valid for /v1/decode" in info.value.reason
