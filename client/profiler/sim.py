"""Simulated call participants: file-fed, paced by the clock, no sound device.

Each `SimClient` is a `VirtualAudio` (a clip plays into its microphone, its speaker is
recorded), a `CaptureSide` and a `PlayoutSide` (the same engine as `codec-client call`) and
a room session (`send: tokens`, `receive: tokens`).  Every packet carries the times block:
the client stamps `client_send_us` when it hands the packet to the socket, the server
`server_recv_us` / `server_send_us`.  One asyncio task per client ticks its virtual device
every `block_ms` (staggered across clients): microphone block in, one speaker block out,
encode what is complete, top the playback FIFO up to `playout_ms`.

All clients run in one process on one clock (`time.perf_counter`), so sender and receiver
times compare exactly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from client.audio import PcmHold
from client.engine import CaptureSide, PlayoutSide
from client.errors import ClientError
from client.files import mode_for
from client.session import Session, mode_fields
from client.trace import RoundtripRecord, clock_us
from client.virtual import VirtualAudio
from streaming.latency import LatencyStats
from streaming.model import BitrateMode, CodecModel, ModelCard
from streaming.protocol import PacketTimes, TokenPacket, encode_packet

__all__ = ["RoundtripClient", "SendLog", "SimClient", "SimConfig", "run_room", "run_roundtrip"]

F32: TypeAlias = npt.NDArray[np.float32]
F64: TypeAlias = npt.NDArray[np.float64]

TAIL_S = 1.0
"""Time after the last captured block during which clients keep playing (drain)."""

SEND_LOG_S = 60.0
"""Sending history a roundtrip client keeps to time-stamp the frames that come back, s (a
frame that comes back later than that gets no record)."""


@dataclass(frozen=True)
class SimConfig:
    """A profiling run: `clients` participants of `room` on `server` for `seconds` of audio,
    bitrate `mode` (None: the model's 6 kbps mode), device blocks of `block_ms`, playback FIFO
    of `playout_ms`."""

    server: str
    room: str
    clients: int = 2
    seconds: float = 10.0
    mode: BitrateMode | None = None
    block_ms: float = 20.0
    playout_ms: float = 20.0
    api_key: str | None = None

    def mode_for(self, card: ModelCard) -> BitrateMode:
        """The bitrate mode of this run on `card`."""
        return self.mode if self.mode is not None else mode_for(card, None, None)


class SimClient:
    """One simulated participant (see the module doc)."""

    def __init__(self, index: int, model: CodecModel, source: F32, config: SimConfig) -> None:
        card = model.card
        rate = card.sample_rate
        self.index = index
        self.name = f"client{index}"
        self.config = config
        self.block = max(1, round(rate * config.block_ms / 1000.0))
        self.source = source
        record_s = config.seconds + TAIL_S + 1.0
        self.port = VirtualAudio(rate, source, block=self.block, record_s=record_s)
        self.encode_stats = LatencyStats()
        self.decode_stats = LatencyStats()
        self.capture = CaptureSide(
            model,
            self.port,
            self._queue,
            mode=config.mode_for(card),
            record=True,
            stats=self.encode_stats,
        )
        self.playout = PlayoutSide(
            model,
            self.port,
            name=self.name,
            target_ms=config.playout_ms,
            record=True,
            stats=self.decode_stats,
        )
        self.code_bits, self.gain_bits = card.code_bits, card.gain.bits
        self.outbox: asyncio.Queue[TokenPacket] = asyncio.Queue()
        self.session: Session | None = None
        self.participant_id = 0
        self.tick_lag_ms: list[float] = []
        self.end: dict[str, object] = {}

    def _queue(self, packet: TokenPacket) -> None:
        self.outbox.put_nowait(packet)

    async def connect(self) -> None:
        """Join the room; the participant id becomes the stream id of what we send."""
        hello = {"send": "tokens", "receive": "tokens", "name": self.name}
        path = f"/v1/rooms/{self.config.room}"
        self.session = await Session.open(
            self.config.server, path, hello, api_key=self.config.api_key
        )
        self.participant_id = self.session.ready.stream_id
        self.capture.stream_id = self.participant_id
        self.playout.ignore_stream = self.participant_id

    async def run(self, start: float) -> None:
        """Tick the device from `start` (perf_counter s) for seconds + tail, then leave."""
        assert self.session is not None
        sender = asyncio.create_task(self._send())
        receiver = asyncio.create_task(self._receive())
        try:
            await self._ticks(start)
            await self.outbox.join()
        finally:
            sender.cancel()
            await self._leave(receiver)

    async def _ticks(self, start: float) -> None:
        block_s = self.block / self.port.rate
        total = int((self.config.seconds + TAIL_S) / block_s)
        for b in range(total):
            due = start + b * block_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            self.tick_lag_ms.append(1000.0 * (now - due))
            self.port.advance(now)
            self.capture.process()
            self.playout.fill()

    async def _send(self) -> None:
        assert self.session is not None
        while True:
            packet = await self.outbox.get()
            stamped = dataclasses.replace(packet, times=PacketTimes(clock_us(time.perf_counter())))
            data = encode_packet(stamped, code_bits=self.code_bits, gain_bits=self.gain_bits)
            await self.session.send_bytes(data)
            self.outbox.task_done()

    async def _receive(self) -> None:
        assert self.session is not None
        async for message in self.session.messages():
            if isinstance(message, bytes):
                self.playout.receive(message, time.perf_counter())

    async def _leave(self, receiver: asyncio.Task[None]) -> None:
        session = self.session
        assert session is not None
        try:
            await session.send_json({"type": "end"})
            await asyncio.wait_for(receiver, timeout=2.0)
        except (TimeoutError, ClientError):
            receiver.cancel()
        self.end = session.end_message or {}
        await session.close()


async def run_room(model: CodecModel, sources: list[F32], config: SimConfig) -> list[SimClient]:
    """Run `config.clients` participants (client i speaks `sources[i]`); return them."""
    clients = [SimClient(i, model, sources[i], config) for i in range(config.clients)]
    for client in clients:
        await client.connect()
    await asyncio.sleep(0.2)  # every join event delivered before the first packet
    block_s = config.block_ms / 1000.0
    start = time.perf_counter() + 0.1
    runs = [client.run(start + block_s * i / config.clients) for i, client in enumerate(clients)]
    await asyncio.gather(*runs)
    return clients


class SendLog:
    """When the PCM sent so far reached each total: one (cumulative samples, time it was
    handed to the socket, s) entry per chunk sent.

    `time_of(samples)` answers for totals asked in non-decreasing order (the frames that come
    back, in order): it drops the entries before its answer, which no later question needs,
    so each question is O(1) amortised.  At most `capacity` entries are kept (the oldest go
    first), so memory stays bounded even when nothing is asked.  A question about a dropped
    entry is answered None (never a wrong time).
    """

    def __init__(self, capacity: int) -> None:
        """`capacity`: entries kept (>= 1), e.g. the chunks of the longest delay to answer."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._entries: deque[tuple[int, float]] = deque(maxlen=capacity)
        self._dropped_total: int | None = None  # total of the latest entry dropped
        self.total = 0
        """Samples sent so far."""

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def capacity(self) -> int:
        """Entries kept at most."""
        return self._entries.maxlen or 0

    def add(self, n: int, t: float) -> None:
        """`n` more samples (> 0) went out at time `t` (s)."""
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        entries = self._entries
        if len(entries) == entries.maxlen:
            self._dropped_total = entries[0][0]
        self.total += n
        entries.append((self.total, t))

    def time_of(self, samples: int) -> float | None:
        """When the chunk that brought the total sent to `samples` went out (s); None when
        not that much has been sent yet, or when that entry was dropped."""
        entries = self._entries
        while entries and entries[0][0] < samples:
            self._dropped_total = entries.popleft()[0]
        if not entries or (self._dropped_total is not None and samples <= self._dropped_total):
            return None
        return entries[0][1]


class RoundtripClient:
    """A simulated client of /v1/roundtrip: sends its microphone PCM, plays the PCM that
    comes back (the server encodes and decodes), one `RoundtripRecord` per frame.

    The `packet` text message of each frame (`return_tokens`, `timestamps`) precedes its PCM
    and brings the server times; the k-th PCM message is frame k.  The speaker buffer is held
    near `playout_ms` as `codec-client call --receive pcm` holds it (`client.audio.PcmHold`):
    primed with `playout_ms` of silence whenever PCM arrives to an empty buffer, and its
    oldest audio dropped down to `playout_ms` when a chunk arrives while more than
    `playout_ms` + 2 frames are queued (a burst after a network stall).  Dropped audio is
    counted in `pcm_dropped` (samples) and the frames whose start it held in `frames_dropped`
    (they were never played: no record).
    """

    def __init__(self, index: int, model: CodecModel, source: F32, config: SimConfig) -> None:
        card = model.card
        rate = card.sample_rate
        self.index = index
        self.name = f"client{index}"
        self.config = config
        self.frame = card.frame_size
        self.block = max(1, round(rate * config.block_ms / 1000.0))
        self.source = source
        self.mode = config.mode_for(card)
        self.port = VirtualAudio(rate, source, block=self.block, record_s=config.seconds + 2.0)
        self._chunk: F32 = np.zeros(rate, dtype=np.float32)
        self._hold = PcmHold.for_playout(config.playout_ms, rate, card.frame_ms)
        self.session: Session | None = None
        self.participant_id = 0
        self.sends = SendLog(math.ceil(SEND_LOG_S * rate / self.block) + 1)
        """When the microphone PCM went out (to time-stamp the frames that come back)."""
        self._times: dict[int, tuple[int, int]] = {}
        self._frames_in = 0
        self._pending: list[tuple[int, float, int]] = []  # (frame, arrival, position)
        self.records: list[RoundtripRecord] = []
        self.tick_lag_ms: list[float] = []
        self.end: dict[str, object] = {}
        self.frames_sent = 0
        self.pcm_dropped = 0
        """Samples of received PCM the speaker buffer's catch-up dropped."""
        self.frames_dropped = 0
        """Frames that came back and were dropped by the catch-up before they started."""

    @property
    def pcm_dropped_s(self) -> float:
        """Received PCM the speaker buffer's catch-up dropped, s."""
        return self.pcm_dropped / self.port.rate

    async def connect(self) -> None:
        """Open the roundtrip session."""
        hello = {
            "sample_rate": self.port.rate,
            "format": "f32le",
            **mode_fields(self.mode),
            "tokens": "json",
            "return_tokens": True,
            "timestamps": True,
        }
        self.session = await Session.open(
            self.config.server, "/v1/roundtrip", hello, api_key=self.config.api_key
        )
        self.participant_id = self.session.ready.stream_id

    async def run(self, start: float) -> None:
        """Tick the device from `start` for seconds + tail, then end the session."""
        assert self.session is not None
        receiver = asyncio.create_task(self._receive())
        block_s = self.block / self.port.rate
        for b in range(int((self.config.seconds + TAIL_S) / block_s)):
            due = start + b * block_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.perf_counter()
            self.tick_lag_ms.append(1000.0 * (now - due))
            self.port.advance(now)
            await self._send_captured()
            self._resolve()
        await _leave(self, receiver)

    async def _send_captured(self) -> None:
        assert self.session is not None
        n, _ = self.port.read_capture(self._chunk)
        if n:
            data = self._chunk[:n].astype("<f4").tobytes()
            self.sends.add(n, time.perf_counter())  # handed to the socket now
            await self.session.send_bytes(data)
            self.frames_sent = self.sends.total // self.frame

    async def _receive(self) -> None:
        assert self.session is not None
        async for message in self.session.messages():
            now = time.perf_counter()
            if isinstance(message, bytes):
                self._play_pcm(message, now)
            elif message.get("type") == "packet":
                packet = message["packet"]
                times = packet.get("times") or {}
                self._times[int(packet["seq"])] = (
                    int(times.get("server_recv_us", 0)),
                    int(times.get("server_send_us", 0)),
                )

    def _play_pcm(self, data: bytes, arrival: float) -> None:
        """Queue the next frame that came back (arrived at `arrival`, s), after priming or
        catching up the speaker buffer (see the class doc)."""
        pcm = np.frombuffer(data, dtype="<f4")
        playback = self.port.playback
        consumed = playback.total_out
        dropped = self._hold.settle(playback)
        if dropped:
            self.pcm_dropped += dropped
            self._forget_dropped(consumed, playback.total_out)
        self._pending.append((self._frames_in, arrival, self.port.playback_written))
        self.port.write_playback(pcm)
        self._frames_in += 1

    def _forget_dropped(self, start: int, end: int) -> None:
        """Count and forget the pending frames whose first sample (at playback position
        `start` <= position < `end`) the catch-up dropped: they never play."""
        keep: list[tuple[int, float, int]] = []
        for frame, arrival, position in self._pending:
            if start <= position < end:
                self.frames_dropped += 1
                self._times.pop(frame & 0xFFFF, None)
            else:
                keep.append((frame, arrival, position))
        self._pending = keep

    def _resolve(self) -> None:
        consumed = self.port.playback_written - self.port.playback_queued
        keep: list[tuple[int, float, int]] = []
        for frame, arrival, position in self._pending:
            if position >= consumed:
                keep.append((frame, arrival, position))
                continue
            played = self.port.played_time(position)
            times = self._times.pop(frame & 0xFFFF, None)
            sent = self.sends.time_of((frame + 1) * self.frame)
            if played is None or times is None or sent is None:
                continue
            capture = self.port.capture_time(frame * self.frame)
            self.records.append(
                RoundtripRecord(self.name, frame, capture, sent, *times, arrival, played)
            )
        self._pending = keep


async def _leave(client: RoundtripClient, receiver: asyncio.Task[None]) -> None:
    session = client.session
    assert session is not None
    try:
        await session.send_json({"type": "end"})
        await asyncio.wait_for(receiver, timeout=3.0)
    except (TimeoutError, ClientError):
        receiver.cancel()
    client._resolve()
    client.end = session.end_message or {}
    await session.close()


async def run_roundtrip(
    model: CodecModel, sources: list[F32], config: SimConfig
) -> list[RoundtripClient]:
    """Run `config.clients` concurrent /v1/roundtrip clients; return them."""
    clients = [RoundtripClient(i, model, sources[i], config) for i in range(config.clients)]
    for client in clients:
        await client.connect()
    block_s = config.block_ms / 1000.0
    start = time.perf_counter() + 0.1
    runs = [client.run(start + block_s * i / config.clients) for i, client in enumerate(clients)]
    await asyncio.gather(*runs)
    return clients
