"""encode / decode / stream through a real server (uvicorn on a loopback port)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from client.__main__ import main
from streaming.model import CodecModel
from streaming.protocol import packet_from_json, read_bitstream
from tests.client.conftest import ServerThread


def run(*argv: str | Path) -> int:
    return main([str(a) for a in argv])


@pytest.fixture
def wav(tmp_path: Path, speech: tuple[np.ndarray, int]) -> Path:
    x, rate = speech
    path = tmp_path / "in.wav"
    sf.write(path, x[: 2 * rate], rate, subtype="FLOAT")
    return path


@pytest.mark.parametrize("kbps", ["3", "6"])
@pytest.mark.parametrize("transport", ["ws", "http"])
def test_server_coding_equals_local_coding(
    tmp_path: Path, wav: Path, server: ServerThread, model: CodecModel, transport: str, kbps: str
) -> None:
    """The bitrate modes of 3 and 6 kbps (both with a low band on the bundled card)."""
    local, remote = tmp_path / "l.csb", tmp_path / "r.csb"
    assert run("encode", wav, local, "--kbps", kbps, "-q") == 0
    via = ("--server", server.url, "--transport", transport)
    assert run("encode", wav, remote, "--kbps", kbps, "-q", *via) == 0
    assert remote.read_bytes() == local.read_bytes()  # same engine, same tokens, same file
    mode = model.card.mode_for_bitrate(float(kbps))
    _, frames = read_bitstream(local.read_bytes())
    assert {(f.num_codebooks, f.lowband_layout) for f in frames} <= {
        (mode.num_codebooks, 0),
        (mode.num_codebooks, mode.lowband_layout),
    }
    assert any(f.lowband_layout == mode.lowband_layout for f in frames)

    assert run("decode", local, tmp_path / "l.wav", "--float", "-q") == 0
    assert run("decode", local, tmp_path / "r.wav", "--float", "-q", *via) == 0
    y_local, rate = sf.read(tmp_path / "l.wav", dtype="float32")
    y_remote, rate_r = sf.read(tmp_path / "r.wav", dtype="float32")
    assert rate == rate_r and len(y_local) == len(y_remote) == sf.info(wav).frames
    tolerance = 0.0 if transport == "ws" else 1.0 / 32768  # HTTP answers 16-bit WAV
    np.testing.assert_allclose(y_remote, y_local, atol=tolerance)


@pytest.mark.parametrize("kbps", ["1", "6"])
def test_stream_prints_json_lines_and_saves_a_bitstream(
    tmp_path: Path,
    wav: Path,
    server: ServerThread,
    model: CodecModel,
    capsys: pytest.CaptureFixture[str],
    kbps: str,
) -> None:
    mode = model.card.mode_for_bitrate(float(kbps))
    saved = tmp_path / "tokens.csb"
    args = ("stream", wav, "--server", server.url, "--kbps", kbps, "--json", "--fast")
    assert run(*args, "--save", saved) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    # --save .csb sends what `encode` sends: padded by D = 80 samples to whole frames
    frames = -(-(sf.info(wav).frames + model.card.output_delay_samples) // 320)
    assert len(lines) == frames
    assert [p["seq"] for p in lines] == list(range(frames))
    n = mode.num_codebooks
    assert all(p["num_codebooks"] == n and len(p["codes"]) == n for p in lines)
    lows = [p["lowband"]["layout"] for p in lines if "lowband" in p]
    assert set(lows) == ({mode.lowband_layout} if mode.lowband_layout else set())
    assert "token latency" in err and "payload measured" in err
    header, saved_frames = read_bitstream(saved.read_bytes())
    source = header.source
    packets = [packet_from_json(p, code_bits=10, gain_bits=6, max_codebooks=12) for p in lines]
    assert saved_frames == [p.frame for p in packets]
    assert source is not None and source.samples == sf.info(wav).frames
    encoded = tmp_path / "encoded.csb"
    assert run("encode", wav, encoded, "--kbps", kbps, "-q") == 0
    assert saved.read_bytes() == encoded.read_bytes()


def test_stream_without_csb_sends_the_file_as_is(
    tmp_path: Path, wav: Path, server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    """Printing or saving JSON lines streams the file as is (as a live source), without the
    padding a .csb file gets: one packet per started frame of the file."""
    saved = tmp_path / "tokens.jsonl"
    assert run("stream", wav, "--server", server.url, "--fast", "-q", "--save", saved) == 0
    assert len(saved.read_text().splitlines()) == -(-sf.info(wav).frames // 320)
    assert capsys.readouterr().out == ""


def test_real_time_stream_has_low_token_latency(
    tmp_path: Path,
    speech: tuple[np.ndarray, int],
    server: ServerThread,
    capsys: pytest.CaptureFixture[str],
) -> None:
    x, rate = speech
    path = tmp_path / "short.wav"
    sf.write(path, x[: rate // 2], rate)
    assert run("stream", path, "--server", server.url, "-q") == 0
    summary = capsys.readouterr().err
    p50 = float(summary.split("p50 ")[1].split(" ms")[0])
    assert p50 < 100.0, summary


def test_unreachable_server_is_a_clear_error(
    tmp_path: Path, wav: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("encode", wav, tmp_path / "x.csb", "--server", "http://127.0.0.1:9", "-q") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "codec-client encode: error: cannot connect to ws://127.0.0.1:9/v1/encode"
    )
    assert len(err.splitlines()) == 1


def test_server_refusal_quotes_the_close_code(
    tmp_path: Path, wav: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keyed = ServerThread(api_keys=("secret",)).start()
    try:
        code = run("encode", wav, tmp_path / "x.csb", "--server", keyed.url, "-q")
        err = capsys.readouterr().err
        assert code == 1 and "4401" in err
        ok = run("encode", wav, tmp_path / "y.csb", "--server", keyed.url, "--api-key", "secret")
        assert ok == 0
    finally:
        keyed.stop()


def test_rate_capped_server_encoding_equals_local(
    tmp_path: Path, wav: Path, server: ServerThread
) -> None:
    """--rate-cap over WebSocket: the hello's rate_cap makes the server's encoder cap its rate
    exactly as the local one does (same file); over HTTP it is refused with a clear error."""
    x, rate = sf.read(wav, dtype="float32")
    loud = tmp_path / "loud.wav"
    sf.write(loud, np.clip(np.tile(x, 3) * 3.0, -1, 1), rate, subtype="FLOAT")
    local, remote, plain = tmp_path / "l.csb", tmp_path / "r.csb", tmp_path / "p.csb"
    assert run("encode", loud, local, "--kbps", "3", "--rate-cap", "-q") == 0
    via = ("--server", server.url, "--transport", "ws")
    assert run("encode", loud, remote, "--kbps", "3", "--rate-cap", "-q", *via) == 0
    assert run("encode", loud, plain, "--kbps", "3", "-q", *via) == 0
    assert remote.read_bytes() == local.read_bytes() != plain.read_bytes()
    http = ("--server", server.url, "--transport", "http")
    assert run("encode", loud, remote, "--kbps", "3", "--rate-cap", "-q", *http) == 1


@pytest.fixture(scope="module")
def renamed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model under another model id (card.json and the graphs' metadata)."""
    import onnx

    from streaming.model import CARD_METADATA_KEY, default_model_dir

    out = tmp_path_factory.mktemp("renamed")
    card = json.loads((default_model_dir() / "card.json").read_text())
    card["model_id"] = "cs-renamed-for-test"
    text = json.dumps(card)
    (out / "card.json").write_text(text)
    for name in ("encoder.onnx", "decoder.onnx"):
        graph = onnx.load(str(default_model_dir() / name))
        for prop in graph.metadata_props:
            if prop.key == CARD_METADATA_KEY:
                prop.value = text
        onnx.save(graph, str(out / name))
    return out


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_server_encoding_records_the_servers_model(
    tmp_path: Path, wav: Path, server: ServerThread, model: CodecModel, renamed_model: Path,
    transport: str,
) -> None:
    """A file encoded through a server names the server's model, whatever the local one
    (before: the HTTP transport wrote the local model's id)."""
    out = tmp_path / "x.csb"
    assert run("encode", wav, out, "-q", "--model", renamed_model, "--server", server.url,
               "--transport", transport) == 0
    header, _ = read_bitstream(out.read_bytes())
    assert header.model_id == model.card.model_id != "cs-renamed-for-test"



BAD_URLS = [
    "http://127.0.0.1:99999",
    "http://[::1",
    "ws://host:port",
    "http://:8000",
    "ftp://127.0.0.1:8000",
    "http://127.0.0.1:0",
    "http://local host:8000",
]


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize("command", ["encode", "encode-http", "decode", "stream", "profile"])
def test_malformed_server_url_is_a_usage_error(
    tmp_path: Path, wav: Path, capsys: pytest.CaptureFixture[str], command: str, url: str
) -> None:
    """One line naming the URL and exit code 2, never a traceback (the `call` command goes
    through the same `Session.open`)."""
    argv: dict[str, tuple[str | Path, ...]] = {
        "encode": ("encode", wav, tmp_path / "x.csb"),
        "encode-http": ("encode", wav, tmp_path / "x.csb", "--transport", "http"),
        "decode": ("decode", tmp_path / "in.csb", tmp_path / "x.wav"),
        "stream": ("stream", wav, "--save", tmp_path / "x.csb"),
        "profile": ("profile", "--clients", "2", "--seconds", "1", "--out", tmp_path / "p"),
    }
    if command == "decode":
        assert run("encode", wav, tmp_path / "in.csb", "-q") == 0
    assert run(*argv[command], "--server", url, "-q") == 2
    err = capsys.readouterr().err.strip()
    name = argv[command][0]
    assert err.startswith(f"codec-client {name}: error: --server {url!r}: "), err
    assert len(err.splitlines()) == 1
