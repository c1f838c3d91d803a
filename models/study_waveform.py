"""Where the codec's PESQ goes: a reproducible study of phase (MDCT signs) and of a hybrid
low-band waveform coder, on a trained checkpoint (PyTorch, offline).

1. **Sign agreement**: energy-weighted share of MDCT coefficients whose decoded sign equals the
   input's, and the waveform correlation, per band (random phase = 0.5 and 0).
2. **Oracles**: PESQ-WB of the input's own MDCT resynthesised through the codec's transform
   (20 ms hop, 5 ms overlap) with exact magnitudes and random signs above a cut-off.
3. **Hybrid**: the neural codec at q codebooks with its lowest `bins` MDCT bins replaced by
   the input's, scalar-quantised (step `step` on the gain-normalised shape).  Rate = frame
   header (4 + 6 bits) + 10 q + the zeroth-order entropy of the quantisation indices (over
   all clips: what a static entropy coder would spend).

Writes benchmarks/results/waveform_study.json and docs/img/waveform_hybrid.png (rate vs
PESQ-WB against the neural codec alone and Opus/Codec2 from benchmarks/results/quality.json).

    python -m models.study_waveform --checkpoint models/checkpoints/default.pt   # ~5 min

(In models/: it runs the PyTorch model, which only models/ may import.)
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.data import load_mono
from models.evaluate import pad_to_frames, quality
from models.export import load_checkpoint
from models.mdct import frame_spans, overlap_add

ROOT = Path(__file__).resolve().parents[1]

BANDS_HZ = ((0, 500), (500, 1000), (1000, 2000), (2000, 4000), (4000, 8000))
ORACLE_CUTOFFS_HZ = (0, 1000, 2000, 4000)
HYBRID_CODEBOOKS = (1, 3, 5)
HYBRID_BINS = (16, 24, 32, 40)
HYBRID_STEPS = (1.0, 1.5, 2.0, 3.0)


def analyse(model: Any, pcm: torch.Tensor) -> torch.Tensor:
    """Aligned PCM [1, S] -> MDCT coefficients [1, T, N] (the codec's own transform)."""
    c = model.config
    coeffs: torch.Tensor = frame_spans(pcm, c.frame_size, c.overlap) @ model.analysis.T
    return coeffs


def synthesise(model: Any, coeffs: torch.Tensor, length: int) -> np.ndarray:
    c = model.config
    pcm = overlap_add(coeffs @ model.analysis, c.frame_size, c.overlap)
    out: np.ndarray = pcm[0].numpy()[:length]
    return out


def sign_agreement(model: Any, ref: torch.Tensor, dec: torch.Tensor) -> dict[str, Any]:
    c = model.config
    hz_per_bin = c.sample_rate / 2 / c.frame_size
    out = {}
    for lo, hi in BANDS_HZ:
        a, b = int(lo / hz_per_bin), int(hi / hz_per_bin)
        r, d = ref[..., a:b], dec[..., a:b]
        weight = r.abs()
        agree = float(((torch.sign(r) == torch.sign(d)).float() * weight).sum() / weight.sum())
        corr = float((r * d).sum() / torch.sqrt((r * r).sum() * (d * d).sum() + 1e-20))
        out[f"{lo}-{hi} Hz"] = {"sign_agreement": agree, "correlation": corr}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "models/checkpoints/default.pt")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/dev")
    parser.add_argument("--clips", type=int, default=9, help="every 3rd clip, this many")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/waveform_study.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/img/waveform_hybrid.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, meta = load_checkpoint(args.checkpoint)
    files = sorted(glob.glob(str(args.data / "*.flac")) + glob.glob(str(args.data / "*.wav")))
    files = files[1::3][: args.clips]
    rng = torch.Generator().manual_seed(0)
    n, overlap, rate = model.config.frame_size, model.config.overlap, model.config.sample_rate
    hz_per_bin = rate / 2 / n
    signs: list[dict[str, Any]] = []
    oracle: dict[str, list[float]] = {}
    hybrid: dict[tuple[int, int, float], list[float]] = {}
    indices: dict[tuple[int, float], list[np.ndarray]] = {}
    baseline: dict[int, list[float]] = {}
    for path in files:
        clip = load_mono(Path(path), rate)
        x = torch.from_numpy(pad_to_frames(clip, n, overlap))[None]
        print(Path(path).name, flush=True)
        with torch.no_grad():
            codes, gains = model.encode(x)
            ref = analyse(model, x)
            gain = model.gain_value(model.gain_index(ref))
            flips = torch.where(torch.rand(ref.shape, generator=rng) < 0.5, -1.0, 1.0)
            freqs = (torch.arange(n) + 0.5) * hz_per_bin
            for cut in ORACLE_CUTOFFS_HZ:
                coeffs = torch.where(freqs >= cut, ref.abs() * flips, ref)
                score = quality(clip, synthesise(model, coeffs, len(clip)), rate)["pesq_wb"]
                oracle.setdefault(f"random signs above {cut} Hz", []).append(score)
            for q in HYBRID_CODEBOOKS:
                decoded = model.decode(codes, gains, q)
                dec = analyse(model, decoded)
                score = quality(clip, decoded[0].numpy()[: len(clip)], rate)["pesq_wb"]
                baseline.setdefault(q, []).append(score)
                if q == max(HYBRID_CODEBOOKS):
                    signs.append(sign_agreement(model, ref, dec))
                for bins in HYBRID_BINS:
                    for step in HYBRID_STEPS:
                        index = torch.round(ref[..., :bins] / gain / step)
                        indices.setdefault((bins, step), []).append(index.numpy().ravel())
                        mixed = dec.clone()
                        mixed[..., :bins] = index * step * gain
                        score = quality(clip, synthesise(model, mixed, len(clip)), rate)["pesq_wb"]
                        hybrid.setdefault((q, bins, step), []).append(score)
    entropy = {}
    for key, parts in indices.items():
        _, counts = np.unique(np.concatenate(parts), return_counts=True)
        p = counts / counts.sum()
        entropy[key] = float(-(p * np.log2(p)).sum()) * key[0]
    frames_per_s = rate / n
    rows = []
    for (q, bins, step), scores in hybrid.items():
        bits = 4 + 6 + 10 * q + entropy[(bins, step)]
        rows.append({"codebooks": q, "bins": bins, "max_hz": bins * hz_per_bin, "step": step,
                     "kbps": bits * frames_per_s / 1000, "pesq_median": float(np.median(scores)),
                     "pesq_mean": float(np.mean(scores))})
    rows.sort(key=lambda r: r["kbps"])
    result = {
        "checkpoint": str(args.checkpoint), "step": meta["step"],
        "clips": [Path(f).name for f in files],
        "sign_agreement": {band: {k: float(np.mean([s[band][k] for s in signs]))
                                  for k in ("sign_agreement", "correlation")}
                           for band in signs[0]},
        "oracle_pesq_median": {k: float(np.median(v)) for k, v in oracle.items()},
        "neural_alone": [{"codebooks": q, "kbps": (10 + 10 * q) * frames_per_s / 1000,
                          "pesq_median": float(np.median(v)), "pesq_mean": float(np.mean(v))}
                         for q, v in baseline.items()],
        "hybrid": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.plot)
    print(json.dumps({k: result[k] for k in ("sign_agreement", "oracle_pesq_median")}, indent=1))
    print(f"wrote {args.out}, {args.plot}")
    return 0


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no cheaper row beats on median PESQ (rows sorted by rate)."""
    front, best = [], -1.0
    for row in rows:
        if row["pesq_median"] > best:
            front.append(row)
            best = row["pesq_median"]
    return front


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    rows = result["hybrid"]
    ax.scatter([r["kbps"] for r in rows], [r["pesq_median"] for r in rows], s=10, c="0.7",
               label="hybrid: q codebooks + quantised low band (all settings)")
    front = pareto(rows)
    ax.plot([r["kbps"] for r in front], [r["pesq_median"] for r in front], "o-", color="C0",
            label="hybrid, best at each rate")
    alone = result["neural_alone"]
    ax.plot([r["kbps"] for r in alone], [r["pesq_median"] for r in alone], "s--", color="C3",
            label="neural codec alone (random phase)")
    quality_json = ROOT / "benchmarks/results/quality.json"
    if quality_json.exists():
        report = json.loads(quality_json.read_text())
        for entry in report["results"]:
            if entry["codec"] in ("opus", "codec2"):
                mark = "^" if entry["codec"] == "codec2" else "D"
                ax.plot(entry["mean"]["kbps"], entry["mean"]["pesq_wb"], mark, color="k", ms=6)
                ax.annotate(f"{entry['label']} (mean, all clips)",
                            (entry["mean"]["kbps"], entry["mean"]["pesq_wb"]),
                            textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("kbps (entropy-coded low band + codebooks + gain)")
    ax.set_ylabel("PESQ-WB (median over clips)")
    ax.set_title(f"Low-band waveform + neural codec, step {result['step']}, "
                 f"{len(result['clips'])} dev clips")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
