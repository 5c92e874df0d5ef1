"""A config field with its rules (`setting`), and the check of a section's choice fields."""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from dataclasses import field
from typing import Literal

# What a resumed run may do with a field (metadata "resume"), as docs/configuration.md words it.
RESUME_RULES = {
    "must_match": "must match",  # changes the method or the data order: resuming with another value is refused
    "may_change": "may change",  # where outputs go, logging, evaluation cadence, moved files
    "schedule": "may change (logged)",  # schedule-only settings (e.g. a lower lr after non-finite steps)
    "may_grow": "may only grow (logged)",  # more fine-tuning epochs extend a run; fewer are refused
}
# Whether a field defines the recovered OSR statistics (metadata "osr"): True = its value must match for
# the statistics to be reused (osr.load_from, sweeps); "surrogate" = it does through the OSR surrogate it
# resolves to (`JobConfig.osr_surrogate`), which is what is compared.
OSR_RULES = {True: "yes", "surrogate": "via the OSR surrogate", False: ""}


def setting(default, doc: str, *, resume: str = "must_match", osr: bool | str = False):
    """A config field with its one-line `doc` and rules: `resume` (a key of RESUME_RULES) and `osr` (OSR_RULES)."""
    assert resume in RESUME_RULES and osr in OSR_RULES and doc, (resume, osr, doc)
    metadata = {"doc": doc, "resume": resume, "osr": osr}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _choice_error(where: str, value, choices: tuple) -> str:
    return f"{where} must be one of {choices}, got {value!r}"


def _field_choices(annotation) -> tuple | None:
    """The allowed values of a `Literal` field (also `Literal[...] | None`), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        literals = [a for a in typing.get_args(annotation) if typing.get_origin(a) is Literal]
        return typing.get_args(literals[0]) if literals else None
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def choice_errors(section, name: str) -> list[str]:
    """One line per `Literal` field of dataclass `section` (called `name`) whose value is not one of its choices."""
    out = []
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        choices = _field_choices(hints[f.name])
        value = getattr(section, f.name)
        if choices is not None and value not in choices and value is not None:
            out.append(_choice_error(f"{name}.{f.name}" if name else f.name, value, choices))
    return out
