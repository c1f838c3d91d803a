"""The bit bucket behind the encoder's rate cap (streaming/ratecap.py)."""

from __future__ import annotations

import pytest

from streaming.ratecap import BitBudget, fallbacks


def test_fallbacks_go_to_narrower_layouts_widest_first() -> None:
    assert fallbacks(2, (0, 1, 2)) == (2, 1)
    assert fallbacks(1, (0, 1, 2)) == (1,)
    assert fallbacks(2, (0, 2)) == (2,)
    assert fallbacks(0, (0, 1, 2)) == ()


def test_budget_is_a_token_bucket_starting_full() -> None:
    budget = BitBudget(6.0, 20.0, bank_ms=100.0)  # 120 bits a frame, depth 600 bits
    assert budget.allowance() == pytest.approx(720.0)
    budget.spend(720)  # a burst empties the bucket
    assert budget.credit == pytest.approx(0.0)
    budget.spend(100)
    assert budget.credit == pytest.approx(20.0)
    assert budget.allowance() == pytest.approx(140.0)
    budget.spend(140)
    assert budget.credit == pytest.approx(0.0)
    for _ in range(20):  # silence: 21-bit frames bank the rest, up to the bank
        budget.spend(21)
    assert budget.credit == pytest.approx(600.0)
    budget.set_rate(3.0)  # a smaller budget: a smaller bank
    assert budget.bits_per_frame == pytest.approx(60.0) and budget.credit == pytest.approx(300.0)
    budget.spend(300)
    budget.reset()
    assert budget.credit == pytest.approx(300.0) and budget.trimmed == 0
    with pytest.raises(ValueError):
        budget.set_rate(0.0)
