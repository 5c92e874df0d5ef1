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

from models.pretrained import Preprocessing, check_activation, identify
from models.weights import OPENAI_LAYOUTS, load_weights, read_checkpoint

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


def _preprocessing(arch: str, config: dict, tag: str | None, overrides: dict | None) -> Preprocessing:
    """The tag's preprocessing (open_clip's pretrained config) with explicit `overrides` on top."""
    identity = identify(arch, tag)
    check_activation(identity, model_name=arch, quick_gelu=bool(config.get("quick_gelu", False)))
    return identity.preprocessing.overridden_by(**(overrides or {}))


def build_transforms(name: str, *, pretrained_tag: str | None = None,
                     preprocess: dict | None = None) -> tuple[Callable, Callable]:
    """(train, eval) image transforms build_model would return, without instantiating the model."""
    arch, config = _resolve_architecture(name)
    preprocessing = _preprocessing(arch, config, pretrained_tag, preprocess)
    image_size = config["vision_cfg"].get("image_size", 224)

    def transform(is_train: bool) -> Callable:
        return open_clip.image_transform(
            image_size,
            is_train=is_train,
            mean=preprocessing.mean,
            std=preprocessing.std,
            resize_mode=preprocessing.resize_mode,
            interpolation=preprocessing.interpolation,
        )

    return transform(is_train=True), transform(is_train=False)


def build_model(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained_tag: str | None = None,
    preprocess: dict | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    seed: int | None = None,
) -> ClipBundle:
    """Build open_clip model `name` with its transforms and tokenizer; load local `weights` strictly if given.

    `name`: open_clip architecture ("ViT-B-16"), shipped config ("tiny-vit") or JSON config path.
    `pretrained_tag`: the open_clip tag the weights were trained as ("openai", "webli", "dfn5b", ...):
    its pretrained config sets mean, std, interpolation, resize mode and the expected activation.
    Weights in OpenAI's own layouts imply "openai". None (and no OpenAI layout) keeps open_clip defaults.
    `preprocess`: explicit mean / std / interpolation / resize_mode, over the tag's.
    `seed`: seeds the random init without touching the caller's global RNG state.
    """
    if precision not in OPEN_CLIP_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {OPEN_CLIP_PRECISIONS}")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}; pass an existing local file or None")
    arch, config = _resolve_architecture(name)
    checkpoint = read_checkpoint(weights) if weights is not None else None
    if checkpoint is not None and checkpoint.layout in OPENAI_LAYOUTS and pretrained_tag is None:
        pretrained_tag = "openai"  # what open_clip's pretrained="openai" path assumes of these files
        logger.info("%s is in OpenAI's %s layout: preprocessing and activation of pretrained tag 'openai'",
                    weights, checkpoint.layout)
    preprocessing = _preprocessing(arch, config, pretrained_tag, preprocess)
    quiet = _DropRandomInitNotice() if weights is not None else None
    if quiet:
        logging.getLogger().addFilter(quiet)  # weights are loaded below; open_clip cannot know
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model, train_transform, eval_transform = open_clip.create_model_and_transforms(
            arch, precision=precision, device=device, **preprocessing.create_kwargs(),
        )
    if quiet:
        logging.getLogger().removeFilter(quiet)
    if checkpoint is not None:
        try:
            load_weights(model, checkpoint.state_dict, source=weights)
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
