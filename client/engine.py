"""The call engine: microphone PCM -> token packets, token packets -> mixed speaker PCM.

Transport-agnostic and audio-agnostic: `CaptureSide` reads an `AudioPort`'s capture FIFO,
encodes with an `EncoderStream` and hands `TokenPacket`s to a `send` callable;
`PlayoutSide` takes received packet bytes (`receive`, thread-safe), keeps one
`JitterBuffer` + `DecoderStream` per sender, and on each playout tick (`fill`) pops every
sender's jitter buffer once, decodes, mixes and queues one frame for playback.

Playout is clocked by the consumer of the playback FIFO: `fill` runs ticks until
`target_ms` of audio is queued, so the jitter buffers tick at the rate the device (or the
simulated speaker) plays, with no drift between the two.

Both sides can record per-frame timing (`SendRecord`, `PlayRecord`) for the profiler.
Times are seconds on `clock` (time.perf_counter); packet timestamps are its microseconds
modulo 2**32.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from client.audio import AudioPort
from client.trace import PlayRecord, SendRecord, clock_us
from streaming.framing import OutputFramer, SampleFormat
from streaming.jitter import JitterBuffer, JitterConfig, JitterStats, PlayoutKind
from streaming.latency import LatencyStats
from streaming.model import BitrateMode, CodecModel
from streaming.protocol import ProtocolError, TokenPacket, decode_packet
from streaming.stream import DecoderStream, EncoderStream

__all__ = ["CaptureSide", "PlayoutSide", "PlayoutTotals"]

F32: TypeAlias = npt.NDArray[np.float32]
Clock: TypeAlias = Callable[[], float]
SendFn: TypeAlias = Callable[[TokenPacket], None]

SILENCE_DB = -120.0


class CaptureSide:
    """Captured PCM -> `TokenPacket`s (one per 20 ms frame) handed to `send`.

    * `stream_id`: u32 put in every packet; seq starts at 0 and counts sent packets.
    * `mode`: the bitrate mode (codebooks and low-band layout per frame); or `num_codebooks`:
      that many codebooks without low band (default: all Q).
    * `muted`: frames are still encoded (the encoder state stays current) but not sent.
    * `record`: keep a `SendRecord` per frame in `records` (for profiling).
    * `stats`: a `LatencyStats` the encoder adds every frame to.
    * `rate_cap`: hold the payload to the mode's rate (`EncoderStream(rate_cap=True)`).
    `level_db` is the peak level of the last captured chunk, dBFS.
    """

    def __init__(
        self,
        model: CodecModel,
        port: AudioPort,
        send: SendFn,
        *,
        stream_id: int = 0,
        num_codebooks: int | None = None,
        mode: BitrateMode | None = None,
        clock: Clock = time.perf_counter,
        record: bool = False,
        stats: LatencyStats | None = None,
        rate_cap: bool = False,
    ) -> None:
        card = model.card
        self.port = port
        self.send = send
        self.stream_id = stream_id
        self.clock = clock
        self.encoder = EncoderStream(
            model,
            rate=port.rate,
            fmt=SampleFormat.F32LE,
            num_codebooks=num_codebooks,
            clock=clock,
            stats=stats,
            rate_cap=rate_cap,
        )
        if mode is not None:
            self.encoder.set_mode(mode)
        self._chunk: F32 = np.zeros(max(port.rate // 10, 1), dtype=np.float32)  # 100 ms
        self._per_frame = card.frame_size * port.rate / card.sample_rate  # device samples
        self._position = 0  # device samples read so far
        self.seq = 0
        self.muted = False
        self.frames_encoded = 0
        self.packets_sent = 0
        self.level_db = SILENCE_DB
        self.record = record
        self.records: list[SendRecord] = []

    def process(self) -> int:
        """Encode every whole frame captured so far and send it; return packets sent."""
        sent = 0
        while self.port.capture_available:
            n, first_time = self.port.read_capture(self._chunk)
            if n == 0:
                break
            chunk = self._chunk[:n]
            peak = float(np.max(np.abs(chunk)))
            self.level_db = 20.0 * math.log10(peak) if peak > 1e-6 else SILENCE_DB
            first = self._position
            self._position += n
            self.encoder.push(chunk, self.clock())
            while (frame := self.encoder.step()) is not None:
                k = self.encoder.frames_encoded - 1
                capture = first_time + (k * self._per_frame - first) / self.port.rate
                packet = TokenPacket(self.stream_id, self.seq, clock_us(capture), frame)
                if self.record and not self.muted:
                    self._keep_record(packet.seq, capture)
                sent += self._emit(packet)
        return sent

    def _keep_record(self, seq: int, capture: float) -> None:
        lat = self.encoder.last_latency
        if lat is not None:
            self.records.append(
                SendRecord(self.stream_id, seq, capture, lat.ready, lat.start, lat.end)
            )

    def _emit(self, packet: TokenPacket) -> int:
        self.frames_encoded += 1
        if self.muted:
            return 0
        self.send(packet)
        self.seq = (self.seq + 1) & 0xFFFF
        self.packets_sent += 1
        return 1


@dataclass
class _Sender:
    """Receive state of one remote stream; `packets` keeps the last packet of each jitter
    slot (seq modulo the capacity) for the timing records."""

    jitter: JitterBuffer
    decoder: DecoderStream
    packets: list[TokenPacket | None]
    idle_ticks: int = 0


@dataclass
class PlayoutTotals:
    """Receive counters summed over all senders, past and present."""

    senders: int = 0
    received: int = 0
    bad: int = 0
    played: int = 0
    late: int = 0
    lost: int = 0
    concealed: int = 0
    comfort_noise: int = 0
    dropped: int = 0
    ticks: int = 0
    per_sender: dict[int, JitterStats] = field(default_factory=dict)

    def add(self, stats: JitterStats) -> None:
        """Add one sender's final counters."""
        self.received += stats.received
        self.played += stats.played
        self.late += stats.late
        self.lost += stats.lost
        self.concealed += stats.concealed
        self.comfort_noise += stats.comfort_noise
        self.dropped += stats.dropped


@dataclass
class _Pending:
    packet: TokenPacket
    arrival: float
    popped: float
    decoded: float
    position: int


class PlayoutSide:
    """Received token packets -> jitter buffers -> decoders -> mix -> playback FIFO.

    * `target_ms`: playback FIFO level kept by `fill` (device buffering on top of the
      jitter buffer), ms.
    * `ignore_stream`: a stream id never played (our own, if the server echoes it).
    * `idle_timeout_s`: a sender silent this long (no real frame) is forgotten.
    * `record`: keep a `PlayRecord` per played real frame in `records`.
    * `stats`: a `LatencyStats` every decoder adds its frames to.

    `receive`, `forget` and `stats` may be called from any thread; `fill` from one playout
    thread.  The playout thread changes the set of senders (a new stream's first packet, a
    `left` event, an idle timeout) under `_lock`, and `stats` reads it under the same lock, so
    a status line on another thread never sees the dict change size mid-iteration.  The
    per-tick work takes no lock: only adding or removing a sender does.
    """

    def __init__(
        self,
        model: CodecModel,
        port: AudioPort,
        *,
        name: str = "",
        target_ms: float = 40.0,
        jitter: JitterConfig | None = None,
        ignore_stream: int | None = None,
        idle_timeout_s: float = 3.0,
        clock: Clock = time.perf_counter,
        record: bool = False,
        stats: LatencyStats | None = None,
    ) -> None:
        card = model.card
        self.model = model
        self.decode_stats = stats
        self.card = card
        self.port = port
        self.name = name
        self.clock = clock
        self.jitter_config = jitter or JitterConfig(
            frame_ms=card.frame_ms, gain_step_db=card.gain.step_db
        )
        self.ignore_stream = ignore_stream
        self._idle_limit = max(1, round(idle_timeout_s * 1000.0 / card.frame_ms))
        self.inbox: queue.SimpleQueue[tuple[bytes, float]] = queue.SimpleQueue()
        self._leaving: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.senders: dict[int, _Sender] = {}
        """Current senders; changed (on the playout thread) only while holding `_lock`."""
        self.totals = PlayoutTotals()
        self._lock = threading.Lock()
        self._gone: list[int] = []  # senders idle too long, reused by every tick
        self._target = int(target_ms * port.rate / 1000.0)
        self._mix: F32 = np.zeros(card.frame_size, dtype=np.float32)
        self._frame: F32 = np.zeros(card.frame_size, dtype=np.float32)
        self._out = OutputFramer(
            port.rate,
            model_rate=card.sample_rate,
            frame_size=card.frame_size,
            fmt=SampleFormat.F32LE,
            max_buffered_ms=100.0,
        )
        out_size = self._out.resampler.max_output(card.frame_size) + 8
        self._out_buf: F32 = np.zeros(out_size, dtype=np.float32)
        self.record = record
        self.records: list[PlayRecord] = []
        self._pending: list[_Pending] = []
        self.level_db = SILENCE_DB

    # ---- network side (any thread) --------------------------------------------------------

    def receive(self, data: bytes, now: float) -> None:
        """Queue one received packet (raw bytes) that arrived at `now` (s)."""
        self.inbox.put((data, now))

    def forget(self, stream_id: int) -> None:
        """Drop a sender (it left) at the next tick, after the packets it already sent."""
        self._leaving.put(stream_id)

    # ---- playout side (one thread) --------------------------------------------------------

    def fill(self, max_ticks: int = 10) -> int:
        """Take queued packets into the jitter buffers, then run playout ticks until the
        playback FIFO holds `target_ms` (at most `max_ticks`); return ticks run."""
        self._drain()
        ticks = 0
        while self.port.playback_queued < self._target and ticks < max_ticks:
            self._tick()
            ticks += 1
        self._resolve()
        return ticks

    def _drain(self) -> None:
        """Received packets into the jitter buffers, then forget senders that left (their
        `left` event came after their last packet on the same connection)."""
        self._take_packets()
        while not self._leaving.empty():
            self._remove_sender(self._leaving.get_nowait())

    def _take_packets(self) -> None:
        card = self.card
        while True:
            try:
                data, now = self.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                packet = decode_packet(
                    data,
                    code_bits=card.code_bits,
                    gain_bits=card.gain.bits,
                    max_codebooks=card.num_codebooks,
                )
            except ProtocolError:
                self.totals.bad += 1
                continue
            if packet.stream_id == self.ignore_stream:
                continue
            sender = self.senders.get(packet.stream_id) or self._add_sender(packet.stream_id)
            sender.jitter.push(packet, now)
            if self.record:
                sender.packets[packet.seq % len(sender.packets)] = packet

    def _add_sender(self, stream_id: int) -> _Sender:
        sender = _Sender(
            JitterBuffer(self.jitter_config),
            DecoderStream(
                self.model,
                rate=self.card.sample_rate,
                fmt=SampleFormat.F32LE,
                clock=self.clock,
                stats=self.decode_stats,
            ),
            [None] * self.jitter_config.capacity,
        )
        with self._lock:
            self.senders[stream_id] = sender
            self.totals.senders += 1
        return sender

    def _remove_sender(self, stream_id: int) -> None:
        """Forget a sender, adding its final counters to the totals (one step for `stats`)."""
        with self._lock:
            gone = self.senders.pop(stream_id, None)
            if gone is not None:
                self.totals.add(gone.jitter.stats())

    def _tick(self) -> None:
        mix = self._mix
        mix.fill(0.0)
        position = self.port.playback_written
        popped = self.clock()
        gone = self._gone
        for stream_id, sender in self.senders.items():
            item = sender.jitter.pop()
            if item.frame is None:
                sender.idle_ticks += 1
            else:
                sender.decoder.push(item.frame, popped)
                sender.decoder.run()
                sender.decoder.pull_into(self._frame, pad=True)
                mix += self._frame
                if item.kind is PlayoutKind.FRAME:
                    sender.idle_ticks = 0
                    self._note(sender, item.seq, item.arrival, popped, position)
                else:
                    sender.idle_ticks += 1
            if sender.idle_ticks > self._idle_limit:
                gone.append(stream_id)
        if gone:
            for stream_id in gone:
                self._remove_sender(stream_id)
            gone.clear()
        np.clip(mix, -1.0, 1.0, out=mix)
        peak = float(np.max(np.abs(mix)))
        self.level_db = 20.0 * math.log10(peak) if peak > 1e-6 else SILENCE_DB
        self._out.write(mix)
        n = self._out.read_into(self._out_buf)
        self.port.write_playback(self._out_buf[:n])
        self.totals.ticks += 1

    def _note(
        self, sender: _Sender, seq: int | None, arrival: float | None, popped: float, position: int
    ) -> None:
        """Remember a played real frame until its playout time is known."""
        if not self.record or seq is None or arrival is None:
            return
        packet = sender.packets[seq % len(sender.packets)]
        if packet is None or packet.seq != seq:
            return
        self._pending.append(_Pending(packet, arrival, popped, self.clock(), position))

    def _resolve(self) -> None:
        """Turn pending frames whose first sample has been played into `PlayRecord`s."""
        if not self._pending:
            return
        consumed = self.port.playback_written - self.port.playback_queued
        keep: list[_Pending] = []
        for p in self._pending:
            played = self.port.played_time(p.position) if p.position < consumed else None
            if played is None:
                keep.append(p)
                continue
            times = p.packet.times
            self.records.append(
                PlayRecord(
                    receiver=self.name,
                    stream_id=p.packet.stream_id,
                    seq=p.packet.seq,
                    capture_us=p.packet.timestamp_us,
                    client_send_us=times.client_send_us if times else 0,
                    server_recv_us=times.server_recv_us if times else 0,
                    server_send_us=times.server_send_us if times else 0,
                    arrival=p.arrival,
                    popped=p.popped,
                    decoded=p.decoded,
                    played=played,
                )
            )
        self._pending = keep

    def stats(self) -> PlayoutTotals:
        """Counters of every sender, past and present (safe from any thread: see the class
        doc)."""
        with self._lock:
            totals = replace(self.totals, per_sender={})
            for stream_id, sender in self.senders.items():
                stats = sender.jitter.stats()
                totals.add(stats)
                totals.per_sender[stream_id] = stats
        return totals
