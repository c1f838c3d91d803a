"""Training loop: background-safe, checkpoints regularly, resumes after any interruption.

One step: random crops -> codec forward with quantizer dropout -> multi-resolution spectral
losses + RVQ commitment + (after ``idem_start``) the Code Drift idempotence term L_code: the
decoded audio is re-encoded and its latents are pulled towards the code vectors chosen in the
first encoding (arXiv 2410.11025).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.codec import CausalCodec, CodecConfig, CodecOutput, count_parameters
from models.data import Corpus
from models.discriminator import (
    MultiResolutionMDCTDiscriminator,
    discriminator_loss,
    generator_losses,
)
from models.harmonic import voicing_target
from models.losses import IntelligibilityLoss, MultiResolutionSpectralLoss
from models.mdct import frame_spans


@dataclass
class TrainConfig:
    """Optimisation settings; stored in every checkpoint."""

    batch: int = 16
    seconds: float = 1.28
    lr: float = 6e-4
    warmup: int = 500
    lr_decay_per_step: float = 0.99997
    lr_floor: float = 5e-5
    weight_mel: float = 1.0
    weight_log_mag: float = 1.0
    weight_convergence: float = 1.0
    weight_commit: float = 0.25
    weight_mdct: float = 0.2
    weight_lowband: float = 0.0
    weight_stoi: float = 0.0
    lowband_hz: float = 1500.0
    lowband_prob: float = 0.0
    lowband_layouts: tuple[tuple[int, float], ...] = ((32, 3.5), (40, 1.25))
    mode_prob: float = 0.0
    modes: tuple[tuple[int, int], ...] = ((1, 0), (2, 1), (3, 2))
    weight_pitch: float = 1.0
    teacher_pitch_prob: float = 0.5
    weight_adv: float = 0.0
    weight_feat: float = 2.0
    adv_batch: int = 8
    disc_lr: float = 2e-4
    weight_idem: float = 0.5
    idem_start: int = 10000
    grad_clip: float = 5.0
    checkpoint_every: int = 250
    keep_every: int = 5000
    log_every: int = 25
    seed: int = 0
    threads: int = 2
    codec: CodecConfig = field(default_factory=CodecConfig)


def learning_rate(config: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, config.warmup))
    return max(config.lr_floor, config.lr * warm * config.lr_decay_per_step**step)


def idempotence_loss(model: CausalCodec, decoded: torch.Tensor, quantized: torch.Tensor,
                     counts: torch.Tensor) -> torch.Tensor:
    """L_code: re-encoded latents [B,T,D] vs. the first pass's chosen code-vector sums."""
    relatents = model.encode_latents(decoded)[0]
    frames = min(relatents.shape[1], quantized.shape[1]) - 1  # last frame is incomplete
    diff = relatents[:, :frames] - quantized[:, :frames].detach()
    return diff.pow(2).mean()


def sent_lowband(shape_low: torch.Tensor, prob: float,
                 layouts: tuple[tuple[int, float], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the streaming engine would send for a batch, for training the decoder with the
    low band given: shape_low [B, T, K] -> (values, mask) [B, T, K].  Each row gets, with
    probability `prob`, one of `layouts` ((bins, step), drawn uniformly), else none; values =
    rint(shape / step) * step in the layout's bins (streaming/lowband.py, without the
    clipping, which real speech almost never reaches)."""
    batch = shape_low.shape[0]
    values = torch.zeros_like(shape_low)
    mask = torch.zeros_like(shape_low)
    given = torch.rand(batch) < prob
    choice = torch.randint(len(layouts), (batch,))
    for row in torch.nonzero(given).flatten().tolist():
        bins, step = layouts[int(choice[row])]
        mask[row, :, :bins] = 1.0
        values[row, :, :bins] = torch.round(shape_low[row, :, :bins].detach() / step) * step
    return values, mask


def operating_points(batch: int, prob: float, modes: tuple[tuple[int, int], ...],
                     sampled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [B], low-band layout [B]) for a batch: with probability `prob` a row runs one
    of the shipped bitrate modes ((codebooks, layout) pairs of `modes`, layout 0 = none,
    k = `lowband_layouts[k - 1]`; drawn uniformly), else it keeps `sampled` (the quantizer
    dropout's counts) and layout -1 (`sent_lowband` decides).  Mode rows make the weights
    serve the 1, 3 and 6 kbps modes the engine runs (codebooks and low band together),
    which uniform dropout over 1..Q visits in 1 row of 20."""
    counts = sampled.clone()
    layouts = torch.full((batch,), -1, dtype=torch.long)
    chosen = torch.rand(batch) < prob
    picks = torch.randint(len(modes), (batch,))
    for row in torch.nonzero(chosen).flatten().tolist():
        counts[row], layouts[row] = modes[int(picks[row])]
    return counts, layouts


def rows_lowband(shape_low: torch.Tensor, rows: torch.Tensor, prob: float,
                 layouts: tuple[tuple[int, float], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """`sent_lowband` for the rows whose layout is -1; rows >= 0 get exactly that layout."""
    values, mask = sent_lowband(shape_low, prob, layouts)
    for row in torch.nonzero(rows >= 0).flatten().tolist():
        values[row], mask[row] = 0.0, 0.0
        layout = int(rows[row])
        if layout:
            bins, step = layouts[layout - 1]
            mask[row, :, :bins] = 1.0
            values[row, :, :bins] = torch.round(shape_low[row, :, :bins].detach() / step) * step
    return values, mask


def pitch_losses(out: CodecOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 on log2 f0 over voiced frames, voicing BCE) of the decoder's pitch predictions
    against the tracker's analysis of the input."""
    voiced = voicing_target(out.periodicity)
    error = (out.pitch.log_f0 - out.tracker_log_f0).abs()
    pitch = (error * voiced).sum() / voiced.sum().clamp(min=1.0)
    voicing = torch.nn.functional.binary_cross_entropy_with_logits(out.pitch.voicing_logit,
                                                                   voiced)
    return pitch, voicing


def mdct_loss(model: CausalCodec, decoded: torch.Tensor, target: torch.Tensor,
              max_hz: float | None = None) -> torch.Tensor:
    """Sign-aware L1 between power-law compressed MDCT shapes (both divided by the target's
    frame gain); frames [B, T, N] of PCM [B, S], the last (incomplete) frame left out.

    A waveform-matching term: magnitude losses leave the MDCT signs free, and with random
    signs even exact magnitudes score PESQ-WB ~1.4 (exact signs below 1 kHz alone: ~3.3).
    ``max_hz`` restricts it to the bins below that frequency (the gain stays the frame's).
    """
    n, overlap = model.config.frame_size, model.config.overlap
    ref = frame_spans(target, n, overlap)[:, :-1] @ model.analysis.T
    est = frame_spans(decoded, n, overlap)[:, :-1] @ model.analysis.T
    gain = model.gain_value(model.gain_index(ref))
    if max_hz is not None:
        bins = max(1, int(max_hz / (model.config.sample_rate / 2) * n))
        ref, est = ref[..., :bins], est[..., :bins]

    def compress(coeffs: torch.Tensor) -> torch.Tensor:
        shape = coeffs / gain
        return torch.sign(shape) * (shape.abs() + 1e-4).pow(0.5)

    return (compress(est) - compress(ref)).abs().mean()


class Trainer:
    """Owns model, optimizer, data stream and checkpoint folder ``run_dir``."""

    def __init__(self, run_dir: Path, config: TrainConfig, corpus: Corpus,
                 device: str | torch.device = "cpu"):
        self.run_dir, self.config, self.corpus = run_dir, config, corpus
        self.device = torch.device(device)
        torch.manual_seed(config.seed)
        self.model = CausalCodec(config.codec).to(self.device)
        self.loss = MultiResolutionSpectralLoss(config.codec.sample_rate).to(self.device)
        self.intelligibility = IntelligibilityLoss(config.codec.sample_rate).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           betas=(0.8, 0.99), weight_decay=0.0)
        self.discriminator = MultiResolutionMDCTDiscriminator().to(self.device)
        self.disc_optimizer = torch.optim.AdamW(self.discriminator.parameters(),
                                                lr=config.disc_lr, betas=(0.8, 0.99))
        self.step = 0
        self.prior_steps = 0
        """Steps of the runs this one was fine-tuned from (`--init-from`), kept in every
        checkpoint so an export can count the model's whole training."""
        self.stop_requested = False

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "discriminator": self.discriminator.state_dict(),
                "disc_optimizer": self.disc_optimizer.state_dict(),
                "step": self.step, "prior_steps": self.prior_steps,
                "config": asdict(self.config), "rng": torch.get_rng_state()}

    def save(self, name: str = "latest.pt") -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / name
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)
        return path

    def load(self, path: Path, weights_only: bool = False, keep_step: bool = False) -> None:
        """Resume from a full checkpoint, or take only the weights (and the step if asked)."""
        blob = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(blob["model"])
        prior = int(blob.get("prior_steps", 0))
        # resuming (or keep_step): the same run; weights only: a fine-tune starting at 0
        self.prior_steps = prior if keep_step or not weights_only else prior + int(blob["step"])
        if keep_step:
            self.step = int(blob["step"])
        if not weights_only:
            self.optimizer.load_state_dict(blob["optimizer"])
            if "discriminator" in blob:
                self.discriminator.load_state_dict(blob["discriminator"])
                self.disc_optimizer.load_state_dict(blob["disc_optimizer"])
            self.step = int(blob["step"])
            torch.set_rng_state(blob["rng"])

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, batch: np.ndarray) -> dict[str, float]:
        config = self.config
        pcm = torch.from_numpy(batch).to(self.device)
        lowband = None
        counts = None
        if config.mode_prob > 0:
            sampled = self.model.quantizer.sample_counts(pcm.shape[0], pcm.device)
            counts, rows = operating_points(pcm.shape[0], config.mode_prob, config.modes,
                                            sampled)

            def lowband(shape_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return rows_lowband(shape_low, rows, config.lowband_prob, config.lowband_layouts)
        elif config.lowband_prob > 0:
            def lowband(shape_low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return sent_lowband(shape_low, config.lowband_prob, config.lowband_layouts)
        out = self.model(pcm, counts, teacher_prob=config.teacher_pitch_prob, lowband=lowband)
        valid = pcm.shape[1] - config.codec.overlap  # last L samples are incomplete
        terms = self.loss(out.pcm[:, :valid], pcm[:, :valid])
        total = (config.weight_mel * terms["mel"] + config.weight_log_mag * terms["log_mag"]
                 + config.weight_convergence * terms["convergence"]
                 + config.weight_commit * out.quantizer.commitment)
        if config.weight_mdct > 0:
            terms["mdct"] = mdct_loss(self.model, out.pcm, pcm)
            total = total + config.weight_mdct * terms["mdct"]
        if config.weight_lowband > 0:
            terms["lowband"] = mdct_loss(self.model, out.pcm, pcm, config.lowband_hz)
            total = total + config.weight_lowband * terms["lowband"]
        if config.weight_stoi > 0:
            terms["stoi"] = self.intelligibility(out.pcm[:, :valid], pcm[:, :valid])
            total = total + config.weight_stoi * terms["stoi"]
        if config.weight_pitch > 0:
            terms["pitch"], terms["voicing"] = pitch_losses(out)
            total = total + config.weight_pitch * (terms["pitch"] + terms["voicing"])
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["commit"] = float(out.quantizer.commitment.detach())
        if self.step >= config.idem_start and config.weight_idem > 0:
            idem = idempotence_loss(self.model, out.pcm, out.quantizer.quantized,
                                    out.quantizer.used_codebooks)
            total = total + config.weight_idem * idem
            logs["idem"] = float(idem)
        if config.weight_adv > 0:
            real, fake = pcm[: config.adv_batch], out.pcm[: config.adv_batch]
            logs["disc"] = self.discriminator_step(real, fake.detach())
            adversarial, matching = generator_losses(self.discriminator(real),
                                                     self.discriminator(fake))
            total = total + config.weight_adv * adversarial + config.weight_feat * matching
            logs.update(adv=float(adversarial), feat=float(matching))
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        self.optimizer.step()
        self.step += 1
        logs.update(total=float(total.detach()), grad_norm=float(grad_norm),
                    lr=self.optimizer.param_groups[0]["lr"])
        return logs

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """One update of the MDCT discriminator on real and generated PCM [b, S]."""
        loss = discriminator_loss(self.discriminator(real), self.discriminator(fake))
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_optimizer.step()
        return float(loss.detach())

    def usage(self) -> list[float]:
        """Codebook perplexity per stage from the EMA counts (1024 = all codes equally used)."""
        out = []
        for stage in self.model.quantizer.stages:
            probs = stage.cluster_size / stage.cluster_size.sum()
            out.append(round(float(torch.exp(-(probs * (probs + 1e-12).log()).sum())), 1))
        return out

    # -- the loop ----------------------------------------------------------------------------
    def run(self, steps: int) -> None:
        config = self.config
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        samples = int(config.seconds * config.codec.sample_rate)
        samples -= samples % config.codec.frame_size
        batches = self.corpus.batches(config.batch, samples, seed=config.seed + self.step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / "log.jsonl"
        running: dict[str, float] = {}
        progress = tqdm(total=steps, initial=min(self.step, steps), desc="training",
                        unit="step", dynamic_ncols=True, mininterval=5.0)
        started = time.time()
        while self.step < steps and not self.stop_requested:
            logs = self.train_step(next(batches))
            for key, value in logs.items():
                running[key] = running.get(key, 0.0) + value
            progress.update(1)
            if self.step % config.log_every == 0:
                mean = {k: v / config.log_every for k, v in running.items()}
                mean.update(step=self.step, elapsed_s=time.time() - started,
                            usage=self.usage())
                with log_path.open("a") as handle:
                    handle.write(json.dumps(mean) + "\n")
                progress.set_postfix(mel=f"{mean['mel']:.3f}", lm=f"{mean['log_mag']:.3f}")
                running.clear()
            if self.step % config.checkpoint_every == 0:
                self.save()
            if self.step % config.keep_every == 0:
                self.save(f"step{self.step:07d}.pt")
        self.save()
        progress.close()

    def _request_stop(self, signum: int, frame: object) -> None:
        self.stop_requested = True


def describe(model: CausalCodec) -> str:
    params = count_parameters(model)
    return f"{params / 1e6:.2f} M parameters"


