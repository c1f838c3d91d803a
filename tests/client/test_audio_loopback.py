"""The REAL audio path, no mocks: two `codec-client call` processes on sound devices, through
a real server, over a PulseAudio loopback (tests/client/pulse.py).

    paplay clip -> sink a -> a.monitor = talker's microphone --[talker: encode, send tokens]
       --> server room --> [listener: jitter buffer, decode, play] -> sink b
    rec.monitor (stereo): left = sink a (what the talker heard), right = sink b (what the
    listener played), sample-locked

The listener's output must be the codec's own decoding of what the talker heard: the
offline decode (the engine's model steps, client.files) of the left channel, found by a
search over the talker's unknown frame phase and the delay; the delay is the measured
mouth-to-ear latency of the whole path (device buffers included).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from client.__main__ import main
from client.files import decode_frames_local, encode_pcm_local
from streaming.model import CodecModel
from tests.client.conftest import ServerThread, speech_clip
from tests.client.pulse import PulseAudio, PulseError

ROOT = Path(__file__).resolve().parents[2]
RATE = 16000
N = 320
CODEBOOKS = 11  # --kbps 6
LATENCY_BUDGET_MS = 400.0


@pytest.fixture(scope="module")
def pulse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PulseAudio]:
    try:
        daemon = PulseAudio.start(tmp_path_factory.mktemp("pulse"))
    except PulseError as exc:
        pytest.fail(f"cannot run the PulseAudio loopback: {exc}")
    yield daemon
    daemon.stop()


class Proc:
    """A subprocess whose stderr lines are collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str], stdout: object = None) -> None:
        self.popen = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout or subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.append(line.rstrip())

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from {self.popen.args}:\n" + self.log)
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self.thread.join(timeout=2)
        return code

    @property
    def log(self) -> str:
        return "\n".join(self.lines)


def call(
    server: ServerThread, pulse: PulseAudio, mic: str, speaker: str, stats: Path, media: str
) -> Proc:
    """`codec-client call` in a subprocess on the PulseAudio devices `mic` / `speaker`."""
    argv = [sys.executable, "-m", "client", "call", "--server", server.url]
    argv += ["--room", f"loop-{media}", "--kbps", "6", "--send", media, "--receive", media]
    argv += ["--input-device", mic, "--output-device", speaker, "--stats-json", str(stats)]
    return Proc(argv, pulse.env | {"PYTHONPATH": str(ROOT)})


# ---- offline reference --------------------------------------------------------------------


def decode_batch(model: CodecModel, x: np.ndarray) -> np.ndarray:
    """Encode + decode B signals [B, K*N] at once (fresh states, CODEBOOKS codebooks)."""
    card = model.card
    b, frames = x.shape[0], x.shape[1] // N
    enc = [np.zeros((b, *s.shape), np.float32) for s in card.encoder.states]
    enc2 = [np.zeros_like(a) for a in enc]
    dec = [np.zeros((b, *s.shape), np.float32) for s in card.decoder.states]
    dec2 = [np.zeros_like(a) for a in dec]
    codes = np.zeros((b, card.num_codebooks), np.int64)
    gain = np.zeros(b, np.int64)
    count = np.full(b, CODEBOOKS, np.int64)
    pcm = np.zeros((b, N), np.float32)
    out = np.zeros_like(x)
    for k in range(frames):
        model.encoder_step(np.ascontiguousarray(x[:, k * N : (k + 1) * N]), enc, codes, gain, enc2)
        enc, enc2 = enc2, enc
        codes[:, CODEBOOKS:] = 0
        model.decoder_step(codes, count, gain, dec, pcm, dec2)
        dec, dec2 = dec2, dec
        out[:, k * N : (k + 1) * N] = pcm
    return out


def best_match(ref: np.ndarray, target: np.ndarray, lo: int, hi: int) -> tuple[int, float]:
    """Offset in [lo, hi) where `ref` best matches `target[offset:]`, normalised score."""
    seg = target[lo : hi + len(ref)].astype(np.float64)
    size = 1 << math.ceil(math.log2(len(seg) + len(ref)))
    corr = np.fft.irfft(np.fft.rfft(seg, size) * np.conj(np.fft.rfft(ref, size)), size)
    corr = corr[: len(seg) - len(ref) + 1]
    energy = np.concatenate([[0.0], np.cumsum(seg**2)])
    norm = np.sqrt((energy[len(ref) :] - energy[: -len(ref)]) * float(ref @ ref)) + 1e-12
    score = corr / norm
    k = int(np.argmax(score))
    return lo + k, float(score[k])


def align(model: CodecModel, left: np.ndarray, right: np.ndarray) -> tuple[int, int, float]:
    """(talker frame phase in the recording, delay in samples, score): the offline decode of
    `left` cut into frames at every phase, matched against `right`."""
    onset = int(np.argmax(np.abs(left) > 1e-3))
    warm, speech = 25, 25  # frames of silence (state warm-up), frames of speech compared
    s0 = onset - warm * N - N
    assert s0 >= 0, "the recording must start with silence before the clip"
    x = np.stack([left[s0 + p : s0 + p + (warm + speech) * N] for p in range(N)])
    y = decode_batch(model, x)[:, warm * N :]
    best = (0, 0, -1.0)
    for p in range(N):
        # y[p][t] is the decoder's output for input position s0 + p + warm * N + t - D
        at = s0 + p + warm * N - model.card.output_delay_samples
        offset, score = best_match(y[p], right, at, at + RATE)
        if score > best[2]:
            best = ((s0 + p) % N, offset - at, score)
    return best


def test_call_without_a_sound_device_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["call", "--input-device", "no-such-microphone", "--duration", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "no sound device" in err and "no-such-microphone" in err


@pytest.mark.parametrize("media", ["tokens", "pcm"])
def test_two_clients_call_over_a_real_server_and_real_audio(
    tmp_path: Path, pulse: PulseAudio, server: ServerThread, model: CodecModel, media: str
) -> None:
    """media="tokens": the clients encode and decode (the low-bitrate link); "pcm": thin
    clients, the server encodes the talker and decodes + mixes for the listener."""
    clip, rate = speech_clip(3.0)
    wav = tmp_path / "clip.wav"
    sf.write(wav, clip, rate, subtype="FLOAT")
    raw = tmp_path / "rec.raw"
    with raw.open("wb") as sink:
        recorder = Proc(
            [
                "parec",
                "--device=rec.monitor",
                "--rate=16000",
                "--channels=2",
                "--format=float32le",
                "--raw",
            ],
            pulse.env,
            stdout=sink,
        )
        listener = call(server, pulse, "cs_quiet", "cs_spk_b", tmp_path / "listener.json", media)
        talker = call(server, pulse, "cs_mic_a", "cs_void", tmp_path / "talker.json", media)
        try:
            listener.wait_for("joined room", 60)
            talker.wait_for("joined room", 60)
            time.sleep(0.7)  # the talker's silence reaches the listener: codec states settle
            played = subprocess.run(
                ["paplay", "--device=a", str(wav)], env=pulse.env, capture_output=True, timeout=30
            )
            assert played.returncode == 0, played.stderr
            time.sleep(1.0)  # the tail of the clip through the call
        finally:
            codes = (talker.stop(), listener.stop())
            recorder.stop(signal.SIGTERM)
    assert codes == (0, 0), talker.log + "\n" + listener.log

    stats = json.loads((tmp_path / "listener.json").read_text())
    talked = json.loads((tmp_path / "talker.json").read_text())
    if media == "tokens":
        assert talked["sent"] > 150 and stats["playout"]["played"] > 150
        assert stats["playout"]["lost"] <= 2
    else:
        assert talked["pcm_sent_s"] > 3.0 and stats["pcm_received_s"] > 3.0

    rec = np.fromfile(raw, dtype="<f4")
    rec = rec[: len(rec) // 2 * 2].reshape(-1, 2)
    left, right = rec[:, 0], rec[:, 1]
    start = time.perf_counter()
    phase, delay, score = align(model, left, right)
    # the whole clip: offline decode at the talker's phase vs the listener's output, in
    # 0.5 s windows (the jitter buffer may move the delay by whole frames during the call)
    onset = int(np.argmax(np.abs(left) > 1e-3))
    s0 = (onset - 30 * N) // N * N + phase
    end = min(len(left), onset + len(clip) + N)
    x = np.zeros(-(-(end - s0) // N) * N + N, np.float32)
    x[: end - s0] = left[s0:end]
    d = model.card.output_delay_samples
    ref = decode_frames_local(model, encode_pcm_local(model, x, CODEBOOKS))[d : d + end - s0]
    windows = []
    for w0 in range(onset - s0, onset - s0 + len(clip) - RATE // 2 + 1, RATE // 2):
        r = ref[w0 : w0 + RATE // 2]
        at = s0 + w0 + delay
        offset, similarity = best_match(r, right, at - 3 * N, at + 3 * N)
        windows.append((1000.0 * (offset - s0 - w0) / RATE, similarity))
    delays_ms = [w[0] for w in windows]
    similarity = float(np.median([w[1] for w in windows]))
    delay_ms = 1000.0 * delay / RATE
    report = {
        "media": media,
        "mouth_to_ear_ms": delay_ms,
        "window_delays_ms": delays_ms,
        "similarity_median": similarity,
        "window_similarity": [w[1] for w in windows],
        "phase_score": score,
        "search_s": time.perf_counter() - start,
        "listener": stats,
    }
    (tmp_path / "loopback.json").write_text(json.dumps(report, indent=1))
    print(
        f"\nloopback ({media}): mouth-to-ear {delay_ms:.1f} ms (windows "
        f"{min(delays_ms):.1f}..{max(delays_ms):.1f} ms), similarity to the offline decode: "
        f"median {similarity:.4f} over {len(windows)} windows (phase score {score:.4f})"
    )
    assert score > 0.9
    assert similarity > 0.9
    assert min(delays_ms) > 25.0 and max(delays_ms) < LATENCY_BUDGET_MS
