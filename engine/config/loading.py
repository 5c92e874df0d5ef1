"""A YAML file and `section.key=value` overrides -> a `JobConfig`, each value read by its field's type."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from engine.config.fields import _choice_error
from engine.config.job import JobConfig


class _Text(str):
    """Text typed in an override (`--set key=text`, a CLI flag): read by the field's declared type, never as free YAML."""


@dataclass(frozen=True)
class _Scalar:
    """A number, boolean or date read from a config file, with the text it was written as (`train: 2024_01`)."""

    value: object
    text: str


_NULL_TEXTS = ("", "~", "null", "Null", "NULL")  # YAML's spellings of null; also an override's empty text
_BOOL_TEXTS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


class _SourceLoader(yaml.SafeLoader):
    """YAML as usual, except that numbers, booleans and dates keep the text they were written as (`_Scalar`)."""


def _keep_text(construct):
    return lambda loader, node: _Scalar(construct(loader, node), node.value)


for _tag, _construct in (("int", yaml.SafeLoader.construct_yaml_int), ("float", yaml.SafeLoader.construct_yaml_float),
                         ("bool", yaml.SafeLoader.construct_yaml_bool),
                         ("timestamp", yaml.SafeLoader.construct_yaml_timestamp)):
    _SourceLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _keep_text(_construct))


class _StructureLoader(yaml.SafeLoader):
    """YAML structure only (lists, mappings, quotes): every plain scalar stays text, except null."""


_StructureLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag == "tag:yaml.org,2002:null"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _parse_structure(text: _Text, where: str):
    """An override's list or mapping (`[0.9, 0.98]`, `[{name: x, csv: f}]`), its scalars left as `_Text`."""
    try:
        tree = yaml.load(text, Loader=_StructureLoader)  # a SafeLoader that resolves null only
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{where}: {str(text)!r} is not a YAML list or mapping ({problem})") from None

    def wrap(node):
        if isinstance(node, list):
            return [wrap(v) for v in node]
        if isinstance(node, dict):
            return {wrap(k): wrap(v) for k, v in node.items()}
        return None if node is None else _Text(node)

    return wrap(tree)


def _plain(value):
    """`value` without the markers of where it came from (an untyped leaf keeps override text as text)."""
    if isinstance(value, _Scalar):
        return value.value
    if isinstance(value, _Text):
        return str.__str__(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _coerce(value, annotation, where: str):
    """Convert a value to the field's declared type: override text by that type, YAML values as read.

    A `str` field keeps the text as written (override or file); numbers, booleans and list elements are
    converted per element by their declared type; untyped values (task mappings) are left as they are.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, _Text) and value in _NULL_TEXTS)):
            return None
        non_none = [a for a in args if a is not type(None)]
        for option in non_none[:-1]:  # the first type that takes the value (float | str: numbers stay numbers)
            try:
                return _coerce(value, option, where)
            except ValueError:
                pass
        return _coerce(value, non_none[-1], where)
    container = origin in (list, tuple, dict) or annotation in (list, tuple, dict)
    if isinstance(value, _Text) and container:
        value = _parse_structure(value, where)
    if origin is Literal:
        text = value.text if isinstance(value, _Scalar) else value
        if not isinstance(text, str) or text not in args:
            raise ValueError(_choice_error(where, _plain(text), args))
        return str.__str__(text)
    if annotation is str:
        if isinstance(value, _Scalar):  # `train: 2024_01` in a file: the folder as written, not 202401
            return value.text
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):  # a `base` dict's number: its str
            raise ValueError(f"{where} must be a string, got {value!r}")
        return str.__str__(value) if isinstance(value, str) else str(value)
    if isinstance(value, _Scalar):
        value = value.value
    if annotation is bool:
        if isinstance(value, _Text) and value.lower() in _BOOL_TEXTS:
            return _BOOL_TEXTS[value.lower()]
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {_plain(value)!r}")
    if annotation is int:
        if isinstance(value, _Text):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{where} must be an integer, got {str(value)!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # override text, or YAML 1.1's "1e-5" (no dot), which it reads as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {_plain(value)!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, got {_plain(value)!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or annotation is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {_plain(value)!r}")
        item = args[0] if args else typing.Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {_plain(value)!r}")
        key_type, item = args if args else (typing.Any, typing.Any)
        return {_coerce(k, key_type, where): _coerce(v, item, f"{where}.{_plain(k)}") for k, v in value.items()}
    return _plain(value)


def _fill(instance, values: dict, prefix: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(type(instance))
    names = {f.name for f in dataclasses.fields(instance)}
    for key, value in values.items():
        key = _plain(key)
        where = f"{prefix}{key}"
        if key not in names:
            problems.append(f"unknown key '{where}' (known: {', '.join(sorted(names))})")
            continue
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, _Text):  # --set 'loss={margin: 0.2}': each field still by its type
                try:
                    value = _parse_structure(value, where)
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
            if not isinstance(value, dict):
                problems.append(f"'{where}' must be a mapping of its fields")
                continue
            _fill(current, value, f"{where}.", problems)
            continue
        try:
            setattr(instance, key, _coerce(value, hints[key], where))
        except ValueError as exc:  # the field keeps its default, so its checks report nothing more
            problems.append(str(exc))


def parse_override(text: str) -> tuple[list[str], str]:
    """'loss.margin=0.2' -> (['loss', 'margin'], '0.2'); the field's declared type reads the text later."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), _Text(raw)


def read_yaml(path: str | Path, *, what: str, keep_text: bool = False) -> object:
    """The YAML document in file `path`; a syntax error is a ValueError naming `what`, the file and the line.

    `keep_text`: numbers, booleans and dates also keep their text, which `load_config` gives `str` fields.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        return yaml.load(text, Loader=_SourceLoader) if keep_text else yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{what} {path} is not valid YAML ({problem}{where}); fix the file") from None


def load_config(path: str | None = None, overrides: list[str] | tuple = (), *, base: dict | None = None,
                training: bool = True) -> JobConfig:
    """Build a JobConfig from defaults, an optional `base` dict, a YAML file and overrides.

    Override text is read by the field's declared type (a `str` field keeps it as typed); the file is
    YAML, except that a `str` field given a number, boolean or date takes it as written (`train: 2024_01`).
    `training=False` validates for evaluation only (no training data needed).
    """
    values: dict = {}

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    if base:
        merge(values, base)
    if path:
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = read_yaml(file, what="config file", keep_text=True) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
        merge(values, loaded)
    defaults = JobConfig()
    for text in overrides:
        keys, value = parse_override(text)
        node, default = values, defaults
        for k in keys[:-1]:
            default = getattr(default, k, None) if dataclasses.is_dataclass(default) else None
            # A key inside a mapping field (`loss.terms.toy=0.5`) adds to the mapping it has so far, its default
            # included; the whole field given at once (`loss.terms={toy: 1}`) replaces it.
            node = node.setdefault(k, copy.deepcopy(default) if isinstance(default, dict) else {})
        node[keys[-1]] = value
    cfg = JobConfig()
    problems: list[str] = []
    _fill(cfg, values, "", problems)
    problems.extend(cfg.errors(training=training))
    if problems:
        raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg
