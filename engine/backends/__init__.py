"""The backend registry: the only place a backend is named.

`run.backend` picks an entry (`select_backend`); its `from_config` wraps the model. Built-in backends are
imported on first use (DeepSpeed is slow to import); `register_backend` adds one from anywhere.
"""

from __future__ import annotations

import importlib

_BUILTIN = {
    "single": "engine.backends.single:SingleProcessBackend",
    "deepspeed": "engine.backends.deepspeed:DeepSpeedBackend",
    "fsdp": "engine.backends.fsdp:FSDPBackend",
}
_REGISTERED: dict[str, type] = {}


def register_backend(name: str, backend_class: type) -> None:
    """Make `backend_class` (implementing `engine.backends.base.Backend`) selectable as run.backend=name."""
    _REGISTERED[name] = backend_class


def backend_names() -> tuple[str, ...]:
    """Every selectable run.backend value."""
    return tuple(sorted({*_BUILTIN, *_REGISTERED}))


def backend_class(name: str) -> type:
    """The class registered as `name` (an `engine.backends.base.Backend`)."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise ValueError(f"run.backend: unknown backend {name!r}; use one of {', '.join(backend_names())}")
    module, _, attr = _BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def select_backend(name: str, *, world_size: int) -> type:
    """The backend class for run.backend=`name`, refused when it cannot run `world_size` ranks."""
    cls = backend_class(name)
    if cls.max_ranks is not None and world_size > cls.max_ranks:
        distributed = [n for n in backend_names() if backend_class(n).max_ranks is None]
        raise ValueError(
            f"run.backend={name} cannot run {world_size} ranks; use run.backend={' or '.join(distributed)} "
            "(DeepSpeed: with a zero_configs/*.json as run.zero_config)"
        )
    return cls
