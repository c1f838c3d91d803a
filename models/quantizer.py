"""Residual vector quantizer with EMA codebooks, dead-code restarts and quantizer dropout.

Shapes: latents are [B, T, D]; codes are [B, T, Q] (int64, each in [0, codebook_size)).
Stage ``i`` quantizes the residual left by stages ``0..i-1``, so the first ``k`` codes of a
frame are the same whatever number of codebooks is kept: one model, several bitrates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class QuantizerOutput:
    """Result of quantizing a batch.

    quantized: [B, T, D] sum of the used stages' code vectors (straight-through gradient).
    codes: [B, T, Q] chosen indices (stages beyond a row's count are not meaningful).
    commitment: scalar, mean squared distance of the residuals to their chosen code vectors.
    used_codebooks: [B] number of stages each batch row used.
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    commitment: torch.Tensor
    used_codebooks: torch.Tensor


class EMACodebook(nn.Module):
    """One VQ stage: nearest-neighbour lookup, EMA centroid updates, dead-code restarts."""

    def __init__(self, size: int, dim: int, decay: float = 0.99, dead_threshold: float = 0.5):
        super().__init__()
        self.size, self.dim, self.decay, self.dead_threshold = size, dim, decay, dead_threshold
        self.register_buffer("embedding", torch.randn(size, dim) * 0.1)
        self.register_buffer("cluster_size", torch.ones(size))
        self.register_buffer("embed_sum", self.embedding.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def nearest(self, vectors: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
        """Index of the nearest code vector, [..., D] -> [...] (or [..., 1] with keepdim).

        argmin |v - c|^2 = argmin (|c|^2 / 2 - v.c): the |v|^2 term is the same for every
        code, so it is left out (one MatMul, one Add, one ArgMin per stage in the graph).
        """
        half_norms = 0.5 * self.embedding.pow(2).sum(-1)
        return (half_norms - vectors @ self.embedding.T).argmin(-1, keepdim=keepdim)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors for indices of any shape [...] -> [..., D]."""
        return nn.functional.embedding(codes, self.embedding)

    @torch.no_grad()
    def update(self, vectors: torch.Tensor, codes: torch.Tensor) -> None:
        """EMA update from the vectors [M, D] (already masked to active rows) and codes [M]."""
        if vectors.shape[0] == 0:
            return
        if not bool(self.initialized):
            self._init_from(vectors)
            return
        onehot = nn.functional.one_hot(codes, self.size).type_as(vectors)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.T @ vectors, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (total + self.size * 1e-5) * total
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        self._restart_dead(vectors)

    def _init_from(self, vectors: torch.Tensor) -> None:
        picks = vectors[torch.randint(0, vectors.shape[0], (self.size,), device=vectors.device)]
        self.embedding.copy_(picks)
        self.embed_sum.copy_(picks)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    def _restart_dead(self, vectors: torch.Tensor) -> None:
        dead = self.cluster_size < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        picks = vectors[torch.randint(0, vectors.shape[0], (n_dead,), device=vectors.device)]
        picks = picks + 1e-3 * torch.randn_like(picks)
        self.embedding[dead] = picks
        self.embed_sum[dead] = picks
        self.cluster_size[dead] = 1.0


class ResidualVQ(nn.Module):
    """Q stages of :class:`EMACodebook` with quantizer dropout in training."""

    def __init__(self, num_codebooks: int, codebook_size: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_codebooks, self.dropout_prob = num_codebooks, dropout_prob
        self.stages = nn.ModuleList(EMACodebook(codebook_size, dim) for _ in range(num_codebooks))

    def sample_counts(self, batch: int, device: torch.device) -> torch.Tensor:
        """Codebooks per batch row: all Q, or uniform in 1..Q with probability dropout_prob."""
        counts = torch.full((batch,), self.num_codebooks, device=device, dtype=torch.long)
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(batch, device=device) < self.dropout_prob
            random_counts = torch.randint(1, self.num_codebooks + 1, (batch,), device=device)
            counts = torch.where(drop, random_counts, counts)
        return counts

    def forward(self, latents: torch.Tensor, counts: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize [B, T, D] latents with ``counts`` [B] stages per row (default: sampled)."""
        batch, frames, dim = latents.shape
        if counts is None:
            counts = self.sample_counts(batch, latents.device)
        residual = latents
        quantized = torch.zeros_like(latents)
        all_codes, commit_terms = [], []
        for index, stage in enumerate(self.stages):
            active = (counts > index).to(latents.dtype)[:, None, None]  # [B, 1, 1]
            flat = residual.detach().reshape(-1, dim)
            codes = stage.nearest(flat)
            if self.training:
                row_active = (counts > index).repeat_interleave(frames)
                stage.update(flat[row_active], codes[row_active])
            chosen = stage.lookup(codes).reshape(batch, frames, dim)
            err = (residual - chosen.detach()).pow(2).mean(-1, keepdim=True) * active
            commit_terms.append(err.sum() / (active.sum() * frames).clamp(min=1.0))
            quantized = quantized + chosen * active
            residual = residual - chosen.detach() * active
            all_codes.append(codes.reshape(batch, frames))
        straight_through = latents + (quantized - latents).detach()
        return QuantizerOutput(
            quantized=straight_through,
            codes=torch.stack(all_codes, -1),
            commitment=torch.stack(commit_terms).mean(),
            used_codebooks=counts,
        )

    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        """All Q codes of [B, T, D] latents -> [B, T, Q] (no updates)."""
        residual = latents
        codes = []
        for stage in self.stages:
            index = stage.nearest(residual, keepdim=True)  # [B, T, 1]
            residual = residual - stage.lookup(index[..., 0])
            codes.append(index)
        return torch.cat(codes, -1)

    def decode(self, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Sum of the first ``counts`` [B] stages' vectors for codes [B, T, Q] -> [B, T, D].

        One lookup in the stacked codebooks [Q*K, D] (stage q's code c is row q*K + c), then
        a masked sum over stages: a handful of graph nodes whatever Q is.
        """
        stages = len(self.stages)
        size = self.stages[0].size
        table = torch.cat([stage.embedding for stage in self.stages])  # [Q*K, D]
        offsets = torch.arange(stages, device=codes.device) * size  # [Q]
        vectors = nn.functional.embedding(codes + offsets, table)  # [B, T, Q, D]
        active = torch.arange(stages, device=codes.device) < counts[:, None]  # [B, Q]
        weights = active.to(table.dtype)[:, None, :, None]  # [B, 1, Q, 1]
        return (vectors * weights).sum(-2)
