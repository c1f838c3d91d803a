"""Batched stepping: the due frames of many streams in ONE onnxruntime call.

`BatchEngine.encode_step(streams)` takes the next waiting frame of every listed
`EncoderStream` that has one, stacks their PCM and ONNX states over the batch dimension into
preallocated batch buffers, runs the encoder once, and scatters codes and next states back to
each stream; it returns the `TokenFrame` of each stream (None where none was due).
`decode_step` does the same for `DecoderStream`s (frames of silence are served without the
model).  Streams may keep different numbers of codebooks: truncation happens after the step
(encoder) or through the per-stream `num_codebooks` input (decoder).

The results are the same as stepping each stream alone (the graphs compute every batch row
independently; tests check bit-identity on the bundled model).

Batch buffers are sized to `capacity` streams and grow by doubling when a call needs more
(amortised: a server reaches its peak size once), never shrink, and are reused by every call.
Time: `clock` (s) is read before the gather and after the scatter; that span is every
frame's compute time, and the stream's `ready` time to the start is its queueing time.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from streaming.latency import Histogram
from streaming.model import CodecModel, ModelCard, PreparedStep, StateSpec
from streaming.protocol import TokenFrame
from streaming.stream import Clock, DecoderStream, EncoderStream

__all__ = ["BatchEngine"]

F32: TypeAlias = npt.NDArray[np.float32]
F64: TypeAlias = npt.NDArray[np.float64]
I64: TypeAlias = npt.NDArray[np.int64]

_marks = itertools.count()


def _state_buffers(specs: Sequence[StateSpec], capacity: int) -> tuple[F32, ...]:
    return tuple(np.zeros((capacity, *s.shape), dtype=np.float32) for s in specs)


class _PackedStates:
    """A batch's states both ways: `packed` [capacity, total] holds each stream's flat state
    in one row (one copy per stream, see `GraphState.flat`), `tensors` the per-state arrays
    [capacity, *shape] the graph binds; `unpack` / `pack` move the first B rows between them
    with one copy per state tensor, whatever B is."""

    def __init__(self, specs: Sequence[StateSpec], capacity: int) -> None:
        self.tensors = _state_buffers(specs, capacity)
        total = sum(math.prod(s.shape) for s in specs)
        self.packed: F32 = np.zeros((capacity, total), dtype=np.float32)
        bounds = np.cumsum([0] + [math.prod(s.shape) for s in specs]).tolist()
        self._columns = [
            (self.packed[:, lo:hi], t.reshape(capacity, hi - lo))
            for lo, hi, t in zip(bounds[:-1], bounds[1:], self.tensors, strict=True)
        ]

    def unpack(self, batch: int) -> None:
        """packed[:batch] -> tensors[:batch]."""
        for columns, flat in self._columns:
            np.copyto(flat[:batch], columns[:batch])

    def pack(self, batch: int) -> None:
        """tensors[:batch] -> packed[:batch]."""
        for columns, flat in self._columns:
            np.copyto(columns[:batch], flat[:batch])

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + sum(t.nbytes for t in self.tensors))


class _EncoderBuffers:
    """Encoder step I/O for up to `capacity` streams."""

    def __init__(self, card: ModelCard, capacity: int) -> None:
        self.capacity = capacity
        self.pcm: F32 = np.zeros((capacity, card.frame_size), dtype=np.float32)
        self.counts: I64 = np.ones(capacity, dtype=np.int64)
        self.states_in = _PackedStates(card.encoder.states, capacity)
        self.states_out = _PackedStates(card.encoder.states, capacity)
        self.codes: I64 = np.zeros((capacity, card.num_codebooks), dtype=np.int64)
        self.gain: I64 = np.zeros(capacity, dtype=np.int64)
        self.lowband: F32 = np.zeros((capacity, card.lowband_bins), dtype=np.float32)
        self.ready: F64 = np.zeros(capacity, dtype=np.float64)
        self._steps: dict[int, PreparedStep] = {}

    def step(self, model: CodecModel, batch: int) -> PreparedStep:
        """The encoder step on the first `batch` rows (bound once per batch size)."""
        step = self._steps.get(batch)
        if step is None:
            step = self._steps[batch] = model.prepare_encoder_step(
                self.pcm[:batch],
                self.counts[:batch],
                [a[:batch] for a in self.states_in.tensors],
                self.codes[:batch],
                self.gain[:batch],
                self.lowband[:batch],
                [a[:batch] for a in self.states_out.tensors],
            )
        return step

    @property
    def nbytes(self) -> int:
        arrays: list[npt.NDArray[Any]] = [
            self.pcm,
            self.counts,
            self.codes,
            self.gain,
            self.lowband,
            self.ready,
        ]
        states = self.states_in.nbytes + self.states_out.nbytes
        return int(sum(a.nbytes for a in arrays)) + states


class _DecoderBuffers:
    """Decoder step I/O for up to `capacity` streams."""

    def __init__(self, card: ModelCard, capacity: int) -> None:
        self.capacity = capacity
        self.codes: I64 = np.zeros((capacity, card.num_codebooks), dtype=np.int64)
        self.counts: I64 = np.ones(capacity, dtype=np.int64)
        self.gain: I64 = np.zeros(capacity, dtype=np.int64)
        self.lowband: F32 = np.zeros((capacity, card.lowband_bins), dtype=np.float32)
        self.mask: F32 = np.zeros((capacity, card.lowband_bins), dtype=np.float32)
        self.states_in = _PackedStates(card.decoder.states, capacity)
        self.states_out = _PackedStates(card.decoder.states, capacity)
        self.pcm: F32 = np.zeros((capacity, card.frame_size), dtype=np.float32)
        self.ready: F64 = np.zeros(capacity, dtype=np.float64)
        self._steps: dict[int, PreparedStep] = {}

    def step(self, model: CodecModel, batch: int) -> PreparedStep:
        """The decoder step on the first `batch` rows (bound once per batch size)."""
        step = self._steps.get(batch)
        if step is None:
            step = self._steps[batch] = model.prepare_decoder_step(
                self.codes[:batch],
                self.counts[:batch],
                self.gain[:batch],
                self.lowband[:batch],
                self.mask[:batch],
                [a[:batch] for a in self.states_in.tensors],
                self.pcm[:batch],
                [a[:batch] for a in self.states_out.tensors],
            )
        return step

    @property
    def nbytes(self) -> int:
        arrays: list[npt.NDArray[Any]] = [
            self.pcm,
            self.codes,
            self.counts,
            self.gain,
            self.lowband,
            self.mask,
            self.ready,
        ]
        states = self.states_in.nbytes + self.states_out.nbytes
        return int(sum(a.nbytes for a in arrays)) + states


class BatchEngine:
    """Runs the due frames of many streams of one model in one ONNX call per direction.

    * `capacity`: initial batch capacity (streams per call); grows by doubling on demand
      (both directions together).
    * `clock`: seconds, for the streams' latency records (default `time.perf_counter`).

    `encode_compute` / `decode_compute` are histograms of the batched step times (ms);
    `encode_batches` / `decode_batches` count the ONNX calls, `grows` the reallocations.
    Not thread-safe: one engine per thread (they may share a `CodecModel`).
    """

    def __init__(
        self, model: CodecModel, *, capacity: int = 16, clock: Clock = time.perf_counter
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.model = model
        self.card = model.card
        self.clock = clock
        self._enc = _EncoderBuffers(self.card, capacity)
        self._dec = _DecoderBuffers(self.card, capacity)
        self.encode_compute = Histogram()
        self.decode_compute = Histogram()
        self.encode_batches = 0
        self.decode_batches = 0
        self.grows = 0

    @property
    def capacity(self) -> int:
        """Streams one call can take without reallocating (both directions)."""
        return self._enc.capacity

    @property
    def nbytes(self) -> int:
        """Bytes of the batch buffers."""
        return self._enc.nbytes + self._dec.nbytes

    def reserve(self, size: int) -> None:
        """Make room for `size` streams per call now (doubling), e.g. at server start."""
        if size <= self._enc.capacity:
            return
        new = self._enc.capacity
        while new < size:
            new *= 2
        self._enc = _EncoderBuffers(self.card, new)
        self._dec = _DecoderBuffers(self.card, new)
        self.grows += 1

    def _check_stream(self, stream: EncoderStream | DecoderStream, mark: int) -> None:
        if stream.model is not self.model and stream.card.model_id != self.card.model_id:
            raise ValueError(
                f"stream runs model {stream.card.model_id!r}, this engine {self.card.model_id!r}"
            )
        if stream._mark == mark:
            raise ValueError("the same stream is listed twice in one batch step")
        stream._mark = mark

    # ---- encoder --------------------------------------------------------------------------

    def encode_step(self, streams: Sequence[EncoderStream]) -> list[TokenFrame | None]:
        """Encode the next waiting frame of each stream in one call.

        Returns, aligned with `streams`, each stream's new frame (None where no whole frame
        was waiting).  ValueError if a stream is listed twice or runs another model.
        """
        mark = next(_marks)
        due: list[int] = []
        for i, stream in enumerate(streams):
            self._check_stream(stream, mark)
            if stream.pending_frames:
                due.append(i)
        results: list[TokenFrame | None] = [None] * len(streams)
        b = len(due)
        if not b:
            return results
        self.reserve(b)
        buf = self._enc
        start = self.clock()
        for row, i in enumerate(due):
            stream = streams[i]
            buf.ready[row] = stream._take_frame(buf.pcm[row])
            buf.counts[row] = stream.num_codebooks
            stream.state.gather_into(buf.states_in.packed, row)
        buf.states_in.unpack(b)
        buf.step(self.model, b).run()
        buf.states_out.pack(b)
        gains = buf.gain[:b].tolist()
        for row, i in enumerate(due):
            streams[i].state.scatter_from(buf.states_out.packed, row)
        end = self.clock()
        for row, i in enumerate(due):
            results[i] = streams[i]._finish_frame(
                buf.codes[row], gains[row], buf.lowband[row], float(buf.ready[row]), start, end, b
            )
        self.encode_batches += 1
        self.encode_compute.add(1000.0 * (end - start))
        return results

    def encode_all(self, streams: Sequence[EncoderStream]) -> list[list[TokenFrame]]:
        """`encode_step` until no listed stream has a whole frame waiting; per stream, the
        frames in order."""
        out: list[list[TokenFrame]] = [[] for _ in streams]
        while any(s.pending_frames for s in streams):
            for i, frame in enumerate(self.encode_step(streams)):
                if frame is not None:
                    out[i].append(frame)
        return out

    # ---- decoder --------------------------------------------------------------------------

    def decode_step(self, streams: Sequence[DecoderStream]) -> list[bool]:
        """Decode the next waiting frame of each stream in one call (silence frames without
        the model); the PCM goes to each stream's output buffer (read it with `pull`).

        Returns, aligned with `streams`, whether the stream consumed a frame.
        """
        mark = next(_marks)
        due: list[int] = []
        served = [False] * len(streams)
        for i, stream in enumerate(streams):
            self._check_stream(stream, mark)
            if not stream.pending_frames:
                continue
            served[i] = True
            if stream._next_is_silence():
                stream._take_silence()
            else:
                due.append(i)
        b = len(due)
        if not b:
            return served
        self.reserve(b)
        buf = self._dec
        start = self.clock()
        for row, i in enumerate(due):
            stream = streams[i]
            buf.ready[row] = stream._take_frame(
                buf.codes[row], buf.counts, buf.gain, buf.lowband[row], buf.mask[row], row
            )
            stream.state.gather_into(buf.states_in.packed, row)
        buf.states_in.unpack(b)
        buf.step(self.model, b).run()
        buf.states_out.pack(b)
        for row, i in enumerate(due):
            streams[i].state.scatter_from(buf.states_out.packed, row)
        end = self.clock()
        for row, i in enumerate(due):
            streams[i]._finish_frame(buf.pcm[row], float(buf.ready[row]), start, end, b)
        self.decode_batches += 1
        self.decode_compute.add(1000.0 * (end - start))
        return served

    def decode_all(self, streams: Sequence[DecoderStream]) -> int:
        """`decode_step` until no listed stream has a frame waiting; return the frames
        (silence included) consumed."""
        total = 0
        while any(s.pending_frames for s in streams):
            total += sum(self.decode_step(streams))
        return total
