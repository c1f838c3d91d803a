"""The intelligibility loss: a differentiable STOI that tracks pystoi's value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.losses import IntelligibilityLoss

RATE = 16000

# pystoi 0.4 `stoi(reference, reference + noise, 16000)` for the signals below (pystoi is a
# benchmark dependency, not a test one, so its values are pinned here)
PYSTOI_AT_SNR_DB = {10: 0.9392, 0: 0.7992, -5: 0.7098}


def syllables(seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """A speech-like test signal: a gliding 120 Hz harmonic complex switched on and off
    three times a second, plus a little noise; float32 [seconds * 16000]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30))
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 2
    return (0.1 * envelope * voiced + 0.002 * rng.standard_normal(len(t))).astype(np.float32)


def with_noise(reference: np.ndarray, snr_db: float) -> np.ndarray:
    noise = np.random.default_rng(1).standard_normal(len(reference)).astype(np.float32)
    noise *= np.sqrt((reference**2).mean() / (noise**2).mean() / 10 ** (snr_db / 10))
    return reference + noise


def score(loss: IntelligibilityLoss, estimate: np.ndarray, reference: np.ndarray) -> float:
    return 1.0 - float(loss(torch.from_numpy(estimate)[None], torch.from_numpy(reference)[None]))


@pytest.mark.parametrize("snr_db", sorted(PYSTOI_AT_SNR_DB))
def test_intelligibility_matches_pystoi(snr_db: int) -> None:
    reference = syllables()
    assert score(IntelligibilityLoss(RATE), with_noise(reference, snr_db), reference) == (
        pytest.approx(PYSTOI_AT_SNR_DB[snr_db], abs=0.015))


def test_intelligibility_is_one_for_the_reference_at_any_level() -> None:
    reference = syllables()
    loss = IntelligibilityLoss(RATE)
    assert score(loss, reference, reference) == pytest.approx(1.0, abs=1e-4)
    assert score(loss, 0.25 * reference, reference) == pytest.approx(1.0, abs=1e-4)


def test_intelligibility_loss_has_gradients_towards_the_reference() -> None:
    reference = torch.from_numpy(syllables(1.28))[None]
    estimate = torch.from_numpy(with_noise(reference[0].numpy(), 0.0))[None].requires_grad_()
    loss = IntelligibilityLoss(RATE)
    value = loss(estimate, reference)
    value.backward()
    assert estimate.grad is not None and torch.isfinite(estimate.grad).all()
    with torch.no_grad():  # a small step against the gradient lowers the loss
        stepped = estimate - 1e-3 * estimate.grad / estimate.grad.abs().max()
    assert float(loss(stepped, reference)) < float(value)
