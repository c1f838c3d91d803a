"""`codec-client encode` / `decode` on files, locally through the streaming engine.

Alignment is checked against an offline reference that drives the ONNX model directly
(`CodecModel.encoder_step` / `decoder_step`, no streams, no framers): decode(encode(x)) must
be that reference delayed back by the card's output delay, with exactly len(x) samples.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from client.__main__ import main
from client.audiofile import resample
from streaming.lowband import LAYOUTS, dequantize_into, quantize
from streaming.model import CodecModel
from streaming.protocol import (
    BitstreamWriter,
    SourceInfo,
    TokenFrame,
    frame_stream_bits,
    read_bitstream,
)


def offline_decode(
    model: CodecModel, x16: np.ndarray, codebooks: int, sent: list[TokenFrame] | None = None
) -> np.ndarray:
    """Model-rate decode of `x16` (zero-padded to whole frames, one extra for the output
    delay) by direct model steps, aligned (delay removed) and cut to len(x16).

    `sent`: the frames of the file under test.  Frame k then sends a low band when sent[k]
    has one (the encoder's choice per frame), quantised here from the encoder step's own
    output and checked against the file's indices (and the file's codes and gain too)."""
    card = model.card
    n, d = card.frame_size, card.output_delay_samples
    frames = math.ceil((len(x16) + d) / n)
    x = np.zeros(frames * n, dtype=np.float32)
    x[: len(x16)] = x16
    enc, dec = model.new_encoder_state(), model.new_decoder_state()
    codes = np.zeros((1, card.num_codebooks), dtype=np.int64)
    gain = np.zeros(1, dtype=np.int64)
    count = np.array([codebooks], dtype=np.int64)
    pcm = np.zeros((1, n), dtype=np.float32)
    low = np.zeros((1, card.lowband_bins), dtype=np.float32)  # the encoder's low band output
    values, mask = np.zeros_like(low), np.zeros_like(low)  # the decoder's (none by default)
    out = []
    for k in range(frames):
        frame = x[None, k * n : (k + 1) * n].copy()
        model.encoder_step(frame, count, enc.arrays, codes, gain, low, enc.spare)
        enc.swap()
        codes[0, codebooks:] = 0
        values[:], mask[:] = 0.0, 0.0
        if sent is not None:
            got = sent[k]
            assert (got.gain_index, got.codes) == (int(gain[0]), tuple(codes[0, :codebooks]))
            if got.lowband_layout:
                spec = LAYOUTS[got.lowband_layout]
                indices = quantize(low[0], spec, np.zeros(spec.bins, np.int64))
                assert tuple(indices.tolist()) == got.lowband, k
                dequantize_into(indices, spec, values[0], mask[0])
        model.decoder_step(codes, count, gain, values, mask, dec.arrays, pcm, dec.spare)
        dec.swap()
        out.append(pcm[0].copy())
    return np.concatenate(out)[d : d + len(x16)]


def run(*argv: str | Path) -> int:
    return main([str(a) for a in argv])


@pytest.fixture
def wav16(tmp_path: Path, speech: tuple[np.ndarray, int]) -> Path:
    path = tmp_path / "in.wav"
    x, rate = speech
    sf.write(path, x[: int(2.5 * rate)], rate, subtype="FLOAT")
    return path


def test_round_trip_is_aligned_with_exact_length_and_size(
    tmp_path: Path, wav16: Path, model: CodecModel
) -> None:
    x, rate = sf.read(wav16, dtype="float32")
    csb, out = tmp_path / "a.csb", tmp_path / "a.wav"
    assert run("encode", wav16, csb, "--kbps", "1", "-q") == 0
    assert run("decode", csb, out, "--float", "-q") == 0

    data = csb.read_bytes()
    header, frames = read_bitstream(data)
    card = model.card
    assert header.source == SourceInfo(rate, len(x))
    assert len(frames) == math.ceil((len(x) + card.output_delay_samples) / card.frame_size)
    assert {(f.num_codebooks, f.lowband_layout) for f in frames} == {(1, 0)}
    # bitrate = file size: header + the frames' bits, nothing else: at most 21 bits a frame
    # (131.25 bytes/s, a packet's payload); the file codes each frame's mode and gain
    # against the previous frame's: 1 bit for the repeated mode, 2-9 for the gain
    header_bytes = 26 + len(card.model_id) + 10
    bits = frame_stream_bits(frames, code_bits=card.code_bits, gain_bits=card.gain.bits)
    assert len(data) == header_bytes + math.ceil(bits / 8)
    assert 10 + 1 + 2 <= bits / len(frames) <= 10 + 1 + 9 < 21

    y, out_rate = sf.read(out, dtype="float32")
    assert out_rate == rate and len(y) == len(x)
    np.testing.assert_allclose(y, offline_decode(model, x, 1), atol=1e-6)


def test_re_encoding_a_decoded_file_is_stable(tmp_path: Path, wav16: Path) -> None:
    """The harness re-encodes decoded files: frame count and length must not drift."""
    counts, lengths = [], []
    src = wav16
    for i in range(3):
        csb, out = tmp_path / f"{i}.csb", tmp_path / f"{i}.wav"
        assert run("encode", src, csb, "--kbps", "6", "-q") == 0
        assert run("decode", csb, out, "-q") == 0
        counts.append(read_bitstream(csb.read_bytes())[0].num_frames)
        lengths.append(sf.info(out).frames)
        src = out
    assert len(set(counts)) == 1 and len(set(lengths)) == 1
    assert lengths[0] == sf.info(wav16).frames


@pytest.mark.parametrize("rate", [8000, 48000, 44100])
def test_other_input_rates_round_trip_at_their_rate(
    tmp_path: Path, speech: tuple[np.ndarray, int], model: CodecModel, rate: int
) -> None:
    x16, _ = speech
    x = resample(x16[:32000], 16000, rate)
    path, csb, out = tmp_path / "in.flac", tmp_path / "a.csb", tmp_path / "a.wav"
    sf.write(path, x, rate, subtype="PCM_24")
    x = sf.read(path, dtype="float32")[0]
    assert run("encode", path, csb, "--codebooks", "5", "-q") == 0
    assert run("decode", csb, out, "--float", "-q") == 0
    y, out_rate = sf.read(out, dtype="float32")
    assert out_rate == rate and len(y) == len(x)
    ref16 = offline_decode(model, resample(x, rate, 16000), 5)
    np.testing.assert_allclose(y, resample(ref16, 16000, rate, len(x)), atol=1e-5)


def test_decode_rate_option_and_stereo_mixdown(
    tmp_path: Path, speech: tuple[np.ndarray, int], model: CodecModel
) -> None:
    x, rate = speech
    x = x[:16000]
    stereo, mono = tmp_path / "st.wav", tmp_path / "mono.wav"
    sf.write(stereo, np.stack([x, x], axis=1), rate, subtype="FLOAT")
    sf.write(mono, x, rate, subtype="FLOAT")
    assert run("encode", stereo, tmp_path / "st.csb", "-q") == 0
    assert run("encode", mono, tmp_path / "mono.csb", "-q") == 0
    assert (tmp_path / "st.csb").read_bytes() == (tmp_path / "mono.csb").read_bytes()
    assert run("decode", tmp_path / "st.csb", tmp_path / "o48.wav", "--rate", "48000", "-q") == 0
    assert sf.info(tmp_path / "o48.wav").samplerate == 48000
    assert sf.info(tmp_path / "o48.wav").frames == 3 * len(x)


def test_file_without_source_record_decodes_every_determined_sample(
    tmp_path: Path, wav16: Path, model: CodecModel
) -> None:
    """A file from another writer (no source record): F * N - D samples at the model rate."""
    csb = tmp_path / "a.csb"
    assert run("encode", wav16, csb, "-q") == 0
    header, frames = read_bitstream(csb.read_bytes())
    assert header.source is not None
    writer = BitstreamWriter(replace(header, source=None))
    writer.add_frames(frames)
    plain = tmp_path / "plain.csb"
    plain.write_bytes(writer.finalize())
    assert run("decode", plain, tmp_path / "p.wav", "-q") == 0
    card = model.card
    expected = len(frames) * card.frame_size - card.output_delay_samples
    assert sf.info(tmp_path / "p.wav").frames == expected


@pytest.mark.parametrize(
    ("make", "command", "message"),
    [
        (lambda p: None, "encode", "no such file"),
        (lambda p: p.write_text("hello"), "encode", "not a readable audio file"),
        (lambda p: None, "decode", "no such file"),
        (lambda p: p.write_bytes(b"RIFF0000WAVE"), "decode", "not a valid codecstream"),
        (lambda p: p.write_bytes(b"CSTR\x02\x00\x00"), "decode", "truncated"),
        (lambda p: p.write_bytes(b"CSTR\x01\x00\x00"), "decode", "unknown_version"),
    ],
)
def test_bad_input_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: object, command: str, message: str
) -> None:
    bad = tmp_path / "bad.input"
    make(bad)  # type: ignore[operator]
    assert run(command, bad, tmp_path / "out", "-q") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"codec-client {command}: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_low_band_mode_round_trip_is_aligned_and_measured(
    tmp_path: Path, wav16: Path, model: CodecModel, capsys: pytest.CaptureFixture[str]
) -> None:
    """--kbps 6 encodes in the card's low-band mode: the file's frames are the direct model
    steps' (low band quantised from the encoder output), the decode is the offline decode
    with that low band, aligned, of exactly len(x) samples; the summary gives the mode and
    the payload bitrate measured on the file."""
    mode = model.card.mode_for_bitrate(6)
    assert mode.lowband_layout != 0
    x, rate = sf.read(wav16, dtype="float32")
    csb, out = tmp_path / "a.csb", tmp_path / "a.wav"
    assert run("encode", wav16, csb, "--kbps", "6") == 0
    summary = capsys.readouterr().err
    assert f"mode {mode.num_codebooks} codebooks + low band {mode.lowband_layout}" in summary
    assert f"{mode.kbps:.2f} kbps nominal" in summary and "payload measured" in summary
    assert run("decode", csb, out, "--float", "-q") == 0
    data = csb.read_bytes()
    _, frames = read_bitstream(data)
    card = model.card
    assert {f.num_codebooks for f in frames} == {mode.num_codebooks}
    assert {f.lowband_layout for f in frames} <= {0, mode.lowband_layout}
    bits = frame_stream_bits(frames, code_bits=card.code_bits, gain_bits=card.gain.bits)
    assert bits < sum(f.bit_length(code_bits=card.code_bits, gain_bits=card.gain.bits)
                      for f in frames)
    header_bytes = 26 + len(card.model_id) + 10
    assert len(data) == header_bytes + math.ceil(bits / 8)
    measured = float(summary.split("payload measured ")[1].split(" kbps")[0])
    seconds = len(frames) * card.frame_ms / 1000
    assert measured == pytest.approx(8 * (len(data) - header_bytes) / seconds / 1000, abs=0.01)
    y, out_rate = sf.read(out, dtype="float32")
    assert out_rate == rate and len(y) == len(x)
    ref = offline_decode(model, x, mode.num_codebooks, frames)
    np.testing.assert_allclose(y, ref, atol=1e-6)


def test_explicit_low_band_layout_option(tmp_path: Path, wav16: Path) -> None:
    csb = tmp_path / "a.csb"
    assert run("encode", wav16, csb, "--codebooks", "4", "--lowband-layout", "1", "-q") == 0
    _, frames = read_bitstream(csb.read_bytes())
    assert {f.num_codebooks for f in frames} == {4}
    assert {f.lowband_layout for f in frames} <= {0, 1}
    assert any(f.lowband_layout == 1 for f in frames)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--lowband-layout", "1"], "--lowband-layout needs --codebooks"),
        (["--codebooks", "2", "--lowband-layout", "5"], "--lowband-layout must be one of 0, 1, 2"),
        (["--kbps", "0.5"], "--kbps: 0.5 kbps is below the lowest bitrate"),
        (["--kbps", "inf"], "--kbps must be a finite number"),
        (["--codebooks", "13"], "--codebooks must be in 1..12"),
    ],
)
def test_bad_bitrate_options_are_clear_errors(
    tmp_path: Path,
    wav16: Path,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    message: str,
) -> None:
    """A bad command line: exit code 2, one line, no file written."""
    assert run("encode", wav16, tmp_path / "x.csb", *options, "-q") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.csb").exists()


def test_rate_cap_option_holds_the_payload_to_the_mode_rate(
    tmp_path: Path, speech: tuple[np.ndarray, int], model: CodecModel
) -> None:
    """--rate-cap: the payload of any prefix stays within the mode's rate plus a 1 s bucket;
    a trimmed frame keeps a prefix of the uncapped frame's codes."""
    x, rate = speech
    loud = tmp_path / "loud.wav"
    sf.write(loud, np.clip(np.tile(x, 4) * 3.0, -1, 1), rate, subtype="FLOAT")
    capped, free = tmp_path / "c.csb", tmp_path / "f.csb"
    assert run("encode", loud, capped, "--kbps", "3", "--rate-cap", "-q") == 0
    assert run("encode", loud, free, "--kbps", "3", "-q") == 0
    card = model.card
    mode = card.mode_for_bitrate(3)
    (_, a), (_, b) = read_bitstream(capped.read_bytes()), read_bitstream(free.read_bytes())
    bits = np.cumsum([f.bit_length(code_bits=card.code_bits, gain_bits=card.gain.bits)
                      for f in a])
    per_frame = mode.kbps * card.frame_ms
    assert np.all(bits <= per_frame * np.arange(1, len(a) + 1) + mode.kbps * 1000.0)
    assert a != b and all(y.codes[: x.num_codebooks] == x.codes for x, y in zip(a, b, strict=True))
    via_http = ("--server", "http://127.0.0.1:9", "--transport", "http")
    assert run("encode", loud, capped, "--rate-cap", *via_http) == 1
