"""Preprocessing presets: match a checkpoint's preprocessing even when its weights come from a local file."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import open_clip

logger = logging.getLogger(__name__)

_QUICKGELU_SUFFIX = "-quickgelu"


@dataclass(frozen=True)
class Preset:
    """Image preprocessing and activation a checkpoint family was trained with."""

    model_name: str  # open_clip architecture of the checkpoint
    pretrained_tag: str  # open_clip pretrained tag whose config is the reference for mean/std/interpolation
    resize_mode: str | None = None  # eval resize mode pinned by us; None takes open_clip's value

    def pretrained_cfg(self) -> dict:
        """open_clip's pretrained config for (`model_name`, `pretrained_tag`)."""
        cfg = open_clip.get_pretrained_cfg(self.model_name, self.pretrained_tag)
        if not cfg:
            raise ValueError(
                f"open_clip {open_clip.__version__} has no pretrained config for "
                f"({self.model_name!r}, {self.pretrained_tag!r}); upgrade open_clip_torch or pass preset=None"
            )
        return cfg

    @property
    def quick_gelu(self) -> bool:
        """Whether the checkpoint was trained with QuickGELU activations."""
        return bool(self.pretrained_cfg().get("quick_gelu", False))

    def preprocess_overrides(self) -> dict[str, object]:
        """Preprocessing fields (mean, std, interpolation, resize_mode); None keeps open_clip's default."""
        cfg = self.pretrained_cfg()
        mean, std = cfg.get("mean"), cfg.get("std")
        return {
            "mean": tuple(mean) if mean is not None else None,
            "std": tuple(std) if std is not None else None,
            "interpolation": cfg.get("interpolation"),
            "resize_mode": self.resize_mode or cfg.get("resize_mode"),
        }


PRESETS: dict[str, Preset] = {
    "dfn5b": Preset("ViT-H-14-quickgelu", "dfn5b", resize_mode="squash"),
    "openai": Preset("ViT-B-16-quickgelu", "openai"),
}


def get_preset(name: str) -> Preset:
    """The preset called `name`; ValueError listing the known ones otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)} (or preset=None)")
    return PRESETS[name]


def check_preset_matches_model(preset_name: str, *, model_name: str, quick_gelu: bool) -> None:
    """Raise if the model's activation differs from the preset's checkpoint; warn if the architecture does."""
    preset = get_preset(preset_name)
    base_name = model_name.removesuffix(_QUICKGELU_SUFFIX)
    if preset.quick_gelu and not quick_gelu:
        suggestion = f"{base_name}{_QUICKGELU_SUFFIX}"
        if suggestion not in open_clip.list_models():
            suggestion = preset.model_name
        raise ValueError(
            f"preset {preset_name!r} is for checkpoints trained with QuickGELU ({preset.model_name}), but "
            f"model {model_name!r} uses GELU, which silently computes wrong features; "
            f"use name={suggestion!r}"
        )
    if quick_gelu and not preset.quick_gelu:
        raise ValueError(
            f"preset {preset_name!r} is for checkpoints trained with GELU ({preset.model_name}), but "
            f"model {model_name!r} uses QuickGELU, which silently computes wrong features; "
            f"use name={base_name!r}"
        )
    if base_name != preset.model_name.removesuffix(_QUICKGELU_SUFFIX):
        logger.warning(
            "preset %r was made for %s; applying its preprocessing to %s",
            preset_name, preset.model_name, model_name,
        )
