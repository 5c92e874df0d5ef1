"""The configuration reference (docs/configuration.md), generated from the fields of engine/config/.

`python -m engine.config_reference > docs/configuration.md`; a test fails when the committed file is out of date.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Literal

from engine.config import OSR_RULES, RESUME_RULES, JobConfig, config_fields


def _type_name(annotation) -> str:
    """A field type as the reference shows it: `int`, `list[float] | null`, `"fp32" | "bf16"`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(f'"{a}"' for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _yaml_value(value) -> str:
    """A default as it is written in a config file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return '""' if value == "" else str(value)


def reference_markdown() -> str:
    """docs/configuration.md: every section and field with its type, default, doc and resume / OSR rule."""
    def cell(text) -> str:  # a table cell: pipes escaped, <out_dir> shown rather than read as HTML
        return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")

    import textwrap

    def prose(text: str) -> str:
        return textwrap.fill(text, width=110, break_long_words=False, break_on_hyphens=False)

    lines = [
        "# Configuration reference",
        "",
        ("<!-- Generated from the fields of engine/config/: python -m engine.config_reference "
         "> docs/configuration.md -->"),
        "",
        prose("A job is configured by a YAML file (`--config`) of these sections, and by overrides "
         "(`--set section.key=value`, or the shortcut flags such as `--out`), which win over the file."),
        "",
        prose("How values are read: an override is read by the field's type. A text field keeps the text exactly as "
         "typed (`--out 0123` is the folder `0123`); integers and numbers are parsed as such; booleans are "
         "`true`/`false` (also `yes`/`no`, `on`/`off`); a field that may be null takes `null`, `~` or empty "
         "text as null; lists are written in YAML flow syntax (`[0.9, 0.98]`) and each element is read by the "
         "element type; a choice must be one of the listed values. A config file is YAML, except that a text "
         "field given a number, boolean or date takes it as written (`train: 2024_01` is the folder `2024_01`)."),
        "",
        prose("Resume: *must match* = resuming a checkpoint with another value is refused; *may change* = free to "
         "change; *(logged)* = a schedule setting whose change is logged; *may only grow* = may be raised, "
         "not lowered. OSR: *yes* = recovered OSR statistics (`osr.load_from`, sweeps) are reused only by a job "
         "with the same value; *via the OSR surrogate* = the field chooses the OSR loss, which must match."),
    ]
    hints = {}
    for key, f in config_fields().items():
        section, _, name = key.rpartition(".")
        if section not in hints:
            cls = type(getattr(JobConfig(), section)) if section else JobConfig
            hints[section] = typing.get_type_hints(cls)
            title = section or "top level"
            doc = (cls.__doc__ or "").strip().splitlines()[0] if section else "The method the job runs."
            lines += ["", f"## {title}", "", doc, "",
                      "| field | type | default | resume | OSR | meaning |", "|---|---|---|---|---|---|"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append("| " + " | ".join(cell(c) for c in (
            f"`{key}`", _type_name(hints[section][name]), f"`{_yaml_value(default)}`",
            RESUME_RULES[f.metadata["resume"]], OSR_RULES[f.metadata["osr"]], f.metadata["doc"])) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
