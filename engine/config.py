"""The job configuration: one typed dataclass tree, from YAML plus `section.key=value` overrides.

Every section validates itself; `JobConfig.validate()` reports every problem at once, each
naming its field and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

if typing.TYPE_CHECKING:
    from engine.data.samples import ReadLimits

from engine.backends import backend_names

METHODS = ("tuneclip", "fastclip", "openclip", "siglip")
SURROGATE_CHOICES = ("auto", "hgcl", "gcl", "mbcl", "siglip")
WANDB_MODES = ("offline", "online")
PRECISIONS = ("fp32", "bf16")  # training precisions (weights fp32; bf16 compute)
# Images with more pixels (width x height, read from the header) are skipped before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
# Members larger than this (from the tar header, before any byte is read) are skipped. 64 MiB is twice a
# quality-100 JPEG at the pixel cap and far above what img2dataset writes (< 1 MB); a raw read stays
# within what decoding an image at the pixel cap costs anyway (192 MiB as RGB).
DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024
# The metrics each kind of eval task reports (engine/evaluate/tasks.py), checked before anything loads.
EVAL_METRICS = {
    "zeroshot": ("acc1", "acc5", "mean_per_class_recall"),
    "retrieval": (*(f"{way}_retrieval_recall@{k}" for k in (1, 5, 10) for way in ("image", "text")), "mean_recall@1"),
}

# Paper Table 9: what each method runs.
# siglip: SigLIP's own sigmoid loss (open_clip's SigLipLoss), the baseline for SigLIP checkpoints.
METHOD_SURROGATE = {"tuneclip": "hgcl", "fastclip": "gcl", "openclip": "mbcl", "siglip": "siglip"}
METHOD_RUNS_OSR = {"tuneclip": True, "fastclip": False, "openclip": False, "siglip": False}


@dataclass
class ModelConfig:
    """Which open_clip model, from which local weights, with which preprocessing."""

    name: str = "tiny-vit"  # open_clip architecture, shipped config name or JSON path
    weights: str | None = None  # local .safetensors / .bin / .pt; None = random init
    # open_clip pretrained tag the weights were trained as (openai, webli, laion2b_s34b_b79k, dfn5b, ...):
    # open_clip's pretrained config for it sets mean, std, interpolation, resize mode and the activation.
    pretrained_tag: str | None = None
    preset: str | None = None  # former name of pretrained_tag (e.g. dfn5b, openai); same meaning
    mean: list[float] | None = None  # overrides the tag's (3 numbers)
    std: list[float] | None = None  # overrides the tag's (3 numbers)
    resize_mode: str | None = None  # shortest | longest | squash; overrides the tag's
    interpolation: str | None = None  # bicubic | bilinear | random; overrides the tag's
    tokenizer: str | None = None  # local folder (or hub id) of a Hugging Face tokenizer; None = the model's
    precision: str = "fp32"  # fp32 | bf16 (autocast where the device supports it)
    grad_checkpointing: bool = False

    @property
    def tag(self) -> str | None:
        """The pretrained tag (`pretrained_tag`, or the older `preset`)."""
        return self.pretrained_tag or self.preset

    def build_kwargs(self) -> dict:
        """Keyword arguments of `models.build_model` for this section (besides the name)."""
        preprocess = {key: getattr(self, key) for key in ("mean", "std", "resize_mode", "interpolation")}
        return {"weights": self.weights, "pretrained_tag": self.tag, "tokenizer": self.tokenizer,
                "preprocess": {key: value for key, value in preprocess.items() if value is not None}}

    def errors(self) -> list[str]:
        out = []
        if self.preset and self.pretrained_tag and self.preset != self.pretrained_tag:
            out.append(f"model.preset {self.preset!r} and model.pretrained_tag {self.pretrained_tag!r} disagree; "
                       "keep only model.pretrained_tag")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and (len(value) != 3 or not all(isinstance(v, (int, float)) for v in value)):
                out.append(f"model.{key} must be 3 numbers (one per RGB channel), got {value!r}")
        if self.std is not None and len(self.std) == 3 and not all(v > 0 for v in self.std):
            out.append(f"model.std must be > 0, got {self.std!r}")
        if self.resize_mode is not None or self.interpolation is not None:  # open_clip loads only to check them
            from models.pretrained import INTERPOLATIONS, RESIZE_MODES

            if self.resize_mode not in (None, *RESIZE_MODES):
                out.append(f"model.resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
            if self.interpolation not in (None, *INTERPOLATIONS):
                out.append(f"model.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if not self.name:
            out.append("model.name must name an open_clip architecture or a JSON config")
        if self.precision not in PRECISIONS:
            out.append(f"model.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.weights is not None and not Path(self.weights).exists():
            out.append(f"model.weights: file {self.weights} does not exist; give a local checkpoint path")
        return out


@dataclass
class DataConfig:
    """Training shards (a directory with manifest.json, or the manifest itself) and batching."""

    train: str = ""
    batch_size: int = 64  # global batch across all ranks
    num_workers: int = 0
    shuffle_buffer: int = 1000
    verify_checksums: bool = False
    resampled: bool = False  # draw shards with replacement (very large data); epoch = samples_per_epoch
    samples_per_epoch: int | None = None  # all ranks together; required with resampled
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images (width x height) are skipped before decoding
    # tar members larger than this (bytes, from the tar header) or sparse are skipped unread; 64 MiB
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    train_transform: str = "augment"  # augment: the model's random-resized-crop train transform; eval: none

    @property
    def limits(self) -> ReadLimits:
        """The caps on one sample (pixels, tar member bytes), which evaluation applies too."""
        from engine.data.samples import ReadLimits

        return ReadLimits(self.max_image_pixels, self.max_member_bytes)

    def errors(self, *, training: bool = True) -> list[str]:
        out = []
        if training and not self.train:
            out.append("data.train is required: a shard directory with manifest.json (see `run.py shards`)")
        elif training and not (Path(self.train) / "manifest.json" if Path(self.train).is_dir()
                               else Path(self.train)).is_file():
            out.append(f"data.train: no manifest at {self.train} (relative to {Path.cwd()}); build shards with "
                       "`run.py shards build <csv|dir> <out>` or index existing ones with `run.py shards index <dir>`")
        if self.batch_size < 2:
            out.append(f"data.batch_size must be >= 2 (contrastive losses need negatives), got {self.batch_size}")
        if self.num_workers < 0:
            out.append(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.resampled and not self.samples_per_epoch:
            out.append("data.samples_per_epoch is required with data.resampled=true (samples of all ranks per epoch)")
        if not self.resampled and self.samples_per_epoch is not None:
            out.append("data.samples_per_epoch applies to data.resampled=true only; drop it or set resampled")
        if self.max_image_pixels < 1:
            out.append(f"data.max_image_pixels must be >= 1 (width x height), got {self.max_image_pixels}")
        if self.max_member_bytes < 1:
            out.append(f"data.max_member_bytes must be >= 1 (bytes of one tar member), got {self.max_member_bytes}")
        if self.train_transform not in ("augment", "eval"):
            out.append(
                f"data.train_transform must be 'augment' (random crops) or 'eval' (no augmentation), "
                f"got {self.train_transform!r}"
            )
        return out


@dataclass
class LossConfig:
    """Surrogate and SogCLR estimator settings (temperature is fixed from the checkpoint)."""

    surrogate: str = "auto"  # auto = the method's (tuneclip: hgcl, fastclip: gcl, openclip: mbcl)
    margin: float | str = 0.1  # HGCL margin m, or "auto": the margin_inside_share rule at w0 (README, engine/margin.py)
    margin_inside_share: float = 0.5  # margin=auto: m puts this share of the pairs inside the hinge (d > -m) at w0
    margin_probe_batches: int = 8  # margin=auto: batches at w0 whose d the rule reads
    eps: float = 1e-14
    chunk_size: int = 0  # columns of the global batch per block; 0 = whole batch
    gamma_min: float = 0.9
    gamma_decay_epochs: int = 4

    def errors(self) -> list[str]:
        out = []
        if self.surrogate not in SURROGATE_CHOICES:
            out.append(f"loss.surrogate must be one of {SURROGATE_CHOICES}, got {self.surrogate!r}")
        if isinstance(self.margin, str) and self.margin != "auto":
            out.append(f"loss.margin must be a number >= 0 or 'auto', got {self.margin!r}")
        elif not isinstance(self.margin, str) and self.margin < 0:
            out.append(f"loss.margin must be >= 0 (or 'auto'), got {self.margin}")
        if not 0 < self.margin_inside_share < 1:
            out.append(f"loss.margin_inside_share must be in (0, 1), got {self.margin_inside_share}")
        if self.margin_probe_batches < 1:
            out.append(f"loss.margin_probe_batches must be >= 1, got {self.margin_probe_batches}")
        if not self.eps > 0:
            out.append(f"loss.eps must be > 0 (e.g. 1e-14), got {self.eps}")
        if self.chunk_size < 0:
            out.append(f"loss.chunk_size must be >= 0 (0 = no chunking), got {self.chunk_size}")
        if not 0 < self.gamma_min <= 1:
            out.append(f"loss.gamma_min must be in (0, 1], got {self.gamma_min}")
        if self.gamma_decay_epochs < 0:
            out.append(f"loss.gamma_decay_epochs must be >= 0, got {self.gamma_decay_epochs}")
        return out


@dataclass
class OptimConfig:
    """AdamW and the cosine learning-rate schedule of the fine-tuning stage."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.02
    eps: float = 1e-6
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global grad norm in fine-tuning; 0 = off (never applied in OSR)

    def errors(self) -> list[str]:
        out = []
        if not self.lr > 0:
            out.append(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            out.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            out.append(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip < 0:
            out.append(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        return out


@dataclass
class OSRConfig:
    """Stage I (paper Algorithm 1) and the stage-II seeding switches (paper Table 2)."""

    epochs: int = 5
    seed_moments: bool = True
    seed_u: bool = True
    surrogate: str = "auto"  # auto = the stage-II surrogate
    load_from: str | None = None  # end-of-OSR checkpoint to start stage II from (skips OSR)

    def errors(self) -> list[str]:
        out = []
        if self.load_from is not None and not Path(self.load_from).is_dir():
            out.append(f"osr.load_from: {self.load_from} is not a checkpoint folder (see `run.py osr`)")
        if self.epochs < 0:
            out.append(f"osr.epochs must be >= 0, got {self.epochs}")
        if self.surrogate not in ("auto", "hgcl", "gcl"):
            out.append(f"osr.surrogate must be auto, hgcl or gcl, got {self.surrogate!r}")
        return out


@dataclass
class EvalConfig:
    """Local evaluation tasks, when to run them, and which metric picks the best checkpoint."""

    # {name, csv | wds | clip_benchmark, classnames?, templates?, split?, main_metric?} (see README)
    zeroshot: list[dict] = field(default_factory=list)
    retrieval: list[dict] = field(default_factory=list)  # {name, csv | wds | clip_benchmark, split?, main_metric?}
    every_steps: int = 0  # 0 = at epoch ends only
    at_start: bool = True
    best_metric: str = ""  # "task/metric", e.g. "imagenet/acc1"; empty = first zero-shot acc1
    batch_size: int = 128
    num_workers: int = 2  # DataLoader processes decoding evaluation images (0 = in the main process)

    def errors(self) -> list[str]:
        out = []
        for section in ("zeroshot", "retrieval"):
            for i, task in enumerate(getattr(self, section)):
                if not isinstance(task, dict) or "name" not in task:
                    out.append(f"eval.{section}[{i}] needs 'name'")
                elif not any(key in task for key in ("csv", "wds", "clip_benchmark")):
                    out.append(f"eval.{section}[{i}] needs one of 'csv', 'wds', 'clip_benchmark'")
                else:
                    out.extend(_task_path_errors(f"eval.{section}[{i}] {task['name']!r}", task))
        out.extend(self._metric_errors())
        if self.every_steps < 0:
            out.append(f"eval.every_steps must be >= 0, got {self.every_steps}")
        if self.num_workers < 0:
            out.append(f"eval.num_workers must be >= 0, got {self.num_workers}")
        return out

    def _metric_errors(self) -> list[str]:
        """Metric names (each task's main_metric, best_metric) that no configured task reports."""
        out, metrics = [], {}
        for section in ("zeroshot", "retrieval"):
            for i, task in enumerate(getattr(self, section)):
                if not isinstance(task, dict) or "name" not in task:
                    continue
                metrics[str(task["name"])] = EVAL_METRICS[section]
                main = task.get("main_metric")
                if main is not None and main not in EVAL_METRICS[section]:
                    out.append(f"eval.{section}[{i}].main_metric {main!r} is not a {section} metric; use one of "
                               f"{', '.join(EVAL_METRICS[section])}")
        task_name, _, metric = self.best_metric.rpartition("/")
        if self.best_metric and metrics and metric not in metrics.get(task_name, ()):
            known = [f"{name}/{m}" for name, names in metrics.items() for m in names]
            out.append(f"eval.best_metric {self.best_metric!r} is not a metric of the eval tasks; use "
                       f"'<task>/<metric>', one of: {', '.join(known)}")
        return out


# Task keys naming files or folders; a value without a folder or suffix may be a built-in list (imagenet1k, openai).
_TASK_PATH_KEYS = ("csv", "clip_benchmark", "classnames", "templates", "wds")


def _task_path_errors(where: str, task: dict) -> list[str]:
    """The paths of one eval task that do not exist (patterns and `::` lists of `wds` are left to the task)."""
    out = []
    for key in _TASK_PATH_KEYS:
        value = task.get(key)
        if not isinstance(value, str) or any(mark in value for mark in ("{", "*", "?", "[", "::")):
            continue
        path = Path(value)
        if key in ("classnames", "templates") and path.parent == Path(".") and not path.suffix:
            continue  # a built-in name; the task checks it
        if not path.exists():
            out.append(f"{where}: {key} {value} does not exist (paths are relative to {Path.cwd()}); fix the path")
    return out


@dataclass
class RunConfig:
    """Where outputs go, how long to train, logging and the backend."""

    out_dir: str = "runs/tuneclip"
    epochs: int = 5  # fine-tuning epochs
    max_steps_per_epoch: int = 0  # 0 = the whole epoch (useful for smoke runs)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10
    backend: str = "single"  # any name in the backend registry (engine.backends): single | deepspeed | fsdp
    zero_config: str | None = None
    progress: bool = True
    save_every_steps: int = 0  # 0 = no periodic checkpoints
    keep_last_n: int = 2
    # Write checkpoints in the background (run.backend=fsdp): training goes on while the shards are written;
    # a checkpoint counts (latest, resume) only once every rank's write has finished.
    async_checkpoint: bool = False
    resume: str | None = None  # "latest" or a checkpoint folder
    max_bad_steps: int = 5  # consecutive non-finite steps skipped before the run aborts
    collective_timeout_s: int = 600  # a rank waiting this long in a collective fails the job (dead/frozen rank)
    # Several nodes: a folder on each node's local disk for that node's replica of the u table
    # (default: one folder per node under out_dir, each opened by its node only).
    node_local_dir: str | None = None
    below_base_tolerance: float = 0.005  # an evaluation more than this under the base (metric units) is warned about
    stop_below_base: int = 0  # stop fine-tuning after this many consecutive evaluations below the base; 0 = never
    tensorboard: bool = False  # also log scalars to <out_dir>/tensorboard (per step and per evaluation)
    wandb_project: str | None = None  # also log to Weights & Biases (optional package `wandb`)
    wandb_mode: str = "offline"  # offline (files under <out_dir>/wandb, `wandb sync` later) | online

    def errors(self) -> list[str]:
        out = []
        if self.epochs < 0:
            out.append(f"run.epochs must be >= 0, got {self.epochs}")
        if self.backend not in backend_names():
            out.append(f"run.backend must be one of {backend_names()}, got {self.backend!r}")
        if self.log_every < 1:
            out.append(f"run.log_every must be >= 1, got {self.log_every}")
        if self.save_every_steps < 0:
            out.append(f"run.save_every_steps must be >= 0 (0 = off), got {self.save_every_steps}")
        if self.keep_last_n < 1:
            out.append(f"run.keep_last_n must be >= 1, got {self.keep_last_n}")
        if self.collective_timeout_s < 1:
            out.append(f"run.collective_timeout_s must be >= 1 (seconds), got {self.collective_timeout_s}")
        if self.max_bad_steps < 1:
            out.append(f"run.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.below_base_tolerance < 0:
            out.append(f"run.below_base_tolerance must be >= 0 (metric units), got {self.below_base_tolerance}")
        if self.stop_below_base < 0:
            out.append(f"run.stop_below_base must be >= 0 (0 = never stop), got {self.stop_below_base}")
        if self.wandb_mode not in WANDB_MODES:
            out.append(f"run.wandb_mode must be one of {WANDB_MODES}, got {self.wandb_mode!r}")
        if self.resume not in (None, "latest") and not Path(self.resume).is_dir():
            out.append(f"run.resume: {self.resume} is not a checkpoint folder; give 'latest' or a "
                       "<run>/checkpoints/step_N folder")
        if self.zero_config is not None or self.backend == "deepspeed":
            from engine.backends.zero_configs import resolve_zero_config

            try:
                resolve_zero_config(self.zero_config)
            except FileNotFoundError as exc:
                out.append(str(exc))
        return out


@dataclass
class JobConfig:
    """The whole job: method plus one section per component."""

    method: str = "tuneclip"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    osr: OSRConfig = field(default_factory=OSRConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def surrogate(self) -> str:
        """The fine-tuning surrogate after resolving `auto` from the method."""
        return METHOD_SURROGATE[self.method] if self.loss.surrogate == "auto" else self.loss.surrogate

    @property
    def osr_surrogate(self) -> str:
        """The OSR surrogate: by default the stage-II loss, so u* and m* match what stage II uses."""
        if self.osr.surrogate != "auto":
            return self.osr.surrogate
        return self.surrogate if self.surrogate not in ("mbcl", "siglip") else "gcl"

    def errors(self, *, training: bool = True) -> list[str]:
        """Every problem of the configuration; `training=False` (evaluation) needs no training data."""
        out = []
        if self.method not in METHODS:
            out.append(f"method must be one of {METHODS}, got {self.method!r}")
        out.extend(self.data.errors(training=training))
        for section in (self.model, self.loss, self.optim, self.osr, self.eval, self.run):
            out.extend(section.errors())
        return out

    def validate(self, *, training: bool = True) -> JobConfig:
        """Raise one ValueError listing every problem, or return self."""
        problems = self.errors(training=training)
        if problems:
            raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self

    def to_dict(self) -> dict:
        """Plain JSON-compatible dict (tuples as lists), as stored in logs and checkpoints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """Stable hash of the configuration (recorded with logs and checkpoints)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _coerce(value, annotation, where: str):
    """Convert a YAML/CLI value to the dataclass field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        for option in non_none[:-1]:  # the first type that takes the value (float | str: numbers stay numbers)
            try:
                return _coerce(value, option, where)
            except ValueError:
                pass
        return _coerce(value, non_none[-1], where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return value
    return value


def _fill(instance, values: dict, prefix: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(type(instance))
    names = {f.name for f in dataclasses.fields(instance)}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            problems.append(f"unknown key '{where}' (known: {', '.join(sorted(names))})")
            continue
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                problems.append(f"'{where}' must be a mapping of its fields")
                continue
            _fill(current, value, f"{where}.", problems)
            continue
        try:
            setattr(instance, key, _coerce(value, hints[key], where))
        except ValueError as exc:
            problems.append(str(exc))


def parse_override(text: str) -> tuple[list[str], object]:
    """'loss.margin=0.2' -> (['loss', 'margin'], 0.2); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def read_yaml(path: str | Path, *, what: str) -> object:
    """The YAML document in file `path`; a syntax error is a ValueError naming `what`, the file and the line."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{what} {path} is not valid YAML ({problem}{where}); fix the file") from None


def load_config(path: str | None = None, overrides: list[str] | tuple = (), *, base: dict | None = None,
                training: bool = True) -> JobConfig:
    """Build a JobConfig from defaults, an optional `base` dict, a YAML file and overrides.

    `training=False` validates for evaluation only (no training data needed).
    """
    values: dict = {}

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    if base:
        merge(values, base)
    if path:
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = read_yaml(file, what="config file") or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
        merge(values, loaded)
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    cfg = JobConfig()
    problems: list[str] = []
    _fill(cfg, values, "", problems)
    problems.extend(cfg.errors(training=training))
    if problems:
        raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg
