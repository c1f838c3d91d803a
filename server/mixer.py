"""Engine-side jobs of the voice-call rooms: the room mixer and PCM senders.

`RoomMixer` (one per room, periodic): for every sender of the room a `JitterBuffer` and a
`DecoderStream` (model rate, float32), for every participant that receives PCM an
`OutputFramer` (its rate and format).  Once per frame period (20 ms) it pops one playout item
per sender (frame, concealment, comfort noise, or silence before the first packet), decodes
them all in the worker's batched decoder step, then sends each PCM receiver the sum of every
*other* sender's frame, clipped to [-1, 1], as one message (`MixOut`).  It works only while
at least one participant receives PCM; without any it ignores packets.

A sender quiet for more than `_QUIET_TICKS` ticks (1 s) is played as silence instead of
decoding comfort noise forever.

`RoomSenderJob` encodes a `send: "pcm"` participant's PCM like an encode session (binary
packets, stream id = participant id, handed to the loop for forwarding) and puts each frame
into the room mixer directly (both live on the worker thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from server.engine_worker import Job, Sink
from server.jobs import StreamJob, TokenOutput
from streaming.framing import OutputFramer, SampleFormat
from streaming.jitter import JitterBuffer, JitterConfig, PlayoutKind
from streaming.model import BitrateMode, CodecModel
from streaming.protocol import TokenFrame, TokenPacket
from streaming.stream import DecoderStream, EncoderStream

__all__ = ["MixJoin", "MixLeave", "MixOut", "MixPacket", "RoomMixer", "RoomSenderJob"]

_QUIET_TICKS: Final = 50


@dataclass(frozen=True, slots=True)
class MixJoin:
    """Participant `pid` receives PCM at `rate` Hz in `fmt`."""

    pid: int
    rate: int
    fmt: SampleFormat


@dataclass(frozen=True, slots=True)
class MixLeave:
    """Participant `pid` left (as sender and receiver)."""

    pid: int


@dataclass(frozen=True, slots=True)
class MixPacket:
    """A token packet from participant `pid` (a `send: "tokens"` participant)."""

    pid: int
    packet: TokenPacket


@dataclass(frozen=True, slots=True)
class MixOut:
    """One frame of mixed PCM for participant `pid` (bytes in its format)."""

    pid: int
    data: bytes


class _Track:
    """One sender as heard by the mixer."""

    __slots__ = ("decoder", "jitter", "quiet")

    def __init__(self, model: CodecModel, config: JitterConfig) -> None:
        self.jitter = JitterBuffer(config)
        self.decoder = DecoderStream(
            model, fmt=SampleFormat.F32LE, max_pending_frames=2, max_buffered_ms=100.0
        )
        self.quiet = 0


class RoomMixer(Job):
    """Jitter buffers, decoders and the mix of one room (see the module docstring)."""

    endpoint = "room"
    periodic = True

    def __init__(self, model: CodecModel, sink: Sink) -> None:
        super().__init__(sink)
        card = model.card
        self.model = model
        self.card = card
        self.config = JitterConfig(frame_ms=card.frame_ms, gain_step_db=card.gain.step_db)
        self.tracks: dict[int, _Track] = {}
        self.listeners: dict[int, OutputFramer] = {}
        self._decoders: list[DecoderStream] = []

    def on_input(self, item: object, now: float) -> None:
        if isinstance(item, MixPacket):
            packet = item.packet
            self.insert(item.pid, packet.seq, packet.timestamp_us, packet.frame, now)
        elif isinstance(item, MixJoin):
            card = self.card
            self.listeners[item.pid] = OutputFramer(
                item.rate,
                model_rate=card.sample_rate,
                frame_size=card.frame_size,
                fmt=item.fmt,
                max_buffered_ms=100.0,
            )
        elif isinstance(item, MixLeave):
            self.listeners.pop(item.pid, None)
            self.tracks.pop(item.pid, None)
            if not self.listeners:
                self.tracks.clear()
            self._decoders = [t.decoder for t in self.tracks.values()]

    def insert(self, pid: int, seq: int, timestamp_us: int, frame: TokenFrame, now: float) -> None:
        """A frame of sender `pid` arrived at `now` (s); ignored while nobody receives PCM."""
        if not self.listeners:
            return
        track = self.tracks.get(pid)
        if track is None:
            track = self.tracks[pid] = _Track(self.model, self.config)
            self._decoders = [t.decoder for t in self.tracks.values()]
        track.jitter.insert(seq, frame, now, timestamp_us=timestamp_us)

    def decoders(self) -> list[DecoderStream]:
        return self._decoders

    def on_period(self, now: float) -> None:
        if not self.listeners:
            return
        for track in self.tracks.values():
            item = track.jitter.pop()
            track.quiet = 0 if item.kind is PlayoutKind.FRAME else track.quiet + 1
            if item.frame is not None and track.quiet <= _QUIET_TICKS:
                track.decoder.push(item.frame, now)
            else:
                track.decoder.push_silence(now)

    def after_step(self, period: bool) -> None:
        if not period or not self.listeners:
            return
        n = self.card.frame_size
        frames: dict[int, npt.NDArray[np.float32]] = {
            pid: np.asarray(track.decoder.pull(n, pad=True), dtype=np.float32)
            for pid, track in self.tracks.items()
        }
        total = np.zeros(n, dtype=np.float32)
        for pcm in frames.values():
            total += pcm
        for pid, framer in self.listeners.items():
            own = frames.get(pid)
            mix = total - own if own is not None else total.copy()
            np.clip(mix, -1.0, 1.0, out=mix)
            framer.write(mix)
            self.emit(MixOut(pid, framer.read_bytes()))


class RoomSenderJob(StreamJob):
    """Encodes a PCM sender of a room; frames go to the loop (forwarding) and the mixer."""

    def __init__(
        self,
        model: CodecModel,
        sink: Sink,
        mixer: RoomMixer,
        *,
        pid: int,
        rate: int,
        fmt: SampleFormat,
        mode: BitrateMode,
        timestamps: bool,
        rate_cap: bool = False,
    ) -> None:
        super().__init__(
            model,
            sink,
            endpoint="room",
            encode=True,
            decode=False,
            rate=rate,
            fmt=fmt,
            mode=mode,
            rate_cap=rate_cap,
            tokens=TokenOutput.BINARY,
            stream_id=pid,
            timestamps=timestamps,
        )
        self.mixer = mixer
        self.pid = pid
        self._frame_us = round(self.card.frame_ms * 1000)

    def on_encoded(self, stream: EncoderStream, frame: TokenFrame) -> None:
        super().on_encoded(stream, frame)
        record = stream.last_latency
        assert record is not None
        index = stream.frames_encoded - 1
        self.mixer.insert(
            self.pid, index & 0xFFFF, (index * self._frame_us) & 0xFFFFFFFF, frame, record.end
        )
