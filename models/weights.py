"""Weight files in stock open_clip format: safe reading, strict loading, atomic export, logit_scale shape."""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.io import atomic_path
from engine.safe_load import load_tensor_file, read_torchscript_state_dict
from models import transformers_clip

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# open_clip keeps these 0-dim; make_logit_scale_1d turns them into shape [1] for DeepSpeed.
SCALAR_PARAMS = ("logit_scale", "logit_bias")
# Attribute a ZeRO-3 partitioned SCALAR_PARAMS parameter gets when loaded: its float32 value from the weights file
# (the partition holds the run's precision, e.g. bf16-rounded), so a frozen one is exported as it was loaded.
LOADED_FP32_ATTR = "loaded_fp32"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DeepSpeed engine, torch.compile
_NUM_EXAMPLES = 5  # mismatches listed per kind in error messages
# OpenAI's checkpoints carry these next to the weights; open_clip drops them (factory.load_state_dict).
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
OPENAI_LAYOUTS = ("openai-state-dict", "torchscript")  # layouts only OpenAI's CLIP files use

logger = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """A state dict read from a weights file and the layout it came in."""

    state_dict: dict[str, torch.Tensor]
    layout: str  # "open_clip" | "openai-state-dict" (with OPENAI_METADATA_KEYS) | "torchscript" | "transformers"


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """Whether `path` is a TorchScript archive (a zip with a `code/` folder of TorchScript source)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def weights_layout(path: str | os.PathLike) -> str:
    """The layout of weights file `path` ("open_clip", "openai-state-dict", "torchscript") from its keys
    only (a pickled checkpoint is memory-mapped, not read); read errors are left to the reader."""
    path = Path(path)
    if path.is_dir() and transformers_clip.is_transformers_folder(path):
        return "transformers"
    if path.suffix == ".safetensors":
        return "open_clip"
    if is_torchscript_archive(path):
        return "torchscript"
    try:
        checkpoint = load_tensor_file(path, mmap=True)
    except ValueError:
        try:  # not a zip checkpoint (mmap needs one): read it whole
            checkpoint = load_tensor_file(path)
        except ValueError:
            return "open_clip"  # read_checkpoint reports what is wrong with it
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    has_metadata = isinstance(checkpoint, dict) and any(key in checkpoint for key in OPENAI_METADATA_KEYS)
    return "openai-state-dict" if has_metadata else "open_clip"


def _drop_openai_metadata(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    found = [key for key in OPENAI_METADATA_KEYS if key in state_dict]
    if not found:
        return state_dict, False
    return {key: value for key, value in state_dict.items() if key not in OPENAI_METADATA_KEYS}, True


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors`, an open_clip `.bin`/`.pt` file or an OpenAI TorchScript
    archive, never unpickling objects; OpenAI's metadata entries are dropped."""
    return read_checkpoint(path).state_dict


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """`read_state_dict` plus the layout the file was in (OpenAI layouts imply QuickGELU, OpenAI preprocessing)."""
    path = Path(path)
    if transformers_clip.is_transformers_folder(path):
        return Checkpoint(state_dict=transformers_clip.read_state_dict(path), layout="transformers")
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path}; pass an existing local {'/'.join(WEIGHT_SUFFIXES)} file"
        )
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(
            f"unsupported weights file {path}: expected one of {WEIGHT_SUFFIXES}; "
            "convert it to .safetensors (the state dict of an open_clip model)"
        )
    layout = "open_clip"
    if path.suffix != ".safetensors" and is_torchscript_archive(path):
        checkpoint, layout = read_torchscript_state_dict(path), "torchscript"
    elif path.suffix == ".safetensors":
        try:
            checkpoint = load_file(path, device="cpu")
        except SafetensorError as err:
            raise ValueError(f"cannot read {path} as safetensors ({err}); is the file complete?") from err
    else:
        checkpoint = load_tensor_file(path)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{path} holds no state dict (got {type(checkpoint).__name__})")
    not_tensors = [key for key, value in checkpoint.items()
                   if not isinstance(value, torch.Tensor) or not isinstance(key, str)]
    if not_tensors:
        raise ValueError(
            f"{path} is not a model state dict: entries {not_tensors[:_NUM_EXAMPLES]} are not "
            "name -> tensor; "
            "pass a raw state dict or a checkpoint with a 'state_dict' entry"
        )
    state_dict, had_metadata = _drop_openai_metadata(_strip_wrapper_prefixes(checkpoint))
    if had_metadata and layout == "open_clip":
        layout = "openai-state-dict"
    return Checkpoint(state_dict=state_dict, layout=layout)


def _describe_mismatch(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    missing = [key for key in expected if key not in loaded]
    unexpected = [key for key in loaded if key not in expected]
    wrong_shape = [
        f"{key}: file {list(loaded[key].shape)} vs model {list(expected[key].shape)}"
        for key in expected
        if key in loaded and loaded[key].shape != expected[key].shape
    ]
    parts = [
        f"{len(items)} {kind} (e.g. {', '.join(items[:_NUM_EXAMPLES])})"
        for kind, items in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", wrong_shape))
        if items
    ]
    return "; ".join(parts)


def load_weights(model: torch.nn.Module, path: str | os.PathLike | dict[str, torch.Tensor], *,
                 source: str | os.PathLike | None = None) -> int:
    """Load `path` (or a state dict read from `source`) into the unwrapped `model` strictly;
    `logit_scale` may be 0-dim or [1] on either side. Returns the number of tensors loaded."""
    if isinstance(path, dict):
        state_dict, path = dict(path), source
    else:
        state_dict = read_state_dict(path)
    expected = model.state_dict()
    # Buffers the model rebuilds itself (non-persistent, e.g. attn_mask) are not weights; TorchScript keeps them.
    computed = {name for name, _ in model.named_buffers()} - expected.keys()
    state_dict = {key: value for key, value in state_dict.items() if key not in computed}
    for name in SCALAR_PARAMS:
        in_both = name in state_dict and name in expected
        if in_both and state_dict[name].numel() == expected[name].numel() == 1:
            state_dict[name] = state_dict[name].reshape(expected[name].shape)
    mismatch = _describe_mismatch(state_dict, expected)
    if mismatch:
        raise ValueError(
            f"weights {path} do not match the model architecture: {mismatch}. Fix: build the model with the "
            "architecture the checkpoint was trained as (build_model name=...), or pass the right file"
        )
    model.load_state_dict(state_dict, strict=True)
    return len(state_dict)


def log_loaded_weights(source: str | os.PathLike, arch: str, num_tensors: int, *, into: str = "") -> None:
    """The one line every loader logs for the weights it loaded (all strictly: nothing missing or unexpected)."""
    logger.info("loaded weights %s into %s%s: %d tensors, 0 missing, 0 unexpected", source, into and f"{into} of ",
                arch, num_tensors)


def export_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Atomically write `model`'s (or a full state dict's) weights as stock open_clip `.safetensors`.

    `logit_scale` is written 0-dim as open_clip expects.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path {path} must end in .safetensors (open_clip picks a loader by suffix)")
    tensors = {}
    state_dict = model if isinstance(model, dict) else model.state_dict()
    for key, value in _strip_wrapper_prefixes(state_dict).items():
        if key in SCALAR_PARAMS and value.shape == (1,):
            value = value.reshape(())
        tensors[key] = value.detach().to("cpu").contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})


def make_logit_scale_1d(model: torch.nn.Module) -> None:
    """Re-register 0-dim `logit_scale` (and `logit_bias`, if any) as shape [1], keeping value and grad flag.

    Call before building the optimizer: the old parameter objects are replaced.
    """
    if not isinstance(getattr(model, "logit_scale", None), torch.nn.Parameter):
        raise TypeError(f"{type(model).__name__} has no logit_scale parameter; pass the unwrapped CLIP model")
    for name in SCALAR_PARAMS:
        param = getattr(model, name, None)
        if isinstance(param, torch.nn.Parameter) and param.ndim == 0:
            value = param.detach().reshape(1).clone()
            setattr(model, name, torch.nn.Parameter(value, requires_grad=param.requires_grad))


def temperature(model: torch.nn.Module) -> float:
    """Contrastive temperature tau = 1 / exp(logit_scale) of `model`."""
    logit_scale = getattr(model, "logit_scale", None)
    if hasattr(logit_scale, "ds_id"):  # partitioned by DeepSpeed ZeRO-3: gather it (collective)
        from deepspeed import zero

        loaded = getattr(logit_scale, LOADED_FP32_ATTR, None)
        if loaded is not None:  # the file's value, not the partition's (maybe bf16-rounded) copy
            return float(torch.exp(-loaded.float()).reshape(()))

        with zero.GatheredParameters([logit_scale]):
            return float(torch.exp(-logit_scale.detach().float()).reshape(()))
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1:
        raise ValueError(
            f"{type(model).__name__} has no single-element logit_scale; pass the unwrapped CLIP model "
            "(with ZeRO-3, gather the parameter first)"
        )
    return float(torch.exp(-logit_scale.detach().float()).reshape(()))
