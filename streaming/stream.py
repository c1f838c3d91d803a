"""Encoder and decoder streams: one client's audio <-> token frames, with explicit state.

`EncoderStream`: push client PCM (any chunk size, 8/16/24/48 kHz, int16 or float32), pull
`TokenFrame`s, one per model frame (N samples at the model rate, 20 ms on the default card).
The bitrate mode (codebooks kept and low-band layout) can change on any frame
(`set_num_codebooks`, `set_lowband_layout`, `set_mode`, `set_bitrate`); it applies to the frames
encoded after the call.

`DecoderStream`: push `TokenFrame`s (or frames of silence), decode them, pull PCM at the
client's rate and format (`pull(n, pad=True)` for a playout that needs exactly n samples).

A stream can run alone (encoder `step()` / `pull()`, decoder `step()` / `run()`: one ONNX
call of batch 1 per frame) or be stepped by a `streaming.batch.BatchEngine` together with
other streams (one ONNX call for all); both give identical results, and a stream may switch
between the two at any frame.  All of a stream's memory is allocated at construction:
the ONNX state (`EncoderState` / `DecoderState`, double-buffered), the framer (resampler
history + ring buffer), the step's I/O arrays and small fixed queues; `reset()` returns the
stream to its freshly constructed state.  Time comes from the `clock` callable (seconds,
default `time.perf_counter`) or explicit `now` arguments.

Delays (see `algorithmic_delay_ms`): an encoder adds one frame + its input resampling delay,
a decoder the card's output delay + its output resampling delay.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from streaming.framing import (
    InputFramer,
    OutputFramer,
    PcmInput,
    SampleFormat,
    resampling_delay_ms,
)
from streaming.latency import FrameLatency, LatencyStats
from streaming.lowband import LAYOUTS, LOWBAND_LAYOUT_NONE, clear_into, dequantize_into, quantize
from streaming.model import (
    BitrateMode,
    CodecModel,
    DecoderState,
    EncoderState,
    GraphState,
    ModelCard,
    PreparedStep,
)
from streaming.protocol import TokenFrame, frame_bits
from streaming.ratecap import BitBudget, fallbacks

__all__ = [
    "Clock",
    "DecoderStream",
    "EncoderStream",
    "StreamOverflowError",
    "decoder_delay_ms",
    "encoder_delay_ms",
]

F32: TypeAlias = npt.NDArray[np.float32]
F64: TypeAlias = npt.NDArray[np.float64]
I64: TypeAlias = npt.NDArray[np.int64]
Clock: TypeAlias = Callable[[], float]
"""A monotonic clock in seconds (time.perf_counter, or a fake one in tests)."""


def encoder_delay_ms(card: ModelCard, rate: int | None = None) -> float:
    """Algorithmic delay of an `EncoderStream` fed PCM at `rate` Hz (None: the model's), ms:
    one frame + the input resampler's delay."""
    return card.frame_ms + resampling_delay_ms(_rate_or_model(card, rate), card.sample_rate)


def decoder_delay_ms(card: ModelCard, rate: int | None = None) -> float:
    """Algorithmic delay of a `DecoderStream` giving PCM at `rate` Hz (None: the model's), ms:
    the card's output delay (synthesis overlap) + the output resampler's delay."""
    return card.output_delay_ms + resampling_delay_ms(card.sample_rate, _rate_or_model(card, rate))


class StreamOverflowError(RuntimeError):
    """Raised by `DecoderStream.push(..., strict=True)` when its frame queue is full."""


def _both_ways(
    state: GraphState, prepare: Callable[[tuple[F32, ...], tuple[F32, ...]], PreparedStep]
) -> tuple[PreparedStep, PreparedStep]:
    """The two unbatched steps of a double-buffered state, indexed by `state.parity`:
    (first buffer set -> second, second -> first)."""
    first, second = (state.spare, state.arrays) if state.parity else (state.arrays, state.spare)
    return prepare(first, second), prepare(second, first)


class _TimeQueue:
    """Fixed FIFO of float timestamps (s); pushing onto a full queue drops the oldest."""

    __slots__ = ("_buf", "_count", "_head")

    def __init__(self, capacity: int) -> None:
        self._buf: F64 = np.zeros(max(1, capacity), dtype=np.float64)
        self._head = 0
        self._count = 0

    def push(self, value: float, repeat: int = 1) -> None:
        cap = self._buf.shape[0]
        for _ in range(repeat):
            if self._count == cap:
                self._head = (self._head + 1) % cap
                self._count -= 1
            self._buf[(self._head + self._count) % cap] = value
            self._count += 1

    def pop(self, default: float) -> float:
        if not self._count:
            return default
        value = float(self._buf[self._head])
        self._head = (self._head + 1) % self._buf.shape[0]
        self._count -= 1
        return value

    def clear(self) -> None:
        self._head = 0
        self._count = 0

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes)


def _rate_or_model(card: ModelCard, rate: int | None) -> int:
    return card.sample_rate if rate is None else rate


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


class EncoderStream:
    """Client PCM in, `TokenFrame`s out (one per model frame).

    * `rate`: client sample rate, Hz (default: the model's); `fmt`: format of bytes input.
    * `num_codebooks`: codebooks kept per frame, 1..Q (default Q); see `set_num_codebooks`.
    * `lowband_layout`: low-band layout sent with each frame (default 0, none); see
      `set_lowband_layout`.
    * `max_buffered_ms`: PCM that may wait for encoding (default 1000 ms); beyond it input is
      dropped and counted in `overflow_samples`.
    * `stats`: optional shared `LatencyStats` every encoded frame is added to.
    * `rate_cap`: hold the payload to the mode's nominal bitrate (`bitrate_kbps`), with
      bursts of at most 1 s of it: frames that would exceed it go with fewer codebooks, a
      narrower low band or none (`streaming.ratecap.BitBudget`, counted in
      `frames_trimmed`).  Off by default: every low band goes whole and the rate follows the
      signal (trimming loud frames costs quality; for links that cannot carry a burst).
    """

    def __init__(
        self,
        model: CodecModel,
        *,
        rate: int | None = None,
        fmt: SampleFormat = SampleFormat.S16LE,
        num_codebooks: int | None = None,
        lowband_layout: int = LOWBAND_LAYOUT_NONE,
        max_buffered_ms: float = 1000.0,
        clock: Clock = time.perf_counter,
        stats: LatencyStats | None = None,
        rate_cap: bool = False,
    ) -> None:
        card = model.card
        self.model = model
        self.card = card
        self.clock = clock
        self.stats = stats
        self.rate_cap = rate_cap
        self.framer = InputFramer(
            _rate_or_model(card, rate),
            model_rate=card.sample_rate,
            frame_size=card.frame_size,
            fmt=fmt,
            max_buffered_ms=max_buffered_ms,
        )
        self.state: EncoderState = model.new_encoder_state()
        self._initial_codebooks = self._valid_codebooks(
            card.num_codebooks if num_codebooks is None else num_codebooks
        )
        self.num_codebooks = self._initial_codebooks
        """Codebooks kept in the frames encoded from now on (1..Q)."""
        self._initial_layout = self._valid_layout(lowband_layout)
        self.lowband_layout = self._initial_layout
        """Low-band layout of the frames encoded from now on (0: none)."""
        self._budget = BitBudget(self.bitrate_kbps, card.frame_ms)
        self._codes_only_bits = tuple(  # payload bits of a frame of n codebooks, no low band
            frame_bits(n, code_bits=card.code_bits, gain_bits=card.gain.bits) if n else 0
            for n in range(card.num_codebooks + 1)
        )
        self._fallbacks = {i: fallbacks(i, card.lowband_layouts) for i in card.lowband_layouts}
        self._pcm: F32 = np.zeros((1, card.frame_size), dtype=np.float32)
        self._count: I64 = np.ones(1, dtype=np.int64)
        self._codes: I64 = np.zeros((1, card.num_codebooks), dtype=np.int64)
        self._gain: I64 = np.zeros(1, dtype=np.int64)
        self._lowband: F32 = np.zeros((1, card.lowband_bins), dtype=np.float32)
        self._indices: I64 = np.zeros(card.lowband_bins, dtype=np.int64)
        self._scaled: F32 = np.zeros(card.lowband_bins, dtype=np.float32)  # quantiser scratch
        self._steps: tuple[PreparedStep, PreparedStep] | None = None  # built on first step()
        self._ready = _TimeQueue(self.framer.ring.capacity // card.frame_size + 1)
        self._algorithmic_ms = encoder_delay_ms(card, rate)
        self.frames_encoded = 0
        """Frames encoded since creation / reset."""
        self.last_latency: FrameLatency | None = None
        """Latency record of the last encoded frame."""
        self._mark = -1  # used by BatchEngine to detect a stream listed twice

    # ---- configuration --------------------------------------------------------------------

    @property
    def rate(self) -> int:
        """Client sample rate, Hz."""
        return self.framer.rate

    @property
    def fmt(self) -> SampleFormat:
        """Format of bytes input."""
        return self.framer.fmt

    def _valid_codebooks(self, n: int) -> int:
        q = self.card.num_codebooks
        if type(n) is not int or not 1 <= n <= q:
            raise ValueError(f"num_codebooks must be an int in 1..{q}, got {n!r}")
        return n

    def _valid_layout(self, layout_id: int) -> int:
        if layout_id not in self.card.lowband_layouts:
            raise ValueError(f"lowband_layout must be one of {self.card.lowband_layouts}, "
                             f"got {layout_id!r}")
        return layout_id

    def set_num_codebooks(self, n: int) -> None:
        """Keep `n` codebooks (1..Q) in the frames encoded from now on."""
        self.num_codebooks = self._valid_codebooks(n)
        self._budget.set_rate(self.bitrate_kbps)

    def set_lowband_layout(self, layout_id: int) -> None:
        """Send low-band layout `layout_id` (0: none) with the frames encoded from now on."""
        self.lowband_layout = self._valid_layout(layout_id)
        self._budget.set_rate(self.bitrate_kbps)

    def set_mode(self, mode: BitrateMode) -> None:
        """Codebooks and low-band layout of `mode` for the frames encoded from now on."""
        self.num_codebooks = self._valid_codebooks(mode.num_codebooks)
        self.lowband_layout = self._valid_layout(mode.lowband_layout)
        self._budget.set_rate(self.bitrate_kbps)

    def set_bitrate(self, kbps: float) -> BitrateMode:
        """Use the card's mode for a budget of `kbps` (`ModelCard.mode_for_bitrate`); return it.

        ValueError when `kbps` is below the 1-codebook bitrate.
        """
        mode = self.card.mode_for_bitrate(kbps)
        self.set_mode(mode)
        return mode

    @property
    def bitrate_kbps(self) -> float:
        """Nominal payload bitrate of the current mode, kbps (the cap with `rate_cap`)."""
        return self.card.bitrate_kbps(self.num_codebooks, self.lowband_layout)

    @property
    def frames_trimmed(self) -> int:
        """Frames sent with less than their mode (fewer codebooks, a narrower low band or none)
        to stay within the bitrate (`rate_cap`)."""
        return self._budget.trimmed

    # ---- sizes ----------------------------------------------------------------------------

    @property
    def pending_frames(self) -> int:
        """Whole frames buffered and not yet encoded."""
        return self.framer.frames_ready

    @property
    def overflow_samples(self) -> int:
        """Model-rate samples dropped because more than `max_buffered_ms` was waiting."""
        return self.framer.overflow

    @property
    def algorithmic_delay_ms(self) -> float:
        """Delay this side adds by construction: one frame + input resampling, ms."""
        return self._algorithmic_ms

    @property
    def state_nbytes(self) -> int:
        """Bytes of the recurrent ONNX state (one copy)."""
        return self.state.state_nbytes

    @property
    def nbytes(self) -> int:
        """Bytes this stream allocated (state buffers, framer, I/O arrays, queues)."""
        io = self._pcm.nbytes + self._count.nbytes + self._codes.nbytes + self._gain.nbytes
        io += self._lowband.nbytes + self._indices.nbytes + self._scaled.nbytes
        return int(self.state.nbytes + self.framer.nbytes + io + self._ready.nbytes)

    # ---- streaming ------------------------------------------------------------------------

    def push(self, pcm: PcmInput, now: float | None = None) -> int:
        """Add a chunk of client PCM; return the number of frames waiting to be encoded.

        `now` (s, the stream's clock) is when the chunk arrived; default `clock()`.  It becomes
        the `ready` time of the frames this chunk completes.
        """
        before = self.framer.frames_ready
        after = self.framer.push(pcm)
        if after > before:
            self._ready.push(self.clock() if now is None else now, after - before)
        return after

    def flush(self, now: float | None = None) -> int:
        """End of input: flush the resampler and zero-pad the last partial frame; return the
        frames waiting.  The stream stays usable (later input follows the padding)."""
        before = self.framer.frames_ready
        after = self.framer.flush()
        if after > before:
            self._ready.push(self.clock() if now is None else now, after - before)
        return after

    def _prepared_step(self) -> PreparedStep:
        """The unbatched step from the current state buffer set into the other one (two
        bindings, built once: state in A -> out B, and B -> A)."""
        if self._steps is None:
            pcm, count, codes = self._pcm, self._count, self._codes
            gain, low = self._gain, self._lowband
            self._steps = _both_ways(
                self.state,
                lambda i, o: self.model.prepare_encoder_step(pcm, count, i, codes, gain, low, o),
            )
        return self._steps[self.state.parity]

    def step(self) -> TokenFrame | None:
        """Encode the next waiting frame alone (one ONNX call, batch 1); None if none waits."""
        if self.framer.frames_ready == 0:
            return None
        ready = self._take_frame(self._pcm[0])
        self._count[0] = self.num_codebooks
        start = self.clock()
        self._prepared_step().run()
        self.state.swap()
        end = self.clock()
        return self._finish_frame(
            self._codes[0], int(self._gain[0]), self._lowband[0], ready, start, end, 1
        )

    def pull(self, max_frames: int | None = None) -> list[TokenFrame]:
        """Encode (alone) up to `max_frames` waiting frames (all with None), in order."""
        frames: list[TokenFrame] = []
        while max_frames is None or len(frames) < max_frames:
            frame = self.step()
            if frame is None:
                break
            frames.append(frame)
        return frames

    def encode(self, pcm: PcmInput, now: float | None = None) -> list[TokenFrame]:
        """`push(pcm)` then `pull()`: the frames this chunk completed (maybe none)."""
        self.push(pcm, now)
        return self.pull()

    def reset(self) -> None:
        """Back to a fresh stream: zero state, empty buffers, counters 0, the constructor's
        number of codebooks."""
        self.state.reset()
        self.framer.reset()
        self._ready.clear()
        self.num_codebooks = self._initial_codebooks
        self.lowband_layout = self._initial_layout
        self._budget.set_rate(self.bitrate_kbps)
        self._budget.reset()
        self.frames_encoded = 0
        self.last_latency = None

    # ---- engine hooks (used by BatchEngine) -----------------------------------------------

    def _take_frame(self, out: F32) -> float:
        """Move the next waiting frame into `out` [N]; return its ready time."""
        self.framer.read_frame(out)
        return self._ready.pop(self.clock())

    def _finish_frame(
        self,
        codes: I64,
        gain_index: int,
        lowband: F32,
        ready: float,
        start: float,
        end: float,
        batch: int,
    ) -> TokenFrame:
        """The frame of one encoder output row: codes [Q], gain index, shape low band [K]."""
        n = self.num_codebooks
        kept = tuple(codes[:n].tolist())
        frame: TokenFrame | None = None
        layout_id = self.lowband_layout
        wanted = False  # a low band this frame would carry without the cap
        if layout_id != LOWBAND_LAYOUT_NONE:
            gain = self.card.gain
            wanted = gain.min_db + gain.step_db * gain_index >= LAYOUTS[layout_id].min_level_db
        if wanted:  # (quiet frames go without low band)
            frame = (self._capped(n, gain_index, kept, lowband) if self.rate_cap
                     else self._with_lowband(n, gain_index, kept, lowband, layout_id))
        if frame is None:
            frame = TokenFrame.trusted(n, gain_index, kept)
            if self.rate_cap:
                self._budget.spend(self._codes_only_bits[n], trimmed=wanted)
        record = FrameLatency(self.frames_encoded, ready, start, end, batch, self._algorithmic_ms)
        self.last_latency = record
        if self.stats is not None:
            self.stats.add(record)
        self.frames_encoded += 1
        return frame

    def _with_lowband(
        self, n: int, gain_index: int, codes: tuple[int, ...], lowband: F32, layout_id: int
    ) -> TokenFrame:
        """The frame of n codebooks with low-band layout `layout_id`, quantised from `lowband`."""
        spec = LAYOUTS[layout_id]
        indices = quantize(lowband, spec, self._indices[: spec.bins], self._scaled[: spec.bins])
        return TokenFrame.trusted(n, gain_index, codes, layout_id, tuple(indices.tolist()))

    def _capped(
        self, n: int, gain_index: int, codes: tuple[int, ...], lowband: F32
    ) -> TokenFrame | None:
        """The frame with the most the budget allows: the mode's layout with n codebooks, else
        with fewer (down to 1: a codebook is worth less than the low band), else each
        narrower layout the same way; None when no low band fits (then codebooks alone)."""
        allowance = self._budget.allowance()
        for layout_id in self._fallbacks[self.lowband_layout]:
            spec = LAYOUTS[layout_id]
            indices = quantize(lowband, spec, self._indices[: spec.bins],
                               self._scaled[: spec.bins])
            low_bits = 1 + spec.coded_bits(indices)  # the layout field: 1 more bit
            k = n
            while k >= 1 and self._codes_only_bits[k] + low_bits > allowance:
                k -= 1
            if k >= 1:
                trimmed = k != n or layout_id != self.lowband_layout
                self._budget.spend(self._codes_only_bits[k] + low_bits, trimmed)
                return TokenFrame.trusted(k, gain_index, codes[:k], layout_id,
                                          tuple(indices.tolist()))
        return None

    def __repr__(self) -> str:
        return (
            f"EncoderStream(rate={self.rate}, num_codebooks={self.num_codebooks}, "
            f"lowband_layout={self.lowband_layout}, pending={self.pending_frames}, "
            f"encoded={self.frames_encoded})"
        )


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------


class DecoderStream:
    """`TokenFrame`s in, client PCM out.

    * `rate`: client sample rate, Hz (default: the model's); `fmt`: format of `pull` output
      (int16 arrays / s16le bytes, or float32 arrays / f32le bytes).
    * `max_pending_frames`: frames that may wait for decoding (default 50 = 1 s on the
      default card); a push onto a full queue drops the frame and counts it in
      `frames_dropped` (or raises `StreamOverflowError` with `strict=True`).
    * `max_buffered_ms`: decoded PCM that may wait to be pulled (default 1000 ms); beyond it
      the newest samples are dropped and counted in `overflow_samples`.
    * `stats`: optional shared `LatencyStats` every decoded frame is added to.
    """

    def __init__(
        self,
        model: CodecModel,
        *,
        rate: int | None = None,
        fmt: SampleFormat = SampleFormat.S16LE,
        max_pending_frames: int = 50,
        max_buffered_ms: float = 1000.0,
        clock: Clock = time.perf_counter,
        stats: LatencyStats | None = None,
    ) -> None:
        if max_pending_frames < 1:
            raise ValueError("max_pending_frames must be >= 1")
        card = model.card
        self.model = model
        self.card = card
        self.clock = clock
        self.stats = stats
        self.framer = OutputFramer(
            _rate_or_model(card, rate),
            model_rate=card.sample_rate,
            frame_size=card.frame_size,
            fmt=fmt,
            max_buffered_ms=max_buffered_ms,
        )
        self.state: DecoderState = model.new_decoder_state()
        q = card.num_codebooks
        cap = max_pending_frames
        # pending frame queue (fixed ring); a count of 0 marks a frame of silence
        self._q_codes: I64 = np.zeros((cap, q), dtype=np.int64)
        self._q_count: I64 = np.zeros(cap, dtype=np.int64)
        self._q_gain: I64 = np.zeros(cap, dtype=np.int64)
        self._q_low: F32 = np.zeros((cap, card.lowband_bins), dtype=np.float32)
        self._q_mask: F32 = np.zeros((cap, card.lowband_bins), dtype=np.float32)
        self._q_ready: F64 = np.zeros(cap, dtype=np.float64)
        self._q_head = 0
        self._q_len = 0
        # step I/O
        self._codes: I64 = np.zeros((1, q), dtype=np.int64)
        self._count: I64 = np.ones(1, dtype=np.int64)
        self._gain: I64 = np.zeros(1, dtype=np.int64)
        self._low: F32 = np.zeros((1, card.lowband_bins), dtype=np.float32)
        self._mask: F32 = np.zeros((1, card.lowband_bins), dtype=np.float32)
        self._pcm: F32 = np.zeros((1, card.frame_size), dtype=np.float32)
        self._steps: tuple[PreparedStep, PreparedStep] | None = None  # built on first step()
        self._silence: F32 = np.zeros(card.frame_size, dtype=np.float32)
        self._algorithmic_ms = decoder_delay_ms(card, rate)
        self._max_gain = 1 << card.gain.bits
        self.frames_decoded = 0
        """Frames decoded (silence excluded) since creation / reset."""
        self.frames_dropped = 0
        """Frames pushed onto a full queue and dropped."""
        self.last_latency: FrameLatency | None = None
        """Latency record of the last decoded frame."""
        self._mark = -1

    # ---- sizes ----------------------------------------------------------------------------

    @property
    def rate(self) -> int:
        """Client sample rate, Hz."""
        return self.framer.rate

    @property
    def fmt(self) -> SampleFormat:
        """Format of `pull` output."""
        return self.framer.fmt

    @property
    def pending_frames(self) -> int:
        """Frames (and silence frames) waiting to be decoded."""
        return self._q_len

    @property
    def available(self) -> int:
        """Decoded samples (at `rate`) ready to pull."""
        return self.framer.available

    @property
    def overflow_samples(self) -> int:
        """Samples (at `rate`) dropped because more than `max_buffered_ms` was not pulled."""
        return self.framer.overflow

    @property
    def underrun_samples(self) -> int:
        """Samples (at `rate`) padded pulls asked for but did not get."""
        return self.framer.underrun

    @property
    def algorithmic_delay_ms(self) -> float:
        """Delay this side adds by construction: card output delay + output resampling, ms."""
        return self._algorithmic_ms

    @property
    def state_nbytes(self) -> int:
        """Bytes of the recurrent ONNX state (one copy)."""
        return self.state.state_nbytes

    @property
    def nbytes(self) -> int:
        """Bytes this stream allocated (state buffers, framer, queue, I/O arrays)."""
        queue = self._q_codes.nbytes + self._q_count.nbytes + self._q_gain.nbytes
        queue += self._q_ready.nbytes + self._q_low.nbytes + self._q_mask.nbytes
        io = self._codes.nbytes + self._count.nbytes + self._gain.nbytes + self._pcm.nbytes
        io += self._low.nbytes + self._mask.nbytes
        return int(self.state.nbytes + self.framer.nbytes + queue + io + self._silence.nbytes)

    # ---- input ----------------------------------------------------------------------------

    def _check_frame(self, frame: TokenFrame) -> None:
        q = self.card.num_codebooks
        if frame.num_codebooks > q:
            raise ValueError(f"frame has {frame.num_codebooks} codebooks, the model has {q}")
        if frame.gain_index >= self._max_gain:
            raise ValueError(
                f"gain_index {frame.gain_index} out of range (< {self._max_gain} expected)"
            )
        if max(frame.codes) >= self.card.codebook_size:
            raise ValueError(f"a code is >= the codebook size {self.card.codebook_size}")
        if len(frame.lowband) > self.card.lowband_bins:
            raise ValueError(
                f"frame has {len(frame.lowband)} low-band bins, the model takes "
                f"{self.card.lowband_bins}"
            )

    def _enqueue(
        self,
        count: int,
        gain: int,
        codes: tuple[int, ...],
        now: float | None,
        strict: bool,
        layout_id: int = LOWBAND_LAYOUT_NONE,
        lowband: tuple[int, ...] = (),
    ) -> int:
        cap = self._q_count.shape[0]
        if self._q_len == cap:
            if strict:
                raise StreamOverflowError(f"{cap} frames are already waiting to be decoded")
            self.frames_dropped += 1
            return self._q_len
        slot = (self._q_head + self._q_len) % cap
        row = self._q_codes[slot]
        row[:count] = codes
        row[count:] = 0
        self._q_count[slot] = count
        self._q_gain[slot] = gain
        if layout_id == LOWBAND_LAYOUT_NONE:
            clear_into(self._q_low[slot], self._q_mask[slot])
        else:
            dequantize_into(lowband, LAYOUTS[layout_id], self._q_low[slot], self._q_mask[slot])
        self._q_ready[slot] = self.clock() if now is None else now
        self._q_len += 1
        return self._q_len

    def push(self, frame: TokenFrame, now: float | None = None, *, strict: bool = False) -> int:
        """Queue one frame for decoding; return the frames waiting.

        `now` (s) is its arrival time (default `clock()`).  ValueError when the frame does
        not fit the model (more than Q codebooks, gain or code out of range).
        """
        self._check_frame(frame)
        return self._enqueue(frame.num_codebooks, frame.gain_index, frame.codes, now, strict,
                             frame.lowband_layout, frame.lowband)

    def push_many(self, frames: Iterable[TokenFrame], now: float | None = None) -> int:
        """Queue frames in order (see `push`); return the frames waiting."""
        for frame in frames:
            self.push(frame, now)
        return self._q_len

    def push_silence(self, now: float | None = None, *, strict: bool = False) -> int:
        """Queue one frame of silence (N zero samples, no decoder step, state untouched),
        e.g. for a jitter-buffer tick with nothing to play; return the frames waiting."""
        return self._enqueue(0, 0, (), now, strict)

    # ---- decoding -------------------------------------------------------------------------

    def _prepared_step(self) -> PreparedStep:
        """The unbatched step from the current state buffer set into the other one (two
        bindings, built once: state in A -> out B, and B -> A)."""
        if self._steps is None:
            codes, count, gain, pcm = self._codes, self._count, self._gain, self._pcm
            low, mask = self._low, self._mask
            self._steps = _both_ways(
                self.state,
                lambda i, o: self.model.prepare_decoder_step(
                    codes, count, gain, low, mask, i, pcm, o
                ),
            )
        return self._steps[self.state.parity]

    def step(self) -> bool:
        """Decode the next waiting frame alone (one ONNX call, batch 1) into the output
        buffer; False if nothing waits."""
        if not self._q_len:
            return False
        if self._next_is_silence():
            self._take_silence()
            return True
        ready = self._take_frame(
            self._codes[0], self._count, self._gain, self._low[0], self._mask[0], 0
        )
        start = self.clock()
        self._prepared_step().run()
        self.state.swap()
        end = self.clock()
        self._finish_frame(self._pcm[0], ready, start, end, 1)
        return True

    def run(self, max_frames: int | None = None) -> int:
        """Decode (alone) up to `max_frames` waiting frames (all with None); return how many."""
        done = 0
        while (max_frames is None or done < max_frames) and self.step():
            done += 1
        return done

    # ---- output ---------------------------------------------------------------------------

    def pull(self, max_samples: int | None = None, *, pad: bool = False) -> npt.NDArray[np.generic]:
        """Up to `max_samples` decoded samples at `rate` (all available with None): an int16
        array for S16LE, float32 for F32LE.  `pad=True` returns exactly `max_samples`,
        zero-padded (counted in `underrun_samples`).  Decodes nothing: call `step` / `run`
        or a `BatchEngine` first."""
        return self.framer.read(max_samples, pad=pad)

    def pull_bytes(self, max_samples: int | None = None, *, pad: bool = False) -> bytes:
        """As `pull`, encoded in the stream's format (little-endian bytes)."""
        return self.framer.read_bytes(max_samples, pad=pad)

    def pull_into(self, out: npt.NDArray[np.generic], *, pad: bool = False) -> int:
        """As `pull`, into a caller array (int16 or float32, 1-D); return real samples written."""
        return self.framer.read_into(out, pad=pad)

    def decode(self, frame: TokenFrame, now: float | None = None) -> npt.NDArray[np.generic]:
        """`push(frame)`, `run()`, `pull()`: every sample available after decoding it."""
        self.push(frame, now)
        self.run()
        return self.pull()

    def flush(self) -> int:
        """End of stream: decode what waits and flush the output resampler, so every decoded
        sample can be pulled; return samples available.  (The decoded audio still lags the
        encoder input by the card's output delay: encode one more frame to get it out.)"""
        self.run()
        return self.framer.flush()

    def reset(self) -> None:
        """Back to a fresh stream: zero state, empty queue and buffers, counters 0."""
        self.state.reset()
        self.framer.reset()
        self._q_head = 0
        self._q_len = 0
        self.frames_decoded = 0
        self.frames_dropped = 0
        self.last_latency = None

    # ---- engine hooks (used by BatchEngine) -----------------------------------------------

    def _next_is_silence(self) -> bool:
        return bool(self._q_count[self._q_head] == 0)

    def _take_silence(self) -> None:
        self._q_head = (self._q_head + 1) % self._q_count.shape[0]
        self._q_len -= 1
        self.framer.write(self._silence)

    def _take_frame(
        self, codes: I64, counts: I64, gains: I64, lowband: F32, mask: F32, row: int
    ) -> float:
        """Move the next waiting frame into row `row` of the step inputs (`codes`, `lowband`
        and `mask` are that row already); return its ready time."""
        head = self._q_head
        np.copyto(codes, self._q_codes[head])
        np.copyto(lowband, self._q_low[head])
        np.copyto(mask, self._q_mask[head])
        counts[row] = self._q_count[head]
        gains[row] = self._q_gain[head]
        self._q_head = (head + 1) % self._q_count.shape[0]
        self._q_len -= 1
        return float(self._q_ready[head])

    def _finish_frame(self, pcm: F32, ready: float, start: float, end: float, batch: int) -> None:
        self.framer.write(pcm)
        record = FrameLatency(self.frames_decoded, ready, start, end, batch, self._algorithmic_ms)
        self.last_latency = record
        if self.stats is not None:
            self.stats.add(record)
        self.frames_decoded += 1

    def __repr__(self) -> str:
        return (
            f"DecoderStream(rate={self.rate}, pending={self.pending_frames}, "
            f"available={self.available}, decoded={self.frames_decoded})"
        )
