"""Fixtures of the server tests: a REAL uvicorn server on a loopback port, real clips.

`ServerThread` runs `server.runner.CodecServer` (the production server class, graceful
shutdown included) with its own event loop in a background thread, on a free port (port 0),
and waits until it listens.  Clients are real `websockets` / `httpx` clients on the test's
event loop.  The shared `server` fixture serves most tests; tests that need other settings
(limits, keys, short timeouts) start their own with `start_server`.

Speech clips come from ../shared/data/dev beside the repository (16 kHz FLAC), read with
soundfile here only; the tests fail clearly when that directory is missing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import websockets
from websockets.asyncio.client import ClientConnection

from server.app import create_app
from server.runner import CodecServer, make_config
from server.settings import Settings
from streaming.model import ModelCard, default_model_dir
from streaming.protocol import TokenPacket, decode_packet

ROOT = Path(__file__).resolve().parents[2]
DEV_DATA = ROOT / ".." / "shared" / "data" / "dev"
SHORT_CLIP = "ls_3080__3080-5032-0003.flac"  # 3.44 s
OTHER_CLIP = "lyra_sample1__sample1_16kHz.flac"  # 3.45 s


def load_clip(name: str = SHORT_CLIP) -> np.ndarray:
    """A 16 kHz dev clip as int16 samples; fails (not skips) when ../shared is missing."""
    path = DEV_DATA / name
    if not path.is_file():
        pytest.fail(
            f"speech clip {path} is missing: the server tests need ../shared/data/dev beside "
            "the repository (see ../shared/README.md)"
        )
    pcm, rate = sf.read(path, dtype="int16")
    assert rate == 16000 and pcm.ndim == 1
    return np.asarray(pcm)


class ServerThread:
    """A CodecServer on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        config = make_config(self.app, settings, host="127.0.0.1", port=0, log_level="warning")
        self.server = CodecServer(config, self.app)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.port = 0

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def state(self) -> Any:
        return self.app.state.codec


async def settle(server: ServerThread, active: int = 0, timeout: float = 5.0) -> None:
    """Wait until the server holds `active` sessions (closes are processed asynchronously)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while server.state.admission.active != active:
        assert loop.time() < end, f"{server.state.admission.active} sessions still active"
        await asyncio.sleep(0.01)


def start_server(**overrides: Any) -> ServerThread:
    """A fresh server with `Settings(**overrides)` (caller stops it)."""
    return ServerThread(
        Settings(**{"log_level": "warning", "engine_processes": 1, **overrides})
    ).start()


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    """The shared server: default settings, no API keys."""
    running = start_server()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def clip() -> np.ndarray:
    return load_clip(SHORT_CLIP)


# ---- client helpers ---------------------------------------------------------------------


def connect(url: str, **kwargs: Any) -> Any:
    """`websockets.connect` without compression (the server offers none)."""
    return websockets.connect(url, compression=None, open_timeout=10, **kwargs)


def small_buffer_socket(port: int) -> socket.socket:
    """A connected client socket with small kernel buffers, so that a client that stops
    reading makes the server's sends block after a few MB."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


@asynccontextmanager
async def non_reading_client(running: ServerThread, path: str) -> AsyncIterator[ClientConnection]:
    """A client connection with small socket buffers and a one-message receive queue, for
    tests that flood without reading.  When the test fails it is aborted, not closed: the
    close handshake would wait forever to write to a server that has stopped reading."""
    ws = await connect(running.ws(path), max_queue=1, sock=small_buffer_socket(running.port))
    try:
        yield ws
    except BaseException:
        ws.transport.abort()
        raise
    try:
        await asyncio.wait_for(ws.close(), 20)
    except TimeoutError:
        ws.transport.abort()
        raise AssertionError("no close within 20 s: the server stopped reading") from None


async def hello(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    """Send a hello (version 1 + `fields`) and return the `ready` message."""
    await ws.send(json.dumps({"type": "hello", "version": 1, **fields}))
    ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert ready["type"] == "ready", ready
    return ready


async def send_pcm(ws: ClientConnection, pcm: np.ndarray, chunk: int = 320) -> None:
    """Send int16 samples in chunks of `chunk` samples, as fast as possible."""
    data = pcm.astype("<i2").tobytes()
    step = 2 * chunk
    for i in range(0, len(data), step):
        await ws.send(data[i : i + step])


@dataclass
class Received:
    """Everything a client got until the server closed."""

    binary: list[bytes] = field(default_factory=list)
    text: list[dict[str, Any]] = field(default_factory=list)
    code: int | None = None
    reason: str = ""

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.text if m.get("type") == kind]


async def receive_all(ws: ClientConnection, timeout: float = 20) -> Received:
    """Read until the connection closes; the close code and reason."""
    got = Received()

    async def run() -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    got.binary.append(message)
                else:
                    got.text.append(json.loads(message))
        except websockets.ConnectionClosedError:
            pass  # a close code other than 1000/1001: read below

    await asyncio.wait_for(run(), timeout)
    got.code, got.reason = ws.close_code, ws.close_reason or ""
    return got


async def close_code_of(url: str, *messages: str | bytes, **kwargs: Any) -> tuple[int, str]:
    """Connect, send `messages`, return the server's close (code, reason)."""
    async with connect(url, **kwargs) as ws:
        for message in messages:
            try:
                await ws.send(message)
            except websockets.ConnectionClosed:
                break
        got = await receive_all(ws, timeout=15)
    assert got.code is not None
    return got.code, got.reason


HELLO = json.dumps({"type": "hello", "version": 1})

Q, CODE_BITS, GAIN_BITS = 12, 10, 6
"""The bundled model's codebooks and bit widths."""

CARD = ModelCard.from_file(default_model_dir() / "card.json")
"""The bundled model's card: bitrate modes (`mode_for_bitrate`), nominal rates."""


def parse_packets(messages: list[bytes]) -> list[TokenPacket]:
    """Decode binary token packets (default model parameters)."""
    return [
        decode_packet(m, code_bits=CODE_BITS, gain_bits=GAIN_BITS, max_codebooks=Q)
        for m in messages
    ]


async def encode_with_server(server: ServerThread, pcm: np.ndarray, **fields: Any) -> Received:
    """Encode `pcm` on /v1/encode (then `end`): everything received."""
    async with connect(server.ws("/v1/encode")) as ws:
        await hello(ws, **fields)
        await send_pcm(ws, pcm)
        await ws.send(json.dumps({"type": "end"}))
        return await receive_all(ws)
