"""`codec-client stream` through a real server: `--save X.csb` equals `encode` (aligned, exact
length, same frames), the output path is checked before streaming, `--chunk-ms` validation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from client.__main__ import main
from client.audiofile import resample
from streaming.model import CodecModel
from streaming.protocol import read_bitstream
from tests.client.conftest import ServerThread


def run(*argv: str | Path) -> int:
    return main([str(a) for a in argv])


def lag(x: np.ndarray, y: np.ndarray, max_lag: int) -> int:
    """The shift k (samples) maximising sum x[i] y[i + k]: y is late by k."""
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]

    def corr(k: int) -> float:
        return float(np.dot(x[max(0, -k) : n - max(0, k)], y[max(0, k) : n + min(0, k)]))

    return max(range(-max_lag, max_lag + 1), key=corr)


@pytest.mark.parametrize("rate", [16000, 48000, 22050])
def test_saved_csb_equals_encode_and_decodes_aligned(
    tmp_path: Path,
    speech: tuple[np.ndarray, int],
    server: ServerThread,
    model: CodecModel,
    capsys: pytest.CaptureFixture[str],
    rate: int,
) -> None:
    """48 kHz used to decode 2.125 ms late (server resampler delay) and 16 kHz lost its last
    5 ms (no decoder-delay padding): the saved file must be `encode`'s, byte for byte."""
    x, r = speech
    path = tmp_path / "in.wav"
    sf.write(path, resample(x[: int(1.5 * r)], r, rate), rate, subtype="FLOAT")
    n = sf.info(path).frames
    streamed, local = tmp_path / "s.csb", tmp_path / "l.csb"
    assert run("stream", path, "--server", server.url, "--fast", "-q", "--save", streamed) == 0
    assert run("encode", path, local, "-q") == 0
    assert streamed.read_bytes() == local.read_bytes()

    card = model.card
    header, frames = read_bitstream(streamed.read_bytes())
    model_n = -(-n * card.sample_rate // rate)
    assert len(frames) == -(-(model_n + card.output_delay_samples) // card.frame_size)
    assert header.source is not None and (header.source.rate, header.source.samples) == (rate, n)
    err = capsys.readouterr().err
    assert err.startswith(f"{len(frames)} frames for 1.50 s of audio"), err

    out = tmp_path / "s.wav"
    assert run("decode", streamed, out, "--float", "-q") == 0
    y, rate_out = sf.read(out, dtype="float32")
    x_in, _ = sf.read(path, dtype="float32")
    assert rate_out == rate and len(y) == n
    assert lag(x_in, y, rate // 100) == 0
    tail = y[-rate // 200 :]  # the last 5 ms are decoded, not zeros
    assert np.sqrt(np.mean(tail**2)) > 0.1 * np.sqrt(np.mean(x_in[-rate // 200 :] ** 2))


def test_real_time_csb_save_is_paced_and_equals_encode(
    tmp_path: Path, speech: tuple[np.ndarray, int], server: ServerThread
) -> None:
    """Without --fast the prepared PCM is still sent in real time, in --chunk-ms chunks."""
    x, r = speech
    path = tmp_path / "in.wav"
    sf.write(path, x[: r // 2], r, subtype="FLOAT")
    streamed, local = tmp_path / "s.csb", tmp_path / "l.csb"
    started = time.perf_counter()
    code = run("stream", path, "--server", server.url, "-q", "--chunk-ms", "7", "--save", streamed)
    elapsed = time.perf_counter() - started
    assert code == 0 and elapsed >= 0.5
    assert run("encode", path, local, "-q") == 0
    assert streamed.read_bytes() == local.read_bytes()


@pytest.mark.parametrize("save", ["nodir/t.csb", "nodir/t.jsonl", "adir.csb"])
def test_unwritable_save_path_fails_before_streaming(
    tmp_path: Path, speech: tuple[np.ndarray, int], capsys: pytest.CaptureFixture[str], save: str
) -> None:
    """Checked before connecting: nothing listens on port 9, yet the error is the output
    path's (a missing directory, or a directory), one line, at once."""
    x, r = speech
    path = tmp_path / "in.wav"
    sf.write(path, x, r)
    (tmp_path / "adir.csb").mkdir()
    target = tmp_path / save
    started = time.perf_counter()
    code = run("stream", path, "--server", "http://127.0.0.1:9", "-q", "--save", target)
    err = capsys.readouterr().err.strip()
    assert code == 1 and time.perf_counter() - started < 2.0
    assert err.startswith(f"codec-client stream: error: {target}: cannot write ("), err
    assert len(err.splitlines()) == 1


def test_save_check_keeps_an_existing_file_and_leaves_no_new_one(
    tmp_path: Path, speech: tuple[np.ndarray, int], capsys: pytest.CaptureFixture[str]
) -> None:
    """The check neither truncates an existing file nor leaves an empty one when streaming
    then fails (here: nothing listens on port 9)."""
    x, r = speech
    path = tmp_path / "in.wav"
    sf.write(path, x[:r], r)
    old, new = tmp_path / "old.csb", tmp_path / "new.csb"
    old.write_bytes(b"previous tokens")
    for save in (old, new):
        assert run("stream", path, "--server", "http://127.0.0.1:9", "-q", "--save", save) == 1
        assert "cannot connect" in capsys.readouterr().err
    assert old.read_bytes() == b"previous tokens"
    assert not new.exists()


@pytest.mark.parametrize("value", ["0", "-20", "nan", "inf", "abc"])
def test_chunk_ms_must_be_positive(
    tmp_path: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        run("stream", tmp_path / "in.wav", f"--chunk-ms={value}")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --chunk-ms:" in err and value in err
