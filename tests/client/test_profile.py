"""`codec-client profile` against a real server: reports, stage budget, independent check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.__main__ import main
from client.profiler.stages import ROUNDTRIP_STAGES, STAGES
from tests.client.conftest import ServerThread


@pytest.mark.parametrize(
    ("mode", "clients", "stages"), [("room", 2, STAGES), ("roundtrip", 1, ROUNDTRIP_STAGES)]
)
def test_profile_reports_a_stage_budget_that_adds_up(
    tmp_path: Path,
    server: ServerThread,
    capsys: pytest.CaptureFixture[str],
    mode: str,
    clients: int,
    stages: tuple[object, ...],
) -> None:
    out = tmp_path / "report"
    argv = ["profile", "--server", server.url, "--mode", mode, "--clients", str(clients)]
    assert main([*argv, "--seconds", "2", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "mouth-to-ear (signal)" in table

    for name in (
        "profile.json",
        "report.html",
        "stage_budget.png",
        "stage_cdf.png",
        "stage_box.png",
    ):
        assert (out / name).stat().st_size > 1000, name
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3

    profile = json.loads((out / "profile.json").read_text())
    keys = [s["key"] for s in profile["stages"]]
    assert keys == [s.key for s in stages]  # type: ignore[attr-defined]
    assert all(s["count"] > 0 and s["p50"] is not None for s in profile["stages"])
    e2e = profile["e2e"]
    assert e2e["count"] >= clients * 50  # frames of ~2 s per receiver
    # the stages add up to the measured mouth-to-ear delay of each frame ...
    assert abs(profile["residual_ms"]["mean"]) < 1e-6
    assert profile["stage_sum"]["p50"] == pytest.approx(e2e["p50"], abs=1e-6)
    # ... and the timestamps agree with the delay of the played audio itself
    signal = profile["signal"]
    assert signal["windows"] >= 2
    # spectral similarity (client.profiler.spectral): a decoder with its own oscillator
    # state plays the right audio with other harmonic phases than the offline decode
    assert signal["similarity_median"] > 0.6
    assert signal["lsd_db_median"] < 6.0
    assert abs(signal["residual_ms"]["median"]) < 2.0
    # (the delay takes values a frame apart, per receiver and as its jitter buffer steps:
    # e.g. windows at 94-95 and 114-115 ms; the median of 6 windows and that of all frames
    # may then fall on different steps, 1 run in 4-6 at the former 5 ms tolerance; the
    # residual above is the per-window check)
    assert signal["delay_ms"]["p50"] == pytest.approx(e2e["p50"], abs=25.0)
    # a local, unloaded path: mouth-to-ear within a sane budget, nothing lost
    assert 25.0 < e2e["p50"] < 300.0
    assert profile["frames"]["lost"] == 0
    assert profile["clock_offset"]["seconds"] == 0.0
    # what a catch-up of the roundtrip speaker buffer dropped is counted (none in a room)
    dropped = profile["frames"]["pcm_dropped_samples"]
    assert dropped >= 0 and (mode == "roundtrip" or dropped == 0)
    assert f"speaker catch-up dropped {dropped} samples" in table
    if mode == "roundtrip":  # the bundled model: 16 kHz
        per_client = sum(c["pcm_dropped_s"] for c in profile["per_client"])
        assert per_client * 16000 == pytest.approx(dropped)
