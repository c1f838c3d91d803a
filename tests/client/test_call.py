"""`codec-client call` (client.call, client.cmd_call) on simulated devices: the speaker
buffer of `--receive pcm`, the room hello, option and --stats-json errors, how a call ends
(hang-up vs the server closing it) and a sound device that fails to start after the join.
The network parts run against real loopback servers."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.protocol import State

from client import cmd_call
from client.__main__ import main
from client.audio import PCM_CATCHUP_MARGIN_FRAMES
from client.call import CallClient, CallOptions
from client.devices import DeviceAudio
from client.errors import EXIT_USAGE, ClientError
from client.session import Session
from client.virtual import VirtualAudio
from streaming.model import CodecModel
from tests.client.conftest import ServerThread

RATE = 16000
FRAME = RATE // 50  # 20 ms


class FakeDevice(VirtualAudio):
    """A `VirtualAudio` with the thread interface of `client.devices.DeviceAudio` (the two
    wake-up events, start, close); nothing advances it unless the test does.  `on_start`
    runs when the call starts audio, i.e. once it has joined its room."""

    def __init__(self, on_start: Callable[[], None] | None = None) -> None:
        super().__init__(RATE, np.zeros(0, np.float32), block=FRAME, record_s=0.0)
        self.data_ready = threading.Event()
        self.space_ready = threading.Event()
        self.on_start = on_start
        self.closed = False

    def start(self) -> None:
        if self.on_start is not None:
            self.on_start()

    def close(self) -> None:
        self.closed = True
        self.data_ready.set()
        self.space_ready.set()


def pcm_listener(
    model: CodecModel, ticks: int, playout_ms: float = 40.0
) -> tuple[VirtualAudio, CallClient]:
    """A receive="pcm" participant on a virtual speaker (20 ms blocks) recording `ticks`."""
    port = VirtualAudio(RATE, np.zeros(0, np.float32), block=FRAME, record_s=ticks * 0.02)
    options = CallOptions(server="x", room="r", send="pcm", receive="pcm", playout_ms=playout_ms)
    return port, CallClient(model, port, options)


def message(k: int) -> bytes:
    """The server's k-th 20 ms PCM message: every sample is k / 1000 (tells which one plays)."""
    return np.full(FRAME, k / 1000.0, dtype="<f4").tobytes()


# ---- receive="pcm": the speaker buffer ----------------------------------------------------


def test_pcm_speaker_buffer_comes_back_after_a_network_stall(model: CodecModel) -> None:
    """The server sends one message per 20 ms; the network stalls 0.5 s and then delivers the
    25 held messages at once.  The burst must not stay in the speaker buffer: the oldest audio
    is dropped (and counted) until the buffer is back near --playout-ms."""
    ticks, stall = 300, range(100, 125)
    port, client = pcm_listener(model, ticks)
    limit = int(0.040 * RATE) + (PCM_CATCHUP_MARGIN_FRAMES + 1) * FRAME  # after a write
    levels: list[int] = []
    sent = 0
    for tick in range(ticks):
        port.advance(tick * 0.02)
        if tick in stall:
            continue
        while sent <= tick:  # everything the server produced so far arrives now
            client._play_pcm(message(sent))
            sent += 1
        levels.append(port.playback_queued)
    assert max(levels) <= limit
    assert levels[-1] <= limit
    stats = client.snapshot()
    assert stats.pcm_received_s == pytest.approx(ticks * 0.02)
    # most of the 0.5 s burst was dropped: what came at once beyond playout + margin
    assert 0.4 <= stats.pcm_dropped_s <= 0.5
    # after the burst the speaker plays what the server sent at most playout + 3 frames ago
    rec = port.recording[: port.recorded]
    for tick in range(200, ticks):
        playing = round(float(rec[tick * FRAME + FRAME // 2]) * 1000.0)  # message index
        assert 0 <= tick - playing <= 2 + PCM_CATCHUP_MARGIN_FRAMES + 1


def test_pcm_speaker_buffer_stays_bounded_when_the_server_clock_runs_fast(
    model: CodecModel,
) -> None:
    """Server clock 2% faster than the speaker (one extra message every 50 ticks): the
    surplus is dropped instead of piling up; a steady stream drops nothing."""
    ticks = 2000
    port, client = pcm_listener(model, ticks)
    limit = int(0.040 * RATE) + (PCM_CATCHUP_MARGIN_FRAMES + 1) * FRAME
    highest = 0
    for tick in range(ticks):
        port.advance(tick * 0.02)
        client._play_pcm(message(0))
        if tick % 50 == 49:
            client._play_pcm(message(0))
        highest = max(highest, port.playback_queued)
        if tick == 999:
            first_half_dropped = client.snapshot().pcm_dropped_s
    assert highest <= limit
    stats = client.snapshot()
    assert stats.pcm_dropped_s > first_half_dropped > 0.0
    # a stream at the speaker's rate drops nothing
    port, client = pcm_listener(model, 500)
    for tick in range(500):
        port.advance(tick * 0.02)
        client._play_pcm(message(0))
    assert client.snapshot().pcm_dropped_s == 0.0
    assert port.playback_queued <= limit


# ---- options ------------------------------------------------------------------------------


def test_the_pcm_sender_hello_carries_rate_cap(model: CodecModel) -> None:
    device = FakeDevice()
    pcm = CallClient(model, device, CallOptions("x", "r", send="pcm", rate_cap=True))
    assert pcm.hello()["rate_cap"] is True
    assert CallClient(model, device, CallOptions("x", "r", send="pcm")).hello()["rate_cap"] is False
    # a token sender caps its own encoder: the server takes no rate_cap from it
    assert "rate_cap" not in CallClient(model, device, CallOptions("x", "r", rate_cap=True)).hello()


async def test_the_server_applies_rate_cap_to_a_pcm_sender(
    model: CodecModel, server: ServerThread
) -> None:
    ready: dict[str, Any] = {}

    def joined(c: CallClient) -> None:
        assert c.session is not None
        ready.update(c.session.ready.raw)
        c.hangup()

    options = CallOptions(server.url, "ratecap", send="pcm", receive="pcm", rate_cap=True)
    stats = await CallClient(model, FakeDevice(), options).run(on_joined=joined)
    assert ready["rate_cap"] is True
    assert stats.closed_by_server is None


@pytest.fixture
def no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a sound device fails the test (option errors must come first)."""

    def refuse(args: Any) -> Any:
        raise AssertionError("the sound device was opened")

    monkeypatch.setattr(cmd_call, "_open_audio", refuse)


@pytest.mark.parametrize(
    "argv",
    [
        ["--playout-ms", "0"],
        ["--playout-ms", "-40"],
        ["--playout-ms", "nan"],
        ["--block-ms", "0"],
        ["--block-ms", "-10"],
    ],
)
def test_buffer_sizes_must_be_positive(
    argv: list[str], no_device: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["call", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"codec-client call: error: {argv[0]} must be > 0")
    assert err.count("\n") == 1


def test_an_unwritable_stats_json_fails_before_the_call(
    tmp_path: Path, no_device: None, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "missing" / "stats.json"
    assert main(["call", "--stats-json", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"codec-client call: error: --stats-json {target}: cannot write")
    assert err.count("\n") == 1 and "Traceback" not in err


# ---- the call through main(), on a fake device ---------------------------------------------


@pytest.fixture
def fake_call(model: CodecModel, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., int]]:
    """`codec-client call ARGV` on a FakeDevice (with `on_start`), stdin = `keys`."""

    def run(argv: list[str], keys: str = "", on_start: Callable[[], None] | None = None) -> int:
        monkeypatch.setattr(cmd_call, "load_model", lambda path: model)
        monkeypatch.setattr(cmd_call, "_open_audio", lambda args: FakeDevice(on_start))
        monkeypatch.setattr(sys, "stdin", io.StringIO(keys))
        return main(["call", "-q", *argv])

    yield run


def test_hanging_up_ends_the_call_with_exit_0(
    fake_call: Callable[..., int], server: ServerThread, tmp_path: Path
) -> None:
    stats_path = tmp_path / "stats.json"
    argv = ["--server", server.url, "--room", "hangup", "--stats-json", str(stats_path)]
    assert fake_call(argv, keys="q\n") == 0  # q + Enter
    assert json.loads(stats_path.read_text())["closed_by_server"] is None
    assert fake_call([*argv, "--duration", "0.2"]) == 0  # the end of --duration
    assert json.loads(stats_path.read_text())["closed_by_server"] is None


def test_a_server_shutdown_ends_the_call_with_exit_1_and_says_so(
    fake_call: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server shuts down (closes the session with 1001) while nobody hangs up."""
    srv = ServerThread(engine_processes=0).start()
    stats_path = tmp_path / "stats.json"
    try:
        shutdown = threading.Thread(target=srv.stop, daemon=True)
        argv = ["--server", srv.url, "--room", "shutdown", "--duration", "30"]
        code = fake_call([*argv, "--stats-json", str(stats_path)], on_start=shutdown.start)
    finally:
        srv.stop()
    assert code == 1
    err = capsys.readouterr().err
    assert (
        "codec-client call: error: the server ended the call with 1001: server shutting down" in err
    )
    assert "Traceback" not in err
    closed = json.loads(stats_path.read_text())["closed_by_server"]
    assert closed == {"code": 1001, "reason": "server shutting down"}


def test_a_stats_json_write_error_after_the_call_is_one_line(
    fake_call: Callable[..., int],
    server: ServerThread,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    target = folder / "stats.json"
    argv = ["--server", server.url, "--room", "statsjson", "--stats-json", str(target)]
    assert fake_call(argv, keys="q\n", on_start=folder.rmdir) == 1  # the folder goes mid-call
    err = capsys.readouterr().err
    assert err == (
        f"codec-client call: error: --stats-json {target}: cannot write "
        "(No such file or directory)\n"
    )


# ---- a sound device that fails to start once the call has joined ---------------------------

START_ERROR = "Error starting stream: Device unavailable [PaErrorCode -9985]"


class PortAudioError(Exception):
    pass


class UnstartableStream:
    """A PortAudio stream that opens but cannot start (the device went away, is busy, ...)."""

    def __init__(self, opened: list[UnstartableStream], **settings: Any) -> None:
        self.settings = settings
        self.closed = False
        opened.append(self)

    def start(self) -> None:
        raise PortAudioError(START_ERROR)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def unstartable_audio(opened: list[UnstartableStream]) -> DeviceAudio:
    """A `DeviceAudio` on a fake sounddevice whose streams (noted in `opened`) fail to start."""
    sd = types.ModuleType("fake_sounddevice")
    sd.PortAudioError = PortAudioError  # type: ignore[attr-defined]
    sd.InputStream = sd.OutputStream = lambda **kw: UnstartableStream(opened, **kw)  # type: ignore[attr-defined]
    return DeviceAudio(sd, 1, 2, RATE, block=FRAME // 2)


async def peer_left(peer: Session, name: str) -> bool:
    """Read `peer`'s room events until participant `name` joins and then leaves (ClientError
    when nothing comes for 10 s)."""
    joined: set[int] = set()
    while (message := await peer.recv(timeout=10.0)) is not None:
        if not isinstance(message, dict):
            continue
        pid = int(message.get("participant_id", -1))
        if message.get("type") == "joined" and message.get("name") == name:
            joined.add(pid)
        elif message.get("type") == "left" and pid in joined:
            return True
    return False


async def join_as(server: ServerThread, room: str, name: str) -> Session:
    hello = {"send": "tokens", "receive": "tokens", "name": name}
    return await Session.open(server.url, f"/v1/rooms/{room}", hello)


async def test_audio_that_fails_to_start_after_the_join_leaves_the_call(
    model: CodecModel, server: ServerThread
) -> None:
    """The call has joined its room when the sound device fails to start: the error comes
    out of `run` as the usual one-line device error, and nothing is left behind: worker
    threads stopped, streams closed, session closed, participant gone from the room."""
    bob = await join_as(server, "nostart", "bob")
    opened: list[UnstartableStream] = []
    options = CallOptions(server.url, "nostart", "ghost")
    client = CallClient(model, unstartable_audio(opened), options)
    try:
        with pytest.raises(ClientError) as caught:
            await client.run()
        assert caught.value.exit_code == EXIT_USAGE
        assert str(caught.value) == f"no sound device: cannot start audio ({START_ERROR})"
        assert client._workers and not any(w.is_alive() for w in client._workers)
        assert len(opened) == 2 and all(stream.closed for stream in opened)
        assert client.session is not None and client.session.ws.state is State.CLOSED
        assert await peer_left(bob, "ghost")
    finally:
        await bob.close()


async def test_codec_client_call_with_a_device_that_fails_to_start_is_one_line_exit_2(
    model: CodecModel,
    server: ServerThread,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    opened: list[UnstartableStream] = []
    monkeypatch.setattr(cmd_call, "load_model", lambda path: model)
    monkeypatch.setattr(cmd_call, "_open_audio", lambda args: unstartable_audio(opened))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    bob = await join_as(server, "nostart-cli", "bob")
    argv = ["call", "-q", "--server", server.url, "--room", "nostart-cli", "--name", "ghost"]
    try:
        code = await asyncio.to_thread(main, argv)  # main runs its own event loop
        assert await peer_left(bob, "ghost")  # it left the room, not merely exited
    finally:
        await bob.close()
    assert code == EXIT_USAGE
    assert capsys.readouterr().err == (
        f"codec-client call: error: no sound device: cannot start audio ({START_ERROR})\n"
    )
    assert all(stream.closed for stream in opened)
