"""Settings: defaults, environment, command line, API keys; message parsing units."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.codes import CloseCode, SessionError, close_reason
from server.messages import End, Endpoint, Ping, SetBitrate, parse_control, parse_hello
from server.settings import Settings, SettingsError, build_parser, parse_api_keys, parse_settings
from streaming.model import CodecModel


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
    assert h.num_codebooks == 5 and h.sample_rate == 16000 and h.sends_pcm
    room = parse_hello(
        {"type": "hello", "version": 1, "send": "pcm", "receive": "none", "sample_rate": 48000},
        Endpoint.ROOM,
        card,
    )
    assert room.sends_pcm and not room.receives_pcm and room.num_codebooks == 11
    assert parse_control({"type": "set_bitrate", "num_codebooks": 2}, h, card) == SetBitrate(2)
    assert parse_control({"type": "end"}, h, card) == End()
    assert parse_control({"type": "ping", "id": None}, h, card) == Ping(None, True)
    with pytest.raises(SessionError) as info:
        parse_hello({"type": "hello", "version": 1, "stream_id": -1}, Endpoint.ENCODE, card)
    assert info.value.code == CloseCode.BAD_REQUEST and "stream_id" in info.value.reason
