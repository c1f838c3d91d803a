"""Server settings: typed, from environment variables, overridable on the command line.

Every setting is a field of the frozen dataclass `Settings` with its environment variable
(`CODECSTREAM_*`) and command-line flag (`--*`).  Precedence: command line > environment >
default.  `Settings.from_env()` reads the environment; `parse_settings(argv)` adds the command
line (see `build_parser`); `Settings(...)` builds one directly (tests).

API keys: `CODECSTREAM_API_KEYS="key1,key2:4"` (comma-separated; `:N` gives that key its own
limit of N concurrent sessions, otherwise `max_sessions_per_key` applies) and/or
`CODECSTREAM_API_KEYS_FILE` (one `key` or `key:N` per line, `#` comments).  A `#` is part of
a key given by `--api-key` or `CODECSTREAM_API_KEYS`; in the keys file it starts a comment
(at the start of an entry or after whitespace), and a `#` inside a key there is an error, so
a key is never silently cut short.  No key configured means authentication is disabled (the
server logs a warning at start).

Durations are seconds (suffix `_s`) or milliseconds (suffix `_ms`); sizes are bytes.  Every
float setting must be a finite number in its range (`_Bounded`), at most `MAX_DURATION_S`
for a duration, checked on the command line, in the environment and in `Settings(...)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "ENV_PREFIX",
    "Settings",
    "SettingsError",
    "build_parser",
    "parse_api_keys",
    "parse_settings",
]

ENV_PREFIX: Final = "CODECSTREAM_"


class SettingsError(ValueError):
    """A setting has an invalid value (names the variable or flag and the value)."""


MAX_AUTO_PROCESSES: Final = 8
"""Most engine processes `engine_processes=auto` starts (each holds its own model copy)."""

EVENT_LOOPS: Final = ("auto", "uvloop", "asyncio")
"""Values of `Settings.event_loop` (uvicorn's `loop` option)."""

MAX_AUTO_THREADS: Final = 2
"""Most onnxruntime intra-op threads `engine_threads=auto` gives an engine process (a frame
step is hundreds of small operators: more threads mostly wait on each other)."""


MAX_DURATION_S: Final = 86_400.0
"""Longest value of a duration setting, s (one day; 86 400 000 for the `_ms` settings).
Durations become timers and integers (uvicorn's graceful-shutdown timeout is
`int(shutdown_timeout_s) + 1`, /v1/decode's frame limit `floor(max_file_seconds * frames/s)`):
`inf` or 1e300 crashed there; no timeout of the server needs more than a day."""

MAX_SWITCH_INTERVAL_MS: Final = 1000.0
"""Longest `switch_interval_ms` (`sys.setswitchinterval` turns `inf` into 0 silently): a
thread may hold the GIL that long while another waits, 50 frame periods of 20 ms; Python's
default is 5 ms."""

MIN_BACKLOG_FRAMES: Final = 2
"""Least `max_backlog_ms` in frames of the model (checked against the loaded model's frame
at start, `server.app`; `MIN_BACKLOG_MS` at parse time, before the model is known)."""

MIN_BACKLOG_MS: Final = MIN_BACKLOG_FRAMES * 20.0
"""Least `max_backlog_ms`: `MIN_BACKLOG_FRAMES` (2) frames of the bundled model (20 ms each).

A stream session stops reading while more than `max_backlog_ms` of its input is unanswered,
and input short of a frame (plus the resampler's delay, up to 4.25 ms at 8 kHz) is answered
only by more input or `end`: below a frame and that delay the session stopped reading for
good (its `end` was never read).  A room sender's real-time budget holds `max_backlog_ms`
of audio and a token packet costs a frame: below a frame every packet was dropped.  The
second frame is slack for network jitter."""


def _meta(env: str, help_text: str, parse: Callable[[str], Any] | None = None) -> dict[str, Any]:
    return {"env": ENV_PREFIX + env, "help": help_text, "parse": parse}


@dataclass(frozen=True)
class _Bounded:
    """Parser and check of a float setting: a finite number from `low` (excluded when
    `low_open`) to `high`, in `unit` ("s", "ms", "%")."""

    low: float
    high: float
    unit: str
    low_open: bool = False

    def check(self, value: float) -> float:
        """`value` when finite and in range, else ValueError naming the range."""
        above = value > self.low if self.low_open else value >= self.low
        if not (math.isfinite(value) and above and value <= self.high):
            raise ValueError(f"must be a finite number {self.range()}, got {value:g}")
        return value

    def range(self) -> str:
        """The range in words: '> 0 and <= 86400 s'."""
        low, high = f"{self.low:.15g}", f"{self.high:.15g}"
        return f"{'>' if self.low_open else '>='} {low} and <= {high} {self.unit}"

    def __call__(self, raw: str) -> float:
        return self.check(float(raw))


_SECONDS: Final = _Bounded(0.0, MAX_DURATION_S, "s", low_open=True)
"""A duration setting in seconds (`_s`, `max_file_seconds`)."""


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(f"must be >= 1, got {raw}")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(f"must be >= 0, got {raw}")
    return value


def _auto_or(parse: Callable[[str], int]) -> Callable[[str], int | None]:
    """A parser of 'auto' (None: the setting's count is worked out at start) or `parse`."""

    def parse_auto(raw: str) -> int | None:
        return None if raw.strip().lower() == "auto" else parse(raw)

    return parse_auto


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_engine_processes() -> int:
    """`engine_processes` 'auto': the CPU cores this process may run on but one (left to the
    event loop), at least 1 and at most `MAX_AUTO_PROCESSES`."""
    return max(1, min(_available_cores() - 1, MAX_AUTO_PROCESSES))


def auto_engine_threads(processes: int) -> int:
    """`engine_threads` 'auto' for `processes` engine processes: the cores per process, at
    least 1 and at most `MAX_AUTO_THREADS`; 1 when the engine runs in the server process
    (`processes` = 0: its threads share the event loop's GIL).

    On 2 cores that is 1 engine process with 2 intra-op threads: the process's core plus
    what the event loop leaves of the other.  Measured there, alternating 1 and 2 threads,
    5 rounds: 2 threads sustained 50 round-trip sessions in every round, 1 thread 40 in two
    rounds and 50 in none (docs/benchmarks.md).
    """
    if processes < 1:
        return 1
    return max(1, min(_available_cores() // processes, MAX_AUTO_THREADS))


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be in 0..65535, got {raw}")
    return value


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _optional_path(raw: str) -> Path | None:
    return Path(raw) if raw else None


_COMMENT: Final = re.compile(r"(?<![^\s,])#")
"""A `#` that starts a comment: at the start of a line or of an entry, or after whitespace."""


def _strip_comment(line: str) -> str:
    """`line` of a keys file without its `#` comment; ValueError for a `#` inside a key
    (cutting the key there would make its prefix a valid key)."""
    match = _COMMENT.search(line)
    code = line if match is None else line[: match.start()]
    if "#" in code:
        raise ValueError(
            "'#' inside an API key: keys in the keys file cannot contain '#' (it starts a "
            "comment there; give such a key with --api-key or CODECSTREAM_API_KEYS)"
        )
    return code


def parse_api_keys(text: str, *, comments: bool = True) -> dict[str, int | None]:
    """Parse `key` / `key:limit` entries separated by commas or newlines.

    `comments` (the keys file): a `#` at the start of a line or entry or after whitespace
    starts a comment, a `#` inside a key is an error.  Without `comments` (`--api-key`,
    `CODECSTREAM_API_KEYS`) a `#` is part of the key.  Returns {key: per-key session limit
    or None (use the default)}.  ValueError on a key with whitespace, a non-integer or < 1
    limit, or a key listed twice.
    """
    keys: dict[str, int | None] = {}
    for line in text.splitlines():
        for entry in (_strip_comment(line) if comments else line).split(","):
            entry = entry.strip()
            if not entry:
                continue
            key, sep, limit_text = entry.rpartition(":")
            limit: int | None = None
            if not sep:
                key = entry
            else:
                try:
                    limit = int(limit_text)
                except ValueError:
                    raise ValueError(f"API key limit {limit_text!r} is not an integer") from None
                if limit < 1:
                    raise ValueError(f"API key limit must be >= 1, got {limit}")
            if not key or any(c.isspace() for c in key):
                raise ValueError("an API key is empty or contains whitespace")
            if key in keys:
                raise ValueError("an API key is listed twice")
            keys[key] = limit
    return keys


@dataclass(frozen=True)
class Settings:
    """Everything configurable about the server (defaults = `codec-server` with no options)."""

    host: str = field(default="127.0.0.1", metadata=_meta("HOST", "address to bind"))
    port: int = field(default=8000, metadata=_meta("PORT", "TCP port (0 = any free)", _port))
    model_dir: Path | None = field(
        default=None,
        metadata=_meta("MODEL", "model directory (default: the bundled model)", _optional_path),
    )
    engine_threads: int | None = field(
        default=None,
        metadata=_meta(
            "ENGINE_THREADS",
            "onnxruntime intra-op threads of each engine process: 'auto' = the cores per "
            f"engine process, 1 to {MAX_AUTO_THREADS} (1 with engine processes 0); or a count",
            _auto_or(_positive_int),
        ),
    )
    engine_workers: int = field(
        default=1,
        metadata=_meta(
            "ENGINE_WORKERS",
            "engine threads, each stepping its share of the sessions (onnxruntime runs them "
            "in parallel)",
            _positive_int,
        ),
    )
    engine_processes: int | None = field(
        default=None,
        metadata=_meta(
            "ENGINE_PROCESSES",
            "engine processes stepping the encode/decode/roundtrip sessions on other cores: "
            "'auto' = one per available CPU core but one (left to the event loop), 1 to "
            f"{MAX_AUTO_PROCESSES}; 0 = in the engine threads of the server process (rooms and "
            "HTTP file jobs always are)",
            _auto_or(_non_negative_int),
        ),
    )
    switch_interval_ms: float = field(
        default=1.0,
        metadata=_meta(
            "SWITCH_INTERVAL_MS",
            "Python thread switch interval, ms (sys.setswitchinterval): how long an engine "
            "thread back from onnxruntime may wait for the GIL while the event loop runs",
            _Bounded(0.0, MAX_SWITCH_INTERVAL_MS, "ms", low_open=True),
        ),
    )
    api_keys: tuple[str, ...] = field(
        default=(),
        metadata=_meta("API_KEYS", "API keys, 'key' or 'key:max_sessions', comma-separated", _csv),
    )
    api_keys_file: Path | None = field(
        default=None,
        metadata=_meta(
            "API_KEYS_FILE", "file of API keys, one 'key[:max_sessions]' per line", _optional_path
        ),
    )
    max_sessions: int = field(
        default=256,
        metadata=_meta(
            "MAX_SESSIONS", "concurrent sessions (WebSocket + HTTP jobs)", _positive_int
        ),
    )
    max_sessions_per_key: int = field(
        default=16,
        metadata=_meta(
            "MAX_SESSIONS_PER_KEY", "concurrent sessions per API key (default limit)", _positive_int
        ),
    )
    max_message_bytes: int = field(
        default=1 << 20,
        metadata=_meta(
            "MAX_MESSAGE_BYTES", "largest WebSocket message accepted, bytes", _positive_int
        ),
    )
    max_upload_bytes: int = field(
        default=16 << 20,
        metadata=_meta("MAX_UPLOAD_BYTES", "largest HTTP request body, bytes", _positive_int),
    )
    upload_timeout_s: float = field(
        default=60.0,
        metadata=_meta(
            "UPLOAD_TIMEOUT",
            "seconds to receive a whole HTTP request body (408 after; the file job's session "
            "slot is held meanwhile)",
            _SECONDS,
        ),
    )
    max_file_seconds: float = field(
        default=600.0,
        metadata=_meta(
            "MAX_FILE_SECONDS",
            "longest audio of an HTTP file job, s: the WAV sent to /v1/encode, the audio a "
            "bitstream sent to /v1/decode would decode to (413 above)",
            _SECONDS,
        ),
    )
    handshake_timeout_s: float = field(
        default=10.0,
        metadata=_meta("HANDSHAKE_TIMEOUT", "seconds from accept to hello", _SECONDS),
    )
    idle_timeout_s: float = field(
        default=30.0,
        metadata=_meta(
            "IDLE_TIMEOUT", "seconds without a client message (not rooms)", _SECONDS
        ),
    )
    send_timeout_s: float = field(
        default=10.0,
        metadata=_meta(
            "SEND_TIMEOUT", "seconds one send may block (client not reading)", _SECONDS
        ),
    )
    keepalive_interval_s: float = field(
        default=20.0,
        metadata=_meta("KEEPALIVE_INTERVAL", "seconds between WebSocket pings", _SECONDS),
    )
    keepalive_timeout_s: float = field(
        default=20.0,
        metadata=_meta("KEEPALIVE_TIMEOUT", "seconds to wait for a pong", _SECONDS),
    )
    batch_window_ms: float = field(
        default=6.0,
        metadata=_meta(
            "BATCH_WINDOW_MS",
            "engine: longest wait, ms, for other streams' frames to join a step (shortened "
            "so a step ends within half a frame period of its oldest input; 0 = no wait)",
            _Bounded(0.0, MAX_DURATION_S * 1000.0, "ms"),
        ),
    )
    max_slow_percent: float = field(
        default=2.0,
        metadata=_meta(
            "MAX_SLOW_PERCENT",
            "new encode/decode/roundtrip sessions are refused (4429 'server at capacity') "
            "while more than this percentage of the engine's recent frames (smoothed over "
            "~1.5 s) took it over 3/4 of the frame period, so the sessions running keep real "
            "time; 100 = never refuse",
            _Bounded(0.0, 100.0, "%"),
        ),
    )
    max_backlog_ms: float = field(
        default=1000.0,
        metadata=_meta(
            "MAX_BACKLOG_MS",
            f"input awaiting processing per session, ms of audio (at least {MIN_BACKLOG_MS:g}: "
            f"{MIN_BACKLOG_FRAMES} frames)",
            _Bounded(MIN_BACKLOG_MS, MAX_DURATION_S * 1000.0, "ms"),
        ),
    )
    send_queue: int = field(
        default=50,
        metadata=_meta(
            "SEND_QUEUE", "messages queued per room receiver (oldest dropped)", _positive_int
        ),
    )
    room_max_participants: int = field(
        default=16,
        metadata=_meta("ROOM_MAX_PARTICIPANTS", "participants per room", _positive_int),
    )
    shutdown_timeout_s: float = field(
        default=5.0,
        metadata=_meta(
            "SHUTDOWN_TIMEOUT", "seconds to close sessions on shutdown", _SECONDS
        ),
    )
    cors_origins: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "CORS_ORIGINS", "origins allowed by CORS, comma-separated (default: CORS off)", _csv
        ),
    )
    log_level: str = field(
        default="info", metadata=_meta("LOG_LEVEL", "debug, info, warning or error")
    )
    event_loop: str = field(
        default="auto",
        metadata=_meta(
            "EVENT_LOOP",
            "asyncio event loop: 'uvloop' (libuv, less CPU per message), 'asyncio' (the "
            "standard library's), or 'auto' = uvloop where it is installed",
        ),
    )

    def __post_init__(self) -> None:
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise SettingsError(
                f"log_level must be debug/info/warning/error, got {self.log_level!r}"
            )
        self._check_floats()
        if self.event_loop not in EVENT_LOOPS:
            raise SettingsError(
                f"event_loop must be {'/'.join(EVENT_LOOPS)}, got {self.event_loop!r}"
            )
        if self.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise SettingsError("event_loop 'uvloop': uvloop is not installed (pip install uvloop)")
        if self.max_sessions_per_key > self.max_sessions:
            object.__setattr__(self, "max_sessions_per_key", self.max_sessions)

    def _check_floats(self) -> None:
        """SettingsError naming the first float setting outside its range (`_Bounded`)."""
        for f in dataclasses.fields(self):
            bounds = f.metadata["parse"]
            if isinstance(bounds, _Bounded):
                try:
                    bounds.check(getattr(self, f.name))
                except ValueError as exc:
                    raise SettingsError(f"{f.name} {exc}") from None

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `environ` (default `os.environ`), then `overrides` (field=value)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is not None:
                values[f.name] = _parse_field(f, raw, f.metadata["env"])
        values.update(overrides)
        return cls(**values)

    # ---- API keys -------------------------------------------------------------------------

    def key_limits(self) -> dict[str, int]:
        """{API key: its concurrent session limit}; empty = authentication disabled.

        Raises SettingsError when a key entry or the keys file is invalid.
        """
        raw: dict[str, int | None] = {}
        try:
            raw.update(parse_api_keys(",".join(self.api_keys), comments=False))
            if self.api_keys_file is not None:
                # utf-8-sig: a byte-order mark (Windows editors) is not part of the first key
                text = self.api_keys_file.read_text(encoding="utf-8-sig")
                for key, limit in parse_api_keys(text).items():
                    if key in raw:
                        raise ValueError("an API key is listed twice")
                    raw[key] = limit
        except OSError as exc:
            raise SettingsError(f"cannot read the API keys file: {exc.strerror}") from None
        except ValueError as exc:
            raise SettingsError(f"invalid API keys: {exc}") from None
        return {k: (self.max_sessions_per_key if v is None else v) for k, v in raw.items()}

    @property
    def engine_process_count(self) -> int:
        """Engine processes to start: `engine_processes`, or the 'auto' count."""
        if self.engine_processes is None:
            return auto_engine_processes()
        return self.engine_processes

    @property
    def engine_thread_count(self) -> int:
        """onnxruntime intra-op threads per engine process: `engine_threads`, or the 'auto'
        count for `engine_process_count` processes."""
        if self.engine_threads is None:
            return auto_engine_threads(self.engine_process_count)
        return self.engine_threads

    @property
    def auth_enabled(self) -> bool:
        """True when at least one API key is configured."""
        return bool(self.api_keys) or self.api_keys_file is not None


def _parse_field(f: dataclasses.Field[Any], raw: str, where: str) -> Any:
    parse: Callable[[str], Any] | None = f.metadata["parse"]
    if parse is None:
        return raw
    try:
        return parse(raw)
    except ValueError as exc:
        raise SettingsError(f"{where}: invalid value {raw!r} ({exc})") from None


def _flag(name: str) -> str:
    return "--" + name.removesuffix("_s").removesuffix("_dir").replace("_", "-")


def build_parser(prog: str = "codec-server") -> argparse.ArgumentParser:
    """Command line: one `--flag` per setting (see `Settings`), plus `--api-key` (repeatable)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="codecstream server: speech to codec tokens and back over WebSocket, "
        "voice-call rooms, metrics. Every option also reads an environment variable.",
    )
    for f in dataclasses.fields(Settings):
        if f.name == "api_keys":
            parser.add_argument(
                "--api-key",
                dest="api_keys",
                action="append",
                metavar="KEY[:N]",
                help=f"API key, repeatable, or comma-separated (env {f.metadata['env']}); "
                "':N' = that key's session limit",
            )
            continue
        default = f.default
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} (env {f.metadata['env']}, default "
            f"{'auto' if f.name in _AUTO_SETTINGS else _show(default)})",
        )
    return parser


_AUTO_SETTINGS: Final = ("engine_processes", "engine_threads")
"""Settings whose default (None) means 'auto'."""


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def parse_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from the environment overridden by the command line `argv`.

    Exits through argparse (status 2) on an invalid flag value.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    try:
        for f in dataclasses.fields(Settings):
            value = getattr(args, f.name)
            if value is None:
                continue
            if f.name == "api_keys":
                overrides[f.name] = tuple(k for item in value for k in _csv(item))
            else:
                overrides[f.name] = _parse_field(f, value, _flag(f.name))
        return Settings.from_env(environ, **overrides)
    except SettingsError as exc:
        parser.error(str(exc))
