"""Files at uncommon sample rates (22254, 11127 Hz, ...): resampled with bounded memory.

Rates with a small common divisor with 16 kHz made the resampler's exact design a table of
L*M-scaled size (1.3 to 5 GiB, a MemoryError); they now get its interpolated design.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from client.__main__ import main
from client.audiofile import read_audio, resample, resampled_length
from client.errors import ClientError
from tests.client.conftest import synthetic_speech


def run(*argv: str | Path) -> int:
    return main([str(a) for a in argv])


def tone(rate: int, freq: float, n: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)


@pytest.mark.parametrize(("rate_in", "rate_out"), [(22254, 16000), (16000, 22254), (11127, 16000)])
def test_resample_at_odd_rates_is_aligned_with_exact_length(rate_in: int, rate_out: int) -> None:
    x = tone(rate_in, 1000.0, rate_in // 2 + 7)
    tracemalloc.start()
    try:
        y = resample(x, rate_in, rate_out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # the exact design: 1.3 GiB for 22254 Hz
    assert len(y) == resampled_length(len(x), rate_in, rate_out) == -(-len(x) * rate_out // rate_in)
    # delay-compensated: y[k] is the tone at k / rate_out seconds (away from the ends)
    inner = slice(rate_out // 50, len(y) - rate_out // 50)
    np.testing.assert_allclose(y[inner], tone(rate_out, 1000.0, len(y))[inner], atol=1e-4)
    assert len(resample(x, rate_in, rate_out, 1234)) == 1234


def test_resample_rejects_a_pair_it_cannot_filter_in_one_line() -> None:
    with pytest.raises(ClientError, match="cannot resample 7800001 Hz -> 16000 Hz") as info:
        resample(np.zeros(100, np.float32), 7800001, 16000)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("rate", [22254, 11127])
def test_odd_rate_file_round_trip(tmp_path: Path, rate: int) -> None:
    """encode/decode at the file's rate == the same audio through a 16 kHz file, resampled."""
    x = synthetic_speech(rate, 1.0)
    odd, odd_csb, odd_out = tmp_path / "odd.wav", tmp_path / "odd.csb", tmp_path / "odd_out.wav"
    sf.write(odd, x, rate, subtype="FLOAT")
    x16 = resample(x, rate, 16000)
    ref, ref_csb, ref_out = tmp_path / "ref.wav", tmp_path / "ref.csb", tmp_path / "ref_out.wav"
    sf.write(ref, x16, 16000, subtype="FLOAT")
    for src, csb, out in ((odd, odd_csb, odd_out), (ref, ref_csb, ref_out)):
        assert run("encode", src, csb, "-q") == 0
        assert run("decode", csb, out, "--float", "-q") == 0
    y, out_rate = sf.read(odd_out, dtype="float32")
    assert out_rate == rate and len(y) == len(x)
    y16 = sf.read(ref_out, dtype="float32")[0]
    np.testing.assert_allclose(y, resample(y16, 16000, rate, len(x)), atol=1e-5)
    assert np.corrcoef(x, y)[0, 1] > 0.8  # sane audio, in place


def test_decode_to_an_odd_rate(tmp_path: Path) -> None:
    x = synthetic_speech(16000, 0.5)
    wav, csb, out = tmp_path / "in.wav", tmp_path / "a.csb", tmp_path / "out.wav"
    sf.write(wav, x, 16000, subtype="FLOAT")
    assert run("encode", wav, csb, "-q") == 0
    assert run("decode", csb, out, "--rate", "22254", "-q") == 0
    info = sf.info(out)
    assert info.samplerate == 22254 and info.frames == resampled_length(len(x), 16000, 22254)


def test_a_directory_as_input_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ClientError, match="is a directory"):
        read_audio(tmp_path)
    assert run("encode", tmp_path, tmp_path / "out.csb", "-q") == 1
    err = capsys.readouterr().err.strip()
    assert err == f"codec-client encode: error: {tmp_path}: is a directory, not an audio file"


@pytest.mark.parametrize("rate", ["0", "-8000", "2000000000"])
def test_decode_rate_out_of_range_is_a_usage_error(
    tmp_path: Path, rate: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`decode --rate` outside 1..768000 Hz: exit 2 and one line, before any decoding (a
    huge rate would otherwise ask for gigabytes of output)."""
    assert run("decode", tmp_path / "missing.csb", tmp_path / "o.wav", "--rate", rate) == 2
    err = capsys.readouterr().err.strip()
    assert "--rate must be a number of Hz in 1..768000" in err and len(err.splitlines()) == 1
