"""Schedules: the fine-tuning learning rate and SogCLR's gamma_t, against their plain formulas."""

import math
from itertools import pairwise

import pytest

from engine.schedules import cosine_lr, gamma_at_epoch


def test_cosine_lr_schedule():
    assert cosine_lr(0, base_lr=1.0, total_steps=10, warmup_steps=0) == 1.0
    assert cosine_lr(5, base_lr=1.0, total_steps=10, warmup_steps=0) == pytest.approx(0.5)
    assert cosine_lr(0, base_lr=1.0, total_steps=10, warmup_steps=2) == pytest.approx(0.5)
    assert cosine_lr(10, base_lr=1.0, total_steps=10, warmup_steps=0) == pytest.approx(0.0)


def test_gamma_schedule():
    assert gamma_at_epoch(0, gamma_min=0.9, decay_epochs=4) == 1.0
    assert gamma_at_epoch(2, gamma_min=0.9, decay_epochs=4) == pytest.approx(0.95)
    assert gamma_at_epoch(1, gamma_min=0.9, decay_epochs=4) == pytest.approx(
        0.9 + 0.1 * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert gamma_at_epoch(4, gamma_min=0.9, decay_epochs=4) == 0.9
    assert gamma_at_epoch(9, gamma_min=0.9, decay_epochs=4) == 0.9
    assert gamma_at_epoch(0, gamma_min=0.5, decay_epochs=0) == 0.5
    with pytest.raises(ValueError, match="gamma_min"):
        gamma_at_epoch(0, gamma_min=1.5, decay_epochs=4)


def naive_gamma(epoch: int, gamma_min: float, decay_epochs: int) -> float:
    """SPEC.md: cosine from 1.0 down to gamma_min over `decay_epochs`, then constant."""
    if epoch >= decay_epochs:
        return gamma_min
    # Linear interpolation between 1 and gamma_min with a half-cosine weight that goes 1 -> 0.
    weight = (1.0 + math.cos(math.pi * epoch / decay_epochs)) / 2.0
    return weight * 1.0 + (1.0 - weight) * gamma_min


@pytest.mark.parametrize("gamma_min,decay_epochs", [(0.9, 4), (0.2, 7), (1.0, 3), (0.5, 1), (0.01, 20)])
def test_gamma_matches_naive_formula(gamma_min, decay_epochs):
    values = [gamma_at_epoch(e, gamma_min=gamma_min, decay_epochs=decay_epochs) for e in range(decay_epochs + 6)]
    expected = [naive_gamma(e, gamma_min, decay_epochs) for e in range(decay_epochs + 6)]
    assert values == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert values[0] == 1.0  # starts at exactly 1
    assert values[decay_epochs:] == [gamma_min] * 6  # reached at decay_epochs, then constant
    assert all(a >= b for a, b in pairwise(values))  # never increases
    assert all(gamma_min <= v <= 1.0 for v in values)


def test_gamma_midpoint_is_halfway():
    # Half-way through the decay the cosine weight is exactly 1/2: gamma = (1 + gamma_min) / 2.
    assert gamma_at_epoch(3, gamma_min=0.4, decay_epochs=6) == pytest.approx(0.7, abs=1e-12)
    # A cosine, not a linear ramp: a quarter of the way it is above the linear value.
    quarter = gamma_at_epoch(1, gamma_min=0.0001, decay_epochs=4)
    assert quarter == pytest.approx(0.0001 + 0.9999 * (1 + math.sqrt(0.5)) / 2, abs=1e-12)
    assert quarter > 1 - 0.9999 / 4


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.0001])
def test_gamma_min_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="gamma_min must be in"):
        gamma_at_epoch(0, gamma_min=bad, decay_epochs=4)


def naive_cosine_lr(step: int, base_lr: float, total_steps: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("total,warmup", [(10, 0), (20, 5), (8, 3), (100, 1)])
def test_cosine_lr_matches_naive_formula(total, warmup):
    got = [cosine_lr(s, base_lr=3e-4, total_steps=total, warmup_steps=warmup) for s in range(total + 3)]
    want = [naive_cosine_lr(s, 3e-4, total, warmup) for s in range(total + 3)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
    if warmup:
        assert got[warmup - 1] == pytest.approx(3e-4)  # warm-up ends at the base rate
        assert all(a < b for a, b in pairwise(got[:warmup]))
    assert got[total:] == pytest.approx([0.0] * 3, abs=1e-18)  # stays at 0 after the end
