"""A checkpoint's identity: the open_clip pretrained tag it was trained as selects open_clip's own
pretrained config (mean, std, interpolation, resize mode, QuickGELU), also for weights read from a
local file; explicit fields override it."""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass, field

import open_clip

from engine.config import Interpolation, ResizeMode

logger = logging.getLogger(__name__)

PREPROCESS_FIELDS = ("mean", "std", "interpolation", "resize_mode")  # open_clip PreprocessCfg fields we set
RESIZE_MODES = typing.get_args(ResizeMode)  # open_clip.transform.image_transform_v2's modes
INTERPOLATIONS = typing.get_args(Interpolation)
_QUICKGELU_SUFFIX = "-quickgelu"


@dataclass(frozen=True)
class Preprocessing:
    """Image preprocessing for open_clip (`None` keeps the architecture's default)."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    resize_mode: str | None = None

    def create_kwargs(self) -> dict[str, object]:
        """Keyword arguments of `open_clip.create_model_and_transforms` (image_mean, ...)."""
        return {f"image_{name}": getattr(self, name) for name in PREPROCESS_FIELDS}

    def overridden_by(self, **fields) -> Preprocessing:
        """A copy with every non-None entry of `fields` replacing this one's."""
        values = {name: getattr(self, name) for name in PREPROCESS_FIELDS}
        values.update({name: (tuple(value) if name in ("mean", "std") else value)
                       for name, value in fields.items() if value is not None})
        return Preprocessing(**values)


@dataclass(frozen=True)
class PretrainedIdentity:
    """What the tag says about a checkpoint: its preprocessing and activation."""

    tag: str | None
    reference_model: str | None  # the architecture whose (name, tag) config was read
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    quick_gelu: bool | None = None  # None: no tag, nothing known


def pretrained_cfg(model_name: str, tag: str) -> tuple[str, dict]:
    """(architecture, open_clip pretrained config) for `tag` on `model_name`, or on the closest
    architecture open_clip knows the tag for (a local or tiny config); ValueError for unknown tags."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if cfg:
        return model_name, cfg
    owners = open_clip.list_pretrained_models_by_tag(tag)
    if not owners:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(
            f"model.pretrained_tag {tag!r} is not a pretrained tag open_clip {open_clip.__version__} knows "
            f"(tags for {model_name}: {known or 'none'}; others: openai, webli, laion2b_s34b_b79k, dfn5b, ...); "
            "see open_clip.list_pretrained(), or set model.mean/std/resize_mode/interpolation yourself"
        )
    base = model_name.removesuffix(_QUICKGELU_SUFFIX)
    # Prefer the same architecture family (ViT-B-16 for ViT-B-16-foo), else open_clip's first.
    owner = next((name for name in owners if name.startswith(base)), owners[0])
    logger.warning("pretrained tag %r is not listed for %s; applying the config of (%s, %s)",
                   tag, model_name, owner, tag)
    return owner, open_clip.get_pretrained_cfg(owner, tag)


def identify(model_name: str, tag: str | None) -> PretrainedIdentity:
    """The preprocessing and activation `tag` implies for `model_name` (nothing when `tag` is None)."""
    if tag is None:
        return PretrainedIdentity(tag=None, reference_model=None)
    owner, cfg = pretrained_cfg(model_name, tag)
    mean, std = cfg.get("mean"), cfg.get("std")
    preprocessing = Preprocessing(
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
        interpolation=cfg.get("interpolation"),
        resize_mode=cfg.get("resize_mode"),
    )
    return PretrainedIdentity(tag=tag, reference_model=owner, preprocessing=preprocessing,
                              quick_gelu=bool(cfg.get("quick_gelu", False)))


def check_activation(identity: PretrainedIdentity, *, model_name: str, quick_gelu: bool) -> None:
    """ValueError when the model's activation differs from the one the checkpoint was trained with
    (open_clip only warns; the features would be silently wrong)."""
    if identity.quick_gelu is None or identity.quick_gelu == quick_gelu:
        return
    base = model_name.removesuffix(_QUICKGELU_SUFFIX)
    if identity.quick_gelu:
        suggestion = base + _QUICKGELU_SUFFIX
        if suggestion not in open_clip.list_models():
            suggestion = identity.reference_model
        raise ValueError(
            f"pretrained tag {identity.tag!r} is for checkpoints trained with QuickGELU ({identity.reference_model}), "
            f"but model {model_name!r} uses GELU, which silently computes wrong features; use name={suggestion!r}"
        )
    raise ValueError(
        f"pretrained tag {identity.tag!r} is for checkpoints trained with GELU ({identity.reference_model}), but "
        f"model {model_name!r} uses QuickGELU, which silently computes wrong features; use name={base!r}"
    )
