"""`run.plugins`: modules imported before a job is built, so what they register (a backend, a loss term, a
normaliser) is selectable by name in the same config, in every launched process alike."""

from __future__ import annotations

import importlib


def import_plugins(names: list[str] | tuple[str, ...]) -> None:
    """Import each module of `names` (dotted, importable from the working directory or PYTHONPATH)."""
    for name in names or ():
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"run.plugins: cannot import {name!r} ({exc}); name a module importable from the "
                             "working directory or PYTHONPATH, e.g. mypackage.terms") from None
