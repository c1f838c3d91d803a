"""Phase-insensitive comparison of played audio with a reference: delay and similarity.

A codec decoder with its own oscillator state (a phase accumulator, long-memory states)
makes perceptually identical audio whose waveform depends on where the decoder started
and on concealed frames: two correct decodes of the same tokens can have harmonic phases
that differ, so their waveform correlation is low although the audio is right.  These
measures look at log-mel spectrograms instead, which keep what is heard (the short-time
energy in each band) and drop the phases:

* `locate`: where a template lies in a longer signal.  The normalised cross-correlation of
  log-mel spectrograms at a 1 ms hop (band means removed), refined to a fraction of a hop
  by a parabola through the peak; then, where the waveform agrees too (a normalised
  waveform correlation of at least `WAVEFORM_MATCH` within a millisecond of the spectral
  peak: a phase-deterministic decoder), to the sample on the waveform.
* `similarity`: the correlation of the two log-mel spectrograms (20 ms frames, 10 ms hop,
  dB, floored `FLOOR_DB` below the reference's peak; the frames where the reference is
  within `ACTIVE_DB` of its loudest frame) after removing each band's mean over time and
  each frame's mean over bands: what is left is the time-frequency pattern of the speech
  (formants, voicing, onsets), not the long-term spectrum or the loudness envelope that
  any other speech or shaped noise shares.  About 0.75-1.0 for a correct decode, below
  0.3 for other speech, reversed speech or noise with the same loudness envelope and
  long-term spectrum (tests/client/test_spectral.py).
* `log_spectral_distance`: the RMS difference of the two log-mel spectrograms in dB over
  the same frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

__all__ = [
    "ACTIVE_DB",
    "FLOOR_DB",
    "WAVEFORM_MATCH",
    "Locator",
    "Match",
    "locate",
    "log_mel",
    "log_spectral_distance",
    "similarity",
]

F64: TypeAlias = npt.NDArray[np.float64]
Signal: TypeAlias = npt.NDArray[np.floating]

BANDS = 32
FMIN = 100.0
FLOOR_DB = 60.0
"""The log-mel bins are floored this far below the reference's loudest bin (dB)."""
ACTIVE_DB = 30.0
"""`similarity` and `log_spectral_distance` look at the frames of the reference within this
of its loudest frame (dB): pauses hold no speech pattern, and noise with the speech's
loudness envelope and long-term spectrum would match their contrast with the speech."""
WAVEFORM_MATCH = 0.9
"""`locate` takes the waveform's lag when its normalised correlation reaches this."""
_EPS = 1e-12


@dataclass(frozen=True)
class Match:
    """Where a template lies in a signal (see `locate`)."""

    offset: float
    """Start of the template in the signal, samples (fractional on the spectral path)."""
    score: float
    """Normalised correlation of the log-mel spectrograms at that offset."""
    waveform: float
    """Best normalised waveform correlation within `refine` samples of the spectral lag."""
    refined: bool
    """Whether `offset` is the waveform's lag (score >= WAVEFORM_MATCH)."""


def _mel_filters(rate: int, nfft: int, bands: int) -> F64:
    """Triangular mel filters [bands, nfft // 2 + 1] (HTK mel scale), area-normalised."""

    def mel(f: F64 | float) -> F64:
        return np.asarray(2595.0 * np.log10(1.0 + np.asarray(f) / 700.0), dtype=np.float64)

    fmax = min(7600.0, 0.475 * rate)
    edges_mel = np.linspace(float(mel(FMIN)), float(mel(fmax)), bands + 2)
    edges = 700.0 * (10.0 ** (edges_mel / 2595.0) - 1.0)
    freqs = np.arange(nfft // 2 + 1) * rate / nfft
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lo) / (mid - lo)
    down = (hi - freqs[None, :]) / (hi - mid)
    w = np.maximum(0.0, np.minimum(up, down))
    # a filter narrower than a bin still gets its nearest bin
    empty = w.sum(axis=1) == 0.0
    if empty.any():
        nearest = np.abs(freqs[None, :] - mid[empty]).argmin(axis=1)
        w[np.flatnonzero(empty), nearest] = 1.0
    return np.asarray(w / w.sum(axis=1, keepdims=True), dtype=np.float64)


def log_mel(x: Signal, rate: int, *, hop: int, win: int, bands: int = BANDS) -> F64:
    """Log-mel power spectrogram [frames, bands] in dB; frame i is x[i*hop : i*hop + win]
    (Hann window).  Empty when x is shorter than one window."""
    x64 = np.asarray(x, dtype=np.float64)
    if x64.shape[0] < win:
        return np.zeros((0, bands), dtype=np.float64)
    nfft = max(512, 1 << math.ceil(math.log2(win)))
    frames = np.lib.stride_tricks.sliding_window_view(x64, win)[::hop]
    power = np.abs(np.fft.rfft(frames * np.hanning(win), nfft, axis=1)) ** 2
    energy = power @ _mel_filters(rate, nfft, bands).T
    return np.asarray(10.0 * np.log10(energy + _EPS), dtype=np.float64)


def _floor(a: F64, *others: F64) -> tuple[F64, ...]:
    """`a` and `others` floored FLOOR_DB below a's peak (silence compares as equal)."""
    if a.size == 0:
        return (a, *others)
    floor = float(a.max()) - FLOOR_DB
    return tuple(np.maximum(m, floor) for m in (a, *others))


def _parabola(y: F64, k: int) -> float:
    """Vertex offset (-0.5..0.5) of the parabola through y[k-1], y[k], y[k+1]."""
    if k <= 0 or k >= y.shape[0] - 1:
        return 0.0
    a, b, c = float(y[k - 1]), float(y[k]), float(y[k + 1])
    den = a - 2.0 * b + c
    return 0.0 if den >= 0.0 else float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))


def _sliding_corr(t: F64, s: F64) -> F64:
    """Pearson correlation of the matrix t [T, B] (flattened, band means removed) with each
    window s[k : k + T] (its band means removed), k = 0 .. len(s) - T."""
    n, m = t.shape[0], s.shape[0]
    tc = t - t.mean(axis=0)
    size = 1 << math.ceil(math.log2(n + m))
    num = np.fft.irfft(
        (np.fft.rfft(s, size, axis=0) * np.conj(np.fft.rfft(tc, size, axis=0))).sum(axis=1),
        size,
    )[: m - n + 1]
    c1 = np.concatenate([np.zeros((1, s.shape[1])), np.cumsum(s, axis=0)])
    c2 = np.concatenate([np.zeros((1, s.shape[1])), np.cumsum(s**2, axis=0)])
    w1, w2 = c1[n:] - c1[:-n], c2[n:] - c2[:-n]
    var_s = np.maximum((w2 - w1**2 / n).sum(axis=1), 0.0)
    return np.asarray(num / np.sqrt(var_s * float((tc**2).sum()) + _EPS), dtype=np.float64)


def _waveform_corr(template: F64, segment: F64) -> F64:
    """Normalised waveform correlation of `template` with each window of `segment`."""
    w = template.shape[0]
    size = 1 << math.ceil(math.log2(segment.shape[0] + w))
    spec = np.fft.rfft(segment, size) * np.conj(np.fft.rfft(template, size))
    corr = np.fft.irfft(spec, size)[: segment.shape[0] - w + 1]
    energy = np.cumsum(np.concatenate([[0.0], segment**2]))
    norm = np.sqrt(np.maximum((energy[w:] - energy[:-w]) * float(template @ template), 1e-20))
    return np.asarray(corr / norm, dtype=np.float64)


class Locator:
    """Finds templates in one signal (`locate`); the signal's spectrogram is computed once."""

    def __init__(
        self, signal: Signal, rate: int, *, hop_ms: float = 1.0, win_ms: float = 20.0
    ) -> None:
        self.signal = np.asarray(signal, dtype=np.float64)
        self.rate = rate
        self.hop = max(1, round(hop_ms * rate / 1000.0))
        self.win = round(win_ms * rate / 1000.0)
        self.spec = log_mel(self.signal, rate, hop=self.hop, win=self.win)

    def __call__(self, template: Signal) -> Match:
        """Where `template` best matches `signal[offset : offset + len(template)]`,
        0 <= offset <= len(signal) - len(template) (module doc)."""
        t = np.asarray(template, dtype=np.float64)
        s, hop = self.signal, self.hop
        if s.shape[0] < t.shape[0]:
            raise ValueError("the signal is shorter than the template")
        mt, ms = _floor(log_mel(t, self.rate, hop=hop, win=self.win), self.spec)
        if mt.shape[0] < 2:
            raise ValueError("the template is shorter than two spectral frames")
        corr = _sliding_corr(mt, ms)
        k = int(np.argmax(corr))
        spectral = float(np.clip((k + _parabola(corr, k)) * hop, 0, s.shape[0] - t.shape[0]))
        # the waveform, within a millisecond of the spectral peak: less than half a pitch
        # period of any voice, so a periodic waveform cannot pull the lag to the next period
        refine = max(hop, self.rate // 1000)
        lo = max(0, round(spectral) - refine)
        hi = min(s.shape[0] - t.shape[0], round(spectral) + refine)
        wave = _waveform_corr(t, s[lo : hi + t.shape[0]])
        j = int(np.argmax(wave))
        best = float(wave[j])
        if best >= WAVEFORM_MATCH:
            return Match(float(lo + j), float(corr[k]), best, True)
        return Match(spectral, float(corr[k]), best, False)


def locate(
    template: Signal, signal: Signal, rate: int, *, hop_ms: float = 1.0, win_ms: float = 20.0
) -> Match:
    """Where `template` best matches `signal[offset : offset + len(template)]`,
    0 <= offset <= len(signal) - len(template), on log-mel spectrograms (module doc)."""
    return Locator(signal, rate, hop_ms=hop_ms, win_ms=win_ms)(template)


def similarity(reference: Signal, played: Signal, rate: int) -> float:
    """Correlation of the double-centred log-mel spectrograms of two aligned signals of the
    same length over the reference's active frames (module doc): 1 for the same audio,
    about 0 for unrelated audio; NaN if fewer than two frames are active."""
    a, b = _frames(reference, played, rate)
    if a.shape[0] < 2:
        return math.nan
    a = a - a.mean(axis=0) - a.mean(axis=1, keepdims=True) + a.mean()
    b = b - b.mean(axis=0) - b.mean(axis=1, keepdims=True) + b.mean()
    return float((a * b).sum() / math.sqrt(float((a**2).sum() * (b**2).sum()) + _EPS))


def log_spectral_distance(reference: Signal, played: Signal, rate: int) -> float:
    """RMS log-mel difference (dB) over the reference's active frames (NaN if none)."""
    a, b = _frames(reference, played, rate)
    if a.shape[0] == 0:
        return math.nan
    return float(np.sqrt(np.mean((a - b) ** 2)))


def _frames(reference: Signal, played: Signal, rate: int) -> tuple[F64, F64]:
    """The floored log-mel frames (20 ms, 10 ms hop) of both signals where the reference
    is active: its frame energy within ACTIVE_DB of its loudest frame."""
    if np.shape(reference) != np.shape(played):
        raise ValueError("reference and played audio must be aligned and of the same length")
    win, hop = rate // 50, rate // 100
    a = log_mel(reference, rate, hop=hop, win=win)
    b = log_mel(played, rate, hop=hop, win=win)
    if a.shape[0] == 0:
        return a, b
    level = 10.0 * np.log10(np.sum(10.0 ** (a / 10.0), axis=1))
    active = level > float(level.max()) - ACTIVE_DB
    fa, fb = _floor(a, b)
    return fa[active], fb[active]
