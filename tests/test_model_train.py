"""Training losses: the waveform (MDCT sign) terms see what magnitude losses cannot."""

from __future__ import annotations

import pytest
import torch

from models.codec import CausalCodec
from models.export import random_model
from models.mdct import frame_spans, overlap_add
from models.train import (
    TrainConfig,
    idempotence_loss,
    mdct_loss,
    operating_points,
    pitch_losses,
    rows_lowband,
    sent_lowband,
)
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


def test_sent_lowband_quantises_the_given_rows_only() -> None:
    torch.manual_seed(0)
    shape_low = 3.0 * torch.randn(64, 5, 48)
    values, mask = sent_lowband(shape_low, 0.5, ((32, 3.5), (40, 1.25)))
    bins = mask[:, 0, :].sum(-1)
    assert set(bins.tolist()) == {0.0, 32.0, 40.0}
    for row in range(64):
        width = int(bins[row])
        assert bool((mask[row, :, :width] == 1).all()) and bool((mask[row, :, width:] == 0).all())
        assert bool((values[row, :, width:] == 0).all())
        if width:
            step = 3.5 if width == 32 else 1.25
            sent = values[row, :, :width]
            assert torch.allclose(sent, torch.round(shape_low[row, :, :width] / step) * step)
    model = random_model(TINY, seed=5)
    out = model(speechlike(6), lowband=lambda s: sent_lowband(s, 1.0, ((16, 0.5),)))
    assert torch.isfinite(out.pcm).all()


def test_mode_rows_get_the_modes_codebooks_and_low_band() -> None:
    """mode_prob rows run a shipped mode (codebooks + its layout); the others keep the
    dropout's counts and sent_lowband's random choice."""
    torch.manual_seed(0)
    modes = ((1, 0), (2, 1), (3, 2))
    layouts = ((32, 3.5), (40, 1.25))
    sampled = torch.full((64,), 12, dtype=torch.long)
    counts, rows = operating_points(64, 0.5, modes, sampled)
    picked = rows >= 0
    assert 10 < int(picked.sum()) < 54
    assert (counts[~picked] == 12).all()
    pairs = zip(counts[picked].tolist(), rows[picked].tolist(), strict=True)
    assert set(pairs) <= set(modes)
    shape_low = torch.randn(64, 5, 48)
    values, mask = rows_lowband(shape_low, rows, 0.0, layouts)  # prob 0: only mode rows
    for row in range(64):
        layout = int(rows[row])
        bins = 0 if layout <= 0 else layouts[layout - 1][0]
        assert float(mask[row].sum()) == 5 * bins
        if bins:
            step = layouts[layout - 1][1]
            assert torch.equal(values[row, :, :bins], torch.round(shape_low[row, :, :bins] / step)
                               * step)


def test_the_training_forward_and_losses_stay_on_the_inputs_device() -> None:
    """Training runs on a GPU where one is available (`codec-train train --device`): every
    tensor the forward pass and the losses create must live on the input's device.  The
    'meta' device stands in for a GPU here: mixing it with a CPU tensor raises, as CUDA does.
    (The quantizer's EMA update reads values, which meta tensors lack: eval mode here.)"""
    from torch.fx.experimental import _config as fx_config

    from models.discriminator import (
        MultiResolutionMDCTDiscriminator,
        discriminator_loss,
        generator_losses,
    )
    from models.losses import IntelligibilityLoss, MultiResolutionSpectralLoss

    config = TrainConfig()
    model = CausalCodec(TINY).to("meta").eval()
    pcm = torch.randn(2, TINY.frame_size * 40, device="meta")
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        sampled = model.quantizer.sample_counts(2, pcm.device)
        counts, rows = operating_points(2, 0.5, config.modes, sampled)

        def lowband(shape_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rows_lowband(shape_low, rows, 0.7, config.lowband_layouts)

        out = model(pcm, counts, teacher_prob=0.5, lowband=lowband)
        losses = [
            *MultiResolutionSpectralLoss().to("meta")(out.pcm, pcm).values(),
            IntelligibilityLoss().to("meta")(out.pcm, pcm),
            mdct_loss(model, out.pcm, pcm),
            *pitch_losses(out),
            idempotence_loss(model, out.pcm, out.quantizer.quantized,
                             out.quantizer.used_codebooks),
        ]
        discriminator = MultiResolutionMDCTDiscriminator().to("meta")
        real, fake = discriminator(pcm), discriminator(out.pcm)
        losses += [*generator_losses(real, fake), discriminator_loss(real, fake)]
    assert out.pcm.device.type == "meta" and out.pcm.shape == pcm.shape
    assert all(loss.device.type == "meta" for loss in losses)


def test_device_option_is_checked() -> None:
    from models.cli import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SystemExit, match="auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            resolve_device("cuda")
