"""The two towers' layer groups as open_clip's lock methods define them: partial freezing (`lock_tower`) and the
depth of every parameter for layer-wise learning-rate decay (`layer_decay_scales`).

open_clip's `lock_image_tower(unlocked_groups)` / `lock_text_tower(unlocked_layers)` freeze a tower except
its last groups (ViT: embeddings, each block, the last block with the final norm, the projection; text:
the same with the token embedding; timm trunks: timm's `group_matcher`; Hugging Face encoders: the
embeddings and each layer). The groups are read by calling those methods, never re-implemented, so
the engine's groups are open_clip's for every family it builds.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass

from torch import nn

# Where towers keep their repeated blocks: open_clip transformers (`resblocks`), timm vision towers such as
# SigLIP's (`trunk.blocks`), Hugging Face text encoders (`encoder.layer` / `layers`).
BLOCK_LISTS = ("resblocks", "blocks", "layer", "layers")
_BLOCK = re.compile(r"(?:^|\.)(?:" + "|".join(BLOCK_LISTS) + r")\.(\d+)\.")


@dataclass(frozen=True)
class Tower:
    """How the model names a tower: its lock method, that method's count argument, and its module prefixes."""

    kind: str  # "image" | "text"
    lock_method: str
    count_arg: str
    prefixes: tuple[str, ...]  # parameters under these belong to the tower even if its lock leaves them alone
    field: str  # the config field of the unlocked count, for messages


TOWERS = {
    "image": Tower("image", "lock_image_tower", "unlocked_groups", ("visual.",), "model.lock_image_unlocked_groups"),
    "text": Tower("text", "lock_text_tower", "unlocked_layers", ("text.",), "model.lock_text_unlocked_layers"),
}


def _lock_call(model: nn.Module, tower: Tower, unlocked: int) -> None:
    """The model's own lock method with `unlocked` last groups left trainable (its prints silenced)."""
    method = getattr(model, tower.lock_method, None)
    if method is None:
        raise ValueError(f"{type(model).__name__} has no {tower.lock_method}(): its {tower.kind} tower cannot be "
                         f"locked; set model.lock_{tower.kind}=false and optim.layer_decay_{tower.kind}=1.0")
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            # open_clip's HF text encoder prints what it unlocks; its timm lock imports a deprecated timm path.
            warnings.filterwarnings("ignore", message="Importing from timm.models.helpers", category=FutureWarning)
            method(**{tower.count_arg: unlocked})
    except (AssertionError, RuntimeError, NotImplementedError) as exc:  # e.g. ModifiedResNet: full lock only
        raise ValueError(f"the {tower.kind} tower of {type(model).__name__} cannot be locked partially "
                         f"({exc or type(exc).__name__}), which {tower.field} > 0 and optim.layer_decay_{tower.kind} "
                         f"< 1 need: use {tower.field}=0 (the whole tower locked) and "
                         f"optim.layer_decay_{tower.kind}=1.0") from None


def lock_groups(model: nn.Module, kind: str) -> list[list[str]]:
    """Tower `kind`'s lock groups, first (embeddings) to last, as parameter names: those its lock method leaves
    trainable with k unlocked groups but not with k - 1. Every parameter's `requires_grad` is restored."""
    tower = TOWERS[kind]
    params = dict(model.named_parameters())
    flags = {name: param.requires_grad for name, param in params.items()}
    groups: list[list[str]] = []
    try:
        frozen = None
        for unlocked in range(len(params) + 2):
            for param in params.values():
                param.requires_grad_(True)
            _lock_call(model, tower, unlocked)
            now = [name for name, param in params.items() if not param.requires_grad]
            if frozen is not None:
                if len(now) >= len(frozen):  # one more unlocked group unlocked nothing
                    raise ValueError(f"the {tower.kind} tower of {type(model).__name__} unlocks nothing more at "
                                     f"{unlocked} groups, so its lock groups cannot be read for {tower.field} or "
                                     f"optim.layer_decay_{tower.kind}; use 0 and 1.0")
                groups.insert(0, [name for name in frozen if name not in set(now)])
            if not now:
                break
            frozen = now
    finally:
        for name, param in params.items():
            param.requires_grad_(flags[name])
    return groups


def lock_tower(model: nn.Module, kind: str, *, unlocked: int) -> list[str]:
    """Freeze tower `kind` except its last `unlocked` lock groups, through the model's lock method; returns the
    names it froze. Raises ValueError when `unlocked` would leave nothing of the tower frozen."""
    tower = TOWERS[kind]
    if unlocked > 0:
        num_groups = len(lock_groups(model, kind))
        if unlocked >= num_groups:
            raise ValueError(f"{tower.field}={unlocked}: the {tower.kind} tower of {type(model).__name__} has "
                             f"{num_groups} lock groups, so nothing would stay frozen; use 0 to "
                             f"{num_groups - 1} or set model.lock_{tower.kind}=false")
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    _lock_call(model, tower, unlocked)
    return [name for name, param in model.named_parameters() if name in trainable and not param.requires_grad]


def tower_depths(model: nn.Module, kind: str) -> tuple[dict[str, int], int]:
    """(name -> depth, L) for tower `kind` with L transformer blocks: embeddings 0, block i its i + 1, and
    everything after the last block (final norm, projection, pooling head) L.

    A lock group's depth is the number of blocks in it and the groups before it, so open_clip's last group
    (the projection) and the one joining the last block with the final norm both sit at L; a tower parameter
    that no lock group holds (a timm trunk's head, a Hugging Face projection, kept trainable by open_clip's
    lock) comes after the blocks, at L.
    """
    tower = TOWERS[kind]
    depths, seen_blocks = {}, set()
    for group in lock_groups(model, kind):
        seen_blocks.update(match.group(1) for name in group if (match := _BLOCK.search(name)))
        depths.update(dict.fromkeys(group, len(seen_blocks)))
    num_blocks = len(seen_blocks)
    for name, _ in model.named_parameters():
        if name not in depths and name.startswith(tower.prefixes):
            depths[name] = num_blocks
    return depths, num_blocks


def layer_decay_scales(model: nn.Module, *, image: float = 1.0, text: float = 1.0) -> dict[str, float]:
    """Parameter name -> learning-rate factor decay ** (L - depth) of each tower whose decay is not 1.0.

    Parameters outside both towers (`logit_scale`, `logit_bias`) are not listed: they keep the base lr,
    as the layers at depth L do.
    """
    scales = {}
    for kind, decay in (("image", image), ("text", text)):
        if decay == 1.0:
            continue
        depths, num_blocks = tower_depths(model, kind)
        scales.update({name: decay ** (num_blocks - depth) for name, depth in depths.items()})
    return scales
