"""open_clip model construction, weight loading, preprocessing presets and export."""

from models.factory import (
    CONFIG_DIR,
    OPEN_CLIP_PRECISIONS,
    ClipBundle,
    build_model,
    build_transforms,
    features_of,
    register_shipped_configs,
)
from models.presets import PRESETS, Preset, get_preset
from models.weights import export_weights, load_weights, make_logit_scale_1d, read_state_dict, temperature

__all__ = [
    "CONFIG_DIR",
    "OPEN_CLIP_PRECISIONS",
    "PRESETS",
    "ClipBundle",
    "Preset",
    "build_model",
    "build_transforms",
    "export_weights",
    "features_of",
    "get_preset",
    "load_weights",
    "make_logit_scale_1d",
    "read_state_dict",
    "register_shipped_configs",
    "temperature",
]
