"""open_clip models built on the meta device: shapes without memory, for backends that shard first and load after."""

from __future__ import annotations

import os

import torch
from torch import nn

from models.factory import ClipBundle, resolve_model, weights_loaded_after
from models.weights import SCALAR_PARAMS, _describe_mismatch, read_state_dict


def build_model_on_meta(name: str, *, weights: str | os.PathLike | None = None, pretrained_tag: str | None = None,
                        preprocess: dict | None = None, tokenizer: str | None = None) -> ClipBundle:
    """`build_model(name, ...)` with every parameter and buffer on the meta device (no memory, no values);
    names, tags, preprocessing and tokenizers resolve as in `build_model` (`weights` is not loaded).

    Fill it with `torch.nn.Module.to_empty`, then `init_non_persistent_buffers` and a state dict.
    """
    import open_clip

    spec = resolve_model(name, weights=weights, pretrained_tag=pretrained_tag, preprocess=preprocess,
                         tokenizer=tokenizer)
    train_transform, eval_transform = spec.transforms()
    preprocess_cfg = {key.removeprefix("image_"): value
                      for key, value in spec.preprocessing.create_kwargs().items() if value is not None}
    with torch.device("meta"), weights_loaded_after():  # a meta model has no values: the caller fills them
        model = open_clip.create_model(spec.arch, precision="fp32", device="meta", load_weights=False,
                                       force_preprocess_cfg=preprocess_cfg)
    return ClipBundle(model=model, train_transform=train_transform, eval_transform=eval_transform,
                      tokenizer=spec.tokenizer, model_name=spec.arch, model_cfg=spec.config,
                      preprocessing=spec.preprocessing)


def init_non_persistent_buffers(model: nn.Module) -> None:
    """Recompute the buffers a state dict does not carry (open_clip's causal attention masks) after `to_empty`.

    Raises ValueError for any other non-persistent buffer (its values could not be restored).
    """
    for module_name, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buffer = getattr(module, name)
            if buffer is None:
                continue
            if name != "attn_mask" or buffer.ndim != 2 or buffer.shape[0] != buffer.shape[1]:
                raise ValueError(f"{module_name}.{name}: unknown non-persistent buffer; this model cannot be built "
                                 "on the meta device (load it with its weights instead)")
            # open_clip's causal mask: -inf above the diagonal, 0 elsewhere (build_causal_mask).
            mask = torch.full(buffer.shape, float("-inf"), device=buffer.device, dtype=buffer.dtype).triu_(1)
            setattr(module, name, mask)


def read_matching_state_dict(skeleton: nn.Module, path) -> dict[str, torch.Tensor]:
    """The state dict in weights file `path` (read safely, as `load_weights` does), checked against the keys and
    shapes of `skeleton` (a meta-device model); scalar `logit_scale` / `logit_bias` take the skeleton's shape."""
    state_dict = read_state_dict(path)
    expected = skeleton.state_dict()
    for name in SCALAR_PARAMS:
        if name in state_dict and name in expected and state_dict[name].numel() == expected[name].numel() == 1:
            state_dict[name] = state_dict[name].reshape(expected[name].shape)
    mismatch = _describe_mismatch(state_dict, expected)
    if mismatch:
        raise ValueError(f"weights {path} do not match the model architecture: {mismatch}. Fix: build the model "
                         "with the architecture the checkpoint was trained as (model.name), or pass the right file")
    return state_dict
