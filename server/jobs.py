"""Engine-side jobs of the stream endpoints: encode, decode, roundtrip, HTTP file jobs.

A `StreamJob` owns an `EncoderStream` and/or a `DecoderStream` and a FIFO of inputs in the
order the client sent them: PCM chunks, token frames and control markers (`SetMode`,
`FlushMark`, `EndMark`).  `feed` moves input into the streams only as far as the next frame
needs (PCM in slices of one frame), so a burst waits in the FIFO, control messages apply
exactly between the media sent before and after them, and the stream buffers never overflow.

Outputs (`server.engine_worker.Out`, see there) per frame:

* encode: one token packet (binary, or JSON text) with `frames=1`;
* decode: the PCM of the frame (`frames=1`);
* roundtrip: the JSON packet if `return_tokens` (`frames=0`), then the PCM (`frames=1`);
* HTTP jobs: `TokenFrame`s (encode) or PCM bytes (decode), then `Done`.

Markers produce `bitrate`, `flushed` and `end` messages (docs/protocol.md).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeAlias

import numpy as np
import numpy.typing as npt

from server.engine_worker import Job, Out, Sink
from server.messages import clock_us, mode_fields, to_text
from streaming.framing import SampleFormat
from streaming.model import BitrateMode, CodecModel, ModelCard
from streaming.protocol import (
    PACKET_HEADER_SIZE,
    PacketTimes,
    TokenFrame,
    TokenPacket,
    encode_packet,
    packet_to_json,
)
from streaming.stream import DecoderStream, EncoderStream, decoder_delay_ms, encoder_delay_ms

__all__ = [
    "SERVER_SEND_OFFSET",
    "Done",
    "EndMark",
    "FlushMark",
    "PcmChunk",
    "SetMode",
    "StreamJob",
    "StreamJobSpec",
    "TokenOutput",
]

SERVER_SEND_OFFSET: Final = PACKET_HEADER_SIZE + 8
"""Byte offset of `server_send_us` in a packet with a times block."""

PcmChunk: TypeAlias = bytes | npt.NDArray[np.float32]
"""PCM input: bytes in the session format, or a float32 array (HTTP jobs)."""


@dataclass(frozen=True, slots=True)
class SetMode:
    """Encode with `mode` (codebooks and low-band layout) from the frame completed by the next
    PCM on."""

    mode: BitrateMode


@dataclass(frozen=True, slots=True)
class FlushMark:
    """Flush here (pad, process, reply `flushed`)."""


@dataclass(frozen=True, slots=True)
class EndMark:
    """End here (flush, reply `end`, close)."""


@dataclass(frozen=True, slots=True)
class Done:
    """End of an HTTP job: frames produced and late."""

    frames: int
    late_frames: int


class TokenOutput(Enum):
    """How a job hands encoded frames out."""

    BINARY = "binary"
    """Binary token packets (`Out` bytes)."""
    JSON = "json"
    """`{"type": "packet", "packet": {...}}` text."""
    FRAMES = "frames"
    """`TokenFrame` objects (HTTP jobs)."""
    NONE = "none"
    """Not handed out (roundtrip without return_tokens)."""


@dataclass(frozen=True, slots=True)
class StreamJobSpec:
    """Everything a `StreamJob` is built from but the model and the sink (picklable: an engine
    process builds the job from it, server.engine_process).  Fields as in `StreamJob`."""

    endpoint: str
    encode: bool
    decode: bool
    rate: int
    fmt: SampleFormat
    tokens: TokenOutput
    mode: BitrateMode | None = None
    rate_cap: bool = False
    stream_id: int = 0
    timestamps: bool = False

    def build(self, model: CodecModel, sink: Sink) -> StreamJob:
        """The job, with its streams."""
        return StreamJob(
            model,
            sink,
            endpoint=self.endpoint,
            encode=self.encode,
            decode=self.decode,
            rate=self.rate,
            fmt=self.fmt,
            mode=self.mode,
            rate_cap=self.rate_cap,
            tokens=self.tokens,
            stream_id=self.stream_id,
            timestamps=self.timestamps,
        )

    def algorithmic_latency_ms(self, card: ModelCard) -> float:
        """Delay the job's streams add by construction, ms (the streams' own definitions,
        `streaming.stream.encoder_delay_ms` / `decoder_delay_ms`), without building them."""
        total = 0.0
        if self.encode:
            total += encoder_delay_ms(card, self.rate)
        if self.decode:
            total += decoder_delay_ms(card, self.rate)
        return round(total, 4)


class _Drain:
    """Internal marker: a flush whose padded frames are being processed."""

    __slots__ = ("end",)

    def __init__(self, end: bool) -> None:
        self.end = end


_Item: TypeAlias = PcmChunk | TokenFrame | SetMode | FlushMark | EndMark | _Drain


class StreamJob(Job):
    """One encode / decode / roundtrip session, or one HTTP file job.

    * `encode`, `decode`: which streams exist (roundtrip: both, the encoder's frames go
      straight into the decoder);
    * `rate`, `fmt`: client PCM (input of the encoder, output of the decoder);
    * `mode`: bitrate mode of encoded frames (codebooks kept, low-band layout); None: all Q
      codebooks without low band (jobs that only decode); `rate_cap`: hold the encoded
      frames to the mode's rate (`EncoderStream(rate_cap=True)`);
    * `tokens`: how encoded frames are handed out; `stream_id`, `timestamps`: packet fields;
    * `http`: end with `Done` instead of an `end` message.
    """

    def __init__(
        self,
        model: CodecModel,
        sink: Sink,
        *,
        endpoint: str,
        encode: bool,
        decode: bool,
        rate: int,
        fmt: SampleFormat,
        mode: BitrateMode | None = None,
        rate_cap: bool = False,
        tokens: TokenOutput,
        stream_id: int = 0,
        timestamps: bool = False,
        http: bool = False,
    ) -> None:
        super().__init__(sink)
        card = model.card
        self.card = card
        self.endpoint = endpoint
        self.tokens = tokens
        self.stream_id = stream_id
        self.timestamps = timestamps
        self.http = http
        self.encoder = (
            EncoderStream(
                model,
                rate=rate,
                fmt=fmt,
                num_codebooks=None if mode is None else mode.num_codebooks,
                lowband_layout=0 if mode is None else mode.lowband_layout,
                max_buffered_ms=4 * card.frame_ms,
                rate_cap=rate_cap,
            )
            if encode
            else None
        )
        self.decoder = (
            DecoderStream(
                model,
                rate=rate,
                fmt=fmt,
                max_pending_frames=4,
                max_buffered_ms=max(200.0, 4 * card.frame_ms),
            )
            if decode
            else None
        )
        self._encoders: tuple[EncoderStream, ...] = (self.encoder,) if self.encoder else ()
        self._decoders: tuple[DecoderStream, ...] = (self.decoder,) if self.decoder else ()
        samples = math.ceil(card.frame_size * rate / card.sample_rate)
        self._slice_samples = samples
        self._slice_bytes = samples * fmt.sample_bytes
        self._queue: deque[tuple[_Item, float]] = deque()
        self._offset = 0  # samples (arrays) or bytes (bytes) consumed of the head PCM chunk
        self._enc_ready: deque[float] = deque()  # roundtrip: ready time of frames in decoding
        self.frames_out = 0

    # ---- hooks ----------------------------------------------------------------------------

    def encoders(self) -> Sequence[EncoderStream]:
        return self._encoders

    def decoders(self) -> Sequence[DecoderStream]:
        return self._decoders

    def on_input(self, item: object, now: float) -> None:
        """Queue a PCM chunk, a `TokenFrame` (or a list of them) or a marker, in order."""
        if isinstance(item, list):
            self._queue.extend((x, now) for x in item)
        else:
            self._queue.append((item, now))  # type: ignore[arg-type]

    def wants_tick(self) -> bool:
        """Frames pending, or a flush waiting for the next tick to finish."""
        queue = self._queue
        return self._busy() or (bool(queue) and isinstance(queue[0][0], _Drain))

    def after_step(self, period: bool) -> None:
        self.feed()

    def feed(self) -> None:
        """Apply queued inputs in order until the next frame is due (or the queue is empty)."""
        queue = self._queue
        while queue and not self.finished:
            item, now = queue[0]
            if not self._apply(item, now):
                return
            queue.popleft()
            self._offset = 0

    def _apply(self, item: _Item, now: float) -> bool:
        """Apply one input; False when it must wait for pending frames (stays queued)."""
        if isinstance(item, TokenFrame):
            return self._push_frame(item, now)
        if isinstance(item, (bytes, np.ndarray)):
            return self._push_pcm(item, now)
        if self._busy():
            return False
        if isinstance(item, SetMode):
            self._set_mode(item.mode)
        elif isinstance(item, (FlushMark, EndMark)):
            if self.encoder is not None:
                self.encoder.flush(now)
            self._queue[0] = (_Drain(isinstance(item, EndMark)), now)
            return False
        elif isinstance(item, _Drain):
            self._finish_flush(item.end)
        return True

    def _busy(self) -> bool:
        """A stream has a frame waiting for the next step."""
        return any(s.pending_frames for s in self._encoders) or any(
            s.pending_frames for s in self._decoders
        )

    # ---- inputs ---------------------------------------------------------------------------

    def _push_pcm(self, chunk: PcmChunk, now: float) -> bool:
        encoder = self.encoder
        if encoder is None:
            return True
        is_bytes = isinstance(chunk, bytes)
        size = len(chunk)
        step = self._slice_bytes if is_bytes else self._slice_samples
        while self._offset < size:
            if encoder.pending_frames:
                return False
            end = min(self._offset + step, size)
            encoder.push(chunk[self._offset : end], now)
            self._offset = end
        return True

    def _push_frame(self, frame: TokenFrame, now: float) -> bool:
        decoder = self.decoder
        if decoder is None:
            return True
        if decoder.pending_frames:
            return False
        decoder.push(frame, now)
        return True

    def _set_mode(self, mode: BitrateMode) -> None:
        encoder = self.encoder
        if encoder is None:
            return
        encoder.set_mode(mode)
        if not self.http:
            reply = {"type": "bitrate", **mode_fields(mode), "from_frame": encoder.frames_encoded}
            self.emit(Out(to_text(reply), reply=True))

    def _finish_flush(self, end: bool) -> None:
        decoder = self.decoder
        if decoder is not None:
            decoder.flush()
            tail = decoder.pull_bytes()
            if tail:
                self.emit(Out(tail))
        if self.http:
            if end:
                self.emit(Done(self.frames_out, self.late_frames))
                self.finished = True
            return
        if end:
            self.emit(
                Out(
                    to_text(
                        {
                            "type": "end",
                            "frames": self.frames_out,
                            "late_frames": self.late_frames,
                            "dropped_frames": 0,
                        }
                    ),
                    close=True,
                )
            )
            self.finished = True
        else:
            self.emit(Out(to_text({"type": "flushed", "frames": self.frames_out}), reply=True))

    # ---- outputs --------------------------------------------------------------------------

    def on_encoded(self, stream: EncoderStream, frame: TokenFrame) -> None:
        record = stream.last_latency
        assert record is not None
        index = stream.frames_encoded - 1
        decoder = self.decoder
        if decoder is None:
            self.frames_out += 1
            self.check_late(record.ready, record.end)
        else:
            decoder.push(frame, record.end)
            self._enc_ready.append(record.ready)
        self._emit_tokens(frame, index, record.ready, counts=decoder is None)

    def _emit_tokens(self, frame: TokenFrame, index: int, ready: float, *, counts: bool) -> None:
        form = self.tokens
        done = 1 if counts else 0
        if form is TokenOutput.FRAMES:
            self.emit(frame)
            return
        if form is TokenOutput.NONE:
            return
        packet = self._packet(frame, index, ready)
        if form is TokenOutput.BINARY:
            data = encode_packet(
                packet, code_bits=self.card.code_bits, gain_bits=self.card.gain.bits
            )
            self.emit(Out(data, frames=done, stamp=SERVER_SEND_OFFSET if self.timestamps else -1))
        else:
            self.emit(
                Out(to_text({"type": "packet", "packet": packet_to_json(packet)}), frames=done)
            )

    def _packet(self, frame: TokenFrame, index: int, ready: float) -> TokenPacket:
        times = None
        if self.timestamps:
            # binary packets get server_send_us stamped at send time; JSON ones now
            send = clock_us(time.perf_counter()) if self.tokens is TokenOutput.JSON else 0
            times = PacketTimes(0, clock_us(ready), send)
        frame_us = round(self.card.frame_ms * 1000)
        return TokenPacket(
            self.stream_id, index & 0xFFFF, (index * frame_us) & 0xFFFFFFFF, frame, times
        )

    def on_decoded(self, stream: DecoderStream) -> None:
        record = stream.last_latency
        self.frames_out += 1
        if record is not None:
            ready = self._enc_ready.popleft() if self._enc_ready else record.ready
            self.check_late(ready, record.end)
        self.emit(Out(stream.pull_bytes(), frames=1))
