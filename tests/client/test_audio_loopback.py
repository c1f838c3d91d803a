"""The REAL audio path, no mocks: two `codec-client call` processes on sound devices, through
a real server, over a PulseAudio loopback (tests/client/pulse.py).

    paplay clip -> sink a -> a.monitor = talker's microphone --[talker: encode, send tokens]
       --> server room --> [listener: jitter buffer, decode, play] -> sink b
    rec.monitor (stereo): left = sink a (what the talker heard), right = sink b (what the
    listener played), sample-locked

The listener's output must be the codec's own decoding of what the talker heard: the
offline decode (the engine's own streams, batched, in the calls' bitrate mode: the 6 kbps
mode, low band included) of the left channel, found by a search over the talker's unknown
frame phase and the delay; the delay is the measured mouth-to-ear latency of the whole path
(device buffers included).

The comparison is phase-insensitive (client.profiler.spectral): a decoder with its own
oscillator state (a harmonic phase accumulator, long-memory states) plays the right audio
with other harmonic phases than an offline decode started 25 frames before the speech, so
the delay is found on log-mel spectrograms (refined to the sample on the waveform where
the waveform agrees, as with a phase-deterministic decoder) and the similarity is that of
the log-mel spectrograms (tests/client/test_spectral.py checks that it fails for wrong
audio), with the log-spectral distance in dB beside it.
"""

from __future__ import annotations

import json
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
from client.profiler.spectral import Locator, locate, log_spectral_distance, similarity
from streaming.batch import BatchEngine
from streaming.framing import SampleFormat
from streaming.model import CodecModel
from streaming.stream import DecoderStream, EncoderStream
from tests.client.conftest import ServerThread, speech_clip
from tests.client.pulse import PulseAudio, PulseError

ROOT = Path(__file__).resolve().parents[2]
RATE = 16000
N = 320
KBPS = 6.0  # the calls' --kbps: the card's low-band mode
LATENCY_BUDGET_MS = 400.0
WARM, SPEECH = 25, 25  # phase search: frames of silence (state warm-up), frames of speech
CANDIDATES = 8  # phases whose decode of the whole clip is compared
MIN_CLIP_SCORE = 0.8  # spectral match of the whole clip (a correct decode: 0.95-1.0)
MIN_SIMILARITY = 0.6  # median over 0.5 s windows (correct: 0.85-1.0, wrong audio: about 0)
MAX_LSD_DB = 6.0  # median log-spectral distance (correct: about 3 dB, 0 if phase-coherent)


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
    argv += ["--room", f"loop-{media}", "--kbps", f"{KBPS:g}", "--send", media, "--receive", media]
    argv += ["--input-device", mic, "--output-device", speaker, "--stats-json", str(stats)]
    return Proc(argv, pulse.env | {"PYTHONPATH": str(ROOT)})


# ---- offline reference --------------------------------------------------------------------


def decode_batch(model: CodecModel, x: np.ndarray) -> np.ndarray:
    """Encode + decode B signals [B, K*N] at once: fresh streams in the calls' bitrate mode
    (`--kbps KBPS`: codebooks and, frame by frame as the encoder decides, the low band),
    through the engine's own `EncoderStream` / `DecoderStream` code, batched."""
    card = model.card
    mode = card.mode_for_bitrate(KBPS)
    b, frames = x.shape[0], x.shape[1] // N
    engine = BatchEngine(model, capacity=b)
    encoders = [EncoderStream(model, fmt=SampleFormat.F32LE) for _ in range(b)]
    decoders = [DecoderStream(model, fmt=SampleFormat.F32LE) for _ in range(b)]
    for encoder in encoders:
        encoder.set_mode(mode)
    out = np.zeros_like(x)
    for k in range(frames):
        for row, encoder in zip(x, encoders, strict=True):
            encoder.push(row[k * N : (k + 1) * N])
        for decoder, frame in zip(decoders, engine.encode_step(encoders), strict=True):
            assert frame is not None
            decoder.push(frame)
        engine.decode_step(decoders)
        for row, decoder in zip(out, decoders, strict=True):
            assert decoder.pull_into(row[k * N : (k + 1) * N]) == N
    return out


def phase_candidates(model: CodecModel, left: np.ndarray, right: np.ndarray) -> list[int]:
    """The talker's frame phase in the recording (sample index mod N), CANDIDATES guesses:
    the offline decode of `left` cut into frames at every phase, SPEECH frames of it located
    in `right` on log-mel spectrograms, the best matches first."""
    onset = int(np.argmax(np.abs(left) > 1e-3))
    s0 = onset - WARM * N - N
    assert s0 >= 0, "the recording must start with silence before the clip"
    x = np.stack([left[s0 + p : s0 + p + (WARM + SPEECH) * N] for p in range(N)])
    y = decode_batch(model, x)[:, WARM * N :]
    # y[p][t] is the decoder's output for input position a + p + t: right[a + p + t + delay]
    a = s0 + WARM * N - model.card.output_delay_samples
    find = Locator(right[a : a + RATE + N + SPEECH * N], RATE)
    scores = np.array([find(y[p]).score for p in range(N)])
    return [(s0 + int(p)) % N for p in np.argsort(-scores)[:CANDIDATES]]


def clip_decodes(
    model: CodecModel, left: np.ndarray, phases: list[int], s0: int, length: int
) -> np.ndarray:
    """[len(phases), length]: row i is the offline decode of left[s0 + phases[i]:] (frames
    cut at that phase, fresh states), aligned to it (decoder delay removed)."""
    d = model.card.output_delay_samples
    frames = -(-(length + d) // N)
    x = np.zeros((len(phases), frames * N), np.float32)
    for i, p in enumerate(phases):
        part = left[s0 + p : s0 + p + frames * N]
        x[i, : part.shape[0]] = part
    return decode_batch(model, x)[:, d : d + length]


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
    # the talker's frame phase: the candidates' decodes of the whole clip (from 30 frames
    # before it: state warm-up), each located in the listener's output; the best match
    # gives the phase and the delay
    onset = int(np.argmax(np.abs(left) > 1e-3))
    base = (onset - 30 * N) // N * N
    end = min(len(left), onset + len(clip) + N)
    phases = phase_candidates(model, left, right)
    refs = clip_decodes(model, left, phases, base, end - base + N)
    c0 = onset - base  # the clip's start in refs[i], before the phase offset
    matches = [
        locate(refs[i, c0 - p : c0 - p + len(clip)], right[onset : onset + len(clip) + RATE], RATE)
        for i, p in enumerate(phases)
    ]
    best = int(np.argmax([m.score for m in matches]))
    phase, delay, clip_score = phases[best], matches[best].offset, matches[best].score
    s0, ref = base + phase, refs[best]
    # the whole clip in 0.5 s windows (the jitter buffer may move the delay by whole frames
    # during the call), each located within 3 frames of the clip's delay
    windows = []
    w = RATE // 2
    for w0 in range(onset - s0, onset - s0 + len(clip) - w + 1, w):
        r = ref[w0 : w0 + w]
        at = s0 + w0 + round(delay) - 3 * N
        m = locate(r, right[at : at + 6 * N + w], RATE)
        played = right[at + int(m.offset) :][:w]
        windows.append(
            (
                1000.0 * (at + m.offset - s0 - w0) / RATE,
                similarity(r, played, RATE),
                log_spectral_distance(r, played, RATE),
                m.refined,
            )
        )
    delays_ms = [w[0] for w in windows]
    sim = float(np.median([w[1] for w in windows]))
    lsd = float(np.median([w[2] for w in windows]))
    delay_ms = 1000.0 * delay / RATE
    report = {
        "media": media,
        "mouth_to_ear_ms": delay_ms,
        "window_delays_ms": delays_ms,
        "similarity_median": sim,
        "window_similarity": [w[1] for w in windows],
        "lsd_db_median": lsd,
        "window_lsd_db": [w[2] for w in windows],
        "waveform_refined_windows": sum(w[3] for w in windows),
        "talker_phase": phase,
        "clip_score": clip_score,
        "clip_waveform_correlation": matches[best].waveform,
        "search_s": time.perf_counter() - start,
        "listener": stats,
    }
    (tmp_path / "loopback.json").write_text(json.dumps(report, indent=1))
    print(
        f"\nloopback ({media}): mouth-to-ear {delay_ms:.1f} ms (windows "
        f"{min(delays_ms):.1f}..{max(delays_ms):.1f} ms), spectral similarity to the offline "
        f"decode: median {sim:.4f} over {len(windows)} windows, log-spectral distance {lsd:.2f}"
        f" dB (clip score {clip_score:.4f}, waveform {matches[best].waveform:.4f}, "
        f"{report['waveform_refined_windows']} windows phase-coherent)"
    )
    assert clip_score > MIN_CLIP_SCORE
    assert sim > MIN_SIMILARITY
    assert lsd < MAX_LSD_DB
    assert min(delays_ms) > 25.0 and max(delays_ms) < LATENCY_BUDGET_MS
