"""A voice call in a server room: the runtime behind `codec-client call`.

    microphone -> capture ring -> [capture thread] EncoderStream -> token packets --+
                                                                                     | WebSocket
    speaker <- playback ring <- [playout thread] mix <- DecoderStreams <- jitter <--+ /v1/rooms

* `send="tokens"` (default): the client encodes (the low-bitrate link) and sends one token
  packet per 20 ms frame with its capture timestamp; `send="pcm"` (thin client): raw PCM
  chunks go to the server, which encodes them.
* `receive="tokens"`: other participants' packets go to one jitter buffer + decoder per
  sender (client.engine.PlayoutSide), mixed and played; `receive="pcm"`: the server mixes
  and the client only buffers and plays the PCM it gets, holding the speaker buffer near
  `playout_ms` (`client.audio.PcmHold`): an empty buffer is primed with `playout_ms` of
  silence, and when more than `playout_ms` + 2 frames are queued as a new chunk arrives (a
  burst after a network stall, or a server clock faster than the speaker's) the oldest queued
  audio is dropped down to `playout_ms` (counted in `CallStats.pcm_dropped_s`).

The audio callbacks only copy to/from the rings (client.devices); the capture and playout
threads do the codec work; the asyncio loop does the network and the status line.  Muting
stops sending (the encoder keeps running, so unmuting is instant).  Hang-up (`hangup()`,
Ctrl-C, end of `duration`) sends `end`, waits for the server's close (1000) and stops audio.
A session the server closes without a hang-up (1001 "server shutting down", ...) ends the
call too, with the close code and reason in `CallStats.closed_by_server`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from client.audio import AudioCounters, PcmHold
from client.devices import DeviceAudio
from client.engine import CaptureSide, PlayoutSide, PlayoutTotals
from client.errors import ClientError
from client.files import mode_for
from client.session import Session, mode_fields
from client.trace import clock_us
from streaming.model import BitrateMode, CodecModel
from streaming.protocol import PacketTimes, TokenPacket, encode_packet

__all__ = ["CallClient", "CallOptions", "CallStats"]

F32: TypeAlias = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CallOptions:
    """What `codec-client call` was asked for (see its --help).  `mode`: the bitrate mode of
    what this participant sends (None: the model's 6 kbps mode); `rate_cap`: hold what it
    sends to that mode's rate (`EncoderStream(rate_cap=True)` here, or the server's encoder
    for `send="pcm"`); `playout_ms`: the speaker buffer kept, ms (> 0)."""

    server: str
    room: str
    name: str = ""
    send: str = "tokens"
    receive: str = "tokens"
    mode: BitrateMode | None = None
    rate_cap: bool = False
    timestamps: bool = False
    api_key: str | None = None
    playout_ms: float = 40.0
    duration_s: float | None = None

    def __post_init__(self) -> None:
        if not self.playout_ms > 0.0:  # also rejects NaN
            raise ValueError(f"playout_ms must be > 0, got {self.playout_ms}")


@dataclass
class CallStats:
    """Counters of a call so far (packets, frames, audio glitches).

    `pcm_received_s`: PCM received (receive="pcm"), s, including `pcm_dropped_s`: what the
    speaker buffer's catch-up discarded (the PCM counterpart of the jitter buffer's
    `dropped`).  `closed_by_server`: {"code", "reason"} of the close when the server ended
    the session without a hang-up (else None)."""

    participant_id: int = 0
    peers: int = 0
    muted: bool = False
    mic_db: float = -120.0
    out_db: float = -120.0
    sent: int = 0
    send_dropped: int = 0
    pcm_sent_s: float = 0.0
    pcm_received_s: float = 0.0
    pcm_dropped_s: float = 0.0
    playout: PlayoutTotals = dataclasses.field(default_factory=PlayoutTotals)
    audio: AudioCounters = dataclasses.field(default_factory=AudioCounters)
    end: dict[str, Any] | None = None
    closed_by_server: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = dataclasses.asdict(self)
        out["playout"].pop("per_sender", None)
        return out


class _Worker(threading.Thread):
    """Runs `step` each time `wake` is set (or every 50 ms) until `stop` is set."""

    def __init__(
        self, name: str, wake: threading.Event, stop: threading.Event, step: Callable[[], object]
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.wake = wake
        self.stop = stop
        self.step = step
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.wake.wait(0.05)
                self.wake.clear()
                self.step()
        except BaseException as exc:  # reported by the call, never lost in a thread
            self.error = exc
            self.stop.set()


class CallClient:
    """One participant of a room, on a `DeviceAudio` (see the module doc)."""

    def __init__(self, model: CodecModel, audio: DeviceAudio, options: CallOptions) -> None:
        self.model = model
        self.audio = audio
        self.options = options
        self.card = model.card
        self.mode = options.mode if options.mode is not None else mode_for(model.card, None, None)
        """Bitrate mode of what this participant sends."""
        self.stop = threading.Event()
        self.hangup_requested = asyncio.Event()
        self._hangup = False  # hangup() before run() started: honoured once it starts
        self.session: Session | None = None
        self.peers: dict[int, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: asyncio.Queue[bytes | TokenPacket] = asyncio.Queue(maxsize=500)
        self.capture: CaptureSide | None = None
        self.playout: PlayoutSide | None = None
        self._pcm_chunk: F32 = np.zeros(audio.rate // 50, dtype=np.float32)
        self._pcm_sent = 0
        self._pcm_received = 0
        self._pcm_dropped = 0
        self._pcm_hold = PcmHold.for_playout(options.playout_ms, audio.rate, self.card.frame_ms)
        """receive="pcm": how the speaker buffer is held near `playout_ms`."""
        self._workers: list[_Worker] = []
        self.muted = False
        self.stats = CallStats()

    # ---- public ---------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """The room hello of these options."""
        o = self.options
        hello: dict[str, Any] = {"send": o.send, "receive": o.receive, "name": o.name}
        if "pcm" in (o.send, o.receive):
            hello |= {"sample_rate": self.audio.rate, "format": "f32le"}
        if o.send == "pcm":
            hello |= {**mode_fields(self.mode), "timestamps": o.timestamps, "rate_cap": o.rate_cap}
        return hello

    def toggle_mute(self) -> bool:
        """Mute or unmute; return the new state (thread-safe)."""
        self.muted = not self.muted
        if self.capture is not None:
            self.capture.muted = self.muted
        return self.muted

    def hangup(self) -> None:
        """Ask the call to end (thread-safe; also before or while it joins)."""
        self._hangup = True
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self.hangup_requested.set)

    async def run(
        self,
        on_status: Callable[[CallStats], None] | None = None,
        on_joined: Callable[[CallClient], None] | None = None,
    ) -> CallStats:
        """Join, run until hang-up or the server ends the session, leave; final stats.

        `on_joined` is called once audio runs, `on_status` four times a second.  When audio
        fails to start after the join (or `on_joined` raises), the call is left as on a
        hang-up (threads stopped, `end` sent, session closed, audio closed) and the error
        raised."""
        self._loop = asyncio.get_running_loop()
        if self._hangup:
            self.hangup_requested.set()
        path = f"/v1/rooms/{self.options.room}"
        self.session = await Session.open(
            self.options.server, path, self.hello(), api_key=self.options.api_key
        )
        ready = self.session.ready
        self.stats.participant_id = ready.stream_id
        for peer in ready.get("participants", []):
            self.peers[int(peer["participant_id"])] = str(peer.get("name", ""))
        try:
            self._start_audio(ready.stream_id)
            if on_joined is not None:
                on_joined(self)
        except BaseException:
            await self._leave()
            raise
        sender = asyncio.create_task(self._send_loop())
        receiver = asyncio.create_task(self._recv_loop())
        status = asyncio.create_task(self._status_loop(on_status))
        try:
            hung_up = await self._wait_for_end([sender, receiver, status])
        finally:
            await self._leave(sender, receiver, status)
        if not hung_up:
            self._note_server_close()
        return self.snapshot()

    def snapshot(self) -> CallStats:
        """Current counters."""
        s = self.stats
        s.peers = len(self.peers)
        s.muted = self.muted
        if self.capture is not None:
            s.mic_db = self.capture.level_db
            s.sent = self.capture.packets_sent
        if self.playout is not None:
            s.out_db = self.playout.level_db
            s.playout = self.playout.stats()
        s.pcm_sent_s = self._pcm_sent / self.audio.rate
        s.pcm_received_s = self._pcm_received / self.audio.rate
        s.pcm_dropped_s = self._pcm_dropped / self.audio.rate
        s.audio = self.audio.counters()
        return s

    # ---- audio side -----------------------------------------------------------------------

    def _start_audio(self, participant_id: int) -> None:
        o = self.options
        if o.send == "tokens":
            self.capture = CaptureSide(
                self.model,
                self.audio,
                self._queue_packet,
                stream_id=participant_id,
                mode=self.mode,
                rate_cap=o.rate_cap,
            )
            capture_step: Callable[[], object] = self.capture.process
        else:
            capture_step = self._capture_pcm
        self._workers.append(_Worker("capture", self.audio.data_ready, self.stop, capture_step))
        if o.receive == "tokens":
            self.playout = PlayoutSide(
                self.model, self.audio, target_ms=o.playout_ms, ignore_stream=participant_id
            )
            self._workers.append(
                _Worker("playout", self.audio.space_ready, self.stop, self.playout.fill)
            )
        for worker in self._workers:
            worker.start()
        self.audio.start()

    def _queue_packet(self, item: bytes | TokenPacket) -> None:
        """Capture thread -> event loop (never blocks; a full outbox drops the item)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._put, item)

    def _put(self, item: bytes | TokenPacket) -> None:
        if self._outbox.full():  # the network stalls: drop rather than grow the delay
            self.stats.send_dropped += 1
        else:
            self._outbox.put_nowait(item)

    def _capture_pcm(self) -> None:
        """Thin client: send the captured PCM in 20 ms chunks."""
        chunk = self._pcm_chunk
        while self.audio.capture_available >= chunk.shape[0]:
            n, _ = self.audio.read_capture(chunk)
            if not self.muted:
                self._queue_packet(chunk[:n].astype("<f4").tobytes())
                self._pcm_sent += n

    def _play_pcm(self, data: bytes) -> None:
        """PCM from the server (receive="pcm"): re-prime after an underrun, catch up after a
        burst (see the module doc), then queue."""
        pcm = np.frombuffer(data, dtype="<f4")
        self._pcm_dropped += self._pcm_hold.settle(self.audio.playback)
        self.audio.write_playback(pcm)
        self._pcm_received += pcm.shape[0]

    # ---- network side ---------------------------------------------------------------------

    async def _send_loop(self) -> None:
        session = self.session
        assert session is not None
        card = self.card
        while True:
            item = await self._outbox.get()
            if isinstance(item, TokenPacket):
                if self.options.timestamps:
                    times = PacketTimes(clock_us(time.perf_counter()))
                    item = dataclasses.replace(item, times=times)
                item = encode_packet(item, code_bits=card.code_bits, gain_bits=card.gain.bits)
            try:
                await session.send_bytes(item)
            except ClientError:
                if session.normal_close is None:
                    raise
                return  # the server closed the session normally: the receiver reports it

    async def _recv_loop(self) -> None:
        session = self.session
        assert session is not None
        while (message := await session.recv()) is not None:
            if isinstance(message, bytes):
                if self.playout is not None:
                    self.playout.receive(message, time.perf_counter())
                else:
                    self._play_pcm(message)
            elif message.get("type") == "joined":
                self.peers[int(message["participant_id"])] = str(message.get("name", ""))
            elif message.get("type") == "left":
                peer = int(message["participant_id"])
                self.peers.pop(peer, None)
                if self.playout is not None:
                    self.playout.forget(peer)
            elif message.get("type") == "end":
                self.stats.end = message

    async def _status_loop(self, on_status: Callable[[CallStats], None] | None) -> None:
        while True:
            await asyncio.sleep(0.25)
            if on_status is not None:
                on_status(self.snapshot())
            failed = next((w.error for w in self._workers if w.error is not None), None)
            if failed is not None:
                raise ClientError(f"audio thread failed: {failed!r}")

    async def _wait_for_end(self, tasks: list[asyncio.Task[None]]) -> bool:
        """Wait for a hang-up, the end of `duration_s` or the end of a task; raise a task's
        error.  True when the user hung up (hang-up or duration), False when the session
        ended on its own (the server closed it)."""
        hangup = asyncio.ensure_future(self.hangup_requested.wait())
        waiters: set[asyncio.Future[Any]] = {*tasks, hangup}
        timeout = self.options.duration_s
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters - done:
            if waiter not in tasks:
                waiter.cancel()
        for task in done:
            error = task.exception() if task in tasks else None
            if error is not None:
                raise error
        return hangup in done or not done or self.hangup_requested.is_set()

    def _note_server_close(self) -> None:
        """Record the close of a session the server ended (the user did not hang up)."""
        session = self.session
        if session is None:
            return
        frame = session.normal_close
        if frame is not None:
            code, reason = frame
        else:
            code, reason = session.ws.close_code or 1006, session.ws.close_reason or ""
        self.stats.closed_by_server = {"code": int(code), "reason": reason}

    async def _leave(
        self,
        sender: asyncio.Task[None] | None = None,
        receiver: asyncio.Task[None] | None = None,
        status: asyncio.Task[None] | None = None,
    ) -> None:
        """Send `end`, let the receiver (if it runs yet) run until the server's close (at
        most 2 s), close the session, then stop audio and threads."""
        session = self.session
        self.stop.set()
        tasks = [task for task in (sender, receiver, status) if task is not None]
        for task in (sender, status):
            if task is not None:
                task.cancel()
        if session is not None:
            try:
                await session.send_json({"type": "end"})
                if receiver is not None:
                    await asyncio.wait_for(receiver, timeout=2.0)
            except (ClientError, TimeoutError, asyncio.CancelledError):
                pass
            finally:
                if receiver is not None:
                    receiver.cancel()
                await session.close()
        self.audio.close()
        for worker in self._workers:
            worker.join(timeout=1.0)
        await asyncio.gather(*tasks, return_exceptions=True)

