"""PCM conversion, the streaming resampler and the framers (streaming/framing.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from streaming.framing import (
    SUPPORTED_RATES,
    InputFramer,
    OutputFramer,
    Resampler,
    SampleFormat,
    design_filter,
    float32_to_int16,
    pcm_samples,
)

PAIRS = [(48000, 16000), (24000, 16000), (8000, 16000), (16000, 48000), (16000, 24000),
         (16000, 8000)]  # fmt: skip
ODD_CHUNKS = [1, 7, 13, 160, 441, 3, 2000]


def run(resampler: Resampler, x: np.ndarray, chunks: list[int] | None = None) -> np.ndarray:
    """Resample `x` in one call, or cycling through `chunks` sizes."""
    pieces = []
    sizes = itertools.cycle(chunks or [len(x)])
    i = 0
    while i < len(x):
        part = x[i : i + next(sizes)]
        out = np.empty(resampler.max_output(len(part)), dtype=np.float32)
        pieces.append(out[: resampler.process(part, out)])
        i += len(part)
    return np.concatenate(pieces)


def tone(rate: int, freq: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def speechlike(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    x += 0.05 * rng.standard_normal(n)
    return np.clip(x, -1, 1).astype(np.float32)


# ---- resampler ------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS)
def test_resampler_is_chunk_size_invariant(rate_in: int, rate_out: int) -> None:
    x = speechlike(rate_in, 0.5)
    whole = run(Resampler(rate_in, rate_out), x)
    chunked = run(Resampler(rate_in, rate_out), x, ODD_CHUNKS)
    one_by_one = run(Resampler(rate_in, rate_out), x[:700], [1])
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(one_by_one, whole[: len(one_by_one)])
    assert len(whole) == len(x) * rate_out // rate_in


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS)
def test_resampler_delay_is_whole_samples_at_both_rates(rate_in: int, rate_out: int) -> None:
    r = Resampler(rate_in, rate_out)
    assert r.delay_in_samples * rate_out == r.delay_out_samples * rate_in
    assert r.delay_ms == pytest.approx(1000 * r.delay_out_samples / rate_out)
    assert 0 < r.delay_ms <= 5.0


@pytest.mark.parametrize(("rate_in", "rate_out"), PAIRS)
def test_resampler_passes_a_tone_with_its_delay(rate_in: int, rate_out: int) -> None:
    r = Resampler(rate_in, rate_out)
    y = run(r, tone(rate_in, 1000.0, 0.3))
    ideal = tone(rate_out, 1000.0, 0.3 + 0.01)
    ideal = np.concatenate([np.zeros(r.delay_out_samples, np.float32), ideal])[: len(y)]
    settled = slice(rate_out // 50, None)  # after the filter's start-up
    np.testing.assert_allclose(y[settled], ideal[settled], atol=1e-4)


def test_sine_through_48k_16k_48k_keeps_frequency_and_amplitude() -> None:
    freq, amplitude = 1234.0, 0.6
    x = tone(48000, freq, 1.0, amplitude)
    down, up = Resampler(48000, 16000), Resampler(16000, 48000)
    mid = run(down, x, [960])
    y = run(up, mid, [320])
    delay = down.delay_in_samples + up.delay_out_samples  # both in 48 kHz samples
    assert len(y) == len(x)
    settled = y[4800:]
    spectrum = np.abs(np.fft.rfft(settled * np.hanning(len(settled))))
    peak_hz = np.argmax(spectrum) * 48000 / len(settled)
    assert abs(peak_hz - freq) < 48000 / len(settled)
    assert np.max(np.abs(settled)) == pytest.approx(amplitude, abs=2e-3)
    np.testing.assert_allclose(y[delay + 4800 :], x[4800 : len(x) - delay], atol=2e-3)


def test_decimation_rejects_what_would_alias() -> None:
    x = tone(48000, 11000.0, 0.5)  # above the 8 kHz Nyquist of 16 kHz
    y = run(Resampler(48000, 16000), x)[1000:]
    assert np.max(np.abs(y)) < 0.5 * 10 ** (-70 / 20)


def test_same_rate_is_a_passthrough() -> None:
    r = Resampler(16000, 16000)
    x = speechlike(16000, 0.1)
    np.testing.assert_array_equal(run(r, x, [7]), x)
    assert r.delay_ms == 0 and r.passthrough


def test_resampler_reset_restarts_from_silence() -> None:
    r = Resampler(48000, 16000)
    x = speechlike(48000, 0.2)
    first = run(r, x)
    run(r, speechlike(48000, 0.1, seed=5))
    r.reset()
    np.testing.assert_array_equal(run(r, x), first)


# ---- uncommon rates (the interpolated design) ------------------------------------------------

ODD_PAIRS = [(22254, 16000), (16000, 22254), (11127, 16000), (16000, 11127), (22051, 16000)]
COMMON_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000)


@pytest.mark.parametrize(("rate_in", "rate_out"), ODD_PAIRS)
def test_odd_rates_use_a_small_filter_and_stream_like_offline(rate_in: int, rate_out: int) -> None:
    """L*M is 89 million for 22254 -> 16000: the exact design would take gigabytes."""
    r = Resampler(rate_in, rate_out)
    assert not r.exact and r.up * r.down > 10**7
    assert r.nbytes < 1_000_000 and r.taps < 120
    x = speechlike(rate_in, 0.3)
    whole = run(r, x)
    chunked = run(Resampler(rate_in, rate_out), x, ODD_CHUNKS)
    one_by_one = run(Resampler(rate_in, rate_out), x[:400], [1])
    np.testing.assert_array_equal(chunked, whole)
    np.testing.assert_array_equal(one_by_one, whole[: len(one_by_one)])
    # output k comes with input floor(k * M / L), as at the common rates
    assert len(whole) == (len(x) * r.up - 1) // r.down + 1
    r.reset()
    np.testing.assert_array_equal(run(r, x, [333]), whole)


@pytest.mark.parametrize(("rate_in", "rate_out"), ODD_PAIRS)
def test_odd_rates_pass_a_tone_with_whole_output_sample_delay(rate_in: int, rate_out: int) -> None:
    r = Resampler(rate_in, rate_out)
    assert 0 < r.delay_ms <= 5.0
    assert r.delay_ms == 1000 * r.delay_out_samples / rate_out
    # delay_in_samples: the input that flushes the delay (rounded up to a whole sample)
    assert 0 <= r.delay_in_samples * rate_out - r.delay_out_samples * rate_in < rate_out
    y = run(r, tone(rate_in, 1000.0, 0.3))
    ideal = tone(rate_out, 1000.0, 0.3 + 0.01)
    ideal = np.concatenate([np.zeros(r.delay_out_samples, np.float32), ideal])[: len(y)]
    settled = slice(rate_out // 50, None)
    np.testing.assert_allclose(y[settled], ideal[settled], atol=1e-4)


def test_odd_rate_decimation_rejects_what_would_alias() -> None:
    x = tone(22254, 9500.0, 0.3)  # above the 8 kHz Nyquist of 16 kHz
    y = run(Resampler(22254, 16000), x)[500:]
    assert np.max(np.abs(y)) < 0.5 * 10 ** (-70 / 20)


def test_common_rates_keep_the_exact_design() -> None:
    """The framers' and the usual file rates, to and from the model rate: the exact design,
    its delay a whole number of samples at both rates."""
    for rate_in, rate_out in itertools.chain.from_iterable(
        ((rate, 16000), (16000, rate)) for rate in COMMON_RATES if rate != 16000
    ):
        r = Resampler(rate_in, rate_out)
        assert r.exact and r.delay_in_samples * rate_out == r.delay_out_samples * rate_in


def test_resampler_memory_is_bounded_or_the_pair_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"L\*M = 89016000"):
        design_filter(22254, 16000)  # the exact design alone: 178 million taps
    r = Resampler(16000, 767999)  # up = 767999 phases: the table does not grow with it
    assert not r.exact and r.nbytes < 1_000_000
    with pytest.raises(ValueError, match="cannot resample 7800001 Hz -> 16000 Hz: the rate ratio"):
        Resampler(7800001, 16000)


# ---- PCM conversion -------------------------------------------------------------------------


def test_pcm_samples_validates_input() -> None:
    assert pcm_samples(b"\x01\x00\xff\xff", SampleFormat.S16LE).tolist() == [1, -1]
    with pytest.raises(ValueError, match="whole number"):
        pcm_samples(b"\x00\x00\x00", SampleFormat.S16LE)
    with pytest.raises(ValueError, match="mono"):
        pcm_samples(np.zeros((10, 2), np.int16), SampleFormat.S16LE)
    with pytest.raises(ValueError, match="int16, float32"):
        pcm_samples(np.zeros(10, np.int32), SampleFormat.S16LE)
    with pytest.raises(TypeError):
        pcm_samples([0, 1], SampleFormat.S16LE)  # type: ignore[arg-type]


def test_float32_to_int16_rounds_and_saturates() -> None:
    src = np.array([0.0, 0.5, -1.0, 1.0, 2.0, -3.0, 1 / 65536], dtype=np.float32)
    out = np.empty(len(src), np.int16)
    float32_to_int16(src, out)
    assert out.tolist() == [0, 16384, -32768, 32767, 32767, -32768, 0]


# ---- framers --------------------------------------------------------------------------------


def frames_of(framer: InputFramer, chunks: list[np.ndarray | bytes]) -> np.ndarray:
    rows = []
    out = np.empty(framer.frame_size, np.float32)
    for chunk in chunks:
        framer.push(chunk)
        while framer.read_frame(out):
            rows.append(out.copy())
    framer.flush()
    while framer.read_frame(out):
        rows.append(out.copy())
    return np.array(rows)


def split(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, len(x), size)]


@pytest.mark.parametrize("rate", SUPPORTED_RATES)
def test_input_framer_frames_do_not_depend_on_chunking(rate: int) -> None:
    x = (speechlike(rate, 0.45) * 32767).astype(np.int16)
    make = lambda: InputFramer(rate, model_rate=16000, frame_size=320)  # noqa: E731
    whole = frames_of(make(), [x])
    n_in = len(x) + Resampler(rate, 16000).delay_in_samples
    assert len(whole) == -(-n_in * 16000 // rate // 320)  # every sample, padded to a frame
    for ms in (1, 7, 20, 1000):
        chunked = frames_of(make(), split(x, rate * ms // 1000))
        np.testing.assert_array_equal(chunked, whole)


@pytest.mark.parametrize("rate", [16000, 48000])
def test_int16_and_float32_input_are_equivalent(rate: int) -> None:
    x16 = (speechlike(rate, 0.3) * 32767).astype(np.int16)
    xf = x16.astype(np.float32) / 32768
    make = lambda fmt: InputFramer(rate, model_rate=16000, frame_size=320, fmt=fmt)  # noqa: E731
    ref = frames_of(make(SampleFormat.S16LE), [x16])
    np.testing.assert_array_equal(frames_of(make(SampleFormat.S16LE), [x16.tobytes()]), ref)
    np.testing.assert_array_equal(frames_of(make(SampleFormat.F32LE), [xf]), ref)
    np.testing.assert_array_equal(frames_of(make(SampleFormat.F32LE), [xf.tobytes()]), ref)
    np.testing.assert_array_equal(frames_of(make(SampleFormat.F32LE), [xf.astype("f8")]), ref)


def test_float_input_is_clipped_and_sanitised() -> None:
    framer = InputFramer(16000, model_rate=16000, frame_size=4)
    framer.push(np.array([np.nan, 2.0, -np.inf, 0.25], dtype=np.float32))
    out = np.empty(4, np.float32)
    assert framer.read_frame(out)
    assert out.tolist() == [0.0, 1.0, -1.0, 0.25]


def test_input_framer_counts_overflow() -> None:
    framer = InputFramer(16000, model_rate=16000, frame_size=320, max_buffered_ms=100)
    capacity = framer.ring.capacity
    framer.push(np.zeros(16000, np.int16))
    assert framer.overflow == 16000 - capacity
    assert framer.frames_ready == capacity // 320


@pytest.mark.parametrize("rate", SUPPORTED_RATES)
def test_output_framer_formats_and_lengths(rate: int) -> None:
    out16 = OutputFramer(rate, model_rate=16000, frame_size=320)
    outf = OutputFramer(rate, model_rate=16000, frame_size=320, fmt=SampleFormat.F32LE)
    frames = speechlike(16000, 0.2).reshape(-1, 320)
    for frame in frames:
        out16.write(frame)
        outf.write(frame)
    out16.flush()
    outf.flush()
    n = len(frames) * 320 * rate // 16000 + out16.delay_samples
    assert out16.available == outf.available == n
    as_float = outf.read()
    as_int = out16.read_bytes()
    assert as_float.dtype == np.float32 and len(as_int) == 2 * n
    expected = np.empty(n, np.int16)
    float32_to_int16(as_float.copy(), expected)
    assert np.frombuffer(as_int, "<i2").tolist() == expected.tolist()


def test_output_framer_padded_read_counts_underrun() -> None:
    out = OutputFramer(16000, model_rate=16000, frame_size=320)
    out.write(np.full(320, 0.5, np.float32))
    got = out.read(400, pad=True)
    assert got.dtype == np.int16 and len(got) == 400
    assert got[:320].tolist() == [16384] * 320 and not got[320:].any()
    assert out.underrun == 80


def test_int16_round_trip_at_the_model_rate_is_exact() -> None:
    x = (speechlike(16000, 0.1) * 32767).astype(np.int16)
    inp = InputFramer(16000, model_rate=16000, frame_size=160)
    out = OutputFramer(16000, model_rate=16000, frame_size=160)
    frame = np.empty(160, np.float32)
    inp.push(x)
    while inp.read_frame(frame):
        out.write(frame)
    np.testing.assert_array_equal(out.read(), x)


def test_unsupported_rate_is_rejected() -> None:
    with pytest.raises(ValueError, match="44100"):
        InputFramer(44100, model_rate=16000, frame_size=320)
