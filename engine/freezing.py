"""What a job does not train, frozen before the backend builds AdamW (which then holds no state for it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from engine.objectives import trained_scalars
from models.towers import lock_tower

if TYPE_CHECKING:
    from engine.config import JobConfig


def freeze_untrained(model: nn.Module, cfg: JobConfig) -> dict[str, list[str]]:
    """Freeze the temperature (TuneCLIP never learns it), a bias unless the objective learns it (SigLIP's loss),
    and the towers of model.lock_image / model.lock_text but their unlocked last groups (open_clip's lock
    methods). Returns the names frozen: "scalars", and per locked tower ("image", "text")."""
    learned = trained_scalars(cfg.surrogate)
    scalars = [name for name, param in model.named_parameters()
               if ("logit_scale" in name or "logit_bias" in name) and name not in learned]
    for name in scalars:
        model.get_parameter(name).requires_grad_(False)
    frozen = {"scalars": scalars}
    for kind, unlocked in cfg.model.locks().items():
        frozen[kind] = lock_tower(model, kind, unlocked=unlocked)
    return frozen
