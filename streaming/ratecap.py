"""A hard cap on an encoder stream's bitrate: a token bucket that trims the low band.

The codebooks of a frame cost a fixed number of bits, but its low band (streaming/lowband.py)
is entropy coded, so its size follows the signal: a loud, bright clip can take 30 % more than a
mode's nominal rate.  `BitBudget` is a token bucket (rate r = the budget, depth b = `bank_ms`
of it, full at the start): every frame earns `bits_per_frame` = r times the frame duration, up
to the depth; a frame spends what it sends and may take its low band only when the bucket
covers it; otherwise the encoder sends fewer codebooks (down to 1), then a narrower layout
(`fallbacks`), then no low band.  Codebooks alone always fit (a mode's rate is codebooks + the
low band's average), so the payload of any run of k frames is at most k * bits_per_frame + b:
a long stream averages at most the budget, and a burst above it is at most `bank_ms` worth.

Trimming costs quality (the frames trimmed are the loud ones).  On 9 dev clips of 4-8 s
(bench_quality's spread) the cap cost 0.09 PESQ-WB at 3 kbps (uncapped 3.41 kbps -> 3.24,
max clip 4.06 -> 3.52) and 0.05 at 6 kbps; sending fewer codebooks before a narrower low band
did better than the reverse (0.014 PESQ-WB at 3 kbps).  The cap is opt-in
(`EncoderStream(rate_cap=True)`, `codec-client encode/call --rate-cap`): for links that
cannot carry a burst.

No I/O, no allocation per frame: the encoder stream owns one and calls `allowance` / `spend`.
"""

from __future__ import annotations

from typing import Final

from streaming.lowband import LAYOUTS, LOWBAND_LAYOUT_NONE

__all__ = ["BANK_MS", "BitBudget", "fallbacks"]

BANK_MS: Final = 1000.0
"""Depth of the bucket, in ms of the budget: the largest burst above the rate."""


class BitBudget:
    """Bits a stream may still spend (see the module docstring).

    * `kbps`: the budget (payload bits per ms); `frame_ms`: frame duration, ms.
    * `bank_ms`: most unspent budget kept, ms of budget.
    """

    __slots__ = ("bank_bits", "bank_ms", "bits_per_frame", "credit", "frame_ms", "trimmed")

    def __init__(self, kbps: float, frame_ms: float, bank_ms: float = BANK_MS) -> None:
        if frame_ms <= 0 or bank_ms < 0:
            raise ValueError("frame_ms must be > 0 and bank_ms >= 0")
        self.frame_ms = frame_ms
        self.bank_ms = bank_ms
        self.bits_per_frame = 0.0
        self.bank_bits = 0.0
        self.credit = 0.0
        """Bits earned and not spent (0 .. bank_bits)."""
        self.trimmed = 0
        """Frames sent with less than their mode to stay within the budget."""
        self.set_rate(kbps)
        self.credit = self.bank_bits  # the bucket starts full

    def set_rate(self, kbps: float) -> None:
        """New budget from the next frame on (what was banked stays, up to the new bank)."""
        if not kbps > 0:
            raise ValueError(f"kbps must be > 0, got {kbps!r}")
        self.bits_per_frame = kbps * self.frame_ms  # kbit/s * ms = bits
        self.bank_bits = kbps * self.bank_ms
        self.credit = min(self.credit, self.bank_bits)

    def allowance(self) -> float:
        """Most bits the next frame may take: its own budget plus the banked credit."""
        return self.credit + self.bits_per_frame

    def spend(self, bits: int, trimmed: bool = False) -> None:
        """A frame of `bits` was sent (more than `allowance()` only for codebooks alone);
        `trimmed`: it carries less than its mode because of the budget."""
        self.credit = min(self.bank_bits, max(0.0, self.credit + self.bits_per_frame - bits))
        self.trimmed += trimmed

    def reset(self) -> None:
        """A full bucket, nothing trimmed (a fresh stream)."""
        self.credit = self.bank_bits
        self.trimmed = 0


def fallbacks(layout_id: int, available: tuple[int, ...]) -> tuple[int, ...]:
    """Layouts to try for a frame of `layout_id`, in order: itself, then every available
    layout with fewer bins (widest first); no low band is the last resort (not listed)."""
    if layout_id == LOWBAND_LAYOUT_NONE:
        return ()
    bins = LAYOUTS[layout_id].bins
    narrower = sorted(
        (i for i in available if i != LOWBAND_LAYOUT_NONE and LAYOUTS[i].bins < bins),
        key=lambda i: -LAYOUTS[i].bins,
    )
    return (layout_id, *narrower)
