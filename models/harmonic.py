"""Pitch tracking and harmonic excitation: the decoder's source of phase-coherent harmonics.

A frame-rate decoder that writes MDCT coefficients directly has to invent, frame after frame,
the signs that keep each harmonic's phase continuous; left to learn that from spectral losses
it produces noise-excited ("whispered") speech for a long time. Here the decoder predicts a
pitch and a voicing per frame, and a phase accumulator turns them into a band-limited pulse
train whose MDCT the decoder scales bin by bin. Harmonics then line up by construction.

The pitch is not sent as side information: the encoder is given the tracker's estimate as an
input feature and the decoder is trained to recover it from the quantized latent (auxiliary
loss), so the bitstream stays tokens + gain.

Tracker: normalized cross-correlation (NCCF) on a 2:1 decimated signal (8 kHz), lags 20..160
(400..50 Hz), over the current 20 ms frame against the 40 ms window ending with it.
"""

from __future__ import annotations

import math

import torch

F0_MIN, F0_MAX = 50.0, 400.0
HARMONIC_CEILING_HZ = 7600.0


class PitchTracker(torch.nn.Module):
    """Frame pitch from a window of the last ``2 * frame_size`` samples.

    window [..., 2N] -> (log2 f0 [...], periodicity [...] in [0, 1]) ; f0 in Hz at ``rate``.
    """

    BLOCK = 20  # samples per block of the blocked correlation (divides N/2)

    def __init__(self, frame_size: int, sample_rate: int):
        super().__init__()
        self.rate = sample_rate // 2
        half = frame_size // 2  # current frame at 8 kHz
        self.min_lag = int(self.rate / F0_MAX)
        self.max_lag = int(self.rate / F0_MIN)
        lags = torch.arange(self.min_lag, self.max_lag + 1)
        self.register_buffer("lags", lags.float(), persistent=False)
        self.half = half

    def _lagged_dot(self, low: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Correlation of the current half-frame with each lagged window, descending lags.

        low [..., L] at 8 kHz, current [..., N/2] (its last N/2 samples) -> [..., lags], entry
        r = sum_j low[start + r + j] * current[j] (lag max_lag - r), start = N/2 - max_lag.

        Blocked so the graph moves few bytes: with j = K c + d (K = BLOCK),
        P[c, m] = sum_d current[K c + d] * low[start + m + d] is one small MatMul against
        G[d, m] = low[start + d + m] (d < K), and entry r = sum_c P[c, K c + r]. G and the
        diagonal sum are built with tile / pad + reshape (a row of width W + 1 over W-periodic
        data starts one sample later), which onnxruntime runs far faster than a Gather.
        """
        half, block = self.half, self.BLOCK
        rows = self.lags.shape[0]
        span = rows - 1 + half  # samples any lagged window touches
        start = half - self.max_lag
        seq = low[..., start : start + span]
        lead = seq.shape[:-1]
        width = span - block + 1  # columns of G
        tiled = seq.repeat(*([1] * (seq.dim() - 1)), block + 1)[..., : block * (span + 1)]
        windows = tiled.reshape(*lead, block, span + 1)[..., :width]  # G [..., K, width]
        blocks = half // block
        partial = (current.reshape(*lead, blocks, block) @ windows).flatten(-2)  # P, flat
        partial = torch.nn.functional.pad(partial, (0, blocks * block))
        diagonals = partial.reshape(*lead, blocks, width + block)[..., :rows].unbind(-2)
        # element-wise adds, not ReduceSum: onnxruntime picks a reduction order by shape,
        # which would make batched and unbatched runs differ in the last bit
        total = diagonals[0]
        for diagonal in diagonals[1:]:
            total = total + diagonal
        return total

    def _lagged_energy(self, low: torch.Tensor) -> torch.Tensor:
        """Energy of each lagged window, low [..., L] -> [..., lags] (ascending lags).

        Differences of a float64 running sum of squares: O(L) instead of O(lags * N/2).
        """
        squares = low.double().pow(2)
        running = torch.nn.functional.pad(torch.cumsum(squares, dim=-1), (1, 0))
        # window of lag l covers samples [half - l, 2 half - l)
        first, last = self.half - self.max_lag, self.half - self.min_lag
        starts = running[..., first : last + 1]
        ends = running[..., first + self.half : last + self.half + 1]
        return (ends - starts).flip(-1).float().clamp(min=0.0)

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = 0.5 * (window[..., 0::2] + window[..., 1::2])  # [..., N] at 8 kHz
        current = low[..., -self.half :]  # [..., N/2]
        dot = self._lagged_dot(low, current).flip(-1)  # ascending lags
        energy = self._lagged_energy(low) * current.pow(2).sum(-1, keepdim=True)
        nccf = dot * torch.rsqrt(energy + 1e-9)
        # a slight preference for short lags avoids picking the pitch's sub-multiples
        score = nccf * (1.0 - 0.15 * self.lags / self.max_lag)
        best = score.argmax(-1)
        last = self.lags.shape[0] - 1
        around = torch.stack([(best - 1).clamp(0, last), best, (best + 1).clamp(0, last)], -1)
        left, peak, right = nccf.gather(-1, around).unbind(-1)
        # parabolic interpolation of the peak: sub-sample lag, finer pitch at high f0
        curvature = left - 2.0 * peak + right
        shift = torch.where(curvature < -1e-6, 0.5 * (left - right) / curvature.clamp(max=-1e-6),
                            torch.zeros_like(peak)).clamp(-0.5, 0.5)
        lag = self.lags[best] + shift
        log_f0 = torch.log2(self.rate / lag).clamp(math.log2(F0_MIN), math.log2(F0_MAX))
        return log_f0, peak.clamp(0.0, 1.0)


def voicing_target(periodicity: torch.Tensor) -> torch.Tensor:
    """Soft voiced/unvoiced label from the tracker's periodicity (0.35 -> 0, 0.75 -> 1)."""
    return ((periodicity - 0.35) / 0.4).clamp(0.0, 1.0)


def normalize_log_f0(log_f0: torch.Tensor) -> torch.Tensor:
    """log2 f0 -> roughly zero-mean unit-range feature."""
    return (log_f0 - 7.3) / 1.0


def harmonic_excitation(f0_start: torch.Tensor, f0_end: torch.Tensor, voicing_start: torch.Tensor,
                        voicing_end: torch.Tensor, phase: torch.Tensor, frame_size: int,
                        sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Band-limited pulse trains for a run of frames, and the phase after them.

    f0_* / voicing_* [B, T]: values at the start and the end of each frame (f0 in Hz, linear
    interpolation across the frame); phase [B] in cycles, at the start of the first frame.
    Returns (excitation [B, T*N], next phase [B]). Unit RMS when voiced.
    Everything is computed in float64 so chunked and whole-sequence runs agree.
    """
    batch, frames = f0_start.shape
    steps = torch.arange(frame_size, dtype=torch.float64, device=f0_start.device)
    ramp = (steps + 1.0) / frame_size
    f0 = (f0_start.double()[..., None] * (1 - ramp) + f0_end.double()[..., None] * ramp)
    voicing = (voicing_start.double()[..., None] * (1 - ramp)
               + voicing_end.double()[..., None] * ramp)
    increments = (f0 / sample_rate).reshape(batch, frames * frame_size)
    cycles = phase.double()[:, None] + torch.cumsum(increments, dim=-1)
    theta = 2.0 * math.pi * torch.remainder(cycles, 1.0)
    harmonics = torch.floor(HARMONIC_CEILING_HZ / f0.reshape(batch, -1))
    half_sine = torch.sin(0.5 * theta)
    safe = torch.where(half_sine.abs() < 1e-6, torch.ones_like(half_sine), half_sine)
    dirichlet = torch.where(half_sine.abs() < 1e-6, harmonics,
                            torch.sin((harmonics + 0.5) * theta) / (2.0 * safe) - 0.5)
    pulses = dirichlet * torch.rsqrt(0.5 * harmonics) * voicing.reshape(batch, -1)
    next_phase = torch.remainder(cycles[:, -1], 1.0)
    return pulses.float(), next_phase.float()
