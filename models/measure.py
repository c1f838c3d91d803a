"""Measurements on exported graphs: frame-by-frame ONNX runs and impulse latency."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.codec import CodecConfig


class OnnxCodec:
    """Runs an exported model folder frame by frame with onnxruntime (batch of B streams)."""

    def __init__(self, model_dir: Path):
        self.card = json.loads((model_dir / "card.json").read_text()) if (
            model_dir / "card.json").exists() else None
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.encoder = ort.InferenceSession(str(model_dir / "encoder.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(model_dir / "decoder.onnx"), options,
                                            providers=["CPUExecutionProvider"])

    @staticmethod
    def _zero_states(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
        return {i.name: np.zeros((batch, *i.shape[1:]), dtype=np.float32)
                for i in session.get_inputs() if i.name.startswith("in_")}

    def encode(self, pcm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """PCM [B, T*N] -> codes [B, T, Q] (all Q stages), gain index [B, T], frame by frame
        (the low band of the shape, [B, T, K], is kept in ``self.lowband``)."""
        frame = self.encoder.get_inputs()[0].shape[1]
        states = self._zero_states(self.encoder, pcm.shape[0])
        stages = self.encoder.get_outputs()[0].shape[-1]
        counts = np.full(pcm.shape[0], stages, dtype=np.int64)
        names = [o.name for o in self.encoder.get_outputs()]
        codes, gains, lowband = [], [], []
        for k in range(pcm.shape[1] // frame):
            feeds = {"pcm": pcm[:, k * frame:(k + 1) * frame].astype(np.float32),
                     "num_codebooks": counts, **states}
            out = dict(zip(names, self.encoder.run(names, feeds), strict=True))
            codes.append(out["codes"])
            gains.append(out["gain_index"])
            lowband.append(out["lowband"])
            states = {n.replace("out_", "in_", 1): v for n, v in out.items()
                      if n.startswith("out_")}
        self.lowband = np.stack(lowband, 1)
        return np.stack(codes, 1), np.stack(gains, 1)

    def decode(self, codes: np.ndarray, gains: np.ndarray, count: int,
               lowband: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """Codes [B, T, Q], gains [B, T] -> PCM [B, T*N] (lagging the input by the overlap).

        ``lowband``: (values, mask) float32 [B, T, K] of sent low-band bins; None: no low band.
        """
        batch = codes.shape[0]
        width = self.decoder.get_inputs()[3].shape[1]
        if lowband is None:
            zeros = np.zeros((batch, codes.shape[1], width), dtype=np.float32)
            lowband = (zeros, zeros)
        states = self._zero_states(self.decoder, batch)
        names = [o.name for o in self.decoder.get_outputs()]
        counts = np.full((batch,), count, dtype=np.int64)
        out_frames = []
        for k in range(codes.shape[1]):
            feeds = {"codes": codes[:, k].astype(np.int64), "num_codebooks": counts,
                     "gain_index": gains[:, k].astype(np.int64),
                     "lowband": lowband[0][:, k].astype(np.float32),
                     "lowband_mask": lowband[1][:, k].astype(np.float32), **states}
            out = dict(zip(names, self.decoder.run(names, feeds), strict=True))
            out_frames.append(out["pcm"])
            states = {n.replace("out_", "in_", 1): v for n, v in out.items()
                      if n.startswith("out_")}
        return np.concatenate(out_frames, axis=1)


def energy_envelope(pcm: np.ndarray, hop: int, window: int) -> np.ndarray:
    """Log energy of ``window``-sample frames every ``hop`` samples, [S] -> [frames]."""
    frames = np.lib.stride_tricks.sliding_window_view(pcm, window)[::hop]
    return np.log(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-10)


def measured_latency_ms(model_dir: Path, config: CodecConfig) -> float:
    """Mouth-to-ear algorithmic latency of the exported steps, in ms.

    A train of short voiced bursts (40 ms Hann-windowed harmonic complexes at 150 Hz, one
    every 170 ms, so bursts fall at every position within a frame) is fed frame by frame; the
    lag (0.5 ms steps) that best aligns the output's energy envelope with the input's is the
    output delay (a waveform cross-correlation would not do: the decoder regenerates phases).
    Each input sample also waits for the rest of its frame, so latency = frame + lag.
    """
    codec = OnnxCodec(model_dir)
    n, rate = config.frame_size, config.sample_rate
    x = np.zeros((1, n * 100), dtype=np.float32)
    burst = int(0.04 * rate)
    t = np.arange(burst) / rate
    tone = sum(np.sin(2 * np.pi * 150 * h * t) / h for h in range(1, 30)) * np.hanning(burst)
    for start in range(n * 5, x.shape[1] - burst, int(0.17 * rate)):
        x[0, start : start + burst] = 0.1 * tone
    codes, gains = codec.encode(x)
    y = codec.decode(codes, gains, config.num_codebooks)[0]
    hop = rate // 2000
    reference, decoded = energy_envelope(x[0], hop, 2 * hop), energy_envelope(y, hop, 2 * hop)
    max_lag = 2 * n // hop
    scores = [np.corrcoef(reference[: len(decoded) - lag], decoded[lag:])[0, 1]
              for lag in range(max_lag)]
    lag = int(np.nanargmax(scores)) * hop
    return 1000.0 * (n + lag) / rate
