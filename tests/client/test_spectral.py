"""The phase-insensitive measures (client.profiler.spectral) on known signals: the delay to
within a millisecond and a high similarity for the same audio with other harmonic phases (or
decoded by a decoder started elsewhere), a low similarity for wrong audio: other speech,
the same speech reversed in time, noise with the same loudness envelope or long-term
spectrum.  The thresholds are those of the loopback test and the profiler."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from client.files import decode_frames_local, encode_pcm_local
from client.profiler.analysis import MIN_SIMILARITY as PROFILE_MIN_SIMILARITY
from client.profiler.analysis import signal_windows
from client.profiler.spectral import locate, log_spectral_distance, similarity
from client.virtual import VirtualAudio
from streaming.model import CodecModel
from tests.client.test_audio_loopback import MAX_LSD_DB, MIN_SIMILARITY

RATE = 16000
WRONG = 0.3  # wrong audio stays below this (observed: about 0, at most 0.41 in 0.5 s)


def voice(seconds: float, seed: int, phase_seed: int) -> np.ndarray:
    """Speech-like audio: syllables (a fast attack and slow decay, a gliding f0 and two
    gliding formants, some unvoiced noise bursts) drawn from `seed`; the harmonics' phases
    and the noise drawn from `phase_seed`."""
    rng, prng = np.random.default_rng(seed), np.random.default_rng(phase_seed)
    n = int(RATE * seconds)
    x = np.zeros(n)
    pos = int(0.05 * RATE)
    while pos < n:
        m = int(rng.uniform(0.12, 0.3) * RATE)
        u = np.arange(m) / m
        env = np.minimum(1.0, u / 0.1) * (1.0 - u) ** 2
        if rng.random() < 0.25:  # unvoiced: noise in a high band
            f = np.fft.rfftfreq(m, 1 / RATE)
            lo = rng.uniform(2500, 4500)
            spec = np.fft.rfft(prng.standard_normal(m)) * ((f > lo) & (f < lo + 2500))
            seg = 0.3 * np.fft.irfft(spec, m) * env
        else:
            f0 = np.linspace(rng.uniform(90, 250), rng.uniform(90, 250), m)
            f1 = np.linspace(rng.uniform(300, 900), rng.uniform(300, 900), m)
            f2 = np.linspace(rng.uniform(900, 2600), rng.uniform(900, 2600), m)
            phase = 2 * np.pi * np.cumsum(f0) / RATE
            seg = np.zeros(m)
            for k in range(1, int(7000 / f0.max()) + 1):
                fk = k * f0
                amp = 1 / (1 + ((fk - f1) / 120) ** 2) + 0.6 / (1 + ((fk - f2) / 200) ** 2)
                seg += (amp + 0.02) * np.sin(k * phase + prng.uniform(0, 2 * np.pi))
            seg *= 0.1 * env
        x[pos : pos + m] += seg[: n - pos]
        pos += m + int(rng.uniform(0.0, 0.12) * RATE)
    return (x + 1e-4 * prng.standard_normal(n)).astype(np.float32)


def envelope_noise(x: np.ndarray, seed: int) -> np.ndarray:
    """White noise with the short-time (20 ms) loudness envelope of `x`."""
    e = np.sqrt(np.convolve(x.astype(np.float64) ** 2, np.ones(320) / 320, "same"))
    return (np.random.default_rng(seed).standard_normal(x.shape[0]) * e).astype(np.float32)


def spectrum_noise(x: np.ndarray, seed: int) -> np.ndarray:
    """Noise with the long-term spectrum and the 20 ms loudness envelope of `x`."""
    spec = np.fft.rfft(x.astype(np.float64))
    phases = np.exp(2j * np.pi * np.random.default_rng(seed).random(spec.shape[0]))
    noise = np.fft.irfft(np.abs(spec) * phases, x.shape[0])
    box = np.ones(320) / 320
    e = np.sqrt(np.convolve(x.astype(np.float64) ** 2, box, "same"))
    en = np.sqrt(np.convolve(noise**2, box, "same")) + 1e-9
    return (noise * e / en).astype(np.float32)


def wrong_audio(ref: np.ndarray, other: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "other speech": other,
        "reversed": ref[::-1].copy(),
        "envelope noise": envelope_noise(ref, 1),
        "spectrum noise": spectrum_noise(ref, 2),
    }


def test_same_voice_with_other_phases_is_found_and_similar() -> None:
    x = voice(3.0, seed=1, phase_seed=10)
    y = voice(3.0, seed=1, phase_seed=11)  # the same syllables, other harmonic phases
    seg = x[8000:40000]
    corr = float(seg @ y[8000:40000] / np.sqrt((seg @ seg) * (y[8000:40000] @ y[8000:40000])))
    assert abs(corr) < 0.3  # the waveforms do not match ...
    m = locate(seg, y[8000 - 1237 : 40000 + 2000], RATE)
    assert not m.refined
    assert m.offset == pytest.approx(1237, abs=16)  # ... the delay is right to 1 ms
    assert m.score > 0.9
    assert similarity(seg, y[8000:40000], RATE) > 0.9
    assert log_spectral_distance(seg, y[8000:40000], RATE) < 3.0


def test_identical_audio_is_located_to_the_sample_on_the_waveform() -> None:
    x = voice(2.0, seed=3, phase_seed=30)
    m = locate(x[4000:20000], x[1000:30000], RATE)
    assert m.refined and m.offset == 3000.0 and m.waveform > 0.9999
    assert similarity(x[4000:20000], x[4000:20000], RATE) == pytest.approx(1.0)
    assert log_spectral_distance(x[4000:20000], x[4000:20000], RATE) == 0.0


def test_wrong_audio_is_not_similar() -> None:
    x = voice(3.0, seed=1, phase_seed=10)
    other = voice(3.0, seed=2, phase_seed=10)
    for name, wrong in wrong_audio(x, other).items():
        sim = similarity(x, wrong, RATE)
        assert sim < WRONG, (name, sim)


def test_a_decoder_started_elsewhere_is_similar_and_wrong_audio_is_not(
    model: CodecModel, speech: tuple[np.ndarray, int]
) -> None:
    """The bundled model's own decode of the clip from the stream start vs a decode of the
    same tokens started 25 frames before the speech (fresh states: other harmonic phases
    with an oscillator decoder): the loopback test's situation, without the sound devices."""
    clip = speech[0]
    n, d = model.card.frame_size, model.card.output_delay_samples
    x = np.concatenate([np.zeros(40 * n, np.float32), clip, np.zeros(10 * n, np.float32)])
    x = x[: x.shape[0] // n * n]
    tokens = encode_pcm_local(model, x, 11)
    full = decode_frames_local(model, tokens)[d + 15 * n :]
    late = decode_frames_local(model, tokens[15:])[d:]
    on, w = 25 * n, RATE // 2
    a, b = full[on : on + clip.shape[0]], late[on : on + clip.shape[0]]
    m = locate(a, late[on - 1600 : on + clip.shape[0] + 1600], RATE)
    assert m.offset == pytest.approx(1600, abs=16)
    assert similarity(a, b, RATE) > MIN_SIMILARITY
    windows = range(0, clip.shape[0] - w + 1, w)
    right = [similarity(a[i : i + w], b[i : i + w], RATE) for i in windows]
    assert min(right) > PROFILE_MIN_SIMILARITY and float(np.median(right)) > MIN_SIMILARITY
    assert (
        float(np.median([log_spectral_distance(a[i : i + w], b[i : i + w], RATE) for i in windows]))
        < MAX_LSD_DB
    )
    other = np.roll(b, RATE)  # the decode, one second on
    for name, wrong in wrong_audio(a, other).items():
        sim = similarity(a, wrong, RATE)
        wins = [similarity(a[i : i + w], wrong[i : i + w], RATE) for i in windows]
        assert sim < WRONG and float(np.median(wins)) < WRONG, (name, sim, wins)


@dataclass
class Fake:
    """What `signal_windows` reads of a participant."""

    port: VirtualAudio
    block: int = 320


def test_the_profiler_measures_the_delay_of_audio_with_other_phases() -> None:
    """`signal_windows` (the profiler's independent delay check) on a recording that is the
    reference with other harmonic phases, `delay` samples late: the delay to 1 ms; the
    reference itself: to the sample, on the waveform; wrong audio (the recording reversed)
    gives no window."""
    x = voice(4.0, seed=5, phase_seed=50)
    y = voice(4.0, seed=5, phase_seed=51)
    delay, ticks = 1500, 4 * 50 + 20
    sender = Fake(VirtualAudio(RATE, x, block=320, record_s=4.4))
    for k in range(ticks):
        sender.port.advance(0.02 * k)  # source sample j captured at (j - 319) / RATE
    truth = (delay + 319) / RATE  # recording sample i played at i / RATE
    for played, windows, coherent in ((y, 7, False), (x, 7, True), (y[::-1].copy(), 0, False)):
        receiver = Fake(VirtualAudio(RATE, np.zeros(0, np.float32), block=320, record_s=4.4))
        for k in range(ticks):
            receiver.port.advance(0.02 * k)
        rec = receiver.port.recording
        rec[:] = 0.0
        rec[delay : delay + played.shape[0]] = played[: rec.shape[0] - delay]
        found = signal_windows(receiver, sender, x, lambda t: truth + 0.01)  # type: ignore[arg-type]
        assert len(found) == windows
        for w in found:
            assert w.delay == pytest.approx(truth, abs=1e-6 if coherent else 1e-3)
            assert w.similarity > 0.9 and w.refined == coherent
