"""PCM conversion, streaming resampling and exact model framing.

Input side (`InputFramer`): PCM chunks of any size (1 ms to 1 s and beyond), mono, at 8, 16,
24 or 48 kHz, as int16 (bytes or array) or float32 (bytes or array), are converted to float32,
resampled to the model rate by a `Resampler` and cut into exact frames of N model-rate
samples.  Output side (`OutputFramer`): model frames of N samples are resampled to the
client's rate and buffered until pulled in the client's format.

Formats: `SampleFormat.S16LE` (int16 little-endian, full scale 32768) and `SampleFormat.F32LE`
(float32 little-endian in [-1, 1]).  The format applies to `bytes` input; a numpy array is
taken by its dtype (int16 is scaled by 1/32768, float32/float64 taken as is).  Float input is
clipped to [-1, 1] and non-finite samples become 0, so a bad client cannot poison a stream's
recurrent state.  int16 x and float32 x/32768 give bit-identical model input.

`Resampler`: rational polyphase FIR (up L, down M), a Kaiser-windowed sinc designed at the
rate L*rate_in with its stopband edge at the lower Nyquist frequency (no aliasing into the
band), passband edge at `passband` (0.85) of it and `attenuation_db` (80 dB) stopband.  Its
history is explicit state (the last taps-1 input samples and a phase counter), and output
sample k is computed only from input samples 0..floor(k*M/L) with the same arithmetic
whatever the chunking: the output is bit-identical for any chunk sizes.  The filter
half-length is rounded up to a multiple of L*M so that the delay is a whole number of samples
at both rates; with the defaults:

    ======  ============  ===================================
    path    filter taps   delay
    ======  ============  ===================================
    48->16  205           102 in / 34 out samples = 2.125 ms
    24->16  205 (2x103)   51 in / 34 out samples = 2.125 ms
    8->16   137 (2x69)    34 in / 68 out samples = 4.25 ms
    16->48  205 (3x69)    34 in / 102 out samples = 2.125 ms
    16->24  205 (3x69)    34 in / 51 out samples = 2.125 ms
    16->8   137           68 in / 34 out samples = 4.25 ms
    16->16  none          0
    ======  ============  ===================================

(`Resampler.delay_ms` / `delay_in_samples` / `delay_out_samples` give the exact values.)

Uncommon rates: where that rounding would make the filter longer than `MAX_EXACT_HALF`
taps each side at rate_in*L (L*M large: rates with a small common divisor, such as 22254 or
11127 Hz against 16 kHz, where an exact table would take gigabytes), `Resampler` uses an
*interpolated* design instead (`exact` False): the same Kaiser low-pass tabulated at
`INTERPOLATION_PHASES` (256) fractional phases per input sample, each output's coefficients
interpolated linearly between the two nearest phases (error below -100 dB).  Its memory
does not depend on L or M: 257 x taps float32, taps = about 67 input samples x
max(1, rate_in / rate_out) with the defaults (22254 -> 16000: 95 taps, 0.1 MB).  Its delay
is a whole number of output samples only: `delay_out_samples` is exact, `delay_in_samples`
rounded up (the input that flushes it).  Output counts and chunk-size invariance are as
above, but it allocates its coefficient temporaries on every call (it serves files at
uncommon rates, never a server stream).  A pair needing more than `MAX_INTERPOLATED_TAPS`
taps (a rate ratio above about 490 with L*M large) raises ValueError.  The framers' rates
(8, 16, 24, 48 kHz) and the usual file rates (11025, 22050, 32000, 44100, 96000 Hz) all get
the exact design.

Memory: each resampler keeps two history buffers of (taps-1 + block) float32 samples (none
at equal rates); per-call scratch (products, converted and resampled blocks) is shared per
thread, not owned by each stream.
"""

from __future__ import annotations

import functools
import math
import threading
from enum import StrEnum
from typing import Final, TypeAlias, cast

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided, sliding_window_view

from streaming.ring import RingBuffer

__all__ = [
    "SUPPORTED_RATES",
    "InputFramer",
    "OutputFramer",
    "PcmInput",
    "Resampler",
    "SampleFormat",
    "design_filter",
    "float32_to_int16",
    "pcm_samples",
    "resampling_delay_ms",
    "to_float32",
]

F32: TypeAlias = npt.NDArray[np.float32]
F64: TypeAlias = npt.NDArray[np.float64]
I16: TypeAlias = npt.NDArray[np.int16]

SUPPORTED_RATES: Final = (8000, 16000, 24000, 48000)
"""Client sample rates (Hz) the framers accept."""

PcmInput: TypeAlias = bytes | bytearray | memoryview | npt.NDArray[np.generic]
"""A chunk of mono PCM: raw bytes in the stream's `SampleFormat`, or a 1-D numpy array."""

_INT16_SCALE: Final = np.float32(1.0 / 32768.0)
_ONE: Final = np.float32(1.0)
_MINUS_ONE: Final = np.float32(-1.0)
_INT16_MIN: Final = np.float32(-32768.0)
_INT16_MAX: Final = np.float32(32767.0)
_BLOCK: Final = 1024
"""Input samples processed per internal block (bounds every scratch buffer)."""
MAX_EXACT_HALF: Final = 1 << 20
"""Largest half-length (at rate_in*L) of an exact design; longer ones are interpolated."""
INTERPOLATION_PHASES: Final = 256
"""Rows (+1) of an interpolated design's table: fractional phases, 1/256 input sample apart."""
MAX_INTERPOLATED_TAPS: Final = 1 << 15
"""Longest interpolated filter (input samples): bounds its table to about 34 MB."""
_DESIGN_CHUNK: Final = 1 << 16
"""Taps computed at a time when designing a filter (bounds the temporaries)."""


class SampleFormat(StrEnum):
    """Wire format of PCM bytes."""

    S16LE = "s16le"
    """int16 little-endian, full scale 32768."""
    F32LE = "f32le"
    """float32 little-endian, [-1, 1]."""

    @property
    def dtype(self) -> np.dtype[np.generic]:
        """Little-endian numpy dtype of the format."""
        return np.dtype("<i2") if self is SampleFormat.S16LE else np.dtype("<f4")

    @property
    def sample_bytes(self) -> int:
        """Bytes per sample (2 or 4)."""
        return 2 if self is SampleFormat.S16LE else 4


def pcm_samples(pcm: PcmInput, fmt: SampleFormat) -> npt.NDArray[np.generic]:
    """View `pcm` as a 1-D sample array without copying.

    Bytes are interpreted in `fmt` (ValueError if their length is not a whole number of
    samples); an array must be 1-D int16, float32 or float64.
    """
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        size = len(memoryview(pcm).cast("B"))
        if size % fmt.sample_bytes:
            raise ValueError(
                f"{size} bytes is not a whole number of {fmt.value} samples "
                f"({fmt.sample_bytes} bytes each)"
            )
        return np.frombuffer(pcm, dtype=fmt.dtype)
    if not isinstance(pcm, np.ndarray):
        raise TypeError(f"PCM must be bytes or a numpy array, got {type(pcm).__name__}")
    if pcm.ndim != 1:
        raise ValueError(f"PCM must be mono (a 1-D array), got shape {pcm.shape}")
    if pcm.dtype.kind == "i" and pcm.dtype.itemsize == 2:
        return pcm
    if pcm.dtype.kind == "f" and pcm.dtype.itemsize in (4, 8):
        return pcm
    raise ValueError(f"PCM arrays must be int16, float32 or float64, got {pcm.dtype}")


def to_float32(src: npt.NDArray[np.generic], out: F32) -> None:
    """Convert samples `src` (int16 or float) into `out` (same length): int16 / 32768, floats
    clipped to [-1, 1] with non-finite values replaced by 0."""
    if src.dtype.kind == "i":
        np.multiply(src, _INT16_SCALE, out=out)
        return
    np.copyto(out, src, casting="same_kind")
    if not math.isfinite(float(np.sum(out))):
        np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    np.maximum(out, _MINUS_ONE, out=out)  # np.clip's Python wrapper costs 2x these ufuncs
    np.minimum(out, _ONE, out=out)


def float32_to_int16(src: F32, out: I16) -> None:
    """Convert float32 samples to int16 (x * 32768, rounded, saturated); `src` is clobbered."""
    np.multiply(src, np.float32(32768.0), out=src)
    np.rint(src, out=src)
    np.maximum(src, _INT16_MIN, out=src)
    np.minimum(src, _INT16_MAX, out=src)
    np.copyto(out, src, casting="unsafe")


# --------------------------------------------------------------------------------------------
# Resampler
# --------------------------------------------------------------------------------------------


def _kaiser_lowpass(
    rate_in: int, rate_out: int, fs: float, passband: float, attenuation_db: float
) -> tuple[float, float, float]:
    """(fc, beta, length) of the Kaiser low-pass of `design_filter` sampled at `fs` Hz: the
    cutoff as a fraction of fs/2, the window's beta and its minimum length in samples."""
    if not 0.0 < passband < 1.0 or attenuation_db <= 21.0:
        raise ValueError("need 0 < passband < 1 and attenuation_db > 21")
    nyquist = min(rate_in, rate_out) / 2.0
    f_pass = passband * nyquist
    cutoff = (f_pass + nyquist) / 2.0
    width = 2.0 * math.pi * (nyquist - f_pass) / fs  # transition, rad/sample
    a = attenuation_db
    beta = 0.1102 * (a - 8.7) if a > 50.0 else 0.5842 * (a - 21.0) ** 0.4 + 0.07886 * (a - 21.0)
    length = (a - 7.95) / (2.285 * width) + 1.0
    return 2.0 * cutoff / fs, beta, length


def _windowed_sinc(n: F64, half: float, fc: float, beta: float) -> F64:
    """fc * sinc(fc * n) times a Kaiser window reaching 0 offset at +-`half` (0 beyond): the
    same arithmetic as `fc * np.sinc(fc * n) * np.kaiser(2 * half + 1, beta)` for integer
    offsets n = k - half."""
    inside = np.abs(n) <= half
    u = 1 - (n / half) ** 2.0
    np.maximum(u, 0.0, out=u)
    window = np.i0(beta * np.sqrt(u)) / np.i0(beta)
    taps: F64 = fc * np.sinc(fc * n) * window
    taps[~inside] = 0.0
    return taps


def _exact_half(up: int, down: int, length: float) -> int:
    """Half-length at rate_in*L of `design_filter`: the Kaiser half-length rounded up to a
    multiple of L*M."""
    unit = up * down
    return max(unit, math.ceil((length - 1.0) / 2.0 / unit) * unit)


def _ratio(rate_in: int, rate_out: int) -> tuple[int, int]:
    g = math.gcd(rate_in, rate_out)
    return rate_out // g, rate_in // g


def design_filter(
    rate_in: int, rate_out: int, *, passband: float = 0.85, attenuation_db: float = 80.0
) -> tuple[int, int, F64, int]:
    """Low-pass prototype of an exact rational resampler: (L, M, taps, half).

    `taps` (float64, odd length 2*half+1, DC gain L) runs at rate_in*L; its passband edge is
    `passband` times the lower Nyquist frequency, its stopband edge that Nyquist frequency,
    the window a Kaiser one for `attenuation_db`.  `half`, the delay in samples at rate_in*L,
    is a multiple of L*M.  ValueError when half would exceed `MAX_EXACT_HALF` (uncommon rate
    pairs: `Resampler` then uses its interpolated design).
    """
    up, down = _ratio(rate_in, rate_out)
    fs_up = rate_in * up
    fc, beta, length = _kaiser_lowpass(rate_in, rate_out, fs_up, passband, attenuation_db)
    half = _exact_half(up, down, length)
    if half > MAX_EXACT_HALF:
        raise ValueError(
            f"{rate_in} Hz -> {rate_out} Hz: an exact design needs {2 * half + 1} taps "
            f"(L*M = {up * down}), over the {2 * MAX_EXACT_HALF + 1} allowed"
        )
    size = 2 * half + 1
    taps = np.empty(size, dtype=np.float64)
    for first in range(0, size, _DESIGN_CHUNK):  # chunked: bounds the temporaries
        n = np.arange(first, min(first + _DESIGN_CHUNK, size), dtype=np.float64) - half
        taps[first : first + n.shape[0]] = _windowed_sinc(n, float(half), fc, beta)
    taps *= up / taps.sum()
    return up, down, taps, half


def _interpolated_design(
    rate_in: int, rate_out: int, passband: float, attenuation_db: float
) -> tuple[int, int, F32, int]:
    """Table of the interpolated design: (L, M, table, delay in output samples).

    The same Kaiser low-pass as `design_filter`, as a function of the offset in input
    samples, its half-length rounded up to a whole number D of output samples (not of both
    rates).  table[q, i] (`INTERPOLATION_PHASES` + 1 rows of `taps` float32) is its value
    for the input sample taps-1-i samples before the newest one, at fractional phase
    q / INTERPOLATION_PHASES; outputs between two phases interpolate them linearly.
    """
    up, down = _ratio(rate_in, rate_out)
    fc, beta, length = _kaiser_lowpass(rate_in, rate_out, rate_in, passband, attenuation_db)
    delay = max(1, math.ceil((length - 1.0) / 2.0 * up / down))
    taps = 2 * delay * down // up + 1
    if taps > MAX_INTERPOLATED_TAPS:
        raise ValueError(
            f"cannot resample {rate_in} Hz -> {rate_out} Hz: the rate ratio is too large (the "
            f"anti-aliasing filter would need {taps} taps, at most {MAX_INTERPOLATED_TAPS})"
        )
    half = delay * down / up  # in input samples
    phases = INTERPOLATION_PHASES
    table = np.empty((phases + 1, taps), dtype=np.float32)
    back = np.arange(taps - 1, -1, -1, dtype=np.float64) - half
    rows = max(1, _DESIGN_CHUNK // taps)
    for q in range(0, phases + 1, rows):  # chunked: bounds the temporaries
        frac = np.arange(q, min(q + rows, phases + 1), dtype=np.float64)[:, None] / phases
        table[q : q + frac.shape[0]] = _windowed_sinc(back + frac, half, fc, beta)
    table *= np.float32(phases / table[:phases].sum(dtype=np.float64))
    return up, down, table, delay


class _Workspace(threading.local):
    """Per-thread float32 scratch arrays, one per slot, grown on demand and never shrunk.

    Their contents never outlive a call, so streams share them instead of each owning its
    own: slot 0 holds the resampler products, 1 converted input, 2 resampled samples.
    """

    def __init__(self) -> None:
        self.bufs: list[F32] = [np.empty(0, dtype=np.float32) for _ in range(3)]

    def get(self, slot: int, size: int) -> F32:
        buf = self.bufs[slot]
        if buf.shape[0] < size:
            buf = np.empty(max(size, 2 * buf.shape[0]), dtype=np.float32)
            self.bufs[slot] = buf
        return buf[:size]


_WORKSPACE: Final = _Workspace()
_PRODUCTS, _CONVERTED, _RESAMPLED = 0, 1, 2
_ZEROS: Final = np.zeros(_BLOCK, dtype=np.float32)
_ZEROS.flags.writeable = False
_ROWS: Final = 512
"""Output rows per multiply-accumulate pass (at most 512, and _MAX_PRODUCTS floats)."""
_MAX_PRODUCTS: Final = 1 << 18


class Resampler:
    """Streaming rational resampler rate_in -> rate_out for float32 mono (see module doc).

    State: two history buffers (double-buffered, so the kept tail is never copied onto
    itself), the number of valid samples `_len` and the position of the next output in the
    upsampled domain `_pos` (relative to the buffer start).  Sizes are in samples.  `exact`
    is False for the interpolated design of uncommon rate pairs (module doc); ValueError
    when a pair needs a longer filter than `MAX_INTERPOLATED_TAPS`.
    """

    __slots__ = (
        "_bufs",
        "_len",
        "_phases",
        "_pos",
        "_which",
        "block",
        "delay_in_samples",
        "delay_out_samples",
        "down",
        "exact",
        "rate_in",
        "rate_out",
        "taps",
        "up",
    )

    def __init__(
        self,
        rate_in: int,
        rate_out: int,
        *,
        passband: float = 0.85,
        attenuation_db: float = 80.0,
        block: int = _BLOCK,
    ) -> None:
        if rate_in <= 0 or rate_out <= 0 or block <= 0:
            raise ValueError("rates and block must be positive")
        self.rate_in = rate_in
        self.rate_out = rate_out
        self.block = block
        self.exact = True
        if rate_in == rate_out:
            self.up = self.down = 1
            self.taps = 1
            self.delay_in_samples = 0
            self.delay_out_samples = 0
            self._phases: F32 = np.ones((1, 1), dtype=np.float32)
        else:
            up, down = _ratio(rate_in, rate_out)
            fs_up = rate_in * up
            length = _kaiser_lowpass(rate_in, rate_out, fs_up, passband, attenuation_db)[2]
            self.up, self.down = up, down
            if _exact_half(up, down, length) <= MAX_EXACT_HALF:
                _, _, proto, half = design_filter(
                    rate_in, rate_out, passband=passband, attenuation_db=attenuation_db
                )
                per_phase = -(-proto.shape[0] // up)
                flat = np.zeros(per_phase * up, dtype=np.float32)
                flat[: proto.shape[0]] = proto
                # phases[p, i] multiplies x[n0 - per_phase + 1 + i] for outputs of phase p
                self._phases = np.ascontiguousarray(flat.reshape(per_phase, up).T[:, ::-1])
                self.taps = per_phase
                self.delay_in_samples = half // up
                self.delay_out_samples = half // down
            else:
                self.exact = False
                _, _, self._phases, delay = _interpolated_design(
                    rate_in, rate_out, passband, attenuation_db
                )
                self.taps = self._phases.shape[1]
                self.delay_out_samples = delay
                self.delay_in_samples = -(-delay * down // up)
        size = 0 if self.passthrough else self.taps - 1 + block
        self._bufs: tuple[F32, F32] = (
            np.zeros(size, dtype=np.float32),
            np.zeros(size, dtype=np.float32),
        )
        self._which = 0
        self._len = 0
        self._pos = 0
        self.reset()

    @property
    def passthrough(self) -> bool:
        """True when rate_in == rate_out (samples are copied unchanged, no delay)."""
        return self.rate_in == self.rate_out

    @property
    def delay_ms(self) -> float:
        """Group delay of the filter, ms."""
        return 1000.0 * self.delay_out_samples / self.rate_out

    @property
    def nbytes(self) -> int:
        """Bytes of this resampler's own buffers (history + coefficients)."""
        return int(sum(b.nbytes for b in self._bufs) + self._phases.nbytes)

    def max_output(self, n: int) -> int:
        """Most output samples `process` can return for `n` input samples."""
        return (n * self.up + self.down - 1) // self.down + 1

    def reset(self) -> None:
        """Back to the initial state: a history of zeros, no output produced."""
        for b in self._bufs:
            b.fill(0.0)
        self._which = 0
        self._len = self.taps - 1
        self._pos = (self.taps - 1) * self.up

    def process(self, x: F32, out: F32) -> int:
        """Resample `x` (float32, any length) into `out`; return the number of outputs.

        `out` needs `max_output(len(x))` samples of room.  Output sample k is emitted by the
        call that delivers input sample floor(k*M/L).
        """
        if self.passthrough:
            n = int(x.shape[0])
            out[:n] = x
            return n
        total = 0
        for i in range(0, x.shape[0], self.block):
            total += self._process_block(x[i : i + self.block], out[total:])
        return total

    def _process_block(self, x: F32, out: F32) -> int:
        up, down, taps = self.up, self.down, self.taps
        buf = self._bufs[self._which]
        n = x.shape[0]
        buf[self._len : self._len + n] = x
        length = self._len + n
        last = up * length - 1  # outputs whose newest input is in the buffer: pos <= last
        count = (last - self._pos) // down + 1 if last >= self._pos else 0
        most = max(1, min(_ROWS, _MAX_PRODUCTS // taps))
        if self.exact:
            item = buf.itemsize
            for r in range(min(up, count)):
                pos = self._pos + r * down
                phase, newest = pos % up, pos // up
                coeffs = self._phases[phase]
                rows = (count - r + up - 1) // up
                for first in range(0, rows, most):
                    chunk = min(most, rows - first)
                    start = newest - taps + 1 + first * down
                    windows = as_strided(
                        buf[start:],
                        shape=(chunk, taps),
                        strides=(down * item, item),
                        writeable=False,
                    )
                    products = _WORKSPACE.get(_PRODUCTS, chunk * taps).reshape(chunk, taps)
                    np.multiply(windows, coeffs, out=products)
                    o = r + first * up
                    np.sum(products, axis=1, out=out[o : o + up * (chunk - 1) + 1 : up])
        elif count:
            windows_at = sliding_window_view(buf[:length], taps)
            table, phases = self._phases, self._phases.shape[0] - 1
            for first in range(0, count, most):
                k = np.arange(first, min(first + most, count), dtype=np.int64)
                at = self._pos + k * down  # output positions at rate_in*L
                frac = (at % up) * phases  # their phases, in 1/(L * phases) input samples
                q = frac // up
                w = ((frac - q * up) / up).astype(np.float32)[:, None]
                coeffs = table[q]  # interpolated between the phases q and q + 1
                coeffs += (table[q + 1] - coeffs) * w
                coeffs *= windows_at[at // up - (taps - 1)]
                np.sum(coeffs, axis=1, out=out[first : first + k.shape[0]])
        self._pos += count * down
        keep_from = min(max(self._pos // up - taps + 1, 0), length)
        kept = length - keep_from
        other = self._bufs[1 - self._which]
        other[:kept] = buf[keep_from:length]
        self._which = 1 - self._which
        self._len = kept
        self._pos -= keep_from * up
        return count


# --------------------------------------------------------------------------------------------
# Framers
# --------------------------------------------------------------------------------------------


def _check_rate(rate: int) -> None:
    if rate not in SUPPORTED_RATES:
        raise ValueError(f"sample rate {rate} Hz is not supported (use one of {SUPPORTED_RATES})")


@functools.cache
def resampling_delay_ms(rate_in: int, rate_out: int) -> float:
    """Group delay, ms, of the `Resampler(rate_in, rate_out)` the framers build (designed once
    per rate pair, so delays can be reported without building a resampler each time)."""
    return Resampler(rate_in, rate_out).delay_ms


class InputFramer:
    """Client PCM (any chunking, `rate` Hz, `fmt`) -> exact frames of N model-rate samples.

    Holds a `Resampler` (rate -> model_rate) and a `RingBuffer` of model-rate samples of
    `max_buffered_ms` + one frame; samples that do not fit are dropped and counted in
    `overflow` (model-rate samples).  Delay: `delay_samples` (model rate) / `delay_ms`.
    """

    __slots__ = (
        "fmt",
        "frame_size",
        "model_rate",
        "rate",
        "resampler",
        "ring",
    )

    def __init__(
        self,
        rate: int,
        *,
        model_rate: int,
        frame_size: int,
        fmt: SampleFormat = SampleFormat.S16LE,
        max_buffered_ms: float = 1000.0,
    ) -> None:
        _check_rate(rate)
        self.rate = rate
        self.model_rate = model_rate
        self.frame_size = frame_size
        self.fmt = SampleFormat(fmt)
        self.resampler = Resampler(rate, model_rate)
        capacity = math.ceil(max_buffered_ms * model_rate / 1000.0) + frame_size
        self.ring = RingBuffer(capacity)

    @property
    def frames_ready(self) -> int:
        """Whole frames buffered."""
        return self.ring.available // self.frame_size

    @property
    def overflow(self) -> int:
        """Model-rate samples dropped because the buffer was full."""
        return self.ring.overflow

    @property
    def delay_samples(self) -> int:
        """Resampling delay in model-rate samples (0 at the model rate)."""
        return self.resampler.delay_out_samples

    @property
    def delay_ms(self) -> float:
        """Resampling delay, ms."""
        return self.resampler.delay_ms

    @property
    def nbytes(self) -> int:
        """Bytes of this framer's own buffers (ring + resampler)."""
        return self.ring.nbytes + self.resampler.nbytes

    def push(self, pcm: PcmInput) -> int:
        """Add a chunk of client PCM; return the number of whole frames now buffered."""
        samples = pcm_samples(pcm, self.fmt)
        for i in range(0, samples.shape[0], _BLOCK):
            part = samples[i : i + _BLOCK]
            converted = _WORKSPACE.get(_CONVERTED, part.shape[0])
            to_float32(part, converted)
            self._feed(converted)
        return self.frames_ready

    def _feed(self, x: F32) -> None:
        if self.resampler.passthrough:
            self.ring.write(x)
            return
        out = _WORKSPACE.get(_RESAMPLED, self.resampler.max_output(x.shape[0]))
        self.ring.write(out[: self.resampler.process(x, out)])

    def read_frame(self, out: F32) -> bool:
        """Move the next frame (N samples) into `out`; False (out untouched) if none."""
        if self.ring.available < self.frame_size:
            return False
        self.ring.read_into(out[: self.frame_size])
        return True

    def flush(self) -> int:
        """End of input: push the resampler's delay worth of zeros (so every real sample
        reaches the model rate) and zero-pad to a whole frame; return frames buffered."""
        remaining = self.resampler.delay_in_samples
        while remaining > 0:
            n = min(remaining, _BLOCK)
            self._feed(_ZEROS[:n])
            remaining -= n
        partial = self.ring.available % self.frame_size
        if partial:
            self.ring.write_zeros(self.frame_size - partial)
        return self.frames_ready

    def reset(self) -> None:
        """Back to a fresh framer (buffer emptied, resampler history zeroed, counters 0)."""
        self.resampler.reset()
        self.ring.reset()


class OutputFramer:
    """Model frames (N samples at `model_rate`) -> client PCM at `rate` in `fmt`.

    Resampled samples wait in a `RingBuffer` of `max_buffered_ms` (+ one frame) at `rate`
    until read; overflow (samples at `rate` dropped because the reader is too slow) and
    underrun (samples a padded read lacked) are counted.
    """

    __slots__ = (
        "fmt",
        "frame_size",
        "model_rate",
        "rate",
        "resampler",
        "ring",
    )

    def __init__(
        self,
        rate: int,
        *,
        model_rate: int,
        frame_size: int,
        fmt: SampleFormat = SampleFormat.S16LE,
        max_buffered_ms: float = 1000.0,
    ) -> None:
        _check_rate(rate)
        self.rate = rate
        self.model_rate = model_rate
        self.frame_size = frame_size
        self.fmt = SampleFormat(fmt)
        self.resampler = Resampler(model_rate, rate)
        frame_out = self.resampler.max_output(frame_size)
        capacity = math.ceil(max_buffered_ms * rate / 1000.0) + frame_out
        self.ring = RingBuffer(capacity)

    @property
    def available(self) -> int:
        """Samples (at `rate`) ready to read."""
        return self.ring.available

    @property
    def overflow(self) -> int:
        """Samples (at `rate`) dropped because the buffer was full."""
        return self.ring.overflow

    @property
    def underrun(self) -> int:
        """Samples (at `rate`) padded reads asked for but did not get (zeros instead)."""
        return self.ring.underrun

    @property
    def delay_samples(self) -> int:
        """Resampling delay in samples at `rate` (0 at the model rate)."""
        return self.resampler.delay_out_samples

    @property
    def delay_ms(self) -> float:
        """Resampling delay, ms."""
        return self.resampler.delay_ms

    @property
    def nbytes(self) -> int:
        """Bytes of this framer's own buffers (ring + resampler)."""
        return self.ring.nbytes + self.resampler.nbytes

    def write(self, samples: F32) -> None:
        """Add model-rate float32 samples (normally one decoded frame of N)."""
        for i in range(0, samples.shape[0], _BLOCK):
            part = samples[i : i + _BLOCK]
            if self.resampler.passthrough:
                self.ring.write(part)
            else:
                out = _WORKSPACE.get(_RESAMPLED, self.resampler.max_output(part.shape[0]))
                self.ring.write(out[: self.resampler.process(part, out)])

    def write_silence(self, n: int) -> None:
        """Add `n` model-rate zero samples (through the resampler, keeping its timing)."""
        while n > 0:
            m = min(n, _BLOCK)
            self.write(_ZEROS[:m])
            n -= m

    def read_into(self, out: npt.NDArray[np.generic], *, pad: bool = False) -> int:
        """Move up to `len(out)` samples into `out` (int16 or float32, 1-D); return the number
        of real samples moved.  With `pad=True` the rest of `out` is zero-filled and the
        missing count added to `underrun`."""
        if out.dtype == np.float32:
            return self.ring.read_into(cast(F32, out), pad=pad)
        if out.dtype != np.int16:
            raise ValueError(f"out must be int16 or float32, got {out.dtype}")
        dest = cast(I16, out)
        want = dest.shape[0]
        got = 0
        while got < want:
            m = min(want - got, _BLOCK)
            scratch = _WORKSPACE.get(_CONVERTED, m)
            k = self.ring.read_into(scratch)
            float32_to_int16(scratch[:k], dest[got : got + k])
            got += k
            if k < m:
                break
        if pad and got < want:
            dest[got:] = 0
            self.ring.underrun += want - got
        return got

    def read(self, max_samples: int | None = None, *, pad: bool = False) -> npt.NDArray[np.generic]:
        """Up to `max_samples` samples (all available with None) as a new array of the
        format's dtype (int16 for S16LE, float32 for F32LE).  With `pad=True` exactly
        `max_samples` (zeros for missing ones, counted as underrun)."""
        avail = self.ring.available
        if max_samples is None:
            size = avail
        elif max_samples < 0:
            raise ValueError("max_samples must be >= 0")
        else:
            size = max_samples if pad else min(max_samples, avail)
        dtype = np.int16 if self.fmt is SampleFormat.S16LE else np.float32
        out = np.empty(size, dtype=dtype)
        self.read_into(out, pad=pad)
        return out

    def read_bytes(self, max_samples: int | None = None, *, pad: bool = False) -> bytes:
        """As `read`, encoded in the format (little-endian bytes)."""
        return self.read(max_samples, pad=pad).astype(self.fmt.dtype, copy=False).tobytes()

    def flush(self) -> int:
        """End of stream: push the resampler's delay worth of model-rate zeros, so every
        decoded sample reaches the output; return samples available."""
        self.write_silence(self.resampler.delay_in_samples)
        return self.ring.available

    def reset(self) -> None:
        """Back to a fresh framer (buffer emptied, resampler history zeroed, counters 0)."""
        self.resampler.reset()
        self.ring.reset()
