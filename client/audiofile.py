"""Audio files in and out: reading with mono mixdown, aligned offline resampling, writing.

Files are read and written with soundfile (libsndfile: WAV, FLAC, OGG, ...).  Samples are
float32 in [-1, 1], mono.  Multi-channel input is mixed down by averaging the channels.

Resampling uses the engine's own polyphase resampler (`streaming.framing.Resampler`: a
Kaiser-windowed sinc, 80 dB stopband, passband to 0.85 of the lower Nyquist frequency) for
any pair of integer rates, and compensates its group delay: `resample(x, a, b)[k]` is the
signal at time k / b seconds, the same instant as `x[k * a / b]`.  The output has
`ceil(len(x) * b / a)` samples unless a length is given.  Uncommon rates (22254, 11127,
22051 Hz, ...) get the resampler's interpolated design (bounded memory, the delay still a
whole number of output samples); a pair it cannot resample (a ratio above about 490
between rates with a small common divisor, e.g. 7800001 Hz -> 16 kHz) is a ClientError
naming both rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import soundfile as sf

from client.errors import ClientError
from streaming.framing import Resampler

__all__ = ["Audio", "read_audio", "resample", "write_audio"]

F32: TypeAlias = npt.NDArray[np.float32]

_CHUNK = 1 << 16
"""Input samples per resampler call (bounds the temporary arrays)."""


@dataclass(frozen=True)
class Audio:
    """Mono float32 samples and their rate (Hz)."""

    samples: F32
    rate: int

    @property
    def seconds(self) -> float:
        """Duration, s."""
        return float(self.samples.shape[0] / self.rate)


def read_audio(path: Path | str) -> Audio:
    """Read an audio file as mono float32 (channels averaged).

    Raises ClientError naming the file when it is missing, a directory, not audio, or empty.
    """
    p = Path(path)
    if p.is_dir():
        raise ClientError(f"{p}: is a directory, not an audio file")
    if not p.is_file():
        raise ClientError(f"{p}: no such file")
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise ClientError(f"{p}: not a readable audio file ({exc})") from None
    if data.shape[0] == 0:
        raise ClientError(f"{p}: the file holds no audio samples")
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    return Audio(np.ascontiguousarray(mono, dtype=np.float32), int(rate))


def write_audio(path: Path | str, audio: Audio, *, subtype: str | None = None) -> None:
    """Write mono audio; the format follows the file extension (.wav: 16-bit PCM by default).

    Raises ClientError when the file cannot be written.
    """
    p = Path(path)
    try:
        sf.write(str(p), np.clip(audio.samples, -1.0, 1.0), audio.rate, subtype=subtype)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise ClientError(f"{p}: cannot write audio ({exc})") from None


def resampled_length(n: int, rate_in: int, rate_out: int) -> int:
    """Samples covering `n` input samples at the output rate: ceil(n * rate_out / rate_in)."""
    return -(-n * rate_out // rate_in)


def resample(x: F32, rate_in: int, rate_out: int, length: int | None = None) -> F32:
    """Resample `x` (float32, mono) from `rate_in` to `rate_out` Hz, delay-compensated.

    Returns `length` samples (default `resampled_length(len(x), ...)`), zero-padded at the
    end if the filter runs out of input.  ClientError when the rates are not positive or no
    supported filter resamples between them.
    """
    if rate_in <= 0 or rate_out <= 0:
        raise ClientError(f"cannot resample {rate_in} Hz -> {rate_out} Hz: rates must be positive")
    out_len = resampled_length(x.shape[0], rate_in, rate_out) if length is None else length
    if rate_in == rate_out:
        out = np.zeros(out_len, dtype=np.float32)
        n = min(out_len, x.shape[0])
        out[:n] = x[:n]
        return out
    try:
        rs = Resampler(rate_in, rate_out)
    except ValueError as exc:  # a ratio too large for any supported filter
        raise ClientError(str(exc)) from None
    skip = rs.delay_out_samples
    need = out_len + skip
    # zeros after the signal flush the filter: enough input for `need` outputs
    tail = math.ceil(need * rate_in / rate_out) - x.shape[0] + rs.taps + 1
    padded = np.concatenate([x.astype(np.float32, copy=False), np.zeros(max(tail, 0), np.float32)])
    pieces: list[F32] = []
    for i in range(0, padded.shape[0], _CHUNK):
        part = padded[i : i + _CHUNK]
        buf = np.empty(rs.max_output(part.shape[0]), dtype=np.float32)
        pieces.append(buf[: rs.process(part, buf)])
    y = np.concatenate(pieces)[skip:need]
    if y.shape[0] < out_len:
        y = np.concatenate([y, np.zeros(out_len - y.shape[0], dtype=np.float32)])
    return np.ascontiguousarray(y, dtype=np.float32)
