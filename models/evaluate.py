"""Quick quality check of a checkpoint: PESQ-WB, STOI and log-mel distance per codebook count.

Runs the PyTorch model on whole clips (the ONNX graphs give the same codes and PCM, see the
parity tests); the full comparison with Opus/Codec2/Lyra is ``benchmarks/bench_quality.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data import list_audio, load_mono
from models.export import load_checkpoint


def pad_to_frames(pcm: np.ndarray, frame: int, extra: int) -> np.ndarray:
    """Zero-pad [S] to a whole number of frames plus ``extra`` samples for the overlap tail."""
    total = len(pcm) + extra
    total += (-total) % frame
    return np.pad(pcm, (0, total - len(pcm)))


def quality(reference: np.ndarray, decoded: np.ndarray, rate: int) -> dict[str, float]:
    """PESQ-WB (if the pesq package is present), STOI and log-mel distance of two [S] signals."""
    out: dict[str, float] = {}
    try:
        from pesq import pesq

        out["pesq_wb"] = float(pesq(rate, reference, decoded, "wb"))
    except ImportError:
        pass
    except Exception:  # pesq raises on silent or too-short clips
        out["pesq_wb"] = float("nan")
    try:
        from pystoi import stoi

        out["stoi"] = float(stoi(reference, decoded, rate, extended=False))
    except ImportError:
        pass
    spec_ref = np.abs(np.fft.rfft(_frames(reference), axis=-1)) + 1e-5
    spec_dec = np.abs(np.fft.rfft(_frames(decoded), axis=-1)) + 1e-5
    out["log_spec_dist_db"] = float(np.mean(np.abs(20 * np.log10(spec_ref / spec_dec))))
    return out


def _frames(pcm: np.ndarray, size: int = 512, hop: int = 128) -> np.ndarray:
    count = max(1, (len(pcm) - size) // hop + 1)
    idx = np.arange(size)[None, :] + hop * np.arange(count)[:, None]
    return np.pad(pcm, (0, size))[idx] * np.hanning(size)[None, :]


@torch.no_grad()
def evaluate_checkpoint(checkpoint: Path, data: Path, counts: list[int],
                        limit: int = 0) -> dict[str, Any]:
    """Mean metrics per codebook count over the clips in ``data``."""
    model, meta = load_checkpoint(checkpoint)
    config = model.config
    paths = list_audio(data)[: limit or None]
    per_count: dict[str, dict[str, list[float]]] = {str(c): {} for c in counts}
    for path in paths:
        clip = load_mono(path, config.sample_rate)
        padded = pad_to_frames(clip, config.frame_size, config.overlap)
        codes, gains = model.encode(torch.from_numpy(padded)[None])
        for count in counts:
            decoded = model.decode(codes, gains, count)[0].numpy()[: len(clip)]
            for key, value in quality(clip, decoded, config.sample_rate).items():
                per_count[str(count)].setdefault(key, []).append(value)
    summary = {count: {k: float(np.nanmean(v)) for k, v in metrics.items()}
               for count, metrics in per_count.items()}
    return {"checkpoint": str(checkpoint), "step": meta["step"], "clips": len(paths),
            "by_codebooks": summary}
