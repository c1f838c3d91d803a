"""Low-overlap MDCT filterbank (CELT-style window) used as the codec's fixed transform.

Frame ``k`` covers input samples ``[k*N - L, k*N + N)`` (N = hop = frame size, L = overlap):
``N + L`` samples whose windowed MDCT gives ``N`` real coefficients. Synthesis is the
transpose (the lapped transform is orthonormal), and overlap-adding consecutive frames over
their ``L`` shared samples reconstructs the input exactly (time-domain aliasing cancels).
Algorithmic latency of analysis + synthesis is ``N + L`` samples.
"""

from __future__ import annotations

import math

import torch


def low_overlap_window(frame_size: int, overlap: int) -> torch.Tensor:
    """Window over the ``frame_size + overlap`` non-zero samples of a frame, shape [N + L].

    Sine rise over ``overlap`` samples, flat top, sine fall; satisfies Princen-Bradley.
    """
    n = torch.arange(overlap, dtype=torch.float64)
    rise = torch.sin(math.pi / (2 * overlap) * (n + 0.5))
    flat = torch.ones(frame_size - overlap, dtype=torch.float64)
    return torch.cat([rise, flat, rise.flip(0)])


def mdct_matrix(frame_size: int, overlap: int) -> torch.Tensor:
    """Analysis matrix A, shape [N, N + L]: ``coeffs = A @ span`` for one frame's span.

    It is the standard 2N-point MDCT (orthonormal scaling sqrt(2/N)) restricted to the
    window's non-zero support; synthesis is ``A.T``.
    """
    n_coef = frame_size
    zeros_each_side = (frame_size - overlap) // 2
    n = torch.arange(frame_size + overlap, dtype=torch.float64) + zeros_each_side
    k = torch.arange(n_coef, dtype=torch.float64)
    phase = math.pi / n_coef * (n[None, :] + 0.5 + n_coef / 2) * (k[:, None] + 0.5)
    basis = math.sqrt(2.0 / n_coef) * torch.cos(phase)
    return (basis * low_overlap_window(frame_size, overlap)[None, :]).float()


def frame_spans(pcm: torch.Tensor, frame_size: int, overlap: int) -> torch.Tensor:
    """Cut [B, T*N] PCM into frame spans [B, T, N + L] (L zeros of history before sample 0)."""
    padded = torch.nn.functional.pad(pcm, (overlap, 0))
    return padded.unfold(-1, frame_size + overlap, frame_size)


def overlap_add(spans: torch.Tensor, frame_size: int, overlap: int) -> torch.Tensor:
    """Overlap-add synthesis spans [B, T, N + L] into aligned PCM [B, T*N].

    Output sample ``t`` lines up with input sample ``t`` of :func:`frame_spans`; the last
    ``L`` samples of the final span (which need the next frame) are dropped.
    """
    batch, frames, span = spans.shape
    folded = torch.nn.functional.fold(
        spans.transpose(1, 2),
        output_size=(1, frames * frame_size + overlap),
        kernel_size=(1, span),
        stride=(1, frame_size),
    )
    return folded.reshape(batch, -1)[:, overlap : overlap + frames * frame_size]
