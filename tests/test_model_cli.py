"""The training and export CLI end to end on a tiny model: train, resume, fine-tune from a
checkpoint (the run records the steps it started from), export (the card counts them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from models.cli import main

TINY = [f"--set={k}" for k in (
    "codec.channels=32", "codec.encoder_blocks=2", "codec.decoder_blocks=2",
    "codec.latent_dim=8", "codec.codebook_size=64", "codec.num_codebooks=6",
    "batch=2", "seconds=0.32", "checkpoint_every=2")]


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        sf.write(folder / f"c{i}.wav", (0.1 * rng.standard_normal(48000)).astype(np.float32),
                 16000)
    return folder


def train(clips: Path, run: Path, steps: int, *extra: str) -> dict:
    main(["train", "--data", str(clips), "--run", str(run), "--steps", str(steps),
          "--threads", "1", *TINY, *extra])
    blob: dict = torch.load(run / "latest.pt", map_location="cpu", weights_only=False)
    return blob


def test_fine_tune_records_its_origin_and_export_counts_it(clips: Path, tmp_path: Path) -> None:
    base = train(clips, tmp_path / "base", 2)
    assert (base["step"], base["prior_steps"]) == (2, 0)
    tuned = train(clips, tmp_path / "tuned", 3, "--init-from", str(tmp_path / "base/latest.pt"))
    assert (tuned["step"], tuned["prior_steps"]) == (3, 2)
    resumed = train(clips, tmp_path / "tuned", 4)  # same command again: resumes the run
    assert (resumed["step"], resumed["prior_steps"]) == (4, 2)
    out = tmp_path / "model"
    main(["export", "--checkpoint", str(tmp_path / "tuned/latest.pt"), "--out", str(out),
          "--weights", "fp32", "--lineage", "base 2 steps -> tuned 4 steps"])
    card = json.loads((out / "card.json").read_text())
    training = card["training"]
    assert (training["steps"], training["run_steps"]) == (6, 4)
    assert training["lineage"] == "base 2 steps -> tuned 4 steps"
    assert card["model_id"].startswith("cs-mdct-6-")


def test_overrides_cast_to_the_field_types() -> None:
    from models.cli import apply_overrides
    from models.train import TrainConfig

    config = TrainConfig()
    apply_overrides(config, ["modes=[[2, 1], [3, 2]]", "lr=1e-4", "batch=8",
                             "codec.channels=64"])
    assert config.modes == ((2, 1), (3, 2))
    assert config.lr == pytest.approx(1e-4) and config.batch == 8
    assert config.codec.channels == 64
    with pytest.raises(SystemExit, match="unknown setting 'nope'"):
        apply_overrides(config, ["nope=1"])
