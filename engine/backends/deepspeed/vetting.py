"""Vetting of a DeepSpeed checkpoint folder before DeepSpeed unpickles anything in it."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from engine.safe_load import UnsafeFileError, deepspeed_globals, load_tensor_file

_PARAM_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
# Entries of DeepSpeed's files whose keys (or items) are parameter names: the universal conversion builds
# folder names from them.
_NAME_FIELDS = ("param_shapes", "frozen_param_shapes", "shared_params", "buffer_names", "param_slice_mappings")


def _names_in(value) -> list:
    """Parameter names held by one of `_NAME_FIELDS` (a dict, or a list of dicts / names)."""
    if isinstance(value, dict):
        return [*value.keys(), *(v for v in value.values() if isinstance(v, str))]
    if isinstance(value, (list, tuple)):
        return [name for item in value for name in _names_in(item)] if any(isinstance(v, (dict, list, tuple))
                                                                           for v in value) else list(value)
    return []


def _names_of_file(state) -> list:
    names = []
    if isinstance(state, dict):
        for key, value in state.items():
            if key in _NAME_FIELDS:
                names.extend(_names_in(value))
            elif isinstance(value, dict):
                names.extend(_names_of_file(value))
    return names


def vet_checkpoint_folder(folder: Path, *, expected_names: set[str]) -> None:
    """Refuse a DeepSpeed checkpoint folder before DeepSpeed reads it: a symlink in it, a file that needs more
    than tensors and DeepSpeed's plain-data classes, or a parameter name that is not one of `expected_names`
    (the model's; DeepSpeed's universal conversion turns names into paths)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError(f"{folder} is not a DeepSpeed checkpoint folder of this engine (missing or a symlink)")
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise UnsafeFileError(f"checkpoint {folder} holds a symlink ({path}); this engine writes none: "
                                  "only load checkpoints written by this engine")
        if path.suffix != ".pt":
            continue
        state = load_tensor_file(path, mmap=True, extra_globals=deepspeed_globals())
        for name in _names_of_file(state):
            if not (isinstance(name, str) and _PARAM_NAME.fullmatch(name) and name in expected_names):
                raise UnsafeFileError(f"checkpoint file {path} names parameter {str(name)[:120]!r}, which the model "
                                      "does not have; only load checkpoints this engine wrote for this model")


def read_frozen_values(path: Path, *, expected_numel: dict[str, int]) -> dict[str, Tensor]:
    """The fp32 start values of a checkpoint's frozen parameters (`path`, safetensors), refused before use if it is
    a symlink, unreadable, names a parameter that is not in `expected_numel` (the model's name -> number of
    elements), holds another number of elements or anything but float32."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        raise UnsafeFileError(f"checkpoint file {path} is missing or a symlink; this engine writes a plain file: "
                              "only load checkpoints written by this engine")
    try:
        values = load_file(path, device="cpu")
    except SafetensorError as err:
        raise ValueError(f"cannot read {path} as safetensors ({err}); is the checkpoint complete?") from None
    for name, value in values.items():
        if not (_PARAM_NAME.fullmatch(name) and name in expected_numel):
            raise UnsafeFileError(f"checkpoint file {path} names parameter {name[:120]!r}, which the model does not "
                                  "have; only load checkpoints this engine wrote for this model")
        if value.dtype != torch.float32 or value.numel() != expected_numel[name]:
            raise ValueError(f"checkpoint file {path} holds {name} as {value.numel()} {value.dtype} value(s), not "
                             f"{expected_numel[name]} float32; only load checkpoints this engine wrote for this model")
    return values


def checkpoint_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
