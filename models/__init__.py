"""open_clip model construction, pretrained-tag preprocessing, safe weight loading and export."""

from models.factory import (
    CONFIG_DIR,
    OPEN_CLIP_PRECISIONS,
    ClipBundle,
    build_model,
    build_transforms,
    features_of,
    register_shipped_configs,
)
from models.pretrained import PRESET_TAGS, Preprocessing, PretrainedIdentity, identify
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
    "PRESET_TAGS",
    "Checkpoint",
    "ClipBundle",
    "Preprocessing",
    "PretrainedIdentity",
    "build_model",
    "build_transforms",
    "export_weights",
    "features_of",
    "identify",
    "load_weights",
    "make_logit_scale_1d",
    "read_checkpoint",
    "read_state_dict",
    "register_shipped_configs",
    "temperature",
]
