"""Reports of a profile: text table (stdout), profile.json, PNG plots, self-contained HTML.

Plots (matplotlib, Agg backend, no display needed):

* `stage_budget.png`: the mouth-to-ear budget as a stacked bar of the stage medians (p50)
  and means, next to the measured end-to-end p50;
* `stage_cdf.png`: the cumulative distribution of every stage and of the end-to-end delay;
* `stage_box.png`: a box plot per stage (whiskers at p1 / p99).

`report.html` embeds the images as base64 data URIs: one file to open or mail.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["format_table", "write_reports"]

IMAGES = ("stage_budget.png", "stage_cdf.png", "stage_box.png")


def _ms(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.1f}"


def format_table(profile: dict[str, Any]) -> str:
    """The stage table and the counters as plain text (ms)."""
    rows = [f"{'stage':<26} {'p50':>7} {'p95':>7} {'p99':>7} {'mean':>7}   (ms)"]
    for s in profile["stages"]:
        rows.append(
            f"{s['label']:<26} {_ms(s['p50']):>7} {_ms(s['p95']):>7} {_ms(s['p99']):>7} "
            f"{_ms(s['mean']):>7}"
        )
    rows.append("-" * 62)
    for label, key in (("sum of stages", "stage_sum"), ("mouth-to-ear (timestamps)", "e2e")):
        d = profile[key]
        rows.append(
            f"{label:<26} {_ms(d['p50']):>7} {_ms(d['p95']):>7} {_ms(d['p99']):>7} "
            f"{_ms(d['mean']):>7}"
        )
    sig = profile["signal"]
    sd = sig["delay_ms"]
    rows.append(
        f"{'mouth-to-ear (signal)':<26} {_ms(sd['p50']):>7} {_ms(sd['p95']):>7} "
        f"{_ms(sd['p99']):>7} {_ms(sd['mean']):>7}"
    )
    res, sres = profile["residual_ms"], sig["residual_ms"]
    rows += [
        "",
        f"residual e2e - sum of stages: mean {_ms(res['mean'])} ms, "
        f"max |.| {_ms(res['max_abs'])} ms",
        f"residual signal - timestamps: median {_ms(sres['median'])} ms, p95 |.| "
        f"{_ms(sres['p95_abs'])} ms over {sig['windows']} windows",
        _counters(profile),
    ]
    return "\n".join(rows)


def _rtf(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "- (on the server)"
    return f"{float(value):.3f}"


def _counters(profile: dict[str, Any]) -> str:
    f, rtf, lag = profile["frames"], profile["rtf"], profile["scheduler"]["tick_lag_ms"]
    return (
        f"frames: sent {f['sent']}, received {f['received']}, played {f['played']}, "
        f"late {f['late']}, lost {f['lost']}, concealed {f['concealed']}, "
        f"comfort noise {f['comfort_noise']}, dropped {f['dropped']}, playback underrun "
        f"{f['playback_underrun_samples']} samples, speaker catch-up dropped "
        f"{f['pcm_dropped_samples']} samples of received PCM\n"
        f"real-time factor: encode {_rtf(rtf['encode'])}, decode {_rtf(rtf['decode'])} per "
        f"stream (compute / audio time); server stage p50 {_rtf(rtf['server_stage_p50'])}\n"
        f"simulated device ticks late: p50 {_ms(lag['p50'])} ms, p95 {_ms(lag['p95'])} ms, "
        f"max {_ms(lag['max'])} ms; clock offset server-client "
        f"{1000 * profile['clock_offset']['seconds']:.2f} ms "
        f"({profile['clock_offset']['method']})"
    )


def _plot_budget(profile: dict[str, Any], path: Path) -> None:
    stages = profile["stages"]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    colors = plt.get_cmap("tab10")
    for row, stat in enumerate(("p50", "mean")):
        left = 0.0
        for i, s in enumerate(stages):
            value = float(s[stat] or 0.0)
            ax.barh(
                row, value, left=left, color=colors(i % 10), label=s["label"] if row == 0 else None
            )
            if value >= 4.0:
                ax.text(
                    left + value / 2,
                    row,
                    f"{value:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white",
                )
            left += value
    e2e = float(profile["e2e"]["p50"] or 0.0)
    ax.axvline(
        e2e, color="black", linestyle="--", linewidth=1, label=f"mouth-to-ear p50 {e2e:.1f} ms"
    )
    ax.set_yticks([0, 1], ["stage p50", "stage mean"])
    ax.set_xlabel("ms")
    ax.set_title("Mouth-to-ear latency budget")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_cdf(profile: dict[str, Any], path: Path) -> None:
    samples = profile["samples"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for s in profile["stages"]:
        values = np.sort(np.asarray(samples[s["key"]], dtype=np.float64))
        if values.size:
            ax.plot(values, np.arange(1, values.size + 1) / values.size, label=s["label"])
    e2e = np.sort(np.asarray(samples["e2e"], dtype=np.float64))
    if e2e.size:
        ax.plot(
            e2e, np.arange(1, e2e.size + 1) / e2e.size, "k--", linewidth=2, label="mouth-to-ear"
        )
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of frames")
    ax.set_title("Per-stage CDF")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_box(profile: dict[str, Any], path: Path) -> None:
    samples = profile["samples"]
    stages = [s for s in profile["stages"] if samples[s["key"]]]
    fig, ax = plt.subplots(figsize=(9, 4))
    data = [np.asarray(samples[s["key"]], dtype=np.float64) for s in stages]
    if data:
        ax.boxplot(data, whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(stages) + 1), [s["key"] for s in stages], rotation=20)
    ax.set_ylabel("ms")
    ax.set_title("Per-stage distribution (box: p25-p75, whiskers: p1-p99)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _html(profile: dict[str, Any], images: dict[str, bytes]) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(s['label'])}</td><td>{esc(s['description'])}</td>"
        f"<td>{_ms(s['p50'])}</td><td>{_ms(s['p95'])}</td><td>{_ms(s['p99'])}</td>"
        f"<td>{_ms(s['mean'])}</td></tr>"
        for s in profile["stages"]
    )
    for label, d in (
        ("<b>sum of stages</b>", profile["stage_sum"]),
        ("<b>mouth-to-ear (timestamps)</b>", profile["e2e"]),
        ("<b>mouth-to-ear (signal)</b>", profile["signal"]["delay_ms"]),
    ):
        rows += (
            f"<tr><td colspan=2>{label}</td><td>{_ms(d['p50'])}</td><td>{_ms(d['p95'])}</td>"
            f"<td>{_ms(d['p99'])}</td><td>{_ms(d['mean'])}</td></tr>"
        )
    figures = "".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"></figure>'
        for name, data in images.items()
    )
    config = esc(json.dumps(profile.get("config", {}), indent=2))
    counters = esc(_counters(profile))
    residuals = esc(format_table(profile).split("\n\n", 1)[-1])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>codecstream latency profile</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child,td:nth-child(2){{text-align:left}}img{{max-width:100%}}
pre{{background:#f4f4f4;padding:8px;overflow-x:auto}}</style></head><body>
<h1>codecstream latency profile</h1>
<p>Mouth-to-ear delay of every played frame split into stages (ms). Stages telescope, so they
add up to the timestamp end-to-end delay; the signal row is measured independently from the
played audio.</p>
<table><tr><th>stage</th><th>spans</th><th>p50</th><th>p95</th><th>p99</th><th>mean</th></tr>
{rows}</table>
<pre>{residuals}</pre>
{figures}
<h2>Counters</h2><pre>{counters}</pre>
<h2>Run</h2><pre>{config}</pre>
</body></html>
"""


def json_ready(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_reports(profile: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write profile.json, the PNG plots and report.html into `out_dir`; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in (*IMAGES, "profile.json", "report.html")}
    _plot_budget(profile, paths["stage_budget.png"])
    _plot_cdf(profile, paths["stage_cdf.png"])
    _plot_box(profile, paths["stage_box.png"])
    paths["profile.json"].write_text(
        json.dumps(json_ready(profile), indent=1, allow_nan=False) + "\n"
    )
    images = {name: paths[name].read_bytes() for name in IMAGES}
    paths["report.html"].write_text(_html(profile, images), encoding="utf-8")
    return paths
