"""Encoder and decoder streams run alone (streaming/stream.py).

Every size comes from the model card; the audio is synthetic.  Time comes from a fake clock,
so latency records are exact and nothing depends on the machine's speed.
"""

from __future__ import annotations

import numpy as np
import pytest

from streaming.framing import SUPPORTED_RATES, SampleFormat
from streaming.latency import LatencyStats
from streaming.lowband import LAYOUTS
from streaming.model import BitrateMode, CodecModel
from streaming.protocol import TokenFrame
from streaming.ratecap import BANK_MS
from streaming.stream import DecoderStream, EncoderStream, StreamOverflowError


class FakeClock:
    """Advances by `step` seconds on every read."""

    def __init__(self, start: float = 100.0, step: float = 0.001) -> None:
        self.t = start
        self.step = step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


@pytest.fixture(scope="module")
def model() -> CodecModel:
    return CodecModel.load()


def speech(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """int16 synthetic 'speech': a gliding harmonic tone with a syllable envelope + noise."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    x = 0.25 * x + 0.02 * rng.standard_normal(n)
    return np.clip(x * 32767, -32768, 32767).astype(np.int16)


def encode_chunked(model: CodecModel, x: np.ndarray, rate: int, chunk: int) -> list[TokenFrame]:
    enc = EncoderStream(model, rate=rate, max_buffered_ms=2000)  # room for a one-shot push
    frames: list[TokenFrame] = []
    for i in range(0, len(x), chunk):
        frames += enc.encode(x[i : i + chunk])
    enc.flush()
    return frames + enc.pull()


@pytest.mark.parametrize("rate", SUPPORTED_RATES)
def test_any_chunking_gives_the_tokens_of_one_shot_encoding(model: CodecModel, rate: int) -> None:
    x = speech(rate, 1.3)
    one_shot = encode_chunked(model, x, rate, len(x))
    card = model.card
    assert len(one_shot) >= len(x) * card.sample_rate // rate // card.frame_size
    for ms in (1, 7, 20, 1000):
        assert encode_chunked(model, x, rate, rate * ms // 1000) == one_shot, f"{ms} ms chunks"


def test_int16_and_float32_input_give_the_same_tokens(model: CodecModel) -> None:
    x16 = speech(48000, 0.5)
    xf = x16.astype(np.float32) / 32768
    ref = EncoderStream(model, rate=48000).encode(x16)
    assert EncoderStream(model, rate=48000).encode(x16.tobytes()) == ref
    f32 = EncoderStream(model, rate=48000, fmt=SampleFormat.F32LE)
    assert f32.encode(xf.tobytes()) == ref
    assert EncoderStream(model, rate=48000).encode(xf) == ref


def test_num_codebooks_can_change_on_any_frame(model: CodecModel) -> None:
    q = model.card.num_codebooks
    x = speech(16000, 0.6)
    full = EncoderStream(model).encode(x)
    enc = EncoderStream(model)
    enc.push(x)
    counts = [(3 * i) % q + 1 for i in range(len(full))]
    got = []
    for n in counts:
        enc.set_num_codebooks(n)
        frame = enc.step()
        assert frame is not None
        got.append(frame)
    assert enc.step() is None
    for frame, ref, n in zip(got, full, counts, strict=True):
        assert frame.num_codebooks == n
        assert frame.codes == ref.codes[:n]  # residual VQ: a prefix of the full encoding
        assert frame.gain_index == ref.gain_index
    with pytest.raises(ValueError, match=f"1..{q}"):
        enc.set_num_codebooks(q + 1)


def test_set_bitrate_picks_the_mode_from_the_card(model: CodecModel) -> None:
    card = model.card
    enc = EncoderStream(model)
    one = enc.set_bitrate(1.0)  # 21 bits a frame: within a bit per frame of 1 kbps
    assert (one.num_codebooks, one.lowband_layout) == (1, 0)
    assert one.kbps == pytest.approx(1.05)
    for kbps in (1.5, 2.0, 3.0, 4.5, 6.0, 8.0):
        mode = enc.set_bitrate(kbps)
        assert mode.kbps <= kbps + 0.05 + 1e-9
        assert enc.bitrate_kbps == pytest.approx(mode.kbps)
        assert (enc.num_codebooks, enc.lowband_layout) == (mode.num_codebooks, mode.lowband_layout)
        if mode.num_codebooks < card.num_codebooks:  # the next codebook would not fit
            assert card.bitrate_kbps(mode.num_codebooks + 1, mode.lowband_layout) > kbps + 0.05
    assert enc.set_bitrate(3.0) == BitrateMode(2, 1, 3.0)
    assert enc.set_bitrate(6.0) == BitrateMode(3, 2, 6.0)
    assert enc.set_bitrate(7.0) == BitrateMode(5, 2, 7.0)
    frames = enc.encode(speech(16000, 0.2))
    gain = card.gain
    for f in frames:  # quiet frames go without low band
        loud = gain.min_db + gain.step_db * f.gain_index >= LAYOUTS[2].min_level_db
        assert (f.lowband_layout, len(f.lowband)) == ((2, 40) if loud else (0, 0))
    assert any(f.lowband_layout == 2 for f in frames)
    with pytest.raises(ValueError):
        enc.set_bitrate(0.1)


def payload_bits(frames: list[TokenFrame], model: CodecModel) -> list[int]:
    card = model.card
    return [f.bit_length(code_bits=card.code_bits, gain_bits=card.gain.bits) for f in frames]


@pytest.mark.parametrize("kbps", [3.0, 6.0])
def test_rate_cap_keeps_the_payload_within_the_mode_rate(model: CodecModel, kbps: float) -> None:
    """With the cap the payload of the first k frames never exceeds k frames of the mode's
    rate plus the bucket (1 s of it); frames over budget send fewer codebooks, a narrower
    low band or none (counted).  Without it this loud signal exceeds the rate."""
    card = model.card
    loud = np.clip(speech(16000, 10.0, seed=4).astype(np.float64) * 3.5, -32768, 32767)
    loud = loud.astype(np.int16)
    capped = EncoderStream(model, rate_cap=True, max_buffered_ms=11000)
    free = EncoderStream(model, max_buffered_ms=11000)
    mode = capped.set_bitrate(kbps)
    free.set_bitrate(kbps)
    a, b = capped.encode(loud), free.encode(loud)
    budget = mode.kbps * card.frame_ms  # bits per frame
    bucket = mode.kbps * BANK_MS
    sent = np.cumsum(payload_bits(a, model))
    assert np.all(sent <= budget * np.arange(1, len(a) + 1) + bucket + 1e-9)
    assert sum(payload_bits(b, model)) > budget * len(b)
    assert capped.frames_trimmed > 0 and free.frames_trimmed == 0
    # trimmed frames keep a prefix of the codes (fewer codebooks before a narrower low band)
    assert all(x.gain_index == y.gain_index and y.codes[: x.num_codebooks] == x.codes
               for x, y in zip(a, b, strict=True))
    assert {f.lowband_layout for f in a} <= {0, *range(1, mode.lowband_layout + 1)}
    capped.reset()  # back to the constructor's mode, nothing banked or trimmed
    assert capped.frames_trimmed == 0
    capped.set_bitrate(kbps)
    assert capped.encode(loud) == a


def test_reset_gives_a_fresh_encoder(model: CodecModel) -> None:
    a, b = speech(24000, 0.4, seed=1), speech(24000, 0.4, seed=2)
    enc = EncoderStream(model, rate=24000, num_codebooks=4)
    enc.encode(a[:7500])  # an odd number of frames (state buffers swapped), a partial frame
    enc.set_num_codebooks(9)
    enc.reset()
    assert enc.pending_frames == 0 and enc.frames_encoded == 0 and enc.num_codebooks == 4
    assert enc.encode(b) == EncoderStream(model, rate=24000, num_codebooks=4).encode(b)


def test_encoder_overflow_is_counted_not_silent(model: CodecModel) -> None:
    enc = EncoderStream(model, max_buffered_ms=100)
    capacity = enc.framer.ring.capacity
    enc.push(speech(16000, 1.0))
    assert enc.overflow_samples == 16000 - capacity
    assert len(enc.pull()) == capacity // model.card.frame_size


def test_non_finite_float_input_does_not_poison_the_state(model: CodecModel) -> None:
    enc = EncoderStream(model, fmt=SampleFormat.F32LE)
    bad = np.full(model.card.frame_size, np.nan, dtype=np.float32)
    enc.encode(bad)
    enc.encode(speech(16000, 0.1).astype(np.float32) / 32768)
    assert all(np.isfinite(a).all() for a in enc.state.arrays)


def test_encoder_latency_records_use_the_given_clock(model: CodecModel) -> None:
    clock = FakeClock(step=0.001)
    stats = LatencyStats()
    enc = EncoderStream(model, rate=48000, clock=clock, stats=stats)
    n = model.card.frame_size * 48000 // model.card.sample_rate
    enc.push(speech(48000, 0.2)[: 3 * n], now=5.0)
    frame = enc.step()
    assert frame is not None
    rec = enc.last_latency
    assert rec is not None and rec.index == 0 and rec.batch_size == 1
    assert rec.ready == 5.0
    assert rec.compute_ms == pytest.approx(1.0)  # one clock step between start and end
    assert rec.queue_ms == pytest.approx((rec.start - 5.0) * 1000)
    assert rec.algorithmic_ms == pytest.approx(model.card.frame_ms + enc.framer.delay_ms)
    assert rec.total_ms == pytest.approx(rec.algorithmic_ms + rec.queue_ms + rec.compute_ms)
    enc.pull()
    assert stats.count == enc.frames_encoded == 3
    assert stats.compute.quantile(0.5) == pytest.approx(1.0, rel=0.1)


# ---- decoder --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frames(model: CodecModel) -> list[TokenFrame]:
    enc = EncoderStream(model)
    out = enc.encode(speech(16000, 0.5))
    for i, f in enumerate(out):  # vary the bitrate per frame
        n = i % model.card.num_codebooks + 1
        out[i] = TokenFrame(n, f.gain_index, f.codes[:n])
    return out


def decode_all(model: CodecModel, frames: list[TokenFrame], **kw: object) -> np.ndarray:
    dec = DecoderStream(model, **kw)  # type: ignore[arg-type]
    for f in frames:
        dec.push(f)
    dec.flush()
    return dec.pull()


@pytest.mark.parametrize("rate", SUPPORTED_RATES)
def test_decoder_output_length_and_chunk_independence(
    model: CodecModel, frames: list[TokenFrame], rate: int
) -> None:
    card = model.card
    whole = decode_all(model, frames, rate=rate)
    dec = DecoderStream(model, rate=rate)
    n_out = card.frame_size * rate // card.sample_rate
    assert len(whole) == len(frames) * n_out + dec.framer.delay_samples
    pieces = []
    for f in frames:
        out = dec.decode(f)
        assert out.dtype == np.int16
        pieces.append(out)
    dec.flush()
    pieces.append(dec.pull())
    np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_decoder_float32_and_bytes_output(model: CodecModel, frames: list[TokenFrame]) -> None:
    ref16 = decode_all(model, frames, rate=24000)
    f32 = decode_all(model, frames, rate=24000, fmt=SampleFormat.F32LE)
    assert f32.dtype == np.float32
    np.testing.assert_array_equal(np.clip(np.rint(f32 * 32768), -32768, 32767), ref16)
    dec = DecoderStream(model, rate=24000)
    dec.push_many(frames)
    dec.run()
    dec.flush()
    assert dec.pull_bytes() == ref16.astype("<i2").tobytes()


def test_silence_frames_keep_their_place_and_skip_the_model(
    model: CodecModel, frames: list[TokenFrame]
) -> None:
    n = model.card.frame_size
    plain = DecoderStream(model, fmt=SampleFormat.F32LE)
    plain.push_many(frames[:3])
    plain.run()
    ref = plain.pull()
    dec = DecoderStream(model, fmt=SampleFormat.F32LE)
    dec.push(frames[0])
    dec.push_silence()
    dec.push_many(frames[1:3])
    assert dec.pending_frames == 4
    dec.run()
    out = dec.pull()
    assert dec.frames_decoded == 3
    np.testing.assert_array_equal(out[:n], ref[:n])
    assert not out[n : 2 * n].any()
    np.testing.assert_array_equal(out[2 * n :], ref[n:])


def test_decoder_rejects_frames_the_model_cannot_take(model: CodecModel) -> None:
    card = model.card
    dec = DecoderStream(model)
    if card.num_codebooks < 15:
        too_many = card.num_codebooks + 1
        with pytest.raises(ValueError, match="codebooks"):
            dec.push(TokenFrame(too_many, 0, (0,) * too_many))
    with pytest.raises(ValueError, match="codebook size"):
        dec.push(TokenFrame(1, 0, (card.codebook_size,)))
    with pytest.raises(ValueError, match="gain_index"):
        dec.push(TokenFrame(1, 1 << card.gain.bits, (0,)))
    assert dec.pending_frames == 0


def test_decoder_queue_overflow_is_counted(model: CodecModel, frames: list[TokenFrame]) -> None:
    dec = DecoderStream(model, max_pending_frames=4)
    dec.push_many(frames[:6])
    assert dec.pending_frames == 4 and dec.frames_dropped == 2
    with pytest.raises(StreamOverflowError):
        dec.push(frames[0], strict=True)


def test_padded_pull_counts_underrun(model: CodecModel, frames: list[TokenFrame]) -> None:
    dec = DecoderStream(model, rate=8000)
    n_out = model.card.frame_size * 8000 // model.card.sample_rate
    dec.push(frames[0])
    dec.run()
    out = dec.pull(n_out + 10, pad=True)
    assert len(out) == n_out + 10 and dec.underrun_samples == 10


def test_reset_gives_a_fresh_decoder(model: CodecModel, frames: list[TokenFrame]) -> None:
    dec = DecoderStream(model, rate=48000)
    dec.push_many(frames[5:12])
    dec.run(3)
    dec.reset()
    assert (dec.pending_frames, dec.available, dec.frames_decoded) == (0, 0, 0)
    dec.push_many(frames)
    dec.flush()
    np.testing.assert_array_equal(dec.pull(), decode_all(model, frames, rate=48000))


def test_decoder_latency_records(model: CodecModel, frames: list[TokenFrame]) -> None:
    clock = FakeClock(start=0.0, step=0.002)
    dec = DecoderStream(model, rate=16000, clock=clock)
    dec.push(frames[0], now=0.5)
    dec.push(frames[1])
    dec.run()
    rec = dec.last_latency
    assert rec is not None and rec.index == 1
    assert rec.ready == pytest.approx(0.002)  # clock() at the second push
    assert rec.compute_ms == pytest.approx(2.0)
    assert rec.algorithmic_ms == pytest.approx(model.card.output_delay_ms)


def test_state_and_memory_accounting(model: CodecModel) -> None:
    enc, dec = EncoderStream(model), DecoderStream(model)
    assert enc.state_nbytes == model.card.encoder.state_nbytes
    assert dec.state_nbytes == model.card.decoder.state_nbytes
    assert enc.nbytes > 2 * enc.state_nbytes and dec.nbytes > 2 * dec.state_nbytes
