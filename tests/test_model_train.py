"""Training losses: the waveform (MDCT sign) terms see what magnitude losses cannot."""

from __future__ import annotations

import torch

from models.export import random_model
from models.mdct import frame_spans, overlap_add
from models.train import mdct_loss
from tests.test_model_codec import TINY, speechlike

N, L = TINY.frame_size, TINY.overlap


def with_flipped_signs(model: torch.nn.Module, pcm: torch.Tensor, low: int, high: int
                       ) -> torch.Tensor:
    """`pcm` with the signs of MDCT bins [low, high) of every frame flipped."""
    coeffs = frame_spans(pcm, N, L) @ model.analysis.T
    coeffs[..., low:high] *= -1.0
    return overlap_add(coeffs @ model.analysis, N, L)


def test_mdct_loss_is_zero_for_the_input_and_sees_sign_errors() -> None:
    model = random_model(TINY, seed=1)
    pcm = speechlike(12)
    assert float(mdct_loss(model, pcm, pcm)) == 0.0
    flipped = with_flipped_signs(model, pcm, 0, N)  # same magnitudes, opposite signs
    assert float(mdct_loss(model, flipped, pcm)) > 0.1


def test_lowband_mdct_loss_ignores_errors_above_its_cutoff() -> None:
    model = random_model(TINY, seed=1)
    pcm = speechlike(12)
    nyquist = TINY.sample_rate / 2
    cutoff_bin = N // 4
    cutoff_hz = cutoff_bin * nyquist / N
    high_flipped = with_flipped_signs(model, pcm, cutoff_bin, N)
    low_flipped = with_flipped_signs(model, pcm, 0, cutoff_bin)
    low_errors = float(mdct_loss(model, low_flipped, pcm, max_hz=cutoff_hz))
    # flipped high bins leak only a little into the low ones (overlap-add aliasing)
    assert float(mdct_loss(model, high_flipped, pcm, max_hz=cutoff_hz)) < 0.1 * low_errors
    assert low_errors > 0.1
    assert float(mdct_loss(model, high_flipped, pcm)) > 0.1
