"""Schedules as pure functions: the fine-tuning learning rate and SogCLR's gamma_t."""

from __future__ import annotations

import math


def cosine_lr(step: int, *, base_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up then cosine decay to 0 over `total_steps` (step counts from 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def gamma_at_epoch(epoch: int, *, gamma_min: float, decay_epochs: int) -> float:
    """gamma_t: cosine from 1.0 at epoch 0 down to gamma_min at `decay_epochs`, then constant."""
    if not 0.0 < gamma_min <= 1.0:
        raise ValueError(f"gamma_min must be in (0, 1], got {gamma_min}")
    if decay_epochs <= 0 or epoch >= decay_epochs:
        return gamma_min
    return gamma_min + (1.0 - gamma_min) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs))
