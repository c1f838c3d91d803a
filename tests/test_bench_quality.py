"""The quality benchmark's pure helpers on synthetic signals (no peers, no model, fast)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_quality", ROOT / "benchmarks" / "bench_quality.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_quality", module)
    spec.loader.exec_module(module)
    return module


bq = _load()
SR = 16000


def speechlike(seconds: float = 1.5, seed: int = 0) -> np.ndarray:
    """Harmonic glide with a syllable envelope and a little noise, float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.9 * t)) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.55 + 0.45 * np.sin(7 * np.pi * t))
    return (0.2 * x + 0.01 * rng.standard_normal(t.shape[0])).astype(np.float32)


# ---- alignment ------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [0, 1, 80, 104, 517, -33])
def test_estimate_delay_recovers_shift(delay: int) -> None:
    x = speechlike()
    rng = np.random.default_rng(1)
    # deg[n + delay] = x[n]  (a codec that delays by `delay` samples), plus noise
    deg = np.zeros(x.shape[0] + 1000, dtype=np.float32)
    if delay >= 0:
        deg[delay : delay + x.shape[0]] = x
    else:
        deg[: x.shape[0] + delay] = x[-delay:]
    deg += 0.02 * rng.standard_normal(deg.shape[0]).astype(np.float32)
    lag, corr = bq.estimate_delay(x, deg, max_lag=800)
    assert lag == delay
    assert corr > 0.9
    aligned = bq.shift(deg, lag, x.shape[0])
    assert aligned.shape == x.shape
    valid = slice(max(0, -delay), x.shape[0])
    assert np.max(np.abs(aligned[valid] - x[valid])) < 0.15


def test_estimate_delay_sign_inverted_signal() -> None:
    x = speechlike()
    lag, corr = bq.estimate_delay(x, -np.roll(x, 50), max_lag=200)
    assert lag == 50
    assert corr < -0.9


def test_shift_pads_with_zeros() -> None:
    deg = np.arange(1, 11, dtype=np.float32)
    assert bq.shift(deg, 3, 5).tolist() == [4, 5, 6, 7, 8]
    assert bq.shift(deg, -2, 5).tolist() == [0, 0, 1, 2, 3]
    assert bq.shift(deg, 8, 5).tolist() == [9, 10, 0, 0, 0]
    assert bq.shift(deg, 20, 3).tolist() == [0, 0, 0]


def test_envelope_alignment_without_waveform_match() -> None:
    """A 'parametric codec': same energy envelope, unrelated waveform, delayed 240 samples."""
    rng = np.random.default_rng(3)
    n = 2 * SR
    t = np.arange(n) / SR
    env = np.maximum(0.0, np.sin(2 * np.pi * 2.3 * t)) ** 2 + 0.01
    x = (env * rng.standard_normal(n)).astype(np.float32)
    y = np.zeros(n + 500, dtype=np.float32)
    y[240 : 240 + n] = env * rng.standard_normal(n)
    lag, corr, method = bq.estimate_alignment(x, y, max_lag=1600)
    assert method == "envelope"
    assert abs(corr) < 0.3
    assert abs(lag - 240) <= 16


# ---- mel distance -----------------------------------------------------------------------------


def test_mel_distance_zero_for_identical_and_grows_with_noise() -> None:
    x = speechlike()
    rng = np.random.default_rng(2)
    assert bq.mel_distance(x, x) == 0.0
    small = bq.mel_distance(x, x + 0.003 * rng.standard_normal(x.shape[0]))
    large = bq.mel_distance(x, x + 0.05 * rng.standard_normal(x.shape[0]))
    assert 0.0 < small < large


def test_mel_distance_of_a_gain_is_its_level_in_db() -> None:
    rng = np.random.default_rng(4)
    x = (0.1 * rng.standard_normal(SR)).astype(np.float32)  # white: every band far above floor
    assert bq.mel_distance(x, 2 * x) == pytest.approx(20 * math.log10(2), abs=1e-3)


def test_mel_filterbank_shape_and_coverage() -> None:
    fb = bq.mel_filterbank(SR, 512, 80)
    assert fb.shape == (80, 257)
    assert fb.min() >= 0.0
    assert fb.max() <= 1.0 + 1e-9
    assert np.all(fb.sum(axis=1) > 0)  # no empty band
    assert bq.log_mel(speechlike(), SR).shape == (1 + (int(1.5 * SR) - 400) // 160, 80)


# ---- bitrate --------------------------------------------------------------------------------


def test_kbps_and_frames_needed() -> None:
    assert bq.kbps(6000, SR) == pytest.approx(6.0)
    assert bq.kbps(8 * 125, SR) == pytest.approx(1.0)  # 1 s of 1-codebook frames: 125 bytes
    assert bq.kbps(1200 * 3, 3 * 8000, 8000) == pytest.approx(1.2)
    assert math.isnan(bq.kbps(100, 0))
    assert bq.frames_needed(320, 0, 320) == 1
    assert bq.frames_needed(320, 80, 320) == 2
    assert bq.frames_needed(321, 0, 320) == 2
    assert bq.frames_needed(640, -10, 320) == 2


def test_to_pcm16_rounds_and_clips() -> None:
    y = bq.to_pcm16(np.array([0.0, 1.5, -1.5, 0.5, 1e-6], dtype=np.float32))
    assert y.dtype == np.float32
    assert y.tolist() == [0.0, 32767 / 32768, -1.0, 0.5, 0.0]


# ---- tokens ---------------------------------------------------------------------------------


def test_token_match_rates() -> None:
    a = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]])
    b = a.copy()
    b[0, 2] = 0  # last codebook differs in frame 0
    b[1, 0] = 0  # first codebook differs in frame 1
    b[3, 2] = 0
    ga, gb = np.array([10, 11, 12, 13]), np.array([10, 11, 0, 13])
    m = bq.token_match(a, b, ga, gb)
    assert m.per_codebook == [0.75, 1.0, 0.5]
    assert m.overall == pytest.approx(9 / 12)
    assert m.frame_rate == 0.25  # only frame 2 has every code equal
    assert m.gain_rate == 0.75
    assert m.gain_close_rate == 0.75  # 12 -> 0 is 12 steps
    assert m.gain_shift_mean == pytest.approx(-12 / 4)
    pooled = m + bq.token_match(a, a, ga, ga)
    assert pooled.overall == pytest.approx(21 / 24)
    assert pooled.frames == 8
    assert pooled.to_json()["per_codebook"] == [0.875, 1.0, 0.75]
    with pytest.raises(ValueError):
        bq.token_match(a, a[:2], ga, gb)


def test_codebook_usage_entropy_perplexity() -> None:
    col_uniform = np.tile(np.arange(4), 25)  # 4 codes equally often: 2 bits
    col_single = np.zeros(100, dtype=np.int64)  # one code: 0 bits
    u = bq.codebook_usage(np.stack([col_uniform, col_single], axis=1), 1024)
    assert u["entropy_bits"] == pytest.approx([2.0, 0.0])
    assert u["perplexity"] == pytest.approx([4.0, 1.0])
    assert u["used_fraction"] == pytest.approx([4 / 1024, 1 / 1024])
    assert u["frames"] == 100
    assert u["max_entropy_bits"] == pytest.approx(math.log2(100))


def test_level_change_db() -> None:
    x = speechlike()
    assert bq.level_change_db(x, x) == pytest.approx(0.0, abs=1e-9)
    assert bq.level_change_db(x, 0.5 * x) == pytest.approx(-6.0206, abs=1e-3)


def test_nan_aware_means() -> None:
    assert bq.nanmean([1.0, math.nan, 3.0]) == 2.0
    assert math.isnan(bq.nanmean([math.nan]))
    assert bq.nanstd([1.0, 3.0, math.inf]) == 1.0


def test_doc_section_is_replaced_between_markers(tmp_path: Path) -> None:
    doc = tmp_path / "quality.md"
    doc.write_text(f"# T\n\nintro\n\n{bq.SECTION_BEGIN}\nold\n{bq.SECTION_END}\n\nafter\n")
    bq.update_doc(doc, f"{bq.SECTION_BEGIN}\nnew\n{bq.SECTION_END}\n")
    text = doc.read_text()
    assert "old" not in text
    assert "new" in text
    assert text.startswith("# T\n\nintro")
    assert text.endswith("after\n")
    fresh = tmp_path / "fresh.md"
    bq.update_doc(fresh, f"{bq.SECTION_BEGIN}\nx\n{bq.SECTION_END}\n")
    assert fresh.read_text().startswith("# Speech quality")


# ---- our codec's pipelines on the bundled model -----------------------------------------------


def test_streaming_pipeline_length_bitrate_and_client_agreement() -> None:
    from streaming.model import BitrateMode, CodecModel
    from streaming.protocol import frame_stream_bits, read_bitstream

    model = CodecModel.load()
    card = model.card
    x = bq.probe_signal(0.5)
    frames = bq.frames_needed(x.shape[0], card.output_delay_samples, card.frame_size)
    for n in (1, card.num_codebooks):
        mode = BitrateMode(n, 0, card.bitrate_kbps(n))
        data, y = bq.streaming_pipeline(model)(x, mode)
        assert y.shape == x.shape
        assert y.dtype == np.float32
        _, tokens = read_bitstream(data)
        assert [t.num_codebooks for t in tokens] == [n] * frames
        # the file's frames (coded against each other) plus its header; a packet spends
        # frame_bits(n) on each
        payload = frame_stream_bits(tokens, code_bits=card.code_bits, gain_bits=card.gain.bits)
        assert payload < frames * card.frame_bits(n) and len(data) > -(-payload // 8)
    one = bq.OursCodec(model, 1.0, bq.streaming_pipeline(model), "s")
    result = one.roundtrip(x)
    _, tokens = read_bitstream(bq.streaming_pipeline(model)(x, one.mode)[0])
    bits = {"code_bits": card.code_bits, "gain_bits": card.gain.bits}
    assert result.payload_bits == frame_stream_bits(tokens, **bits) < frames * card.frame_bits(1)
    assert result.codes is not None and result.codes.shape == (frames, 1)
    coded = bq.OursCodec(model, 6.0, bq.streaming_pipeline(model), "s")  # a low-band mode
    assert coded.mode.lowband_layout != 0
    result = coded.roundtrip(x)
    data, _ = bq.streaming_pipeline(model)(x, coded.mode)
    _, tokens = read_bitstream(data)
    assert result.payload_bits == frame_stream_bits(tokens, **bits)
    assert any(t.lowband_layout == coded.mode.lowband_layout for t in tokens)
    ok, message = bq.compare_pipelines(model)
    if not ok:
        pytest.skip(message)
    assert "max output difference 0," in message, message
