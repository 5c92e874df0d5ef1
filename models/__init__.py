"""open_clip model construction, weight loading, preprocessing presets and export."""

from models.factory import (
    CONFIG_DIR,
    PRECISIONS,
    ClipBundle,
    build_model,
    build_transforms,
    register_shipped_configs,
)
from models.presets import PRESETS, Preset, get_preset
from models.weights import export_weights, load_weights, make_logit_scale_1d, read_state_dict, temperature

__all__ = [
    "CONFIG_DIR",
    "PRECISIONS",
    "PRESETS",
    "ClipBundle",
    "Preset",
    "build_model",
    "build_transforms",
    "export_weights",
    "get_preset",
    "load_weights",
    "make_logit_scale_1d",
    "read_state_dict",
    "register_shipped_configs",
    "temperature",
]
