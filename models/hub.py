"""open_clip's `hf-hub:org/name` and `local-dir:path` model names, resolved offline the way open_clip
resolves them (its own parser and file lookups), and export back into the folder form open_clip loads."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import open_clip
import open_clip.factory
import open_clip.pretrained
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
from open_clip.push_to_hf_hub import save_config_for_hf

from engine.io import atomic_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubModel:
    """A model named with an open_clip schema: its config, preprocessing and weights file on disk."""

    name: str  # as given ("hf-hub:org/name", "local-dir:path"); open_clip.create_model(name) rebuilds it
    schema: str  # "hf-hub" | "local-dir"
    model_cfg: dict
    preprocess_cfg: dict
    weights: Path | None


def _read_config(path: Path, name: str) -> dict:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{name}: cannot read {path} ({err}); it must be open_clip's {HF_CONFIG_NAME}") from err
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise ValueError(f"{name}: {path} has no 'model_cfg'; it must be open_clip's {HF_CONFIG_NAME} "
                         "(model_cfg and preprocess_cfg, as open_clip's push_to_hf_hub writes it)")
    return config


def _cache_hint() -> str:
    from huggingface_hub import constants

    return (f"the local Hugging Face cache ({constants.HF_HUB_CACHE}; set HF_HUB_CACHE or HF_HOME to another, "
            "and HF_HUB_OFFLINE=1 on machines without network)")


def resolve_hub_name(name: str) -> HubModel | None:
    """The folder behind an `hf-hub:` / `local-dir:` name (None for a plain architecture name).

    `hf-hub:org/name` is read from the local Hugging Face cache by open_clip's own download function
    (huggingface_hub: HF_HUB_CACHE / HF_HOME; HF_HUB_OFFLINE=1 makes no network request);
    `local-dir:path` from the folder. Both need open_clip_config.json; the weights file is the one
    open_clip would pick.
    """
    schema, identifier = open_clip.factory.parse_model_name(name)
    if schema is None:
        return None
    if schema == "local-dir":
        folder = Path(identifier).expanduser()
        if not (folder / HF_CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{name}: {folder / HF_CONFIG_NAME} not found; a local-dir: folder holds "
                                    f"open_clip's {HF_CONFIG_NAME} and the weights (open_clip_model.safetensors)")
        config = _read_config(folder / HF_CONFIG_NAME, name)
        weights = open_clip.factory._find_checkpoint_in_dir(folder)  # open_clip's choice among the folder's files
    else:
        try:
            config_path = open_clip.pretrained.download_pretrained_from_hf(identifier, filename=HF_CONFIG_NAME)
        except FileNotFoundError:
            raise FileNotFoundError(f"{name}: {HF_CONFIG_NAME} of {identifier} is not in {_cache_hint()}; fetch it "
                                    f"once with `hf download {identifier}` where there is network") from None
        config = _read_config(Path(config_path), name)
        try:
            weights = open_clip.pretrained.download_pretrained_from_hf(identifier)
        except FileNotFoundError:
            weights = None
    return HubModel(name=name, schema=schema, model_cfg=config["model_cfg"],
                    preprocess_cfg=config.get("preprocess_cfg", {}), weights=Path(weights) if weights else None)


def export_local_dir(model, tokenizer, model_cfg: dict, weights: Path, folder: Path) -> Path:
    """Make `folder` loadable as open_clip's `local-dir:folder`: open_clip's config (model and
    preprocessing), the tokenizer's files when it has its own (Hugging Face ones), and `weights`
    (an exported .safetensors, hard-linked where the filesystem allows)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / HF_CONFIG_NAME) as tmp:
        save_config_for_hf(model, Path(tmp), model_config=model_cfg)
    if callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(folder)
    target = folder / HF_SAFE_WEIGHTS_NAME
    with atomic_path(target) as tmp:
        Path(tmp).unlink()
        try:
            os.link(weights, tmp)
        except OSError:  # another filesystem, or no hard links: copy
            shutil.copyfile(weights, tmp)
    return folder
