"""A locked, layer-decayed job run on N real ranks (see harness.py): what each step set as group lrs and which
parameters OSR seeded."""

from __future__ import annotations

from engine.config import load_config
from engine.trainer import Trainer


def _param_groups(backend) -> list[dict]:
    """The param groups the backend's AdamW steps (DeepSpeed: its ZeRO optimizer's, over the flat partitions)."""
    engine = getattr(backend, "engine", None)
    return engine.optimizer.param_groups if engine is not None else backend.optimizer.param_groups


def tune_locked(config: dict) -> dict:
    """`run.py tune` of `config`; returns (schedule lr, [(group lr, group lr_scale)]) of every step, the names whose
    moments OSR seeded and the trained names."""
    trainer = Trainer(load_config(base=config))
    backend, steps, seeded = trainer.backend, [], []
    step, osr = backend.step, trainer.osr

    def recording_step(*, lr, grad_clip=0.0):
        norm = step(lr=lr, grad_clip=grad_clip)
        steps.append((lr, [(group["lr"], group["lr_scale"]) for group in _param_groups(backend)]))
        return norm

    def osr_then_read_moments():
        osr()
        seeded.extend(sorted(backend.full_moments()))  # collective

    backend.step, trainer.osr = recording_step, osr_then_read_moments
    try:
        trainer.tune()
    finally:
        trainer.close()
    trained = sorted(name for name, param in backend.model.named_parameters() if param.requires_grad)
    return {"steps": steps, "seeded": seeded, "trained": trained}
