"""One job config for the trainer tests: a tiny TuneCLIP run on the shared synthetic shards."""

from __future__ import annotations

import copy
from pathlib import Path


def job(shards: Path, out: Path, **sections) -> dict:
    """A config dict (for `load_config(base=...)`) of a tiny-vit TuneCLIP job; `sections` are merged in:
    a dict value updates that section (`run={"epochs": 2}`), anything else sets the key (`method="fastclip"`)."""
    base = {
        "method": "tuneclip",
        "model": {"name": "tiny-vit"},
        "data": {"train": str(shards), "batch_size": 8, "shuffle_buffer": 8},
        "optim": {"lr": 1e-3},
        "osr": {"epochs": 1},
        "eval": {"at_start": False},
        "run": {"out_dir": str(out), "epochs": 1, "progress": False, "seed": 0},
    }
    return merge(base, **sections)


def merge(config: dict, **sections) -> dict:
    """A copy of `config` with `sections` merged in, as `job` does."""
    config = copy.deepcopy(config)
    for key, value in sections.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


def crash_after(trainer, num_steps: int, error: Exception) -> None:
    """Make `trainer` raise `error` instead of its step after `num_steps` steps of this launch (a crash)."""
    step, calls = trainer.train_step, {"n": 0}

    def crashing_step(*args, **kwargs):
        if calls["n"] == num_steps:
            raise error
        calls["n"] += 1
        return step(*args, **kwargs)

    trainer.train_step = crashing_step


def stop_after(trainer, global_step: int | None) -> None:
    """Make `trainer` stop as by SIGTERM once it reaches `global_step` (the ranks agree, checkpoint and raise
    Preempted); None leaves it running to the end."""
    step = trainer.train_step

    def train_step(*args, **kwargs):
        metrics = step(*args, **kwargs)
        if global_step is not None and trainer.global_step == global_step:
            trainer.stop_requests.request("a test stop")
        return metrics

    trainer.train_step = train_step
