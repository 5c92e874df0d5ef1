"""Every field of the job by its dotted key ('loss.margin'), and the rules it carries."""

from __future__ import annotations

import dataclasses
import functools
import typing

from engine.config.job import JobConfig


def config_fields(cls: type = JobConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf field of the config tree by its dotted key ('loss.margin'), in declaration order."""
    out = {}
    for f in dataclasses.fields(cls):
        section = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        if section is not None:
            out.update(config_fields(section, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


@functools.cache
def _field_metadata() -> dict[str, typing.Mapping]:
    return {key: f.metadata for key, f in config_fields().items()}


def field_of(key: str) -> str | None:
    """The config field a flattened `key` belongs to ('loss.terms.x' -> 'loss.terms'); None if there is none."""
    fields = _field_metadata()
    while key not in fields and "." in key:
        key = key.rpartition(".")[0]
    return key if key in fields else None


def field_rule(key: str, rule: str):
    """Metadata `rule` ('resume', 'osr', 'doc') of the field at dotted `key`; a key inside a mapping field
    ('loss.terms.x') takes its field's; an unknown key (a removed field) the strict default."""
    fields = _field_metadata()
    while key not in fields and "." in key:
        key = key.rpartition(".")[0]
    return fields[key][rule] if key in fields else {"resume": "must_match", "osr": False, "doc": ""}[rule]


def keys_with(rule: str, *values) -> tuple[str, ...]:
    """The dotted keys whose metadata `rule` is one of `values` ('resume', 'may_change' -> ('run.out_dir', ...))."""
    return tuple(key for key, meta in _field_metadata().items() if meta[rule] in values)
