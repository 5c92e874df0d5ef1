"""The job configuration: one typed dataclass tree, from YAML plus `section.key=value` overrides.

Every field carries its rules (`setting`): a one-line doc, whether a resumed run may change it and whether
it defines the recovered OSR statistics; checkpoint, sweep and docs/configuration.md read them from here.
Every section validates itself; `JobConfig.validate()` reports every problem at once, each naming its field
and the fix. `python -m engine.config_reference` prints the configuration reference.

The modules, one job each: `choices` (the values fields may take), `fields` (`setting` and the rules),
one module per group of sections (`model`, `data`, `training`, `evaluation`, `run`), `job` (the whole tree),
`keys` (fields by dotted key) and `loading` (YAML file and overrides -> JobConfig).
"""

from engine.config.choices import (
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_MEMBER_BYTES,
    EVAL_METRICS,
    METHOD_RUNS_OSR,
    METHOD_SURROGATE,
    METHODS,
    PRECISIONS,
    SURROGATE_CHOICES,
    WANDB_MODES,
    CompileMode,
    Interpolation,
    Method,
    OSRSurrogate,
    Precision,
    ResizeMode,
    Surrogate,
    TeacherKind,
    TrainTransform,
    WandbMode,
)
from engine.config.data import DataConfig
from engine.config.evaluation import EvalConfig
from engine.config.fields import OSR_RULES, RESUME_RULES, choice_errors, setting
from engine.config.job import JobConfig
from engine.config.keys import _field_metadata, config_fields, field_of, field_rule, keys_with  # noqa: F401
from engine.config.loading import load_config, parse_override, read_yaml
from engine.config.model import ModelConfig
from engine.config.run import RunConfig
from engine.config.training import LossConfig, OptimConfig, OSRConfig, TeacherConfig

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_MEMBER_BYTES", "EVAL_METRICS", "METHODS", "METHOD_RUNS_OSR",
    "METHOD_SURROGATE", "OSR_RULES", "PRECISIONS", "RESUME_RULES", "SURROGATE_CHOICES", "WANDB_MODES",
    "CompileMode", "DataConfig", "EvalConfig", "Interpolation", "JobConfig", "LossConfig", "Method", "ModelConfig",
    "OSRConfig", "OSRSurrogate", "OptimConfig", "Precision", "ResizeMode", "RunConfig", "Surrogate", "TeacherConfig",
    "TeacherKind", "TrainTransform", "WandbMode", "choice_errors", "config_fields", "field_of", "field_rule",
    "keys_with", "load_config", "parse_override", "read_yaml", "setting",
]
