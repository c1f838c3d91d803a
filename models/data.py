"""Speech corpus in memory and random training crops.

The corpus is a folder of 16 kHz mono audio files, or a ``manifest.csv`` with a ``path``
column (relative to the manifest), as written by ``../shared/tools/build_corpus.sh``. All files
are concatenated into one int16 array (about 1.3 GB for 11 hours) with short silences between
them, and training crops are drawn uniformly over it.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def list_audio(source: Path) -> list[Path]:
    """Audio files of a folder (recursive) or of a manifest CSV with a ``path`` column."""
    if source.is_file() and source.suffix == ".csv":
        with source.open(newline="") as handle:
            return [source.parent / row["path"] for row in csv.DictReader(handle)]
    if source.is_dir():
        manifest = source / "manifest.csv"
        if manifest.exists():
            return list_audio(manifest)
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    raise FileNotFoundError(f"no audio folder or manifest at {source}")


def load_mono(path: Path, sample_rate: int) -> np.ndarray:
    """Read a file as float32 mono [S]; it must already be at ``sample_rate`` Hz."""
    audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
    if rate != sample_rate:
        raise ValueError(f"{path}: {rate} Hz, expected {sample_rate} Hz (resample the corpus)")
    return audio.mean(axis=1)


@dataclass
class Corpus:
    """All training audio as one int16 array [S] at ``sample_rate``."""

    audio: np.ndarray
    sample_rate: int
    files: int

    @classmethod
    def load(cls, sources: list[Path], sample_rate: int, gap_ms: float = 50.0) -> Corpus:
        paths = [p for source in sources for p in list_audio(source)]
        if not paths:
            raise ValueError(f"no audio files in {', '.join(map(str, sources))}")
        gap = np.zeros(int(sample_rate * gap_ms / 1000), dtype=np.int16)
        pieces: list[np.ndarray] = []
        for path in tqdm(paths, desc="loading corpus", unit="file", leave=False):
            pcm = load_mono(path, sample_rate)
            pieces += [np.clip(pcm * 32767.0, -32768, 32767).astype(np.int16), gap]
        return cls(np.concatenate(pieces), sample_rate, len(paths))

    @property
    def hours(self) -> float:
        return len(self.audio) / self.sample_rate / 3600.0

    def batches(
        self, batch: int, samples: int, seed: int, gain_db: tuple[float, float] = (-18.0, 6.0)
    ) -> Iterator[np.ndarray]:
        """Endless random crops [batch, samples] float32, each with a random level change.

        Near-silent crops are re-drawn (at most a few times) so batches carry speech.
        """
        rng = np.random.default_rng(seed)
        limit = len(self.audio) - samples
        while True:
            out = np.empty((batch, samples), dtype=np.float32)
            for row in range(batch):
                for _ in range(4):
                    start = int(rng.integers(0, limit))
                    crop = self.audio[start : start + samples].astype(np.float32) / 32768.0
                    if np.sqrt(np.mean(crop**2)) > 1e-3:
                        break
                scale = 10.0 ** (rng.uniform(*gain_db) / 20.0)
                out[row] = np.clip(crop * scale * rng.choice([-1.0, 1.0]), -1.0, 1.0)
            yield out
