"""Build an open_clip model by name with matching transforms, tokenizer and local weights."""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import open_clip.factory
import torch

from models import transformers_clip, transformers_siglip
from models.hub import HubModel, export_local_dir, resolve_hub_name
from models.pretrained import PREPROCESS_FIELDS, Preprocessing, check_activation, identify
from models.weights import (
    OPENAI_LAYOUTS,
    export_weights,
    load_weights,
    log_loaded_weights,
    read_checkpoint,
    weights_layout,
)

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
OPEN_CLIP_PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")  # as open_clip.create_model understands them
_REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextmanager
def weights_loaded_after(enabled: bool = True) -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" while building a model whose
    weights the caller loads itself afterwards (open_clip cannot know; the loader logs what it loaded)."""
    quiet = _DropRandomInitNotice() if enabled else None
    if quiet:
        logging.getLogger().addFilter(quiet)  # open_clip logs through the root logger
    try:
        yield
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)


@dataclass
class ClipBundle:
    """An open_clip model with the transforms and tokenizer that match it."""

    model: torch.nn.Module
    train_transform: Callable
    eval_transform: Callable
    tokenizer: Callable
    model_name: str  # open_clip architecture or hf-hub:/local-dir: name; open_clip.create_model(model_name) rebuilds it
    model_cfg: dict = field(default_factory=dict)  # the open_clip model config it was built from
    preprocessing: Preprocessing = field(default_factory=Preprocessing)  # what the transforms were built with


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


def _resolve_architecture(name: str) -> tuple[str, dict, HubModel | None]:
    """open_clip name and model config for `name` (architecture, shipped config, JSON path, or an
    `hf-hub:` / `local-dir:` name, which open_clip resolves itself)."""
    shipped = register_shipped_configs()
    if transformers_clip.is_transformers_folder(name):
        return name, *_register_transformers_folder(name)
    hub = resolve_hub_name(name)
    if hub is not None:
        transformers_siglip.register_config_trunk(hub.model_cfg)  # a folder written from an imported SigLIP
        return hub.name, hub.model_cfg, hub
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
            f"open_clip.list_models(), a shipped config {shipped}, a path to a JSON model config, or "
            "hf-hub:org/name / local-dir:path"
        )
    transformers_siglip.register_config_trunk(config)
    return arch, config, None


def _register_transformers_folder(name: str) -> tuple[dict, HubModel]:
    """Register the open_clip config of the transformers CLIPModel / SiglipModel folder `name` with open_clip under
    that name (open_clip has no public way to add a config that is not a file); its weights and preprocessing come
    along (a SigLIP folder's tokenizer too: it is the config's hf_tokenizer_name)."""
    config = transformers_clip.open_clip_config(name)
    if transformers_clip.is_siglip(name):
        transformers_siglip.check_tokenizer(Path(name))
    elif (Path(name) / "vocab.json").is_file():
        logger.info("%s: tokenizing with open_clip's CLIP BPE (the CLIPTokenizer's vocabulary, context length %d), "
                    "not the folder's tokenizer files; model.tokenizer=%s uses those", name,
                    config["text_cfg"]["context_length"], name)
    for key in {name, name.replace("/", "-")}:  # create_model looks `name` up with "/" as "-", get_tokenizer not
        open_clip.factory._MODEL_CONFIGS[key] = config
    hub = HubModel(name=name, schema="transformers", model_cfg=config,
                   preprocess_cfg=transformers_clip.preprocess_config(name), weights=Path(name))
    return config, hub


def _check_transformers_weights(arch: str, config: dict, weights: Path) -> None:
    """ValueError when transformers folder `weights` holds another architecture than model `arch`."""
    if transformers_clip.is_siglip(weights):
        if not transformers_siglip.same_architecture(transformers_clip.open_clip_config(weights), config):
            raise ValueError(f"model.weights {weights} is a transformers SiglipModel of another architecture than "
                             f"{arch!r} (its vision trunk is registered as its own timm model); set model.name to "
                             f"the folder {weights} to build its own architecture")
        return
    folder = transformers_clip.transformers_config(transformers_clip.open_clip_config(weights), arch=str(weights))
    if transformers_clip.transformers_config(config, arch=arch) != folder:
        raise ValueError(f"model.weights {weights} is a transformers CLIPModel of another architecture than "
                         f"{arch!r} (folder: {folder}); set model.name to the folder {weights} "
                         "to build its own architecture")


def _preprocessing(arch: str, config: dict, tag: str | None, overrides: dict | None,
                   hub: HubModel | None = None) -> Preprocessing:
    """The hub folder's preprocessing, the tag's (open_clip's pretrained config) over it, explicit
    `overrides` over both."""
    identity = identify(arch, tag)
    check_activation(identity, model_name=arch, quick_gelu=bool(config.get("quick_gelu", False)))
    base = Preprocessing().overridden_by(**{key: (hub.preprocess_cfg if hub else {}).get(key)
                                            for key in PREPROCESS_FIELDS})
    tagged = base.overridden_by(**{key: getattr(identity.preprocessing, key) for key in PREPROCESS_FIELDS})
    return tagged.overridden_by(**(overrides or {}))


def _uses_hf_tokenizer(arch: str, config: dict) -> bool:
    # open_clip.get_tokenizer: hf_tokenizer_name in text_cfg, else SigLipTokenizer for "siglip" names.
    return bool(config.get("text_cfg", {}).get("hf_tokenizer_name")) or "siglip" in arch.lower()


# HFTokenizer's own options: the only `tokenizer_kwargs` a model config may pass (anything else would reach
# AutoTokenizer.from_pretrained, trust_remote_code included).
TOKENIZER_KWARGS = ("clean", "strip_sep_token", "language")


def _tokenizer_kwargs(arch: str, text_cfg: dict) -> dict:
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    bad = sorted(str(key) for key, value in kwargs.items() if key not in TOKENIZER_KWARGS
                 or not isinstance(value, (str, bool, type(None)))) if isinstance(kwargs, dict) else None
    if bad is None or bad:
        raise ValueError(f"model {arch!r}: text_cfg.tokenizer_kwargs {bad or kwargs!r} not accepted (allowed: "
                         f"{', '.join(TOKENIZER_KWARGS)} with plain values; remote tokenizer code is never run)")
    return kwargs


def _hf_files(source: str | os.PathLike, filename: str) -> Path | None:
    """`filename` of a Hugging Face folder or of a hub id in the local cache (None when absent)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder / filename if (folder / filename).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(source), filename)
    except (ValueError, ImportError):  # not a hub id
        return None
    return Path(found) if isinstance(found, str) else None


def refuse_remote_code(source: str | os.PathLike, *, what: str) -> None:
    """Refuse a Hugging Face folder (or cached hub id) whose config names its own Python code (`auto_map`),
    before transformers reads it."""
    for filename in ("tokenizer_config.json", "config.json"):
        path = _hf_files(source, filename)
        if path is None:
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{what}: cannot read {path} ({err})") from None
        if isinstance(config, dict) and ("auto_map" in config or config.get("trust_remote_code")):
            raise ValueError(f"{what}: {path} names Python code of its own (auto_map); this engine never runs code "
                             "from a model folder. Use a tokenizer/model of a class transformers ships")


def build_tokenizer(arch: str, config: dict, *, source: str | None = None) -> Callable:
    """open_clip's tokenizer for `arch`, or a Hugging Face tokenizer read from `source` (a local folder or
    a hub id, resolved from the local Hugging Face cache when HF_HUB_OFFLINE=1). Hugging Face tokenizers are
    built here, never with remote code: `trust_remote_code=False`, only HFTokenizer's own kwargs, and a folder
    whose config has `auto_map` is refused."""
    text_cfg = config.get("text_cfg", {})
    schema, identifier = open_clip.factory.parse_model_name(arch)
    hf_name = source or text_cfg.get("hf_tokenizer_name")
    if source is None and hf_name and schema == "local-dir":
        hf_name = identifier  # open_clip reads a local-dir model's tokenizer from the folder itself
    uses_hf = source is not None or bool(text_cfg.get("hf_tokenizer_name"))
    if (uses_hf or _uses_hf_tokenizer(arch, config)) and importlib.util.find_spec("transformers") is None:
        raise ValueError(f"model {arch!r} uses the Hugging Face tokenizer {hf_name or arch!r}, which needs the "
                         "`transformers` package: pip install -e '.[siglip]'")
    kwargs = _tokenizer_kwargs(arch, text_cfg)
    try:
        if not uses_hf:
            return open_clip.get_tokenizer(arch)
        refuse_remote_code(hf_name, what=f"tokenizer of model {arch!r}")
        return open_clip.tokenizer.HFTokenizer(
            str(hf_name), context_length=text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH),
            tokenizer_mode=text_cfg.get("tokenizer_mode"), trust_remote_code=False, **kwargs)
    except OSError as err:  # transformers / huggingface_hub: files not found locally (and no network)
        reason = str(err).strip().splitlines()[0]
        raise ValueError(
            f"tokenizer {hf_name or arch!r} of model {arch!r} could not be read ({reason}); put it in the local "
            "Hugging Face cache (HF_HUB_CACHE or HF_HOME, and HF_HUB_OFFLINE=1 without network) or set "
            "model.tokenizer to a folder holding its tokenizer files (tokenizer.json, tokenizer_config.json)"
        ) from err


@dataclass
class ModelSpec:
    """What a model name, weights file and tag resolve to, before any model is instantiated."""

    arch: str  # open_clip name (architecture, or the hf-hub:/local-dir: name)
    config: dict  # its open_clip model config
    weights: Path | None  # the file to load (a hub folder's own when none was given)
    preprocessing: Preprocessing
    tokenizer: Callable

    def transforms(self) -> tuple[Callable, Callable]:
        """(train, eval) image transforms of this preprocessing at the model's image size."""
        image_size = self.config["vision_cfg"].get("image_size", 224)
        return tuple(open_clip.image_transform(
            image_size, is_train=is_train, mean=self.preprocessing.mean, std=self.preprocessing.std,
            resize_mode=self.preprocessing.resize_mode, interpolation=self.preprocessing.interpolation,
        ) for is_train in (True, False))


def resolve_model(name: str, *, weights: str | os.PathLike | None = None, pretrained_tag: str | None = None,
                  preprocess: dict | None = None, tokenizer: str | None = None) -> ModelSpec:
    """Architecture, weights file, preprocessing and tokenizer for `build_model`'s arguments (see there);
    fails fast, before the model is built. Weights in OpenAI's own layouts imply tag "openai"."""
    if weights is not None and not Path(weights).is_file() and not transformers_clip.is_transformers_folder(weights):
        raise FileNotFoundError(f"weights file not found: {weights}; pass an existing local file, a transformers "
                                "CLIPModel / SiglipModel folder or None")
    arch, config, hub = _resolve_architecture(name)
    if weights is not None and transformers_clip.is_transformers_folder(weights) and Path(weights) != Path(arch):
        _check_transformers_weights(arch, config, Path(weights))
    if config.get("text_cfg", {}).get("hf_model_name"):  # a Hugging Face text tower: open_clip builds it by name
        refuse_remote_code(config["text_cfg"]["hf_model_name"], what=f"text encoder of model {arch!r}")
    if weights is None and hub is not None and hub.weights is not None:
        weights = hub.weights  # the file open_clip would load for this name
    layout = weights_layout(weights) if weights is not None else None
    if layout in OPENAI_LAYOUTS and pretrained_tag is None:
        pretrained_tag = "openai"  # what open_clip's pretrained="openai" path assumes of these files
        logger.info("%s is in OpenAI's %s layout: preprocessing and activation of pretrained tag 'openai'",
                    weights, layout)
    return ModelSpec(arch=arch, config=config, weights=Path(weights) if weights is not None else None,
                     preprocessing=_preprocessing(arch, config, pretrained_tag, preprocess, hub),
                     tokenizer=build_tokenizer(arch, config, source=tokenizer))


def build_transforms(name: str, *, pretrained_tag: str | None = None,
                     preprocess: dict | None = None) -> tuple[Callable, Callable]:
    """(train, eval) image transforms build_model would return, without instantiating the model."""
    arch, config, hub = _resolve_architecture(name)
    preprocessing = _preprocessing(arch, config, pretrained_tag, preprocess, hub)
    spec = ModelSpec(arch=arch, config=config, weights=None, preprocessing=preprocessing, tokenizer=None)
    return spec.transforms()


def build_model(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    pretrained_tag: str | None = None,
    preprocess: dict | None = None,
    tokenizer: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    seed: int | None = None,
) -> ClipBundle:
    """Build open_clip model `name` with its transforms and tokenizer; load local `weights` strictly if given.

    `name`: open_clip architecture ("ViT-B-16"), shipped config ("tiny-vit"), JSON config path, or
    "hf-hub:org/name" / "local-dir:path" (config, preprocessing and weights from the local Hugging Face
    cache or the folder, as open_clip reads them; `weights` still overrides the file).
    `pretrained_tag`: the open_clip tag the weights were trained as ("openai", "webli", "dfn5b", ...):
    its pretrained config sets mean, std, interpolation, resize mode and the expected activation.
    Weights in OpenAI's own layouts imply "openai". None (and no OpenAI layout) keeps open_clip defaults.
    `preprocess`: explicit mean / std / interpolation / resize_mode, over the tag's.
    `tokenizer`: a local folder (or hub id) with a Hugging Face tokenizer, instead of the config's.
    `seed`: seeds the random init without touching the caller's global RNG state.
    """
    if precision not in OPEN_CLIP_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {OPEN_CLIP_PRECISIONS}")
    spec = resolve_model(name, weights=weights, pretrained_tag=pretrained_tag, preprocess=preprocess,
                         tokenizer=tokenizer)
    checkpoint = read_checkpoint(spec.weights) if spec.weights is not None else None
    with torch.random.fork_rng(devices=[], enabled=seed is not None), weights_loaded_after(checkpoint is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model, train_transform, eval_transform = open_clip.create_model_and_transforms(
            spec.arch, precision=precision, device=device, load_weights=False, **spec.preprocessing.create_kwargs(),
        )
    if checkpoint is not None:
        try:
            num_tensors = load_weights(model, checkpoint.state_dict, source=spec.weights)
        except ValueError as err:
            raise ValueError(f"{err} [model was built as {spec.arch!r}]") from err
        log_loaded_weights(spec.weights, spec.arch, num_tensors)
    return ClipBundle(
        model=model,
        train_transform=train_transform,
        eval_transform=eval_transform,
        tokenizer=spec.tokenizer,
        model_name=spec.arch,
        model_cfg=spec.config,
        preprocessing=spec.preprocessing,
    )


def features_of(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_features, text_features) from an open_clip forward's dict or tuple output."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"]
    return out[0], out[1]


def logit_bias_of(out) -> torch.Tensor | None:
    """The model's `logit_bias` from an open_clip forward's output (SigLIP models), else None."""
    if isinstance(out, dict):
        return out.get("logit_bias")
    return out[3] if len(out) > 3 else None


def is_stock_architecture(name: str) -> bool:
    """Whether stock open_clip builds `name` from its own model configs (no add_model_config, no folder)."""
    return (Path(open_clip.factory.__file__).parent / "model_configs" / f"{name}.json").is_file()


def export_model(bundle: ClipBundle, weights: torch.nn.Module | dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write `weights` (the bundle's model or a full state dict) where stock open_clip loads them: `path`
    (.safetensors) for `open_clip.create_model(name, pretrained=path)`, and for every model stock open_clip
    cannot build by name (`hf-hub:` / `local-dir:` names, shipped and JSON configs) also the folder `path`
    without suffix (model config, preprocessing, weights), for `open_clip.create_model("local-dir:<folder>")`."""
    path = Path(path)
    export_weights(weights, path)
    if not is_stock_architecture(bundle.model_name):
        folder = export_local_dir(bundle.model, bundle.tokenizer, bundle.model_cfg, path, path.with_suffix(""))
        logger.info("exported %s as local-dir:%s (stock open_clip loads it by that name)", bundle.model_name, folder)
    return path
