"""Training losses: multi-resolution STFT and log-mel distances, on PCM [B, S] tensors."""

from __future__ import annotations

import math

import torch
from torch import nn


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular HTK-style mel filters, shape [n_mels, n_fft // 2 + 1]."""

    def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + hz / 700.0)

    def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(
        torch.linspace(
            0.0, float(hz_to_mel(torch.tensor(sample_rate / 2.0))), n_mels + 2
        )
    )
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lower) / (center - lower).clamp(min=1e-5)
    down = (upper - freqs[None, :]) / (upper - center).clamp(min=1e-5)
    return torch.clamp(torch.minimum(up, down), min=0.0)


class MultiResolutionSpectralLoss(nn.Module):
    """Sum over window sizes of: L1 log-magnitude, spectral convergence and L1 log-mel.

    Inputs are PCM [B, S] at ``sample_rate``; each term is averaged over bins and frames.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        windows: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048),
        mel_bands: tuple[int, ...] = (10, 20, 40, 80, 128, 160),
    ):
        super().__init__()
        self.windows = windows
        for window, bands in zip(windows, mel_bands, strict=True):
            self.register_buffer(f"hann_{window}", torch.hann_window(window), persistent=False)
            self.register_buffer(
                f"mel_{window}", mel_filterbank(window, bands, sample_rate), persistent=False
            )

    def _magnitude(self, pcm: torch.Tensor, window: int) -> torch.Tensor:
        spec = torch.stft(
            pcm,
            n_fft=window,
            hop_length=window // 4,
            window=getattr(self, f"hann_{window}"),
            return_complex=True,
        )
        return spec.abs().clamp(min=1e-5)

    def forward(self, estimate: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        log_mag = estimate.new_zeros(())
        convergence = estimate.new_zeros(())
        mel = estimate.new_zeros(())
        for window in self.windows:
            est, ref = self._magnitude(estimate, window), self._magnitude(target, window)
            log_mag = log_mag + (est.log() - ref.log()).abs().mean()
            convergence = convergence + torch.linalg.norm(est - ref) / torch.linalg.norm(ref)
            fb = getattr(self, f"mel_{window}")
            est_mel = torch.einsum("mf,bft->bmt", fb, est.pow(2)).clamp(min=1e-10)
            ref_mel = torch.einsum("mf,bft->bmt", fb, ref.pow(2)).clamp(min=1e-10)
            mel = mel + (est_mel.log10() - ref_mel.log10()).abs().mean()
        count = float(len(self.windows))
        return {
            "log_mag": log_mag / count,
            "convergence": convergence / count,
            "mel": mel / count * math.log(10.0),
        }
