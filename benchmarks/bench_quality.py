"""Speech quality benchmark: our codec next to Opus and Codec2 at matched bitrates.

Per (codec, bitrate, clip), on 16 kHz mono clips (default: ../shared/data/dev):

* **ours** at 1, 3 and 6 kbps (the bitrate modes the model card gives those budgets: 1
  codebook; 2 codebooks + low-band layout 1; 3 codebooks + layout 2), run exactly as
  `codec-client encode` / `decode` do: through `client.files` (EncoderStream -> bitstream
  file -> read back -> DecoderStream, output aligned to the input and of its exact length)
  when that module is there, else the same chain written here on the `streaming` API
  (`--pipeline` picks; the JSON records which ran).
  Measured bitrate = bitstream file bytes * 8 / clip duration (header and flush frame
  included); the payload bitrate (frame bits only) is reported too.
* **Opus** (libopus via `opuslib`) at 6, 9 and 12 kbps: 16 kHz, 20 ms frames, VOIP,
  complexity 10, default VBR; bitrate from the bytes of every packet needed to deliver the
  whole clip; output shifted by the encoder's lookahead (its total algorithmic delay).
* **Codec2** (`pycodec2`) at 1.2 and 3.2 kbps: 16 kHz -> 8 kHz -> Codec2 -> 8 kHz -> 16 kHz
  with `scipy.signal.resample_poly` (zero phase); Codec2 keeps no waveform phase, so its
  delay is estimated once per bitrate (median over the clips of a waveform or, when that
  correlation is weak, an energy-envelope cross-correlation) and compensated.

Metrics: PESQ-WB (`pesq`), STOI (`pystoi`), log-mel distance (own, see `mel_distance`) and the
measured bitrate; mean over clips.  Every decoded output is stored as 16-bit PCM (as a WAV
file would) before it is scored or re-encoded.  A residual-delay check cross-correlates each
aligned output with its input (0 = aligned).

Idempotence ("code drift", arXiv 2410.11025): the aligned output is encoded and decoded again
`--passes` times with fresh codec state; PESQ-WB and mel distance against the ORIGINAL after
each pass, and the fraction kept, PESQ(last) / PESQ(1).  For ours also the token match rate
between consecutive passes (per codebook index, overall, whole frames, gain index).

Codebook usage of ours at 6 kbps over all clips (first pass): per-codebook entropy (bits),
perplexity (2**entropy) and the fraction of the codebook ever used.

Writes the JSON (`--out`), docs/img/quality_rate.png, docs/img/quality_idempotence.png,
docs/img/codebook_usage.png and the section of docs/quality.md between its markers (the rest
of the file is kept); `--no-docs` writes the JSON only.

    python benchmarks/bench_quality.py                     # all clips: minutes
    python benchmarks/bench_quality.py --quick             # 4 clips, for development
    python benchmarks/bench_quality.py --model DIR --codecs ours,opus --passes 3
    python benchmarks/bench_quality.py --docs-only         # re-render doc + PNGs from the JSON

A peer library that cannot be imported is skipped with a message (JSON: `skipped`).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime as dt  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from fractions import Fraction  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, ClassVar, TypeAlias  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

F32: TypeAlias = npt.NDArray[np.float32]
F64: TypeAlias = npt.NDArray[np.float64]
I64: TypeAlias = npt.NDArray[np.int64]

SR = 16000
"""Evaluation sample rate (Hz); every codec's input and aligned output are at this rate."""

SECTION_BEGIN = "<!-- bench_quality:begin -->"
SECTION_END = "<!-- bench_quality:end -->"

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dev"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality.json"
DOC = ROOT / "docs" / "quality.md"
IMG = ROOT / "docs" / "img"

OURS_KBPS = (1.0, 3.0, 6.0)
OPUS_KBPS = (6.0, 9.0, 12.0)
CODEC2_KBPS = (1.2, 3.2)
USAGE_KBPS = 6.0
"""Bitrate of ours whose codebook usage is reported."""
QUICK_CLIPS = 4


# ============================================================================================
# Pure helpers (numpy only; tests/test_bench_quality.py checks them)
# ============================================================================================


def to_pcm16(x: npt.ArrayLike) -> F32:
    """`x` as a 16-bit PCM file stores it (rounded, clipped), back as float32 in [-1, 1)."""
    q = np.clip(np.round(np.asarray(x, dtype=np.float64) * 32768.0), -32768, 32767)
    return (q / 32768.0).astype(np.float32)


def to_int16(x: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """`x` (float in [-1, 1]) as int16 samples (rounded, clipped)."""
    q = np.clip(np.round(np.asarray(x, dtype=np.float64) * 32768.0), -32768, 32767)
    return q.astype(np.int16)


def estimate_delay(ref: npt.ArrayLike, deg: npt.ArrayLike, max_lag: int) -> tuple[int, float]:
    """Lag d in [-max_lag, max_lag] maximising |cross-correlation|, so that deg[n + d] ~ ref[n].

    Returns (d, peak correlation normalised by both signal energies, in [-1, 1]).
    """
    r = np.asarray(ref, dtype=np.float64)
    g = np.asarray(deg, dtype=np.float64)
    size = 1 << max(1, math.ceil(math.log2(r.shape[0] + g.shape[0])))
    # xc[k] = sum_n g[n + k] r[n]; negative k wraps to the end
    xc = np.fft.irfft(np.fft.rfft(g, size) * np.conj(np.fft.rfft(r, size)), size)
    max_lag = min(max_lag, size // 2 - 1)
    lags = np.arange(-max_lag, max_lag + 1)
    values = xc[lags % size]
    best = int(np.argmax(np.abs(values)))
    norm = math.sqrt(float(np.dot(r, r)) * float(np.dot(g, g))) + 1e-12
    return int(lags[best]), float(values[best] / norm)


def log_envelope(x: npt.ArrayLike, hop: int) -> F64:
    """Zero-mean log RMS envelope of `x`, one value per `hop` samples (5-point smoothed)."""
    v = np.asarray(x, dtype=np.float64)
    m = v.shape[0] // hop
    rms = np.sqrt(np.mean(v[: m * hop].reshape(m, hop) ** 2, axis=1) + 1e-10)
    smooth = np.convolve(rms, np.full(5, 0.2), mode="same")
    env: F64 = np.log(smooth + 1e-4)
    return env - float(env.mean())


def envelope_delay(ref: npt.ArrayLike, deg: npt.ArrayLike, max_lag: int, hop: int = 16) -> int:
    """Delay (samples, `hop` resolution) from cross-correlating log energy envelopes: for
    codecs that keep the spectral envelope but not the waveform (Codec2)."""
    lag, _ = estimate_delay(log_envelope(ref, hop), log_envelope(deg, hop), max_lag // hop)
    return lag * hop


def estimate_alignment(
    ref: npt.ArrayLike, deg: npt.ArrayLike, max_lag: int, min_corr: float = 0.3
) -> tuple[int, float, str]:
    """(delay, waveform correlation, method): the waveform cross-correlation lag when its
    normalised peak is at least `min_corr`, else the envelope estimate."""
    lag, corr = estimate_delay(ref, deg, max_lag)
    if abs(corr) >= min_corr:
        return lag, corr, "xcorr"
    return envelope_delay(ref, deg, max_lag), corr, "envelope"


def shift(deg: npt.ArrayLike, delay: int, length: int) -> F32:
    """`out[n] = deg[n + delay]` for n in [0, length), zero where `deg` has no sample."""
    g = np.asarray(deg, dtype=np.float32)
    out = np.zeros(length, dtype=np.float32)
    src, dst = max(delay, 0), max(-delay, 0)
    n = min(length - dst, g.shape[0] - src)
    if n > 0:
        out[dst : dst + n] = g[src : src + n]
    return out


def frames_needed(samples: int, delay: int, frame: int) -> int:
    """Frames a codec of `delay` samples must code to output all of `samples` input samples."""
    return -(-(samples + max(delay, 0)) // frame)


def kbps(bits: int | float, samples: int, rate: int = SR) -> float:
    """Bitrate in kbps of `bits` spent on `samples` samples at `rate` Hz."""
    return float(bits) * rate / samples / 1000.0 if samples > 0 else math.nan


def level_change_db(ref: npt.ArrayLike, deg: npt.ArrayLike) -> float:
    """Level of `deg` relative to `ref`, dB (RMS over the whole signals; 0 = same level)."""
    r = float(np.mean(np.square(np.asarray(ref, dtype=np.float64))))
    g = float(np.mean(np.square(np.asarray(deg, dtype=np.float64))))
    return 10.0 * math.log10((g + 1e-20) / (r + 1e-20))


def hz_to_mel(f: npt.ArrayLike) -> F64:
    """HTK mel scale."""
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m: npt.ArrayLike) -> F64:
    """Inverse of `hz_to_mel`."""
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(rate: int = SR, n_fft: int = 512, n_mels: int = 80) -> F64:
    """Triangular mel filters [n_mels, n_fft // 2 + 1], 0 Hz to Nyquist, peak 1."""
    bins = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(0.0, float(hz_to_mel(rate / 2)), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (bins[None, :] - lo) / (mid - lo)
    fall = (hi - bins[None, :]) / (hi - mid)
    return np.maximum(0.0, np.minimum(rise, fall))


def log_mel(
    x: npt.ArrayLike,
    rate: int = SR,
    n_fft: int = 512,
    win: int = 400,
    hop: int = 160,
    n_mels: int = 80,
) -> F64:
    """Mel power spectrogram in dB [frames, n_mels]: 25 ms Hann windows, 10 ms hop."""
    v = np.asarray(x, dtype=np.float64)
    if v.shape[0] < win:
        v = np.pad(v, (0, win - v.shape[0]))
    frames = np.lib.stride_tricks.sliding_window_view(v, win)[::hop] * np.hanning(win)
    power = np.abs(np.fft.rfft(frames, n_fft, axis=1)) ** 2
    return 10.0 * np.log10(power @ mel_filterbank(rate, n_fft, n_mels).T + 1e-10)


def mel_distance(ref: npt.ArrayLike, deg: npt.ArrayLike, floor_db: float = 80.0) -> float:
    """Log-mel spectral distance, dB: mean over 10 ms frames of the RMS over 80 mel bands of
    the dB difference.  Both spectrograms are floored at the reference's maximum minus
    `floor_db`, so that digital silence does not dominate.  0 for identical signals."""
    a, b = log_mel(ref), log_mel(deg)
    n = min(a.shape[0], b.shape[0])
    a, b = a[:n], b[:n]
    floor = a.max() - floor_db
    diff = np.maximum(a, floor) - np.maximum(b, floor)
    return float(np.mean(np.sqrt(np.mean(diff**2, axis=1))))


@dataclass(frozen=True)
class TokenMatch:
    """Identical tokens between two encodings of the same frames: counts pooled over frames.

    `codes_same` / `codes_total` are per codebook index [K]; `frames_same` counts frames
    whose codes are all identical; `gain_same` frames with the same gain index, `gain_close`
    frames whose gain indices differ by at most one step, `gain_shift` the sum over frames of
    (second - first) gain index (a level drift shows as a mean shift)."""

    codes_same: I64
    codes_total: I64
    frames_same: int
    gain_same: int
    gain_close: int
    gain_shift: int
    frames: int

    def __add__(self, other: TokenMatch) -> TokenMatch:
        return TokenMatch(
            self.codes_same + other.codes_same,
            self.codes_total + other.codes_total,
            self.frames_same + other.frames_same,
            self.gain_same + other.gain_same,
            self.gain_close + other.gain_close,
            self.gain_shift + other.gain_shift,
            self.frames + other.frames,
        )

    @property
    def per_codebook(self) -> list[float]:
        """Match rate per codebook index."""
        return [
            s / t if t else math.nan for s, t in zip(self.codes_same, self.codes_total, strict=True)
        ]

    @property
    def overall(self) -> float:
        """Match rate over all codes."""
        total = int(self.codes_total.sum())
        return int(self.codes_same.sum()) / total if total else math.nan

    @property
    def frame_rate(self) -> float:
        """Fraction of frames with every code identical."""
        return self.frames_same / self.frames if self.frames else math.nan

    @property
    def gain_rate(self) -> float:
        """Fraction of frames with the same gain index."""
        return self.gain_same / self.frames if self.frames else math.nan

    @property
    def gain_close_rate(self) -> float:
        """Fraction of frames whose gain indices differ by at most one step."""
        return self.gain_close / self.frames if self.frames else math.nan

    @property
    def gain_shift_mean(self) -> float:
        """Mean change of the gain index (steps; negative: the second encoding is quieter)."""
        return self.gain_shift / self.frames if self.frames else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "per_codebook": self.per_codebook,
            "frames": self.frame_rate,
            "gain": self.gain_rate,
            "gain_within_1": self.gain_close_rate,
            "gain_shift_mean": self.gain_shift_mean,
            "frames_compared": self.frames,
        }


def token_match(
    codes_a: npt.ArrayLike, codes_b: npt.ArrayLike, gains_a: npt.ArrayLike, gains_b: npt.ArrayLike
) -> TokenMatch:
    """Compare two token sequences of the same shape: codes [F, K], gain indices [F]."""
    a, b = np.asarray(codes_a, dtype=np.int64), np.asarray(codes_b, dtype=np.int64)
    ga, gb = np.asarray(gains_a, dtype=np.int64), np.asarray(gains_b, dtype=np.int64)
    if a.shape != b.shape or a.ndim != 2 or ga.shape != gb.shape or ga.shape[0] != a.shape[0]:
        raise ValueError(f"token shapes differ: {a.shape} {b.shape} {ga.shape} {gb.shape}")
    same = a == b
    return TokenMatch(
        same.sum(axis=0).astype(np.int64),
        np.full(a.shape[1], a.shape[0], dtype=np.int64),
        int(same.all(axis=1).sum()),
        int((ga == gb).sum()),
        int((np.abs(gb - ga) <= 1).sum()),
        int((gb - ga).sum()),
        int(a.shape[0]),
    )


def codebook_usage(codes: npt.ArrayLike, codebook_size: int) -> dict[str, Any]:
    """Usage of each codebook (column) of `codes` [F, K]: entropy of the empirical index
    distribution (bits), perplexity 2**entropy, and the fraction of the codebook used."""
    c = np.asarray(codes, dtype=np.int64)
    entropy: list[float] = []
    used: list[float] = []
    for k in range(c.shape[1]):
        counts = np.bincount(c[:, k], minlength=codebook_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        entropy.append(float(-(p * np.log2(p)).sum()))
        used.append(float((counts > 0).sum() / codebook_size))
    return {
        "frames": int(c.shape[0]),
        "codebook_size": codebook_size,
        "entropy_bits": entropy,
        "perplexity": [2.0**h for h in entropy],
        "used_fraction": used,
        "max_entropy_bits": math.log2(max(1, min(c.shape[0], codebook_size))),
    }


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when there is none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def nanstd(values: Sequence[float]) -> float:
    """Standard deviation of the finite values (NaN when there is none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.std()) if v.size else math.nan


# ============================================================================================
# Metrics from the libraries
# ============================================================================================


def pesq_wb(ref: F32, deg: F32) -> float:
    """PESQ wide-band MOS-LQO (ITU-T P.862.2); NaN when PESQ refuses the pair."""
    from pesq import pesq

    try:
        return float(pesq(SR, ref, deg, "wb"))
    except Exception as exc:  # NoUtterancesError, BufferTooShortError, ...
        warnings.warn(f"PESQ failed: {exc}", stacklevel=2)
        return math.nan


def stoi(ref: F32, deg: F32) -> float:
    """Short-time objective intelligibility (0..1)."""
    from pystoi import stoi as _stoi

    return float(_stoi(ref.astype(np.float64), deg.astype(np.float64), SR, extended=False))


# ============================================================================================
# Codecs: roundtrip(x) -> output aligned to x, with exactly its length, and the bits spent
# ============================================================================================


class CodecUnavailableError(Exception):
    """A peer codec's library cannot be loaded: the codec is skipped."""


@dataclass
class Coded:
    """One encode/decode of a clip: `y` aligned to the input with its length, `bits` the
    bitrate measure (file or packet bytes * 8), `payload_bits` the codec bits alone, and for
    ours the tokens (`codes` [F, n], `gains` [F])."""

    y: F32
    bits: int
    payload_bits: int
    codes: I64 | None = None
    gains: I64 | None = None


class Codec:
    """A codec at one bitrate."""

    name = "codec"
    nominal_kbps = 0.0
    delay = 0
    """Delay (samples at 16 kHz) the roundtrip compensates."""
    delay_method = ""

    @property
    def label(self) -> str:
        return f"{self.name}@{self.nominal_kbps:g}k"

    def prepare(self, clips: Sequence[F32]) -> None:
        """Called once with all clips before the first roundtrip (delay calibration)."""

    def roundtrip(self, x: F32) -> Coded:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}


Pipeline: TypeAlias = Callable[[F32, Any], tuple[bytes, F32]]
"""(clip, BitrateMode) -> (bitstream file bytes, aligned decoded clip)."""
"""(16 kHz float32 clip, codebooks) -> (bitstream file bytes, aligned decoded output)."""


def client_pipeline(model: Any) -> Pipeline:
    """The CLI's own path: `client.files.encode_local` -> file bytes -> `read_bitstream`
    (frames and the source record) -> `decode_local` (ImportError when client.files is not
    there)."""
    from client.audiofile import Audio
    from client.files import decode_local, encode_local
    from streaming.protocol import read_bitstream

    def run(x: F32, mode: Any) -> tuple[bytes, F32]:
        data, _ = encode_local(Audio(x, SR), model, mode, quiet=True)
        header, frames = read_bitstream(data)
        out = decode_local(frames, header.source, model, SR, quiet=True)
        return data, np.asarray(out.samples, dtype=np.float32)

    return run


def streaming_pipeline(model: Any) -> Pipeline:
    """The same chain on the `streaming` API directly: EncoderStream -> BitstreamWriter ->
    read_bitstream -> DecoderStream; the input is zero-padded to F = ceil((n + D) / N)
    frames (D = the card's output delay) and the output is the decoded stream from D on."""
    from streaming.framing import SampleFormat
    from streaming.protocol import BitstreamHeader, BitstreamWriter, read_bitstream
    from streaming.stream import DecoderStream, EncoderStream

    card = model.card
    if card.sample_rate != SR:
        raise ValueError(f"the streaming pipeline needs a {SR} Hz model, got {card.sample_rate}")
    n_frame, d = card.frame_size, card.output_delay_samples
    chunk = 25 * n_frame

    def run(x: F32, mode: Any) -> tuple[bytes, F32]:
        n = x.shape[0]
        count = frames_needed(n, d, n_frame)
        pcm = np.zeros(count * n_frame, dtype=np.float32)
        pcm[:n] = x
        enc = EncoderStream(model, fmt=SampleFormat.F32LE)
        enc.set_mode(mode)
        writer = BitstreamWriter(
            BitstreamHeader(
                card.model_id, SR, n_frame, card.code_bits, card.gain.bits, card.num_codebooks
            )
        )
        for i in range(0, pcm.shape[0], chunk):
            writer.add_frames(enc.encode(pcm[i : i + chunk]))
        data = writer.finalize()
        _, frames = read_bitstream(data)
        dec = DecoderStream(model, fmt=SampleFormat.F32LE)
        out = np.zeros(len(frames) * n_frame, dtype=np.float32)
        pos = 0
        for i in range(0, len(frames), 25):
            dec.push_many(frames[i : i + 25])
            dec.run()
            pos += dec.pull_into(out[pos:])
        dec.flush()
        pos += dec.pull_into(out[pos:])
        return data, shift(out[:pos], d, n)

    return run


class OursCodec(Codec):
    name = "ours"

    def __init__(self, model: Any, kbps_: float, pipeline: Pipeline, pipeline_name: str) -> None:
        from streaming.protocol import frame_stream_bits, read_bitstream_arrays

        self._read = read_bitstream_arrays
        self._stream_bits = frame_stream_bits
        self.model = model
        self.card = model.card
        self.nominal_kbps = kbps_
        self.mode = self.card.mode_for_bitrate(kbps_)
        self.num_codebooks = self.mode.num_codebooks
        self.pipeline = pipeline
        self.pipeline_name = pipeline_name
        self.delay = self.card.output_delay_samples
        self.delay_method = "card output_delay_samples (compensated by the decoder pipeline)"

    def roundtrip(self, x: F32) -> Coded:
        data, y = self.pipeline(x, self.mode)
        if y.shape[0] != x.shape[0]:
            raise RuntimeError(f"{self.label}: output has {y.shape[0]} samples, input {x.shape[0]}")
        _, arrays = self._read(data)
        payload = self._stream_bits(
            arrays, code_bits=self.card.code_bits, gain_bits=self.card.gain.bits
        )
        return Coded(
            y,
            8 * len(data),
            payload,
            arrays.codes[:, : self.num_codebooks].copy(),
            arrays.gain_index.copy(),
        )

    def info(self) -> dict[str, Any]:
        return {
            "num_codebooks": self.num_codebooks,
            "lowband_layout": self.mode.lowband_layout,
            "pipeline": self.pipeline_name,
            "card_kbps": self.mode.kbps,
        }


class OpusCodec(Codec):
    """libopus through opuslib: 16 kHz mono, 20 ms, VOIP, complexity 10, default VBR."""

    name = "opus"
    frame = 320

    def __init__(self, kbps_: float) -> None:
        try:
            import opuslib
        except Exception as exc:  # missing package or libopus
            raise CodecUnavailableError(f"opuslib/libopus cannot be loaded ({exc})") from None
        self.opuslib = opuslib
        self.nominal_kbps = kbps_
        self.delay = int(self._encoder().lookahead)
        self.delay_method = "encoder lookahead (OPUS_GET_LOOKAHEAD)"

    def _encoder(self) -> Any:
        enc = self.opuslib.Encoder(SR, 1, self.opuslib.APPLICATION_VOIP)
        enc.bitrate = int(self.nominal_kbps * 1000)
        enc.complexity = 10
        return enc

    def roundtrip(self, x: F32) -> Coded:
        enc, dec = self._encoder(), self.opuslib.Decoder(SR, 1)
        n = x.shape[0]
        count = frames_needed(n, self.delay, self.frame)
        pcm = np.zeros(count * self.frame, dtype=np.int16)
        pcm[:n] = to_int16(x)
        out, bits = [], 0
        for i in range(count):
            packet = enc.encode(pcm[i * self.frame : (i + 1) * self.frame].tobytes(), self.frame)
            bits += 8 * len(packet)
            out.append(np.frombuffer(dec.decode(packet, self.frame), dtype=np.int16))
        y = np.concatenate(out).astype(np.float32) / 32768.0
        return Coded(shift(y, self.delay, n), bits, bits)

    def info(self) -> dict[str, Any]:
        return {"application": "VOIP", "complexity": 10, "frame_ms": 20, "vbr": True}


class Codec2Codec(Codec):
    """Codec2 through pycodec2, at 8 kHz (resample_poly 16k -> 8k -> 16k)."""

    name = "codec2"
    MODES: ClassVar[dict[float, int]] = {1.2: 1200, 3.2: 3200}

    def __init__(self, kbps_: float) -> None:
        try:
            import pycodec2
            from scipy.signal import resample_poly
        except Exception as exc:
            raise CodecUnavailableError(f"pycodec2 cannot be loaded ({exc})") from None
        self.pycodec2 = pycodec2
        self.resample_poly = resample_poly
        self.nominal_kbps = kbps_
        self.mode = self.MODES[kbps_]
        probe = pycodec2.Codec2(self.mode)
        self.spf = int(probe.samples_per_frame())
        self.bpf = int(probe.bits_per_frame())
        self.delay = 0
        self.delay_method = "not calibrated"
        self.clip_delays: list[int] = []

    def _run(self, x: F32, count: int) -> F32:
        """Codec2 on `x` zero-padded to `count` frames at 8 kHz; raw 16 kHz output."""
        c2 = self.pycodec2.Codec2(self.mode)
        x8 = np.zeros(count * self.spf, dtype=np.int16)
        down = to_int16(self.resample_poly(x.astype(np.float64), 1, 2))
        x8[: down.shape[0]] = down[: x8.shape[0]]
        out = [
            np.asarray(c2.decode(c2.encode(x8[i * self.spf : (i + 1) * self.spf])), np.int16)
            for i in range(count)
        ]
        y8 = np.concatenate(out).astype(np.float64) / 32768.0
        return np.asarray(self.resample_poly(y8, 2, 1), dtype=np.float32)

    def prepare(self, clips: Sequence[F32]) -> None:
        """Delay = median over the clips of the alignment estimate (waveform or envelope)."""
        self.clip_delays = []
        for x in clips:
            n8 = -(-x.shape[0] // 2)
            y = self._run(x, frames_needed(n8, 1600, self.spf))  # 200 ms of room
            self.clip_delays.append(estimate_alignment(x, y, max_lag=SR // 10)[0])
        self.delay = int(np.median(self.clip_delays))
        self.delay_method = "median over clips of xcorr/envelope estimates"

    def roundtrip(self, x: F32) -> Coded:
        n = x.shape[0]
        count = frames_needed(-(-n // 2), -(-self.delay // 2), self.spf)
        bits = count * self.bpf
        return Coded(shift(self._run(x, count), self.delay, n), bits, bits)

    def info(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "samples_per_frame_8k": self.spf,
            "bits_per_frame": self.bpf,
            "clip_delays": self.clip_delays,
        }


# ============================================================================================
# Running
# ============================================================================================


@dataclass
class ClipResult:
    clip: str
    seconds: float
    bits: int
    payload_bits: int
    pesq_wb: float
    stoi: float
    mel_dist: float
    residual_delay: int
    residual_corr: float
    residual_method: str
    level_db: float
    pesq_passes: list[float] = field(default_factory=list)
    mel_passes: list[float] = field(default_factory=list)

    @property
    def kbps(self) -> float:
        return kbps(self.bits, round(self.seconds * SR))


def load_clip(path: Path) -> F32:
    """Mono float32 at 16 kHz (channels averaged; other rates resampled with resample_poly)."""
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    x = data.mean(axis=1)
    if rate != SR:
        from scipy.signal import resample_poly

        f = Fraction(SR, int(rate))
        x = resample_poly(x.astype(np.float64), f.numerator, f.denominator)
    return np.ascontiguousarray(x, dtype=np.float32)


def select_clips(data: Path, count: int | None) -> list[Path]:
    """The .wav/.flac files of `data`, sorted; `count` of them evenly spread when given."""
    clips = sorted(p for p in data.iterdir() if p.suffix.lower() in (".wav", ".flac"))
    if not clips:
        raise SystemExit(f"bench_quality: no .wav or .flac clip in {data}")
    if count is not None and count < len(clips):
        step = len(clips) / count
        clips = [clips[int(i * step)] for i in range(count)]
    return clips


def evaluate(
    codec: Codec, clips: dict[str, F32], passes: int, bar: Any
) -> tuple[list[ClipResult], list[list[TokenMatch]], list[I64]]:
    """Run `codec` over the clips with `passes` passes each.

    Returns the per-clip results, for ours the token match of each pass pair per clip, and
    the first-pass codes per clip."""
    results: list[ClipResult] = []
    matches: list[list[TokenMatch]] = []
    first_codes: list[I64] = []
    for name, x in clips.items():
        bar.set_postfix_str(name[:28], refresh=False)
        cur = x
        result: ClipResult | None = None
        prev: Coded | None = None
        pairs: list[TokenMatch] = []
        for _ in range(passes):
            coded = codec.roundtrip(cur)
            y = to_pcm16(coded.y)
            p = pesq_wb(x, y)
            m = mel_distance(x, y)
            if result is None:
                lag, corr, method = estimate_alignment(x, y, max_lag=SR // 20)
                result = ClipResult(
                    name,
                    x.shape[0] / SR,
                    coded.bits,
                    coded.payload_bits,
                    p,
                    stoi(x, y),
                    m,
                    lag,
                    corr,
                    method,
                    level_change_db(x, y),
                )
                if coded.codes is not None:
                    first_codes.append(coded.codes)
            elif coded.codes is not None and prev is not None and prev.codes is not None:
                assert coded.gains is not None and prev.gains is not None
                pairs.append(token_match(prev.codes, coded.codes, prev.gains, coded.gains))
            result.pesq_passes.append(p)
            result.mel_passes.append(m)
            prev = coded
            cur = y
        assert result is not None
        results.append(result)
        matches.append(pairs)
        bar.update(1)
    return results, matches, first_codes


def summarize(
    codec: Codec, results: list[ClipResult], matches: list[list[TokenMatch]], passes: int
) -> dict[str, Any]:
    """The JSON entry of one codec at one bitrate."""
    total_bits = sum(r.bits for r in results)
    total_payload = sum(r.payload_bits for r in results)
    total_samples = sum(round(r.seconds * SR) for r in results)
    keys = ("pesq_wb", "stoi", "mel_dist", "level_db")
    pesq_by_pass = [nanmean([r.pesq_passes[k] for r in results]) for k in range(passes)]
    mel_by_pass = [nanmean([r.mel_passes[k] for r in results]) for k in range(passes)]
    entry: dict[str, Any] = {
        "codec": codec.name,
        "label": codec.label,
        "nominal_kbps": codec.nominal_kbps,
        "delay_samples": codec.delay,
        "delay_method": codec.delay_method,
        **codec.info(),
        "mean": {
            "kbps": kbps(total_bits, total_samples),
            "payload_kbps": kbps(total_payload, total_samples),
            **{k: nanmean([getattr(r, k) for r in results]) for k in keys},
        },
        "std": {k: nanstd([getattr(r, k) for r in results]) for k in keys},
        "pesq_failures": int(sum(not math.isfinite(r.pesq_wb) for r in results)),
        "residual_delay_median": int(np.median([r.residual_delay for r in results])),
        "idempotence": {
            "passes": passes,
            "pesq_wb": pesq_by_pass,
            "mel_dist": mel_by_pass,
            "kept_fraction": pesq_by_pass[-1] / pesq_by_pass[0] if pesq_by_pass[0] else math.nan,
        },
        "per_clip": [
            {
                "clip": r.clip,
                "seconds": r.seconds,
                "bits": r.bits,
                "kbps": r.kbps,
                "pesq_wb": r.pesq_wb,
                "stoi": r.stoi,
                "mel_dist": r.mel_dist,
                "residual_delay": r.residual_delay,
                "residual_corr": r.residual_corr,
                "residual_method": r.residual_method,
                "level_db": r.level_db,
                "pesq_passes": r.pesq_passes,
                "mel_passes": r.mel_passes,
            }
            for r in results
        ],
    }
    if any(matches):
        per_pair = []
        for k in range(passes - 1):
            pooled = _pool([m[k] for m in matches if len(m) > k])
            per_pair.append(pooled.to_json() if pooled else None)
        pooled_all = _pool([t for m in matches for t in m])
        entry["token_match"] = {
            "pairs": [f"{k}->{k + 1}" for k in range(1, passes)],
            "per_pair": per_pair,
            "all_pairs": pooled_all.to_json() if pooled_all else None,
        }
    return entry


def _pool(items: Sequence[TokenMatch]) -> TokenMatch | None:
    if not items:
        return None
    total = items[0]
    for item in items[1:]:
        total = total + item
    return total


def build_codecs(
    names: Sequence[str], model: Any, pipeline: Pipeline | None, pipeline_name: str
) -> tuple[list[Codec], dict[str, str]]:
    codecs: list[Codec] = []
    skipped: dict[str, str] = {}
    for name in names:
        try:
            if name == "ours":
                assert pipeline is not None
                codecs += [OursCodec(model, k, pipeline, pipeline_name) for k in OURS_KBPS]
            elif name == "opus":
                codecs += [OpusCodec(k) for k in OPUS_KBPS]
            elif name == "codec2":
                codecs += [Codec2Codec(k) for k in CODEC2_KBPS]
            else:
                raise SystemExit(f"bench_quality: unknown codec {name!r} (ours, opus, codec2)")
        except CodecUnavailableError as exc:
            skipped[name] = str(exc)
            print(f"bench_quality: skipping {name}: {exc}", file=sys.stderr)
    return codecs, skipped


CLIENT_PIPELINE = "client.files (the codec-client encode/decode path)"
STREAMING_PIPELINE = "streaming API (EncoderStream/BitstreamWriter/DecoderStream, written here)"


def probe_signal(seconds: float = 0.5, seed: int = 0) -> F32:
    """A short noise burst with a decaying envelope, for checking pipelines."""
    rng = np.random.default_rng(seed)
    n = int(SR * seconds)
    env = np.exp(-np.arange(n) / (0.2 * SR))
    return to_pcm16(0.2 * env * rng.standard_normal(n))


def compare_pipelines(model: Any, kbps_: float = 6.0) -> tuple[bool, str]:
    """Run the client and the streaming pipelines on `probe_signal()` at the mode of `kbps_`:
    (client usable, message).  The two should give the same audio; the client file is a few
    bytes larger (its source record)."""
    x = probe_signal()
    mode = model.card.mode_for_bitrate(kbps_)
    data_s, y_s = streaming_pipeline(model)(x, mode)
    try:
        data_c, y_c = client_pipeline(model)(x, mode)
    except Exception as exc:  # not there yet, or its API changed
        return False, f"client.files not usable ({type(exc).__name__}: {exc})"
    if y_c.shape != x.shape:
        return False, f"client.files returned {y_c.shape[0]} samples for {x.shape[0]}"
    diff = float(np.max(np.abs(y_c - y_s))) if y_s.shape == y_c.shape else math.inf
    return True, (
        f"client and streaming pipelines: max output difference {diff:.3g}, "
        f"file {len(data_c)} vs {len(data_s)} bytes"
    )


def choose_pipeline(model: Any, which: str) -> tuple[Pipeline, str, str]:
    """(pipeline, its description, the result of `compare_pipelines`)."""
    if which == "streaming":
        return streaming_pipeline(model), STREAMING_PIPELINE, "not compared"
    ok, message = compare_pipelines(model)
    if ok:
        return client_pipeline(model), CLIENT_PIPELINE, message
    if which == "client":
        raise SystemExit(f"bench_quality: {message}")
    print(f"bench_quality: {message}; using the streaming API directly", file=sys.stderr)
    return streaming_pipeline(model), STREAMING_PIPELINE, message


def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}
    for pkg in ("numpy", "scipy", "onnxruntime", "pesq", "pystoi", "opuslib", "pycodec2"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    try:
        import opuslib.api.info

        out["libopus"] = opuslib.api.info.get_version_string().decode()
    except Exception:
        pass
    return out


def git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, text=True, capture_output=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()}


LEVELS_DB = (-12.0, -6.0, 0.0, 6.0, 12.0)
"""Input level offsets of the level sweep (shape-gain: quality should not depend on them)."""
LEVEL_CLIPS = 8
"""Clips of the level sweep (the first ones of the selection)."""


def level_sweep(codec: OursCodec, clips: dict[str, F32], bar: Any) -> list[dict[str, Any]]:
    """Our codec on each clip scaled by each of LEVELS_DB (clipped to 16-bit full scale),
    scored against the equally scaled input: PESQ-WB, STOI and the mean gain index."""
    rows = []
    for offset in LEVELS_DB:
        scale = float(10.0 ** (offset / 20.0))
        pesq_values, stoi_values, gains, clipped = [], [], [], 0
        for x in clips.values():
            scaled = to_pcm16(np.clip(x * scale, -1.0, 32767 / 32768))
            clipped += int(np.count_nonzero(np.abs(x * scale) >= 1.0))
            coded = codec.roundtrip(scaled)
            y = to_pcm16(coded.y)
            pesq_values.append(pesq_wb(scaled, y))
            stoi_values.append(stoi(scaled, y))
            if coded.gains is not None:
                gains.append(float(np.mean(coded.gains)))
            bar.update(1)
        rows.append({
            "offset_db": offset,
            "pesq_wb": nanmean(pesq_values),
            "stoi": nanmean(stoi_values),
            "mean_gain_index": nanmean(gains),
            "clipped_samples": clipped,
        })
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from streaming.model import CodecModel

    names = [n.strip() for n in args.codecs.split(",") if n.strip()]
    model = CodecModel.load(args.model, threads=1) if "ours" in names else None
    pipeline, pipeline_name, pipeline_check = (None, "", "")
    if model is not None:
        pipeline, pipeline_name, pipeline_check = choose_pipeline(model, args.pipeline)
    codecs, skipped = build_codecs(names, model, pipeline, pipeline_name)
    count = args.clips if args.clips is not None else (QUICK_CLIPS if args.quick else None)
    paths = select_clips(args.data, count)
    clips = {p.stem: load_clip(p) for p in paths}

    entries: list[dict[str, Any]] = []
    usage: dict[str, Any] | None = None
    with tqdm(
        total=len(codecs) * len(clips),
        unit="clip",
        dynamic_ncols=True,
        disable=args.no_progress,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
        file=sys.stderr,
    ) as bar:
        for codec in codecs:
            bar.set_description(codec.label, refresh=False)
            codec.prepare(list(clips.values()))
            results, matches, first = evaluate(codec, clips, args.passes, bar)
            entries.append(summarize(codec, results, matches, args.passes))
            if isinstance(codec, OursCodec) and codec.nominal_kbps == USAGE_KBPS and first:
                usage = {
                    "label": codec.label,
                    "num_codebooks": codec.num_codebooks,
                    **codebook_usage(np.concatenate(first), codec.card.codebook_size),
                }

        sweep_codec = next(
            (c for c in codecs if isinstance(c, OursCodec) and c.nominal_kbps == USAGE_KBPS),
            None,
        )
        levels: dict[str, Any] | None = None
        if sweep_codec is not None and not args.no_levels:
            sweep_clips = dict(list(clips.items())[:LEVEL_CLIPS])
            bar.total += len(LEVELS_DB) * len(sweep_clips)
            bar.set_description(f"{sweep_codec.label} levels", refresh=False)
            levels = {"label": sweep_codec.label, "clips": len(sweep_clips),
                      "rows": level_sweep(sweep_codec, sweep_clips, bar)}

    model_info: dict[str, Any] | None = None
    if model is not None:
        card = model.card
        model_info = {
            "dir": str(model.path),
            "model_id": card.model_id,
            "random_weights": card.random_weights,
            "training_steps": card.raw.get("training", {}).get("steps"),
            "num_codebooks": card.num_codebooks,
            "output_delay_samples": card.output_delay_samples,
        }
    return {
        "benchmark": "quality",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_quality.py " + " ".join(args.argv),
        "quick": count is not None,
        "git": git_commit(),
        "machine": machine(),
        "versions": versions(),
        "model": model_info,
        "pipeline": pipeline_name or None,
        "pipeline_check": pipeline_check or None,
        "data": str(args.data),
        "clips": [{"name": n, "seconds": round(x.shape[0] / SR, 3)} for n, x in clips.items()],
        "passes": args.passes,
        "skipped": skipped,
        "results": entries,
        "codebook_usage": usage,
        "levels": levels,
    }


# ============================================================================================
# Plots and the doc section
# ============================================================================================

CODEC_STYLE = {"ours": ("C0", "o"), "opus": ("C1", "s"), "codec2": ("C2", "^")}


def _by_codec(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in report["results"]:
        groups.setdefault(e["codec"], []).append(e)
    return groups


def _title_suffix(report: dict[str, Any]) -> str:
    model = report["model"]
    name = (
        model["model_id"] + (" (RANDOM WEIGHTS)" if model["random_weights"] else "")
        if model
        else "peers only"
    )
    return f"{name}, {len(report['clips'])} clips"


def plot_rate(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for codec, entries in _by_codec(report).items():
        color, marker = CODEC_STYLE.get(codec, ("C3", "x"))
        rates = _num([e["mean"]["kbps"] for e in entries])
        for ax, key in zip(axes, ("pesq_wb", "stoi"), strict=True):
            ax.plot(
                rates,
                _num([e["mean"][key] for e in entries]),
                color=color,
                marker=marker,
                label=codec,
            )
    for ax, name in zip(axes, ("PESQ-WB (MOS-LQO)", "STOI"), strict=True):
        ax.set_xlabel("measured bitrate, kbps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Quality vs bitrate ({_title_suffix(report)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_idempotence(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = ["-", "--", ":"]
    for codec, entries in _by_codec(report).items():
        color, marker = CODEC_STYLE.get(codec, ("C3", "x"))
        for i, e in enumerate(entries):
            values = _num(e["idempotence"]["pesq_wb"])
            ax.plot(
                range(1, len(values) + 1),
                values,
                color=color,
                marker=marker,
                linestyle=styles[i % len(styles)],
                label=e["label"],
            )
    ax.set_xlabel("encode/decode passes")
    ax.set_ylabel("PESQ-WB vs the original")
    ax.set_xticks(range(1, report["passes"] + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(f"Idempotence ({_title_suffix(report)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_usage(report: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    usage = report["codebook_usage"]
    k = np.arange(1, len(usage["perplexity"]) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    size = usage["codebook_size"]
    ax.bar(k, usage["perplexity"], color="C0", label="perplexity")
    ax.axhline(size, color="k", lw=0.8, ls="--", label=f"codebook size {size}")
    if usage["frames"] < size:
        ax.axhline(
            2 ** usage["max_entropy_bits"],
            color="C3",
            lw=0.8,
            ls=":",
            label=f"bound: {usage['frames']} frames",
        )
    ax.set_ylim(0, 1.2 * size)
    ax.set_xlabel("codebook index")
    ax.set_ylabel("perplexity (2^entropy)")
    ax.set_xticks(k)
    right = ax.twinx()
    right.plot(k, usage["used_fraction"], color="C1", marker="o", label="fraction used")
    right.set_ylim(0, 1.2)
    right.set_ylabel("fraction of codes used")
    lines = ax.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper center", ncol=3)
    ax.set_title(f"Codebook usage, {usage['label']} ({_title_suffix(report)})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(v: float | None, nd: int = 2) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.0f} %"


def _num(values: Sequence[float | None]) -> F64:
    """Values for plotting: None (a NaN in the JSON) -> NaN."""
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def render_section(report: dict[str, Any], images: dict[str, str]) -> str:
    """The docs/quality.md section (between the markers) for `report`."""
    model = report["model"]
    lines = [SECTION_BEGIN, "## Quality at matched bitrates", ""]
    where = (
        f"`{report['command'].strip()}` (JSON: `benchmarks/results/"
        f"{Path(report.get('out', 'quality.json')).name}`)"
    )
    lines.append(
        f"{where}, {report['date']}, git `{report['git']}`, "
        f"{report['machine']['cores']} CPU cores ({report['machine']['cpu']})."
    )
    lines.append("")
    if model:
        steps = model["training_steps"]
        lines.append(
            f"Model `{model['model_id']}`"
            + (f", {steps} training steps" if steps is not None else "")
            + f"; our codec through the {report['pipeline']}"
            + (f" (check: {report['pipeline_check']})" if report.get("pipeline_check") else "")
            + "."
        )
        if model["random_weights"]:
            lines += [
                "",
                "**RANDOM WEIGHTS: these numbers say nothing about the codec's "
                "quality; they only show that the benchmark runs.**",
            ]
    clips = report["clips"]
    total = sum(c["seconds"] for c in clips)
    lines += [
        "",
        f"{len(clips)} clips, {total:.1f} s, from `{report['data']}`"
        + (" (QUICK run: a subset; not the reference numbers)" if report["quick"] else "")
        + ". Values are means over clips (± standard deviation over clips); measured "
        "kbps = all bits / all clip time.",
    ]
    for name, why in report["skipped"].items():
        lines += ["", f"Skipped **{name}**: {why}."]

    entries = report["results"]
    nominal = sorted({e["nominal_kbps"] for e in entries})
    groups = _by_codec(report)
    metrics = [
        ("Measured bitrate, kbps (file or packet bytes)", "kbps", 2, False),
        ("PESQ-WB (MOS-LQO, 1.0-4.64, higher is better)", "pesq_wb", 2, True),
        ("STOI (0-1, higher is better)", "stoi", 3, True),
        ("Log-mel distance, dB (lower is better)", "mel_dist", 2, True),
    ]
    for title, key, nd, with_std in metrics:
        lines += ["", f"**{title}** by nominal bitrate:", ""]
        lines.append("| codec | " + " | ".join(f"{k:g} kbps" for k in nominal) + " |")
        lines.append("|---|" + "---|" * len(nominal))
        for codec, group in groups.items():
            cells = []
            for k in nominal:
                e = next((g for g in group if g["nominal_kbps"] == k), None)
                if e is None:
                    cells.append("")
                elif with_std:
                    cells.append(f"{_f(e['mean'][key], nd)} ±{_f(e['std'][key], nd)}")
                else:
                    cells.append(_f(e["mean"][key], nd))
            lines.append(f"| {codec} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "Delay compensation and alignment check (residual lag after alignment, "
        "median over clips; 0 = aligned), and the output level relative to the input "
        "(first pass, mean over clips):",
        "",
        "| codec | payload kbps | delay compensated | method | residual lag | level, dB |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        lines.append(
            f"| {e['label']} | {_f(e['mean']['payload_kbps'])} | "
            f"{e['delay_samples']} samples ({e['delay_samples'] / SR * 1000:.2f} ms) | "
            f"{e['delay_method']} | {e['residual_delay_median']} | "
            f"{_f(e['mean']['level_db'], 1)} |"
        )

    passes = report["passes"]
    lines += [
        "",
        f"![quality vs bitrate]({images['rate']})",
        "",
        f"### Idempotence ({passes} encode/decode passes)",
        "",
        "PESQ-WB against the original after each pass (log-mel distance of the last "
        "pass in dB); kept = PESQ(last) / PESQ(1).",
        "",
        "| codec | "
        + " | ".join(f"pass {k}" for k in range(1, passes + 1))
        + f" | kept | mel @{passes} |",
        "|---|" + "---|" * (passes + 2),
    ]
    for e in entries:
        idem = e["idempotence"]
        lines.append(
            f"| {e['label']} | "
            + " | ".join(_f(v) for v in idem["pesq_wb"])
            + f" | {_pct(idem['kept_fraction'])} | {_f(idem['mel_dist'][-1])} |"
        )
    ours = [e for e in entries if "token_match" in e]
    if ours:
        lines += [
            "",
            "Token match rate of ours between consecutive passes (fraction of "
            "identical codes, pooled over frames; whole frame = all its codes equal; gain "
            "±1 = gain indices at most one step apart; gain shift = mean change of the gain "
            "index per pass, in steps of the card's gain quantiser, negative = quieter):",
            "",
            "| codec | "
            + " | ".join(ours[0]["token_match"]["pairs"])
            + " | all codes | first codebook | last codebook | whole frames | gain index"
            + " | gain ±1 | gain shift |",
            "|---|" + "---|" * (len(ours[0]["token_match"]["pairs"]) + 7),
        ]
        for e in ours:
            tm = e["token_match"]
            pairs = [_f(p["overall"], 3) if p else "n/a" for p in tm["per_pair"]]
            a = tm["all_pairs"] or {}
            pcb = a.get("per_codebook") or [math.nan]
            lines.append(
                f"| {e['label']} | "
                + " | ".join(pairs)
                + f" | {_f(a.get('overall'), 3)} | {_f(pcb[0], 3)} | {_f(pcb[-1], 3)}"
                + f" | {_f(a.get('frames'), 3)} | {_f(a.get('gain'), 3)}"
                + f" | {_f(a.get('gain_within_1'), 3)} | {_f(a.get('gain_shift_mean'), 2)} |"
            )
        widest = max(
            ours,
            key=lambda e: (
                len(e["token_match"]["all_pairs"]["per_codebook"])
                if e["token_match"]["all_pairs"]
                else 0
            ),
        )
        a = widest["token_match"]["all_pairs"]
        if a:
            width = len(a["per_codebook"])
            lines += [
                "",
                f"Per codebook index, {widest['label']} (all pass pairs):",
                "",
                "| codebook | " + " | ".join(str(i + 1) for i in range(width)) + " |",
                "|---|" + "---|" * width,
                "| match | " + " | ".join(_f(v, 3) for v in a["per_codebook"]) + " |",
            ]
    lines += ["", f"![idempotence]({images['idempotence']})"]

    usage = report["codebook_usage"]
    if usage:
        lines += [
            "",
            f"### Codebook usage ({usage['label']}, {usage['num_codebooks']} "
            f"codebooks, first pass, {usage['frames']} frames)",
            "",
            "Entropy of each codebook's empirical index distribution over all clips "
            f"(at most {math.log2(usage['codebook_size']):.0f} bits for "
            f"{usage['codebook_size']} codes"
            + (
                f", and at most {usage['max_entropy_bits']:.2f} bits from {usage['frames']} frames"
                if usage["frames"] < usage["codebook_size"]
                else ""
            )
            + "; a plug-in estimate from few frames per code reads low), perplexity = "
            "2^entropy, and the fraction of the codebook that occurs at all.",
            "",
            "| codebook | entropy, bits | perplexity | fraction used |",
            "|---|---|---|---|",
        ]
        for i, (h, p, u) in enumerate(
            zip(usage["entropy_bits"], usage["perplexity"], usage["used_fraction"], strict=True)
        ):
            lines.append(f"| {i + 1} | {h:.2f} | {p:.0f} | {u:.3f} |")
        lines += ["", f"![codebook usage]({images['usage']})"]

    levels = report.get("levels")
    if levels:
        lines += [
            f"Input level sweep ({levels['label']}, first {levels['clips']} clips scaled by "
            "the offset, scored against the equally scaled input; shape-gain coding should "
            "make quality independent of level):",
            "",
            "| input level | PESQ-WB | STOI | mean gain index | clipped samples |",
            "|---|---|---|---|---|",
        ]
        for row in levels["rows"]:
            lines.append(
                f"| {row['offset_db']:+.0f} dB | {_f(row['pesq_wb'])} | {_f(row['stoi'], 3)} "
                f"| {_f(row['mean_gain_index'], 1)} | {row['clipped_samples']} |"
            )
        lines.append("")
    lines += [
        "",
        "### Method",
        "",
        "* Ours runs the streaming engine exactly as `codec-client encode`/`decode` do "
        "(EncoderStream -> bitstream file -> read back -> DecoderStream; the input is "
        "padded so the decoder's output delay is flushed, the output is the input's "
        "length and aligned to it). Bitrate = bitstream file size (header included) / "
        "clip duration.",
        "* Opus: libopus via opuslib, 16 kHz, 20 ms frames, VOIP, complexity 10, "
        "default VBR; delay = the encoder lookahead; bitrate from the bytes of every "
        "packet needed to deliver the whole clip.",
        "* Codec2: pycodec2 at 8 kHz through `scipy.signal.resample_poly` both ways "
        "(zero phase); delay = median over clips of a waveform or envelope "
        "cross-correlation estimate; bitrate = frames * bits per frame.",
        "* Every decoded output is rounded to 16-bit PCM before scoring and re-encoding. "
        "PESQ-WB: `pesq` (P.862.2); STOI: `pystoi`; log-mel distance: 25 ms Hann "
        "windows, 10 ms hop, 80 HTK mel bands to 8 kHz, both spectrograms floored at "
        "the reference maximum - 80 dB, mean over frames of the RMS dB difference.",
        "* Idempotence (code drift, arXiv 2410.11025): each pass re-encodes the previous "
        "pass's aligned output with fresh codec state; scores are against the original.",
        "* The official peer harness (`../shared/tools/peers`) measures the same way but "
        "also reports ViSQOL, DNSMOS and SI-SDR; its numbers are the reference for "
        "external comparisons.",
        SECTION_END,
    ]
    return "\n".join(lines) + "\n"


DOC_HEAD = """# Speech quality

How the codec sounds next to Opus and Codec2 at matched bitrates, how well it survives
repeated encoding, and how it uses its codebooks. Produced by `benchmarks/bench_quality.py`;
the section below is rewritten by each run (edit the text outside the markers only).

"""


def update_doc(path: Path, section: str) -> None:
    """Replace the marked section of `path` (create the file, or append the section)."""
    text = path.read_text() if path.exists() else DOC_HEAD
    start, end = text.find(SECTION_BEGIN), text.find(SECTION_END)
    if start >= 0 and end > start:
        text = text[:start] + section.rstrip("\n") + text[end + len(SECTION_END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def write_docs(report: dict[str, Any], doc: Path, img: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    img.mkdir(parents=True, exist_ok=True)
    files = {
        "rate": img / "quality_rate.png",
        "idempotence": img / "quality_idempotence.png",
        "usage": img / "codebook_usage.png",
    }
    written = [doc]
    if report["results"]:
        plot_rate(report, files["rate"])
        plot_idempotence(report, files["idempotence"])
        written += [files["rate"], files["idempotence"]]
    if report["codebook_usage"]:
        plot_usage(report, files["usage"])
        written.append(files["usage"])
    rel = {k: os.path.relpath(v, doc.parent) for k, v in files.items()}
    update_doc(doc, render_section(report, rel))
    return written


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _clean(value: Any) -> Any:
    """NaN/inf -> None, so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of clips")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model directory (default: the bundled streaming/assets/default)",
    )
    p.add_argument("--passes", type=int, default=5, help="encode/decode passes (idempotence)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_CLIPS} clips only")
    p.add_argument("--clips", type=int, default=None, help="use this many clips (spread)")
    p.add_argument("--codecs", default="ours,opus,codec2", help="comma list: ours,opus,codec2")
    p.add_argument(
        "--pipeline",
        choices=("auto", "client", "streaming"),
        default="auto",
        help="ours through client.files (auto: when importable) or the streaming API",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results")
    p.add_argument("--doc", type=Path, default=DOC, help="markdown file of the section")
    p.add_argument("--img", type=Path, default=IMG, help="folder of the PNGs")
    p.add_argument("--no-docs", action="store_true", help="write the JSON only")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--no-levels", action="store_true", help="skip the input level sweep")
    p.add_argument(
        "--docs-only",
        action="store_true",
        help="run nothing: rewrite the doc section and PNGs from the JSON at --out",
    )
    args = p.parse_args(argv)
    if args.passes < 1:
        p.error("--passes must be >= 1")
    if args.clips is not None and args.clips < 1:
        p.error("--clips must be >= 1")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.docs_only:
        report = json.loads(args.out.read_text())
        written = write_docs(report, args.doc, args.img)
        print("wrote " + ", ".join(os.path.relpath(p.resolve(), ROOT) for p in written))
        return 0
    report = run(args)
    report["out"] = os.path.relpath(args.out.resolve(), ROOT)
    report = _clean(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    written = [args.out]
    if not args.no_docs:
        written += write_docs(report, args.doc, args.img)
    for e in report["results"]:
        m, idem = e["mean"], e["idempotence"]
        print(
            f"{e['label']:12s} {_f(m['kbps']):>6s} kbps  PESQ-WB {_f(m['pesq_wb'])}  "
            f"STOI {_f(m['stoi'], 3)}  mel {_f(m['mel_dist'])} dB  "
            f"PESQ@{idem['passes']} {_f(idem['pesq_wb'][-1])} "
            f"(kept {_pct(idem['kept_fraction'])})"
        )
    print("wrote " + ", ".join(os.path.relpath(p.resolve(), ROOT) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
