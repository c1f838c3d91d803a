"""WAV files for the HTTP endpoints: a small RIFF reader (numpy) and a writer (stdlib `wave`).

`read_wav` accepts RIFF/WAVE with PCM integer samples of 8, 16, 24 or 32 bits, IEEE float of
32 or 64 bits, or WAVE_FORMAT_EXTENSIBLE carrying either; any number of channels (averaged to
mono).  It returns float32 samples in [-1, 1] and the sample rate (Hz).  Malformed files raise
`WavError` with status 400, well-formed but unsupported ones status 415.
"""

from __future__ import annotations

import io
import struct
import wave
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["WavError", "read_wav", "write_wav"]

_PCM: Final = 1
_FLOAT: Final = 3
_EXTENSIBLE: Final = 0xFFFE


class WavError(ValueError):
    """The body is not a usable WAV file; `status` is the HTTP status to answer (400/415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _chunks(data: bytes) -> dict[bytes, bytes]:
    """The first chunk of each id in a RIFF/WAVE file."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError(415, "not a WAV file (expected a RIFF/WAVE header)")
    chunks: dict[bytes, bytes] = {}
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"data" and len(body) < size and size != 0xFFFFFFFF:
            body = body[: len(body) - len(body) % 8]  # truncated data chunk: keep whole samples
        chunks.setdefault(cid, body)
        pos += 8 + size + (size & 1)
    return chunks


def read_wav(data: bytes) -> tuple[npt.NDArray[np.float32], int]:
    """(mono float32 samples in [-1, 1], sample rate in Hz) of a WAV file's bytes."""
    chunks = _chunks(data)
    fmt = chunks.get(b"fmt ")
    if fmt is None or len(fmt) < 16:
        raise WavError(400, "WAV file without a valid fmt chunk")
    if b"data" not in chunks:
        raise WavError(400, "WAV file without a data chunk")
    tag, channels, rate, _, block, bits = struct.unpack_from("<HHIIHH", fmt, 0)
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if channels < 1 or bits == 0 or block != channels * ((bits + 7) // 8):
        raise WavError(
            400, f"inconsistent WAV fmt chunk ({channels} channels, {bits} bits, block {block})"
        )
    raw = chunks[b"data"]
    raw = raw[: len(raw) - len(raw) % block]
    samples = _decode(raw, tag, bits)
    mono = samples.reshape(-1, channels).mean(axis=1, dtype=np.float64) if channels > 1 else samples
    return np.ascontiguousarray(mono, dtype=np.float32), rate


def _full_scale(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    """Float samples at full scale: non-finite ones 0 (as docs/protocol.md says of float32
    PCM), the rest clipped to [-1, 1], so mixing channels down never averages an overload or
    an inf."""
    finite: npt.NDArray[np.floating[Any]] = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    np.clip(finite, -1.0, 1.0, out=finite)
    return finite


def _decode(raw: bytes, tag: int, bits: int) -> npt.NDArray[np.floating[Any]]:
    if tag == _PCM and bits == 8:
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if tag == _PCM and bits == 16:
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if tag == _PCM and bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        value = np.where(value >= 1 << 23, value - (1 << 24), value)
        return value.astype(np.float32) / float(1 << 23)
    if tag == _PCM and bits == 32:
        return np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)
    if tag == _FLOAT and bits in (32, 64):
        return _full_scale(np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8"))
    raise WavError(
        415,
        f"unsupported WAV encoding (format tag {tag}, {bits} bits): use PCM "
        "8/16/24/32-bit or float 32/64-bit",
    )


def write_wav(pcm_s16le: bytes, rate: int) -> bytes:
    """A mono 16-bit WAV file of little-endian int16 samples at `rate` Hz."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm_s16le)
    return buffer.getvalue()
