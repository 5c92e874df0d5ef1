"""Build an open_clip model by name with matching transforms, tokenizer and local weights."""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from models.presets import check_preset_matches_model, get_preset
from models.weights import (
    load_weights,
)

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
OPEN_CLIP_PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")  # as open_clip.create_model understands them
_REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@dataclass
class ClipBundle:
    """An open_clip model with the transforms and tokenizer that match it."""

    model: torch.nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    model_name: str  # registered open_clip architecture; open_clip.create_model(model_name) rebuilds it


def _read_model_config(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as config_file:
            config = json.load(config_file)
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {path} is not valid JSON: {err}") from err
    missing = [key for key in _REQUIRED_CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise ValueError(
            f"model config {path} lacks {missing}; it must follow open_clip's model_configs/*.json schema "
            "(embed_dim, vision_cfg, text_cfg at the top level)"
        )
    return config


def _register_config_file(path: Path) -> str:
    """Register one JSON model config with open_clip under its file stem; return that name."""
    config = _read_model_config(path)
    registered = open_clip.get_model_config(path.stem)
    if registered == config:
        return path.stem
    if registered is not None:
        raise ValueError(
            f"model config {path} is named like the registered architecture {path.stem!r} but differs "
            "from it; rename the file"
        )
    open_clip.add_model_config(path)
    return path.stem


def register_shipped_configs() -> list[str]:
    """Register models/configs/*.json with open_clip (repeat calls are no-ops); return their names."""
    return [_register_config_file(path) for path in sorted(CONFIG_DIR.glob("*.json"))]


def _resolve_architecture(name: str) -> tuple[str, dict]:
    """Registered open_clip architecture name and config for `name` (architecture, shipped or JSON path)."""
    shipped = register_shipped_configs()
    if ":" in name and not name.endswith(".json"):
        raise ValueError(
            f"model name {name!r} uses an open_clip schema (hf-hub:, local-dir:), which is not supported; "
            "pass the architecture name or JSON config path, and the weights file via weights="
        )
    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"model config file not found: {path}; pass an existing JSON config or an open_clip "
                "architecture name"
            )
        arch = _register_config_file(path)
    else:
        arch = name.replace("/", "-")  # open_clip accepts "ViT-B/16" for "ViT-B-16"
    config = open_clip.get_model_config(arch)
    if config is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        raise ValueError(
            f"unknown model architecture {name!r} (close names: {close}); pass a name from "
            f"open_clip.list_models(), a shipped config {shipped}, or a path to a JSON model config"
        )
    return arch, config


def _preprocess_overrides(arch: str, config: dict, preset: str | None) -> dict[str, object]:
    if preset is None:
        return {}
    check_preset_matches_model(preset, model_name=arch, quick_gelu=bool(config.get("quick_gelu", False)))
    return get_preset(preset).preprocess_overrides()


def build_transforms(name: str, *, preset: str | None = None) -> tuple[Callable, Callable]:
    """(train, eval) image transforms build_model would return, without instantiating the model."""
    arch, config = _resolve_architecture(name)
    overrides = _preprocess_overrides(arch, config, preset)
    image_size = config["vision_cfg"].get("image_size", 224)

    def transform(is_train: bool) -> Callable:
        return open_clip.image_transform(
            image_size,
            is_train=is_train,
            mean=overrides.get("mean"),
            std=overrides.get("std"),
            resize_mode=overrides.get("resize_mode"),
            interpolation=overrides.get("interpolation"),
        )

    return transform(is_train=True), transform(is_train=False)


def build_model(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    preset: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    seed: int | None = None,
) -> ClipBundle:
    """Build open_clip model `name` with its transforms and tokenizer; load local `weights` strictly if given.

    `name`: open_clip architecture ("ViT-B-16"), shipped config ("tiny-vit") or JSON config path.
    `preset`: key of PRESETS whose preprocessing the checkpoint needs; None keeps open_clip defaults.
    `seed`: seeds the random init without touching the caller's global RNG state.
    """
    if precision not in OPEN_CLIP_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {OPEN_CLIP_PRECISIONS}")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}; pass an existing local file or None")
    arch, config = _resolve_architecture(name)
    overrides = _preprocess_overrides(arch, config, preset)
    quiet = _DropRandomInitNotice() if weights is not None else None
    if quiet:
        logging.getLogger().addFilter(quiet)  # weights are loaded below; open_clip cannot know
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model, train_transform, eval_transform = open_clip.create_model_and_transforms(
            arch,
            precision=precision,
            device=device,
            image_mean=overrides.get("mean"),
            image_std=overrides.get("std"),
            image_interpolation=overrides.get("interpolation"),
            image_resize_mode=overrides.get("resize_mode"),
        )
    if quiet:
        logging.getLogger().removeFilter(quiet)
    if weights is not None:
        try:
            load_weights(model, weights)
        except ValueError as err:
            raise ValueError(f"{err} [model was built as {arch!r}]") from err
        logger.info("loaded weights %s into %s", weights, arch)
    return ClipBundle(
        model=model,
        train_transform=train_transform,
        eval_transform=eval_transform,
        tokenizer=open_clip.get_tokenizer(arch),
        model_name=arch,
    )


def features_of(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_features, text_features) from an open_clip forward's dict or tuple output."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"]
    return out[0], out[1]
