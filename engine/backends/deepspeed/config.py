"""The DeepSpeed config of a job: a ZeRO file (or dict) with the engine's batch sizes and AdamW settings filled in."""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

from engine.backends.zero_configs import resolve_zero_config
from engine.config import PRECISIONS

ZERO_STAGES = (1, 2, 3)
DEFAULT_ZERO_CONFIG = Path(__file__).resolve().parents[3] / "zero_configs" / "zero2.json"
_ADAM_TYPES = ("adamw", "adam")


def _load_zero_config(zero_config: str | os.PathLike | dict) -> tuple[dict, str]:
    """The config as a fresh dict, and how to name it in error messages."""
    if isinstance(zero_config, dict):
        return copy.deepcopy(zero_config), "the zero_config dict"
    path = resolve_zero_config(zero_config)  # a file, or a shipped config's name (zero2, zero3_bf16, ...)
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from err


def _same(ours, theirs) -> bool:
    if isinstance(ours, (list, tuple)):
        return isinstance(theirs, (list, tuple)) and len(ours) == len(theirs) and all(
            _same(a, b) for a, b in zip(ours, theirs))
    return isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and float(ours) == float(theirs)


def _fill(section: dict, key: str, ours, *, where: str, source: str, fix: str, errors: list[str]) -> None:
    """Set `section[key]` to ours; a different value already there is reported, never overridden."""
    if key in section and not _same(ours, section[key]):
        errors.append(f"{source}: {where}{key} = {section[key]!r} disagrees with the engine's value "
                      f"{ours!r}; {fix}")
    section[key] = list(ours) if isinstance(ours, tuple) else ours


def build_deepspeed_config(
    zero_config: str | os.PathLike | dict,
    *,
    micro_batch_size: int,
    world_size: int,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    grad_clip: float,
    precision: str = "fp32",
) -> dict:
    """The DeepSpeed config dict: the ZeRO file (or dict) with batch sizes and AdamW settings filled in.

    Raises ValueError listing every conflict (file, key, both values, fix), an unsupported ZeRO
    stage or precision, an LR scheduler, or a non-Adam optimizer. The input is not modified.
    """
    cfg, source = _load_zero_config(zero_config)
    errors: list[str] = []
    if micro_batch_size < 1:
        errors.append(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if world_size < 1:
        errors.append(f"world_size must be >= 1, got {world_size}")
    if precision not in PRECISIONS:
        errors.append(f"precision must be one of {PRECISIONS} with DeepSpeed, got {precision!r}")

    zero = cfg.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in ZERO_STAGES:
        errors.append(f"{source}: zero_optimization.stage = {stage!r} is not a supported ZeRO stage; "
                      f"set it to one of {ZERO_STAGES}")
    offload = isinstance(zero, dict) and (zero.get("offload_optimizer") or {}).get("device", "none") != "none"

    batch_fix = ("remove the key from the file: the engine sets batch sizes from data.batch_size and "
                 "the world size")
    for key, ours in (("train_micro_batch_size_per_gpu", micro_batch_size),
                      ("gradient_accumulation_steps", 1),
                      ("train_batch_size", micro_batch_size * world_size)):
        _fill(cfg, key, ours, where="", source=source, fix=batch_fix, errors=errors)
    _fill(cfg, "gradient_clipping", grad_clip, where="", source=source,
          fix="remove the key from the file and set optim.grad_clip instead", errors=errors)

    optimizer = cfg.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": not offload}})
    if str(optimizer.get("type", "")).lower() not in _ADAM_TYPES:
        errors.append(f"{source}: optimizer.type = {optimizer.get('type')!r} is not supported; use \"AdamW\" "
                      "(the method seeds AdamW's moments)")
    params = optimizer.setdefault("params", {})
    if params.get("adam_w_mode") is False:
        errors.append(f"{source}: optimizer.params.adam_w_mode = false gives L2-coupled Adam, whose weight "
                      "decay leaks into the OSR moments; remove the key")
    optim_fix = "remove the key from the file and set it in the optim section of the job config"
    _fill(params, "lr", 0.0, where="optimizer.params.", source=source,
          fix="remove the key from the file: the trainer sets lr every step (optim.lr and its schedule)",
          errors=errors)
    for key, ours in (("betas", tuple(betas)), ("eps", eps), ("weight_decay", weight_decay)):
        _fill(params, key, ours, where="optimizer.params.", source=source, fix=optim_fix, errors=errors)
    if "scheduler" in cfg:
        errors.append(f"{source}: has a \"scheduler\" section; remove it: the trainer drives lr itself "
                      "(a DeepSpeed scheduler would also move lr during OSR)")

    if (cfg.get("fp16") or {}).get("enabled", False):
        errors.append(f"{source}: fp16.enabled = true is not supported; use precision bf16 or fp32")
    bf16_key = "bfloat16" if "bfloat16" in cfg else "bf16"  # DeepSpeed reads either name
    file_bf16 = (cfg.get(bf16_key) or {}).get("enabled")
    if file_bf16 is not None and bool(file_bf16) != (precision == "bf16"):
        errors.append(f"{source}: {bf16_key}.enabled = {str(file_bf16).lower()} disagrees with the engine's "
                      f"precision {precision!r}; pick the matching file (zero*_bf16.json for bf16) or change "
                      "model.precision")
    if precision == "bf16":
        cfg.setdefault(bf16_key, {})["enabled"] = True

    if errors:
        raise ValueError("invalid DeepSpeed config:\n  " + "\n  ".join(errors))
    return cfg


def job_deepspeed_config(zero_config: str | os.PathLike | dict, *, micro_batch_size: int, world_size: int,
                         betas: tuple[float, float], weight_decay: float, eps: float, grad_clip: float,
                         precision: str) -> dict:
    """`build_deepspeed_config`, merged once per job: the backend's model construction and the backend itself
    ask for the same file and settings and get copies of one result (a file edited meanwhile is merged anew)."""
    if isinstance(zero_config, dict):
        return build_deepspeed_config(zero_config, micro_batch_size=micro_batch_size, world_size=world_size,
                                      betas=betas, weight_decay=weight_decay, eps=eps, grad_clip=grad_clip,
                                      precision=precision)
    path = Path(zero_config)
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
    return copy.deepcopy(_merged_file(str(path), stamp, micro_batch_size, world_size, tuple(betas), weight_decay,
                                      eps, grad_clip, precision))


@functools.lru_cache(maxsize=2)
def _merged_file(path: str, stamp, micro_batch_size: int, world_size: int, betas: tuple[float, float],
                 weight_decay: float, eps: float, grad_clip: float, precision: str) -> dict:
    return build_deepspeed_config(path, micro_batch_size=micro_batch_size, world_size=world_size, betas=betas,
                                  weight_decay=weight_decay, eps=eps, grad_clip=grad_clip, precision=precision)
