"""Fixtures of the client tests: the bundled model, a few seconds of speech, a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from streaming.model import CodecModel
from tests.server.conftest import ServerThread as BaseServerThread

DEV_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dev"
CLIP = DEV_DIR / "ls_1688__1688-142285-0006.flac"


def synthetic_speech(rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """float32 speech-like signal: a gliding harmonic tone with syllable envelope + noise."""
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * np.maximum(np.sin(2 * np.pi * 2 * t), 0)
    return (0.25 * x + 0.01 * rng.standard_normal(n)).astype(np.float32)


def speech_clip(seconds: float) -> tuple[np.ndarray, int]:
    """`seconds` of a real 16 kHz speech clip when the dev set is here, else synthetic."""
    if CLIP.is_file():
        data, rate = sf.read(str(CLIP), dtype="float32", frames=int(16000 * seconds))
        return data, int(rate)
    return synthetic_speech(16000, seconds), 16000


@pytest.fixture(scope="session")
def model() -> CodecModel:
    return CodecModel.load()


@pytest.fixture(scope="session")
def speech() -> tuple[np.ndarray, int]:
    """3 s of 16 kHz speech (float32, mono) and its rate."""
    return speech_clip(3.0)


class ServerThread(BaseServerThread):
    """The server tests' background server, built from keyword settings, with `url`."""

    def __init__(self, **settings: Any) -> None:
        from server.settings import Settings

        super().__init__(Settings(**{"log_level": "warning", **settings}))

    @property
    def url(self) -> str:
        return self.http


@pytest.fixture(scope="session")
def server() -> Iterator[ServerThread]:
    """A codecstream server with default settings (no API keys), shared by the client tests."""
    running = ServerThread().start()
    yield running
    running.stop()
