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
        """PCM [B, T*N] -> codes [B, T, Q], gain index [B, T], frame by frame."""
        frame = self.encoder.get_inputs()[0].shape[1]
        states = self._zero_states(self.encoder, pcm.shape[0])
        names = [o.name for o in self.encoder.get_outputs()]
        codes, gains = [], []
        for k in range(pcm.shape[1] // frame):
            feeds = {"pcm": pcm[:, k * frame:(k + 1) * frame].astype(np.float32), **states}
            out = dict(zip(names, self.encoder.run(names, feeds), strict=True))
            codes.append(out["codes"])
            gains.append(out["gain_index"])
            states = {n.replace("out_", "in_", 1): v for n, v in out.items()
                      if n.startswith("out_")}
        return np.stack(codes, 1), np.stack(gains, 1)

    def decode(self, codes: np.ndarray, gains: np.ndarray, count: int) -> np.ndarray:
        """Codes [B, T, Q], gains [B, T] -> PCM [B, T*N] (lagging the input by the overlap)."""
        batch = codes.shape[0]
        states = self._zero_states(self.decoder, batch)
        names = [o.name for o in self.decoder.get_outputs()]
        counts = np.full((batch,), count, dtype=np.int64)
        out_frames = []
        for k in range(codes.shape[1]):
            feeds = {"codes": codes[:, k].astype(np.int64), "num_codebooks": counts,
                     "gain_index": gains[:, k].astype(np.int64), **states}
            out = dict(zip(names, self.decoder.run(names, feeds), strict=True))
            out_frames.append(out["pcm"])
            states = {n.replace("out_", "in_", 1): v for n, v in out.items()
                      if n.startswith("out_")}
        return np.concatenate(out_frames, axis=1)


def impulse_latency_ms(model_dir: Path, config: CodecConfig) -> float:
    """Mouth-to-ear algorithmic latency of the exported steps, in ms.

    A 10 Hz impulse train is fed frame by frame; the lag of the cross-correlation peak between
    the streamed output and the input is the output delay, and each input sample also waits
    for the rest of its frame, so latency = frame + lag.
    """
    codec = OnnxCodec(model_dir)
    n, rate = config.frame_size, config.sample_rate
    x = np.zeros((1, n * 50), dtype=np.float32)
    x[0, n * 5 :: rate // 10] = 0.5
    codes, gains = codec.encode(x)
    y = codec.decode(codes, gains, config.num_codebooks)[0]
    max_lag = 2 * n
    scores = [float(np.dot(x[0, : len(y) - lag], y[lag:])) for lag in range(max_lag)]
    lag = int(np.argmax(np.abs(scores)))
    return 1000.0 * (n + lag) / rate
