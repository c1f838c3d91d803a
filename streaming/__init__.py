"""Torch-free streaming engine: ONNX codec runtime, wire/file protocol, jitter buffer.

Modules (standard library, numpy and onnxruntime only):

* `streaming.model`: `ModelCard` (validated card.json), `CodecModel.load()` (ONNX sessions
  checked against the card), batched encoder/decoder steps on preallocated arrays,
  `EncoderState` / `DecoderState`, `ModelError`, `default_model_dir()`.
* `streaming.ring`: `RingBuffer`, fixed float32 FIFO counting overflow and underrun.
* `streaming.framing`: PCM formats (`SampleFormat`), the chunk-size-invariant polyphase
  `Resampler`, `InputFramer` (client PCM -> model frames), `OutputFramer` (model frames ->
  client PCM).
* `streaming.stream`: `EncoderStream` (PCM in, `TokenFrame`s out) and `DecoderStream`
  (`TokenFrame`s in, PCM out), each stepped alone or by a `BatchEngine`.
* `streaming.batch`: `BatchEngine`, the due frames of many streams in one ONNX call.
* `streaming.latency`: `FrameLatency` records, `Histogram` and `LatencyStats` aggregates.
* `streaming.protocol`: frame payload, token packets, bitstream file, `TokenFrame`,
  `ProtocolError`.
* `streaming.jitter`: `JitterBuffer` with loss concealment.

The names below are re-exported lazily: `import streaming` loads nothing heavy; the first
access to, say, `streaming.CodecModel` imports `streaming.model` (and onnxruntime).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streaming.batch import BatchEngine
    from streaming.framing import InputFramer, OutputFramer, Resampler, SampleFormat
    from streaming.latency import FrameLatency, Histogram, LatencyStats
    from streaming.model import (
        CodecModel,
        DecoderState,
        EncoderState,
        ModelCard,
        ModelError,
        default_model_dir,
    )
    from streaming.protocol import ProtocolError, TokenFrame
    from streaming.ring import RingBuffer
    from streaming.stream import DecoderStream, EncoderStream

_EXPORTS: dict[str, str] = {
    "BatchEngine": "streaming.batch",
    "InputFramer": "streaming.framing",
    "OutputFramer": "streaming.framing",
    "Resampler": "streaming.framing",
    "SampleFormat": "streaming.framing",
    "FrameLatency": "streaming.latency",
    "Histogram": "streaming.latency",
    "LatencyStats": "streaming.latency",
    "CodecModel": "streaming.model",
    "DecoderState": "streaming.model",
    "EncoderState": "streaming.model",
    "ModelCard": "streaming.model",
    "ModelError": "streaming.model",
    "default_model_dir": "streaming.model",
    "ProtocolError": "streaming.protocol",
    "TokenFrame": "streaming.protocol",
    "RingBuffer": "streaming.ring",
    "DecoderStream": "streaming.stream",
    "EncoderStream": "streaming.stream",
}

__all__ = [
    "BatchEngine",
    "CodecModel",
    "DecoderState",
    "DecoderStream",
    "EncoderState",
    "EncoderStream",
    "FrameLatency",
    "Histogram",
    "InputFramer",
    "LatencyStats",
    "ModelCard",
    "ModelError",
    "OutputFramer",
    "ProtocolError",
    "Resampler",
    "RingBuffer",
    "SampleFormat",
    "TokenFrame",
    "default_model_dir",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streaming' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
