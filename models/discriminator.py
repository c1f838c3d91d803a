"""Multi-resolution MDCT discriminator that runs at frame rate (cheap enough for CPU training).

Each resolution takes a sine-window MDCT of the PCM (hop H, window 2H), compresses it
(sign * |x|^0.5 after per-clip RMS normalization) and judges it with 1D convolutions over
frames, the bins being channels. Judging signed coefficients across frames lets it see what a
magnitude loss cannot: whether harmonics keep a coherent phase from frame to frame.
Shapes: PCM [B, S] -> per resolution logits [B, 1, T_h] and feature maps [B, C, T_h].
"""

from __future__ import annotations

import torch
from torch import nn

from models.mdct import frame_spans, mdct_matrix


class MDCTResolution(nn.Module):
    def __init__(self, hop: int, channels: int):
        super().__init__()
        self.hop = hop
        self.register_buffer("analysis", mdct_matrix(hop, hop), persistent=False)
        norm = nn.utils.parametrizations.weight_norm
        self.layers = nn.ModuleList([
            norm(nn.Conv1d(hop, channels, 3, padding=1)),
            norm(nn.Conv1d(channels, channels, 3, padding=2, dilation=2)),
            norm(nn.Conv1d(channels, channels, 3, padding=4, dilation=4)),
            norm(nn.Conv1d(channels, channels, 3, padding=1)),
        ])
        self.out = norm(nn.Conv1d(channels, 1, 3, padding=1))

    def forward(self, pcm: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        usable = pcm.shape[-1] - pcm.shape[-1] % self.hop
        coeffs = frame_spans(pcm[:, :usable], self.hop, self.hop) @ self.analysis.T
        scale = coeffs.pow(2).mean(dim=(1, 2), keepdim=True).add(1e-10).rsqrt()
        x = coeffs * scale
        x = (torch.sign(x) * (x.abs() + 1e-6).sqrt()).transpose(1, 2)  # [B, bins, T]
        features = []
        for layer in self.layers:
            x = nn.functional.leaky_relu(layer(x), 0.2)
            features.append(x)
        return self.out(x), features


class MultiResolutionMDCTDiscriminator(nn.Module):
    def __init__(self, hops: tuple[int, ...] = (80, 160, 320), channels: int = 192):
        super().__init__()
        self.resolutions = nn.ModuleList(MDCTResolution(h, channels) for h in hops)

    def forward(self, pcm: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [resolution(pcm) for resolution in self.resolutions]


Judgement = list[tuple[torch.Tensor, list[torch.Tensor]]]


def discriminator_loss(real: Judgement, fake: Judgement) -> torch.Tensor:
    """Hinge loss on real and (detached) generated audio, averaged over resolutions."""
    total = real[0][0].new_zeros(())
    for (real_logits, _), (fake_logits, _) in zip(real, fake, strict=True):
        total = total + torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()
    return total / len(real)


def generator_losses(real: Judgement, fake: Judgement) -> tuple[torch.Tensor, torch.Tensor]:
    """(hinge adversarial loss, relative L1 feature matching) for the codec."""
    adversarial = fake[0][0].new_zeros(())
    matching = fake[0][0].new_zeros(())
    count = 0
    for (_, real_maps), (fake_logits, fake_maps) in zip(real, fake, strict=True):
        adversarial = adversarial + torch.relu(1 - fake_logits).mean()
        for real_map, fake_map in zip(real_maps, fake_maps, strict=True):
            target = real_map.detach()
            matching = matching + (target - fake_map).abs().mean() / (target.abs().mean() + 1e-5)
            count += 1
    return adversarial / len(fake), matching / max(count, 1)
