"""open_clip model construction, pretrained-tag preprocessing, safe weight loading and export."""

from models.factory import (
    CONFIG_DIR,
    OPEN_CLIP_PRECISIONS,
    ClipBundle,
    build_model,
    build_tokenizer,
    build_transforms,
    export_model,
    features_of,
    logit_bias_of,
    register_shipped_configs,
)
from models.hub import HubModel, resolve_hub_name
from models.pretrained import Preprocessing, PretrainedIdentity, identify
from models.weights import (
    Checkpoint,
    export_weights,
    load_weights,
    make_logit_scale_1d,
    read_checkpoint,
    read_state_dict,
    temperature,
)

__all__ = [
    "CONFIG_DIR",
    "OPEN_CLIP_PRECISIONS",
    "Checkpoint",
    "ClipBundle",
    "HubModel",
    "Preprocessing",
    "PretrainedIdentity",
    "build_model",
    "build_tokenizer",
    "build_transforms",
    "export_model",
    "export_weights",
    "features_of",
    "identify",
    "load_weights",
    "logit_bias_of",
    "make_logit_scale_1d",
    "read_checkpoint",
    "read_state_dict",
    "register_shipped_configs",
    "resolve_hub_name",
    "temperature",
]
