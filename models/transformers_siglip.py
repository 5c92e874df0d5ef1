"""Hugging Face transformers `SiglipModel` folders <-> open_clip SigLIP (a timm ViT trunk pooled by its attention
head, open_clip's text tower pooled at the last token): the architecture, the weight names and the preprocessing,
both ways. Only safetensors are read, no code from a folder runs.

The vision tower of an open_clip SigLIP model is a timm model built by name, so an imported folder's trunk is
registered with timm under a name that spells its whole architecture (`siglip_trunk_name`): any process that
resolves the name (ranks, meta builds, a later export) rebuilds the same trunk, with the folder's activation
(transformers' `gelu_pytorch_tanh` is timm's `gelu_tanh`, bit for bit)."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# timm.register_model appends the trunk names it registers to this list (it lists a module's model entry points).
__all__ = ["from_open_clip", "open_clip_config", "register_trunk", "to_open_clip", "transformers_config"]

TRUNK_PREFIX = "tuneclip_siglip_vit"
_TRUNK_NAME = re.compile(TRUNK_PREFIX + r"_i(\d+)_p(\d+)_w(\d+)_d(\d+)_h(\d+)_m(\d+)_(gelu|gelu_tanh)")
# transformers hidden_act -> timm act_layer name (vision) / open_clip nn.GELU kwargs (text)
_VISION_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}
_TEXT_ACTS = {"gelu": None, "gelu_pytorch_tanh": {"approximate": "tanh"}}
_VISION_EPS = 1e-6  # timm ViT's LayerNorm


def siglip_trunk_name(*, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp: int,
                      act: str) -> str:
    """The timm name this module registers for a SigLIP ViT trunk (no class token, attention-pool head)."""
    return f"{TRUNK_PREFIX}_i{image_size}_p{patch_size}_w{width}_d{depth}_h{heads}_m{mlp}_{act}"


def _mlp_ratio(hidden: int, width: int) -> float:
    """A ratio with int(width * ratio) == hidden (what timm and open_clip compute), exact when it can be."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def register_trunk(name: str) -> bool:
    """Register `name` with timm when it is one of this module's trunk names (repeat calls are no-ops);
    whether it is one."""
    match = _TRUNK_NAME.fullmatch(name or "")
    if match is None:
        return False
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(name):
        return True
    image_size, patch_size, width, depth, heads, mlp = map(int, match.groups()[:6])
    args = {"img_size": image_size, "patch_size": patch_size, "embed_dim": width, "depth": depth, "num_heads": heads,
            "mlp_ratio": _mlp_ratio(mlp, width), "class_token": False, "global_pool": "map",
            "act_layer": match.group(7)}

    def create(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        if pretrained:
            raise ValueError(f"timm model {name} has no pretrained weights (the engine loads them from the folder)")
        return VisionTransformer(**{**args, **kwargs})

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    register_model(create)
    return True


def register_config_trunk(config: dict) -> None:
    """Register the trunk an open_clip model config names, when it is one of this module's (a `local-dir:`
    folder written from an imported SigLIP model names one)."""
    register_trunk((config.get("vision_cfg") or {}).get("timm_model_name"))


def _tokenizer_kwargs(folder: Path) -> dict:
    """HFTokenizer's cleaning as transformers' tokenizer of the folder does it: SiglipTokenizer canonicalizes
    (punctuation removed), a plain fast tokenizer leaves the text to its own normalizer."""
    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} ({err})") from None
    return {"clean": "canonicalize"} if str(config.get("tokenizer_class", "")).startswith("Siglip") else {}


def check_tokenizer(folder: Path) -> None:
    """ValueError when the folder's tokenizer cannot be read here: files missing, or only a sentencepiece model
    and no `sentencepiece` package."""
    import importlib.util

    if (folder / "tokenizer.json").is_file():
        return
    if (folder / "spiece.model").is_file():
        if importlib.util.find_spec("sentencepiece") is None:
            raise ValueError(f"{folder}: its tokenizer is spiece.model (SiglipTokenizer), which needs the "
                             "`sentencepiece` package: pip install sentencepiece (or add the folder's tokenizer.json)")
        return
    raise ValueError(f"{folder}: no tokenizer files (tokenizer.json or spiece.model); save the SiglipProcessor / "
                     "tokenizer into the folder, or set model.tokenizer to a folder holding them")


def open_clip_config(folder: Path, config: dict) -> dict:
    """The open_clip model config of the transformers SiglipModel `config` (read from `folder`), its vision
    trunk registered with timm; ValueError naming everything without an open_clip counterpart."""
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    width, text_width = vision.get("hidden_size", 768), text.get("hidden_size", 768)
    vision_act, text_act = vision.get("hidden_act", "gelu_pytorch_tanh"), text.get("hidden_act", "gelu_pytorch_tanh")
    image_size, patch_size = vision.get("image_size", 224), vision.get("patch_size", 16)
    differs = []
    if vision_act not in _VISION_ACTS:
        differs.append(f"vision hidden_act {vision_act!r} (open_clip: one of {sorted(_VISION_ACTS)})")
    if text_act not in _TEXT_ACTS:
        differs.append(f"text hidden_act {text_act!r} (open_clip: one of {sorted(_TEXT_ACTS)})")
    if not vision.get("vision_use_head", True):
        differs.append("vision_use_head false (open_clip's SigLIP pools with the attention head)")
    if vision.get("layer_norm_eps", _VISION_EPS) != _VISION_EPS:
        differs.append(f"vision layer_norm_eps {vision['layer_norm_eps']} (timm's ViT: {_VISION_EPS})")
    if vision.get("num_channels", 3) != 3:
        differs.append(f"vision num_channels {vision['num_channels']} (open_clip: 3)")
    if image_size % patch_size:
        differs.append(f"image_size {image_size} not a multiple of patch_size {patch_size}")
    for tower, cfg, hidden in (("vision", vision, width), ("text", text, text_width)):
        if hidden % cfg.get("num_attention_heads", 12):
            differs.append(f"{tower} hidden_size not divisible by num_attention_heads")
    projection = text.get("projection_size") or text_width
    if projection != width:
        differs.append(f"text projection_size {projection} != vision hidden_size {width} (open_clip: one embed_dim)")
    if differs:
        raise ValueError(f"{folder}: the transformers SiglipModel does not map onto open_clip: {'; '.join(differs)}")
    trunk = siglip_trunk_name(image_size=image_size, patch_size=patch_size, width=width,
                              depth=vision.get("num_hidden_layers", 12), heads=vision.get("num_attention_heads", 12),
                              mlp=vision.get("intermediate_size", 3072), act=_VISION_ACTS[vision_act])
    register_trunk(trunk)
    text_cfg = {"context_length": text.get("max_position_embeddings", 64), "vocab_size": text.get("vocab_size", 32000),
                "hf_tokenizer_name": str(folder), "width": text_width, "heads": text.get("num_attention_heads", 12),
                "layers": text.get("num_hidden_layers", 12),
                "mlp_ratio": _mlp_ratio(text.get("intermediate_size", 3072), text_width),
                "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                "norm_kwargs": {"eps": text.get("layer_norm_eps", 1e-6)}}
    if _tokenizer_kwargs(folder):
        text_cfg["tokenizer_kwargs"] = _tokenizer_kwargs(folder)
    if _TEXT_ACTS[text_act] is not None:
        text_cfg["act_kwargs"] = _TEXT_ACTS[text_act]
    return {"embed_dim": width, "init_logit_bias": -10, "custom_text": True,
            "vision_cfg": {"image_size": image_size, "timm_model_name": trunk, "timm_model_pretrained": False,
                           "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": text_cfg}


def same_architecture(a: dict, b: dict) -> bool:
    """Whether two open_clip configs build the same SigLIP model (where the tokenizer is read from aside)."""
    def strip(config: dict) -> dict:
        text = {k: v for k, v in config.get("text_cfg", {}).items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")}
        return {**config, "text_cfg": text}

    return strip(a) == strip(b)


def _pairs(prefix_hf: str, prefix_oc: str, parts) -> list[tuple[str, str]]:
    return [(f"{prefix_hf}.{hf}.{kind}", f"{prefix_oc}.{oc}.{kind}") for hf, oc in parts for kind in ("weight", "bias")]


def _name_pairs(vision_layers: int, text_layers: int) -> list[tuple[str, str]]:
    """(transformers, open_clip) names of every tensor that maps one to one (fused q/k/v and reshapes aside)."""
    v, t = "vision_model", "text_model"
    pairs = [(f"{v}.embeddings.patch_embedding.weight", "visual.trunk.patch_embed.proj.weight"),
             (f"{v}.embeddings.patch_embedding.bias", "visual.trunk.patch_embed.proj.bias"),
             (f"{v}.head.probe", "visual.trunk.attn_pool.latent"),
             (f"{t}.embeddings.token_embedding.weight", "text.token_embedding.weight"),
             (f"{t}.embeddings.position_embedding.weight", "text.positional_embedding")]
    pairs += _pairs(v, "visual.trunk", [("post_layernorm", "norm"), ("head.attention.out_proj", "attn_pool.proj"),
                                        ("head.layernorm", "attn_pool.norm"), ("head.mlp.fc1", "attn_pool.mlp.fc1"),
                                        ("head.mlp.fc2", "attn_pool.mlp.fc2")])
    pairs += _pairs(t, "text", [("final_layer_norm", "ln_final"), ("head", "text_projection")])
    for index in range(vision_layers):
        pairs += _pairs(f"{v}.encoder.layers.{index}", f"visual.trunk.blocks.{index}",
                        [("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
                         ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")])
    for index in range(text_layers):
        pairs += _pairs(f"{t}.encoder.layers.{index}", f"text.transformer.resblocks.{index}",
                        [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")])
    return pairs


def _fused(vision_layers: int, text_layers: int) -> list[tuple[list[str], str]]:
    """([transformers q, k, v names], open_clip fused name) of every attention's input projection."""
    fused = []
    for kind in ("weight", "bias"):
        fused += [([f"vision_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv"],
                   f"visual.trunk.blocks.{i}.attn.qkv.{kind}") for i in range(vision_layers)]
        fused += [([f"text_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv"],
                   f"text.transformer.resblocks.{i}.attn.in_proj_{kind}") for i in range(text_layers)]
    return fused


def _layers(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({match.group(1) for key in state if (match := pattern.match(key))})


def to_open_clip(hf_state: dict[str, torch.Tensor], config: dict, *, source: str = "") -> dict[str, torch.Tensor]:
    """A transformers SiglipModel state dict renamed to open_clip's SigLIP (q/k/v joined, the head's in-projection
    split into timm's q and kv, positions and scalars reshaped)."""
    hf_state = {key: value for key, value in hf_state.items() if not key.endswith("position_ids")}
    vision_layers = (config.get("vision_config") or {}).get("num_hidden_layers", 12)
    text_layers = (config.get("text_config") or {}).get("num_hidden_layers", 12)
    used, out = set(), {}
    try:
        for hf, oc in _name_pairs(vision_layers, text_layers):
            out[oc] = hf_state[hf]
            used.add(hf)
        for names, oc in _fused(vision_layers, text_layers):
            out[oc] = torch.cat([hf_state[name] for name in names])
            used.update(names)
        position = hf_state["vision_model.embeddings.position_embedding.weight"]
        out["visual.trunk.pos_embed"] = position.unsqueeze(0)
        width = position.shape[-1]
        for kind in ("weight", "bias"):
            joined = hf_state[f"vision_model.head.attention.in_proj_{kind}"]
            out[f"visual.trunk.attn_pool.q.{kind}"], out[f"visual.trunk.attn_pool.kv.{kind}"] = \
                joined[:width], joined[width:]
            used.add(f"vision_model.head.attention.in_proj_{kind}")
        for name in ("logit_scale", "logit_bias"):
            out[name] = hf_state[name].reshape(())
        used.update(("vision_model.embeddings.position_embedding.weight", "logit_scale", "logit_bias"))
    except KeyError as err:
        raise ValueError(f"{source}: transformers SiglipModel weights lack {err.args[0]}; is the file complete?") from None
    extra = sorted(hf_state.keys() - used)
    if extra:
        raise ValueError(f"{source}: transformers weights {extra[:5]} have no open_clip counterpart; this "
                         "SiglipModel does not map onto open_clip")
    return {key: value.contiguous() for key, value in out.items()}


def from_open_clip(oc_state: dict[str, torch.Tensor], vision_layers: int, text_layers: int) -> dict[str, torch.Tensor]:
    """An open_clip SigLIP state dict renamed to transformers SiglipModel's (the inverse of `to_open_clip`);
    KeyError for a missing tensor."""
    out = {hf: oc_state[oc] for hf, oc in _name_pairs(vision_layers, text_layers)}
    for names, oc in _fused(vision_layers, text_layers):
        for name, chunk in zip(names, oc_state[oc].chunk(3)):
            out[name] = chunk
    out["vision_model.embeddings.position_embedding.weight"] = oc_state["visual.trunk.pos_embed"][0]
    for kind in ("weight", "bias"):
        out[f"vision_model.head.attention.in_proj_{kind}"] = torch.cat(
            [oc_state[f"visual.trunk.attn_pool.q.{kind}"], oc_state[f"visual.trunk.attn_pool.kv.{kind}"]])
    for name in ("logit_scale", "logit_bias"):
        out[name] = oc_state[name].reshape(1)
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in out.items()}


def mapped_open_clip_names(vision_layers: int, text_layers: int) -> set[str]:
    """The open_clip tensor names a transformers SiglipModel has counterparts for."""
    names = {oc for _, oc in _name_pairs(vision_layers, text_layers)} | {oc for _, oc in _fused(vision_layers, text_layers)}
    return names | {"visual.trunk.pos_embed", "logit_scale", "logit_bias"} | {
        f"visual.trunk.attn_pool.{part}.{kind}" for part in ("q", "kv") for kind in ("weight", "bias")}


def _gelu_kind(module: torch.nn.Module) -> str | None:
    """transformers hidden_act of a GELU module (exact or tanh), None for any other activation."""
    from timm.layers import activations

    if isinstance(module, activations.GELUTanh):
        return "gelu_pytorch_tanh"
    if isinstance(module, activations.GELU):
        return "gelu"
    if type(module) is torch.nn.GELU:
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(module.approximate)
    return None


def transformers_config(model: torch.nn.Module, *, arch: str) -> dict:
    """transformers SiglipConfig arguments for the open_clip SigLIP `model` (read from its modules, as the vision
    trunk is a timm model); ValueError naming what has no SiglipModel counterpart."""
    def refuse(why: str) -> ValueError:
        return ValueError(f"model {arch!r} has no transformers SiglipModel counterpart ({why}); only SigLIP "
                          "models with a plain timm ViT trunk (no class or register tokens, attention-pool head) "
                          "and open_clip's text tower pooled at the last token export to transformers")

    trunk, text = getattr(model.visual, "trunk", None), getattr(model, "text", None)
    if trunk is None or text is None or not hasattr(trunk, "patch_embed") or getattr(trunk, "attn_pool", None) is None:
        raise refuse("not a timm ViT trunk with an attention-pool head and an open_clip text tower")
    state = model.state_dict()
    vision_layers, text_layers = len(trunk.blocks), len(text.transformer.resblocks)
    extra = sorted({re.sub(r"\.\d+\.", ".N.", key) for key in state.keys() - mapped_open_clip_names(vision_layers,
                                                                                                   text_layers)})
    if extra:
        raise refuse("no counterpart for " + ", ".join(extra[:6]))
    block, resblock = trunk.blocks[0], text.transformer.resblocks[0]
    acts = {"vision": _gelu_kind(block.mlp.act), "text": _gelu_kind(resblock.mlp.gelu)}
    why = [f"{tower} activation {type(m).__name__}" for tower, m in
           (("vision", block.mlp.act), ("text", resblock.mlp.gelu)) if acts[tower] is None]
    if _gelu_kind(trunk.attn_pool.mlp.act) != acts["vision"]:
        why.append("attention-pool activation differs from the blocks'")
    norms = [m for m in trunk.modules() if isinstance(m, torch.nn.LayerNorm)]
    if any(m.eps != norms[0].eps for m in norms):
        why.append("vision LayerNorms of several eps")
    if (getattr(text, "pool_type", None) != "last" or text.attn_mask is not None or text.cls_emb is not None
            or getattr(text, "use_pad_mask", False)):
        why.append(f"text pooling {getattr(text, 'pool_type', None)!r} / causal mask (SiglipModel: last token, "
                   "no mask)")
    if getattr(trunk.attn_pool, "latent_len", 1) != 1 or trunk.attn_pool.pos_embed is not None:
        why.append("attention pool with several latents or its own position embedding")
    if why:
        raise refuse("; ".join(why))
    patch = trunk.patch_embed.proj.weight.shape[-1]
    grid = math.isqrt(trunk.pos_embed.shape[1])
    width, text_width = trunk.embed_dim, text.width
    return {
        "vision_config": {"image_size": grid * patch, "patch_size": patch, "hidden_size": width,
                          "num_hidden_layers": vision_layers, "num_attention_heads": block.attn.num_heads,
                          "intermediate_size": block.mlp.fc1.out_features, "hidden_act": acts["vision"],
                          "layer_norm_eps": norms[0].eps},
        "text_config": {"vocab_size": text.vocab_size, "hidden_size": text_width,
                        "max_position_embeddings": text.context_length, "num_attention_heads": text.heads,
                        "num_hidden_layers": text_layers, "intermediate_size": resblock.mlp.c_fc.out_features,
                        "hidden_act": acts["text"], "layer_norm_eps": text.ln_final.eps,
                        "projection_size": text.text_projection.out_features},
    }


def preprocessor(preprocessing, image_size: int, resample: dict[str, int], mean, std) -> dict | None:
    """SiglipImageProcessor settings equal to open_clip's eval transform when it squashes (resize to the image
    size, no crop); None for another resize mode."""
    if (preprocessing.resize_mode or "shortest") != "squash":
        return None
    interpolation = preprocessing.interpolation or "bicubic"
    if interpolation not in resample:
        raise ValueError(f"interpolation {interpolation!r} has no SiglipImageProcessor counterpart "
                         f"({', '.join(resample)})")
    return {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
            "size": {"height": image_size, "width": image_size}, "resample": resample[interpolation],
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": list(mean), "image_std": list(std)}


def write_tokenizer(tokenizer, text_config: dict, folder: Path) -> bool:
    """The Hugging Face tokenizer open_clip wraps (HFTokenizer), saved into `folder` with its pad / eos ids set
    in `text_config`; False when the model tokenizes otherwise."""
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is None or not hasattr(inner, "save_pretrained") or len(inner) > text_config["vocab_size"]:
        return False
    inner.save_pretrained(folder)
    text_config.update(pad_token_id=inner.pad_token_id, eos_token_id=inner.eos_token_id, bos_token_id=inner.bos_token_id)
    return True
