"""Hugging Face transformers `CLIPModel` folders <-> open_clip ViT CLIP: the architecture, the weight names and
the preprocessing, both ways; `SiglipModel` folders go through models/transformers_siglip.py from here. Only
safetensors are read, no code from a folder runs, and `transformers` itself is needed for export only (import
reads JSON and safetensors; a SigLIP folder's tokenizer is read with it)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.io import atomic_path
from models import transformers_siglip

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
INSTALL_HINT = "pip install -e '.[hf]'"
# PIL resampling codes transformers stores -> open_clip interpolation names.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # transformers hidden_act -> open_clip quick_gelu
_LAYER_NORM_EPS = 1e-5  # open_clip's nn.LayerNorm default
# open_clip config entries a transformers CLIPModel can express (anything else has no counterpart).
_VISION_KEYS = {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}


def read_config(folder: str | os.PathLike) -> dict | None:
    """The transformers config.json of `folder` when it is a transformers CLIP/SigLIP model folder, else None."""
    path = Path(folder) / CONFIG_FILE
    if not Path(folder).is_dir() or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} ({err}); a transformers model folder holds its config.json") from None
    if not isinstance(config, dict) or config.get("model_type") not in ("clip", "siglip"):
        return None
    return config


def is_transformers_folder(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a folder holding a transformers CLIPModel / SiglipModel (config.json, model_type)."""
    return path is not None and read_config(path) is not None


def _refuse_unmappable(folder: Path, config: dict) -> None:
    if "auto_map" in config or config.get("trust_remote_code"):
        raise ValueError(f"{folder / CONFIG_FILE} names Python code of its own (auto_map); this engine never runs "
                         "code from a model folder")


def is_siglip(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a transformers SiglipModel (else a CLIPModel, or no transformers folder)."""
    config = read_config(folder)
    return config is not None and config["model_type"] == "siglip"


def open_clip_config(folder: str | os.PathLike) -> dict:
    """The open_clip model config of the transformers CLIPModel / SiglipModel in `folder`; ValueError naming what
    has no open_clip counterpart."""
    folder = Path(folder)
    config = read_config(folder)
    if config is None:
        raise ValueError(f"{folder} is not a transformers CLIPModel / SiglipModel folder (config.json with "
                         "model_type 'clip' or 'siglip')")
    _refuse_unmappable(folder, config)
    if config["model_type"] == "siglip":
        return transformers_siglip.open_clip_config(folder.resolve(), config)
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    acts = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    differs = []
    if len(acts) != 1 or not acts <= _ACTIVATIONS.keys():
        differs.append(f"hidden_act {sorted(acts)} (open_clip: one of {sorted(_ACTIVATIONS)} for both towers)")
    for tower, cfg in (("vision", vision), ("text", text)):
        if cfg.get("layer_norm_eps", _LAYER_NORM_EPS) != _LAYER_NORM_EPS:
            differs.append(f"{tower} layer_norm_eps {cfg['layer_norm_eps']} (open_clip: {_LAYER_NORM_EPS})")
        if cfg.get("hidden_size", 1) % cfg.get("num_attention_heads", 1):
            differs.append(f"{tower} hidden_size not divisible by num_attention_heads")
    vocab = text.get("vocab_size", 49408)
    if text.get("eos_token_id", 2) not in (2, vocab - 1):  # open_clip pools at the largest token id (argmax)
        differs.append(f"text eos_token_id {text['eos_token_id']} (open_clip pools at the largest id, {vocab - 1})")
    if config.get("projection_dim") is None:
        differs.append("no projection_dim")
    if differs:
        raise ValueError(f"{folder}: the transformers CLIPModel does not map onto open_clip: {'; '.join(differs)}")
    width, text_width = vision["hidden_size"], text["hidden_size"]
    return {
        "embed_dim": config["projection_dim"],
        "quick_gelu": _ACTIVATIONS[acts.pop()],
        "vision_cfg": {"image_size": vision["image_size"], "patch_size": vision["patch_size"], "width": width,
                       "layers": vision["num_hidden_layers"],
                       "head_width": width // vision["num_attention_heads"],
                       "mlp_ratio": vision["intermediate_size"] / width},
        "text_cfg": {"context_length": text["max_position_embeddings"], "vocab_size": vocab, "width": text_width,
                     "heads": text["num_attention_heads"], "layers": text["num_hidden_layers"],
                     "mlp_ratio": text["intermediate_size"] / text_width},
    }


def preprocess_config(folder: str | os.PathLike) -> dict:
    """mean / std / interpolation / resize_mode from `folder`'s preprocessor_config.json (empty when absent)."""
    path = Path(folder) / PREPROCESSOR_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} ({err})") from None
    resample = config.get("resample", 3)
    if resample not in _RESAMPLE:
        raise ValueError(f"{path}: resample {resample} has no open_clip interpolation (2 bilinear, 3 bicubic)")
    size, crop = config.get("size"), config.get("crop_size")
    if isinstance(size, dict) and "height" in size and "shortest_edge" not in size:  # SiglipImageProcessor's
        if size.get("height") != size.get("width") or config.get("do_center_crop", False):
            raise ValueError(f"{path}: resize to {size} (and crop) has no open_clip counterpart (it squashes to a "
                             "square of the model's image size)")
        return {"mean": config.get("image_mean"), "std": config.get("image_std"),
                "interpolation": _RESAMPLE[resample], "resize_mode": "squash"}
    shortest = size.get("shortest_edge") if isinstance(size, dict) else size
    crop_edge = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
    if config.get("do_center_crop", True) and shortest is not None and crop_edge != (shortest, shortest):
        raise ValueError(f"{path}: resize to {shortest} then crop {crop_edge} has no open_clip counterpart (it "
                         "resizes the shortest edge to the crop size); set model.resize_mode / the sizes equal")
    return {"mean": config.get("image_mean"), "std": config.get("image_std"),
            "interpolation": _RESAMPLE[resample], "resize_mode": "shortest"}


def _block_names(num_layers: int, hf: str, oc: str) -> list[tuple[str, str]]:
    """(transformers, open_clip) name pairs of one tower's residual blocks, q/k/v aside."""
    pairs = []
    for index in range(num_layers):
        h, o = f"{hf}.encoder.layers.{index}", f"{oc}.transformer.resblocks.{index}"
        for hf_part, oc_part in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            pairs += [(f"{h}.{hf_part}.{kind}", f"{o}.{oc_part}.{kind}") for kind in ("weight", "bias")]
    return pairs


def _name_pairs(oc_config: dict) -> list[tuple[str, str]]:
    """(transformers, open_clip) names of every tensor that maps one to one (q/k/v and projections aside)."""
    pairs = [("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
             ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
             ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
             ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
             ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
             ("logit_scale", "logit_scale")]
    for hf, oc in (("vision_model.pre_layrnorm", "visual.ln_pre"), ("vision_model.post_layernorm", "visual.ln_post"),
                   ("text_model.final_layer_norm", "ln_final")):
        pairs += [(f"{hf}.{kind}", f"{oc}.{kind}") for kind in ("weight", "bias")]
    pairs += _block_names(oc_config["vision_cfg"]["layers"], "vision_model", "visual")
    pairs += _block_names(oc_config["text_cfg"]["layers"], "text_model", "")
    return [(hf, oc.lstrip(".")) for hf, oc in pairs]


def _attention_blocks(oc_config: dict) -> list[tuple[str, str]]:
    return ([(f"vision_model.encoder.layers.{i}.self_attn", f"visual.transformer.resblocks.{i}.attn")
             for i in range(oc_config["vision_cfg"]["layers"])]
            + [(f"text_model.encoder.layers.{i}.self_attn", f"transformer.resblocks.{i}.attn")
               for i in range(oc_config["text_cfg"]["layers"])])


_PROJECTIONS = (("visual_projection.weight", "visual.proj"), ("text_projection.weight", "text_projection"))


def to_open_clip(hf_state: dict[str, torch.Tensor], oc_config: dict, *, source: str = "") -> dict[str, torch.Tensor]:
    """A transformers CLIPModel state dict renamed (q/k/v joined, projections transposed) to open_clip's."""
    hf_state = {key: value for key, value in hf_state.items() if not key.endswith("position_ids")}
    used, out = set(), {}
    try:
        for hf, oc in _name_pairs(oc_config):
            out[oc] = hf_state[hf]
            used.add(hf)
        for hf, oc in _attention_blocks(oc_config):
            for kind in ("weight", "bias"):
                names = [f"{hf}.{part}_proj.{kind}" for part in "qkv"]
                out[f"{oc}.in_proj_{kind}"] = torch.cat([hf_state[name] for name in names])
                used.update(names)
        for hf, oc in _PROJECTIONS:
            out[oc] = hf_state[hf].t().contiguous()
            used.add(hf)
    except KeyError as err:
        raise ValueError(f"{source}: transformers CLIPModel weights lack {err.args[0]}; is the file complete?") from None
    extra = sorted(hf_state.keys() - used)
    if extra:
        raise ValueError(f"{source}: transformers weights {extra[:5]} have no open_clip counterpart "
                         "(a projection bias or another layout); this CLIPModel does not map onto open_clip")
    return out


def from_open_clip(oc_state: dict[str, torch.Tensor], oc_config: dict) -> dict[str, torch.Tensor]:
    """An open_clip ViT CLIP state dict renamed to transformers CLIPModel's (the inverse of `to_open_clip`)."""
    out = {hf: oc_state[oc].reshape(()) if oc == "logit_scale" else oc_state[oc] for hf, oc in _name_pairs(oc_config)}
    for hf, oc in _attention_blocks(oc_config):
        for kind in ("weight", "bias"):
            for part, chunk in zip("qkv", oc_state[f"{oc}.in_proj_{kind}"].chunk(3)):
                out[f"{hf}.{part}_proj.{kind}"] = chunk
    for hf, oc in _PROJECTIONS:
        out[hf] = oc_state[oc].t()
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in out.items()}


def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The open_clip state dict of the transformers CLIPModel / SiglipModel in `folder` (model.safetensors only)."""
    folder = Path(folder)
    config = open_clip_config(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a transformers folder is read from its model.safetensors only "
                                "(save it with save_pretrained(..., safe_serialization=True); .bin is never unpickled)")
    try:
        hf_state = load_file(path, device="cpu")
    except SafetensorError as err:
        raise ValueError(f"cannot read {path} as safetensors ({err}); is the file complete?") from err
    if is_siglip(folder):
        return transformers_siglip.to_open_clip(hf_state, read_config(folder), source=str(path))
    return to_open_clip(hf_state, config, source=str(path))


def transformers_config(oc_config: dict, *, arch: str) -> dict:
    """transformers CLIPConfig arguments for open_clip model config `oc_config`; ValueError when it has none."""
    vision, text = oc_config.get("vision_cfg", {}), oc_config.get("text_cfg", {})
    extra = (sorted(oc_config.keys() - _TOP_KEYS) + [f"vision_cfg.{k}" for k in sorted(vision.keys() - _VISION_KEYS)]
             + [f"text_cfg.{k}" for k in sorted(text.keys() - _TEXT_KEYS)])
    is_vit = "patch_size" in vision and isinstance(vision.get("layers"), int) and "width" in text
    if extra or not is_vit:
        raise ValueError(f"model {arch!r} has no transformers CLIPModel counterpart ({', '.join(extra) or 'not a ViT'}"
                         "); only open_clip ViT CLIP architectures export to transformers")
    act = "quick_gelu" if oc_config.get("quick_gelu") else "gelu"
    width, text_width = vision["width"], text["width"]
    return {
        "projection_dim": oc_config["embed_dim"],
        "vision_config": {"image_size": vision.get("image_size", 224), "patch_size": vision.get("patch_size", 16),
                          "hidden_size": width, "num_hidden_layers": vision["layers"],
                          "num_attention_heads": width // vision.get("head_width", 64),
                          "intermediate_size": int(width * vision.get("mlp_ratio", 4.0)), "hidden_act": act},
        "text_config": {"vocab_size": text.get("vocab_size", 49408), "hidden_size": text_width,
                        "max_position_embeddings": text.get("context_length", 77),
                        "num_attention_heads": text.get("heads", 8), "num_hidden_layers": text["layers"],
                        "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)), "hidden_act": act,
                        "bos_token_id": text.get("vocab_size", 49408) - 2,
                        "eos_token_id": text.get("vocab_size", 49408) - 1, "pad_token_id": 0},
    }


def require_transformers():
    """The `transformers` module, or ValueError with the install line."""
    try:
        import transformers
    except ImportError:
        raise ValueError(f"--format transformers needs the `transformers` package: {INSTALL_HINT}") from None
    return transformers


def _preprocessor(preprocessing, image_size: int) -> dict:
    """CLIPImageProcessor settings equal to open_clip's eval transform (shortest-edge resize, centre crop)."""
    import open_clip

    mode = preprocessing.resize_mode or "shortest"
    interpolation = preprocessing.interpolation or "bicubic"
    if mode != "shortest" or interpolation not in _RESAMPLE.values():
        raise ValueError(f"resize_mode {mode!r} / interpolation {interpolation!r} have no CLIPImageProcessor "
                         "counterpart (it resizes the shortest edge, then crops)")
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
            "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": list(preprocessing.mean or open_clip.OPENAI_DATASET_MEAN),
            "image_std": list(preprocessing.std or open_clip.OPENAI_DATASET_STD),
            "resample": {name: code for code, name in _RESAMPLE.items()}[interpolation]}


def _write_tokenizer(tokenizer, text_cfg: dict, folder: Path) -> bool:
    """vocab.json / merges.txt of open_clip's BPE (the CLIP tokenizer's), when the model uses it; False if not."""
    import open_clip

    if not isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer) or \
            len(tokenizer.encoder) != text_cfg.get("vocab_size", 49408):
        return False
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in tokenizer.encoder.items()}
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": text_cfg.get("context_length", 77),
         "do_lower_case": True, **special}, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return True


def is_siglip_model(model: torch.nn.Module) -> bool:
    """Whether an open_clip model is a SigLIP one (it learns a logit bias), exported as a SiglipModel."""
    return getattr(model, "logit_bias", None) is not None


def export(bundle, state_dict: dict[str, torch.Tensor], folder: str | os.PathLike, *, preprocessing) -> list[str]:
    """Write `folder` for transformers' CLIPModel / CLIPProcessor.from_pretrained (SiglipModel / SiglipProcessor
    for SigLIP models): config.json, model.safetensors, preprocessor_config.json and the tokenizer files of
    open_clip's BPE or of the model's Hugging Face tokenizer. Returns what could not be written."""
    if is_siglip_model(bundle.model):
        return _export_siglip(bundle, state_dict, Path(folder), preprocessing=preprocessing)
    oc_config = bundle.model_cfg
    hf_config = transformers_config(oc_config, arch=bundle.model_name)
    transformers = require_transformers()
    image_size = hf_config["vision_config"]["image_size"]
    processor = _preprocessor(preprocessing, image_size)
    tensors = from_open_clip(state_dict, oc_config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.CLIPConfig(text_config=hf_config["text_config"], vision_config=hf_config["vision_config"],
                                     projection_dim=hf_config["projection_dim"])
    config.architectures = ["CLIPModel"]
    with atomic_path(folder / CONFIG_FILE) as tmp:
        Path(tmp).write_text(config.to_json_string(), encoding="utf-8")
    with atomic_path(folder / PREPROCESSOR_FILE) as tmp:
        Path(tmp).write_text(json.dumps({**processor, "processor_class": "CLIPProcessor"}, indent=2), encoding="utf-8")
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    if _write_tokenizer(bundle.tokenizer, oc_config["text_cfg"], folder):
        return []
    return [f"tokenizer files (model {bundle.model_name!r} does not use open_clip's CLIP BPE with its vocab size)"]


def _export_siglip(bundle, state_dict: dict[str, torch.Tensor], folder: Path, *, preprocessing) -> list[str]:
    import open_clip

    hf_config = transformers_siglip.transformers_config(bundle.model, arch=bundle.model_name)
    transformers = require_transformers()
    image_size = hf_config["vision_config"]["image_size"]
    resample = {name: code for code, name in _RESAMPLE.items()}
    mean = preprocessing.mean or open_clip.OPENAI_DATASET_MEAN
    std = preprocessing.std or open_clip.OPENAI_DATASET_STD
    processor = transformers_siglip.preprocessor(preprocessing, image_size, resample, mean, std)
    if processor is None:  # shortest-edge resize and crop: CLIPImageProcessor's, which SiglipProcessor takes
        processor = _preprocessor(preprocessing, image_size)
    try:
        tensors = transformers_siglip.from_open_clip(state_dict, hf_config["vision_config"]["num_hidden_layers"],
                                                     hf_config["text_config"]["num_hidden_layers"])
    except KeyError as err:
        raise ValueError(f"model {bundle.model_name!r}: the weights lack {err.args[0]}") from None
    folder.mkdir(parents=True, exist_ok=True)
    wrote_tokenizer = transformers_siglip.write_tokenizer(bundle.tokenizer, hf_config["text_config"], folder)
    config = transformers.SiglipConfig(text_config=hf_config["text_config"], vision_config=hf_config["vision_config"])
    config.architectures = ["SiglipModel"]
    with atomic_path(folder / CONFIG_FILE) as tmp:
        Path(tmp).write_text(config.to_json_string(), encoding="utf-8")
    with atomic_path(folder / PREPROCESSOR_FILE) as tmp:
        Path(tmp).write_text(json.dumps({**processor, "processor_class": "SiglipProcessor"}, indent=2),
                             encoding="utf-8")
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    if wrote_tokenizer:
        return []
    return [f"tokenizer files (model {bundle.model_name!r} does not use a Hugging Face tokenizer of its vocab size)"]
