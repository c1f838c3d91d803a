"""The PyTorch codec: perfect-reconstruction filterbank, streaming == offline, causality,
residual quantization and the shape-gain split."""

from __future__ import annotations

import pytest
import torch

from models.codec import CausalCodec, CodecConfig, mflops_per_second
from models.export import random_model
from models.mdct import frame_spans, mdct_matrix, overlap_add

TINY = CodecConfig(channels=32, encoder_blocks=2, decoder_blocks=2, latent_dim=8,
                   codebook_size=64, num_codebooks=6)
N, L = TINY.frame_size, TINY.overlap


@pytest.fixture(scope="module")
def model() -> CausalCodec:
    return random_model(TINY, seed=1)


def speechlike(frames: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Noise shaped by a slowly varying envelope, [batch, frames * N]."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, frames * N, generator=gen)
    envelope = 0.05 + 0.2 * torch.sin(torch.linspace(0, 12.0, frames * N)).abs()
    return (noise * envelope).float()


def test_mdct_reconstructs_exactly_except_the_last_overlap() -> None:
    analysis = mdct_matrix(N, L)
    pcm = torch.randn(3, N * 12)
    coeffs = frame_spans(pcm, N, L) @ analysis.T
    rebuilt = overlap_add(coeffs @ analysis, N, L)
    assert coeffs.shape == (3, 12, N)
    assert torch.allclose(rebuilt[:, : -L], pcm[:, : -L], atol=1e-5)


def sent_lowband(shape_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a low-band layout would send: row 0 gets its first 10 bins at step 0.5, row 1
    none.  shape_low [2, T, K] -> (values, mask) [2, T, K]."""
    mask = torch.zeros_like(shape_low)
    mask[0, :, :10] = 1.0
    return torch.round(shape_low / 0.5) * 0.5 * mask, mask


@pytest.mark.parametrize("chunk_frames", [1, 2, 5, 7])
def test_chunked_streaming_equals_full_sequence(model: CausalCodec, chunk_frames: int) -> None:
    pcm = speechlike(21)
    counts = torch.tensor([TINY.num_codebooks, 2])
    full = model(pcm, counts, lowband=sent_lowband)
    enc_state, dec_state = model.initial_state("encoder", 2), model.initial_state("decoder", 2)
    out, codes, done = [], [], 0
    with torch.no_grad():
        while done < 21:
            take = min(chunk_frames, 21 - done)
            chunk = pcm[:, done * N : (done + take) * N]
            step_codes, gains, low, enc_state = model.encoder_step(chunk, enc_state)
            step_codes = step_codes.reshape(2, take, -1)
            gains = gains.reshape(2, take)
            values, mask = sent_lowband(low.reshape(2, take, -1))
            decoded, dec_state = model.decoder_step(step_codes, counts, gains, values, mask,
                                                    dec_state)
            out.append(decoded)
            codes.append(step_codes)
            done += take
    streamed = torch.cat(out, dim=-1)
    # the streamed output lags by the overlap: streamed[t + L] == offline[t]
    assert torch.allclose(streamed[:, L:], full.pcm[:, :-L], atol=1e-4)
    full_codes, _ = model.encode(pcm)
    assert torch.equal(torch.cat(codes, dim=1), full_codes)


def test_sent_low_band_replaces_the_estimate_and_keeps_the_gain(model: CausalCodec) -> None:
    shape = torch.randn(3, N)
    gain = torch.full((3, 1), 0.1)
    values = torch.zeros(3, TINY.lowband_bins)
    values[:, :8] = 2.0 * torch.randn(3, 8)
    mask = torch.zeros_like(values)
    mask[:, :8] = 1.0
    coeffs = model.synthesise_spans(shape, gain, values, mask) @ model.analysis.T
    plain = model.synthesise_spans(shape, gain) @ model.analysis.T
    for out in (coeffs, plain):  # every frame carries exactly the sent gain
        assert torch.allclose(out.pow(2).mean(-1).sqrt(), torch.full((3,), 0.1), rtol=1e-4)
    # one factor per frame: the sent bins are the values, the others the estimate, both scaled
    factor = coeffs[:, :1] / (values[:, :1] * 0.1)
    assert torch.allclose(coeffs[:, :8], values[:, :8] * 0.1 * factor, atol=1e-5)
    assert torch.allclose(coeffs[:, 8:], plain[:, 8:] * factor, atol=1e-5)
    none = model.synthesise_spans(shape, gain, values * 0, mask * 0)
    assert torch.allclose(none, model.synthesise_spans(shape, gain), atol=1e-6)


def test_changing_future_input_never_changes_past_output(model: CausalCodec) -> None:
    pcm = speechlike(16)
    changed = pcm.clone()
    cut = 9 * N + 17
    changed[:, cut:] = torch.randn_like(changed[:, cut:])
    counts = torch.tensor([TINY.num_codebooks] * 2)
    with torch.no_grad():
        before, after = model(pcm, counts), model(changed, counts)
    # the frame holding sample `cut` may change; its span starts L samples earlier
    first_affected = (cut // N) * N - L
    assert torch.equal(before.pcm[:, :first_affected], after.pcm[:, :first_affected])
    assert torch.equal(before.codes[:, : cut // N], after.codes[:, : cut // N])
    assert not torch.equal(before.pcm[:, first_affected:], after.pcm[:, first_affected:])


def test_first_codes_do_not_depend_on_the_number_kept(model: CausalCodec) -> None:
    latents = torch.randn(2, 10, TINY.latent_dim)
    all_codes = model.quantizer.encode(latents)
    for count in (1, 3, TINY.num_codebooks):
        out = model.quantizer(latents, torch.full((2,), count))
        assert torch.equal(out.codes[..., :count], all_codes[..., :count])


def test_more_codebooks_quantize_more_accurately() -> None:
    model = random_model(TINY, seed=2)
    latents = model.encode_latents(speechlike(20))[0]
    latents = latents.detach()
    model.train()
    for _ in range(30):  # let the EMA codebooks fit these latents
        model.quantizer(latents, torch.full((2,), TINY.num_codebooks))
    model.eval()
    errors = []
    for count in (1, 3, TINY.num_codebooks):
        out = model.quantizer(latents, torch.full((2,), count))
        errors.append(float((out.quantized - latents).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]


def test_ema_update_moves_codes_and_restarts_dead_ones() -> None:
    torch.manual_seed(0)
    codec = CausalCodec(TINY)
    stage = codec.quantizer.stages[0]
    codec.train()
    vectors = torch.randn(512, TINY.latent_dim)
    stage.update(vectors, stage.nearest(vectors))  # first call initialises from the data
    assert bool(stage.initialized)
    stage.cluster_size[:5] = 0.0  # five dead codes
    before = stage.embedding.clone()
    stage.update(vectors, stage.nearest(vectors))
    assert not torch.equal(before, stage.embedding)
    assert bool((stage.cluster_size[:5] >= stage.dead_threshold).all())


def test_level_change_moves_only_the_gain_index(model: CausalCodec) -> None:
    pcm = speechlike(12)
    step_db = TINY.gain_step_db
    base_codes, base_gain = model.encode(pcm)
    for steps in (-8, 8):  # -12 dB and +12 dB with 1.5 dB steps
        scaled = pcm * 10 ** (steps * step_db / 20)
        codes, gain = model.encode(scaled)
        assert torch.equal(gain, base_gain + steps)
        assert float((codes == base_codes).float().mean()) > 0.98


def test_compute_budget_of_the_default_configuration() -> None:
    mflops = mflops_per_second(CodecConfig())
    assert mflops["decoder"] <= 300
    assert mflops["encoder"] + mflops["decoder"] <= 700
