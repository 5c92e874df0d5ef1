"""The job configuration: one typed dataclass tree, from YAML plus `section.key=value` overrides.

Every field carries its rules (`setting`): a one-line doc, whether a resumed run may change it and whether
it defines the recovered OSR statistics; checkpoint, sweep and docs/configuration.md read them from here.
Every section validates itself; `JobConfig.validate()` reports every problem at once, each naming its field
and the fix. `python -m engine.config_reference` prints the configuration reference.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from engine.backends import backend_names

Method = Literal["tuneclip", "fastclip", "openclip", "siglip"]
Surrogate = Literal["auto", "hgcl", "gcl", "mbcl", "siglip"]
OSRSurrogate = Literal["auto", "hgcl", "gcl"]
Precision = Literal["fp32", "bf16"]  # training precisions (weights fp32; bf16 compute)
ResizeMode = Literal["shortest", "longest", "squash"]  # open_clip.transform.image_transform_v2's modes
Interpolation = Literal["bicubic", "bilinear", "random"]
TrainTransform = Literal["augment", "eval"]
WandbMode = Literal["offline", "online"]
TeacherKind = Literal["wma", "ema"]
CompileMode = Literal["none", "blocks", "model", "step"]
METHODS = typing.get_args(Method)
SURROGATE_CHOICES = typing.get_args(Surrogate)
PRECISIONS = typing.get_args(Precision)
WANDB_MODES = typing.get_args(WandbMode)
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

# What a resumed run may do with a field (metadata "resume"), as docs/configuration.md words it.
RESUME_RULES = {
    "must_match": "must match",  # changes the method or the data order: resuming with another value is refused
    "may_change": "may change",  # where outputs go, logging, evaluation cadence, moved files
    "schedule": "may change (logged)",  # schedule-only settings (e.g. a lower lr after non-finite steps)
    "may_grow": "may only grow (logged)",  # more fine-tuning epochs extend a run; fewer are refused
}
# Whether a field defines the recovered OSR statistics (metadata "osr"): True = its value must match for
# the statistics to be reused (osr.load_from, sweeps); "surrogate" = it does through the OSR surrogate it
# resolves to (`JobConfig.osr_surrogate`), which is what is compared.
OSR_RULES = {True: "yes", "surrogate": "via the OSR surrogate", False: ""}


def setting(default, doc: str, *, resume: str = "must_match", osr: bool | str = False):
    """A config field with its one-line `doc` and rules: `resume` (a key of RESUME_RULES) and `osr` (OSR_RULES)."""
    assert resume in RESUME_RULES and osr in OSR_RULES and doc, (resume, osr, doc)
    metadata = {"doc": doc, "resume": resume, "osr": osr}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """Which open_clip model, from which local weights, with which preprocessing."""

    name: str = setting("tiny-vit", "open_clip architecture, shipped config name, JSON path, or a local transformers "
                        "CLIPModel / SiglipModel folder (config.json + model.safetensors)", osr=True)
    weights: str | None = setting(None, "local .safetensors / .bin / .pt, or a transformers CLIPModel / SiglipModel folder "
                                  "(model.name: the folder, or the open_clip architecture it matches); "
                                  "null = random init",
                                  resume="may_change", osr=True)
    pretrained_tag: str | None = setting(
        None, "open_clip pretrained tag the weights were trained as (openai, webli, laion2b_s34b_b79k, dfn5b, ...): "
        "open_clip's pretrained config for it sets mean, std, interpolation, resize mode and the activation", osr=True)
    preset: str | None = setting(None, "former name of pretrained_tag (e.g. dfn5b, openai); same meaning", osr=True)
    mean: list[float] | None = setting(None, "image mean (3 numbers); overrides the tag's", osr=True)
    std: list[float] | None = setting(None, "image std (3 numbers); overrides the tag's", osr=True)
    resize_mode: ResizeMode | None = setting(None, "how images are resized; overrides the tag's", osr=True)
    interpolation: Interpolation | None = setting(None, "resize interpolation; overrides the tag's", osr=True)
    tokenizer: str | None = setting(None, "local folder (or hub id) of a Hugging Face tokenizer; null = the model's")
    precision: Precision = setting("fp32", "training precision (bf16: autocast where the device supports it)",
                                   osr=True)
    grad_checkpointing: bool = setting(False, "recompute activations in backward (less memory, more time)")
    lock_image: bool = setting(False, "freeze the image tower (open_clip's --lock-image) but its last "
                               "lock_image_unlocked_groups groups; frozen weights are exported unchanged", osr=True)
    lock_image_unlocked_groups: int = setting(
        0, "with lock_image: the image tower's last N lock groups stay trainable (open_clip's groups: embeddings, "
        "each block, the last block with the final norm, the projection; a timm trunk's: timm's)", osr=True)
    lock_text: bool = setting(False, "freeze the text tower (open_clip's --lock-text) but its last "
                              "lock_text_unlocked_layers groups", osr=True)
    lock_text_unlocked_layers: int = setting(
        0, "with lock_text: the text tower's last N lock groups stay trainable (open_clip's "
        "--lock-text-unlocked-layers: embeddings, each block, the last block with the final norm, the projection)",
        osr=True)

    @property
    def tag(self) -> str | None:
        """The pretrained tag (`pretrained_tag`, or the older `preset`)."""
        return self.pretrained_tag or self.preset

    def has_own_weights(self) -> bool:
        """Whether `name` brings its weights (an `hf-hub:` / `local-dir:` name, a transformers model folder)."""
        return self.name.startswith(("hf-hub:", "local-dir:")) or (Path(self.name) / "config.json").is_file()

    def locks(self) -> dict[str, int]:
        """Tower ("image" / "text") -> its number of unlocked last groups, for each tower to lock."""
        return {kind: unlocked for kind, locked, unlocked in (
            ("image", self.lock_image, self.lock_image_unlocked_groups),
            ("text", self.lock_text, self.lock_text_unlocked_layers)) if locked}

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
        out.extend(choice_errors(self, "model"))
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and (len(value) != 3 or not all(isinstance(v, (int, float)) for v in value)):
                out.append(f"model.{key} must be 3 numbers (one per RGB channel), got {value!r}")
        if self.std is not None and len(self.std) == 3 and not all(v > 0 for v in self.std):
            out.append(f"model.std must be > 0, got {self.std!r}")
        if not self.name:
            out.append("model.name must name an open_clip architecture or a JSON config")
        for key, locked in (("lock_image_unlocked_groups", self.lock_image),
                            ("lock_text_unlocked_layers", self.lock_text)):
            value = getattr(self, key)
            if value < 0:
                out.append(f"model.{key} must be >= 0 (0 = the whole tower frozen), got {value}")
            elif value > 0 and not locked:
                tower = key.split("_")[1]
                out.append(f"model.{key}={value} needs model.lock_{tower}=true (it says which groups of the locked "
                           f"tower stay trainable); set model.lock_{tower}=true or remove model.{key}")
        if self.weights is not None and not Path(self.weights).exists():
            out.append(f"model.weights: file {self.weights} does not exist; give a local checkpoint path")
        return out


@dataclass
class DataConfig:
    """Training shards (a directory with manifest.json, or the manifest itself) and batching."""

    train: str = setting("", "shard directory with manifest.json, or the manifest itself (see `run.py shards`)",
                         resume="may_change")
    batch_size: int = setting(64, "global batch across all ranks", osr=True)
    accum_steps: int = setting(1, "micro-batches per step: each rank encodes its share of data.batch_size in this "
                               "many pieces (a feature cache, two forwards), the step exactly that of the whole "
                               "batch; memory of one micro-batch, ~1 extra forward of time", resume="may_change")
    num_workers: int = setting(0, "data loader processes per rank (0 = in the training process)")
    shuffle_buffer: int = setting(1000, "samples held for shuffling within a rank's stream")
    verify_checksums: bool = setting(False, "check every shard's sha256 against the manifest at start")
    resampled: bool = setting(False, "draw shards with replacement (very large data); epoch = samples_per_epoch")
    samples_per_epoch: int | None = setting(None, "samples per epoch, all ranks together; required with resampled")
    max_image_pixels: int = setting(DEFAULT_MAX_IMAGE_PIXELS,
                                    "larger images (width x height) are skipped before decoding")
    max_member_bytes: int = setting(DEFAULT_MAX_MEMBER_BYTES, "tar members larger than this (bytes, from the tar "
                                    "header) or sparse are skipped unread; 64 MiB")
    train_transform: TrainTransform = setting(
        "augment", "augment: the model's random-resized-crop train transform; eval: none (the eval transform)",
        osr=True)

    def errors(self, *, training: bool = True) -> list[str]:
        out = choice_errors(self, "data")
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
        if self.accum_steps < 1:
            out.append(f"data.accum_steps must be >= 1 (1 = no accumulation), got {self.accum_steps}")
        elif self.batch_size % self.accum_steps:
            out.append(f"data.batch_size={self.batch_size} is not divisible by data.accum_steps={self.accum_steps}; "
                       "pick a batch size that is a multiple of world size x accum_steps")
        if self.resampled and not self.samples_per_epoch:
            out.append("data.samples_per_epoch is required with data.resampled=true (samples of all ranks per epoch)")
        if not self.resampled and self.samples_per_epoch is not None:
            out.append("data.samples_per_epoch applies to data.resampled=true only; drop it or set resampled")
        if self.max_image_pixels < 1:
            out.append(f"data.max_image_pixels must be >= 1 (width x height), got {self.max_image_pixels}")
        if self.max_member_bytes < 1:
            out.append(f"data.max_member_bytes must be >= 1 (bytes of one tar member), got {self.max_member_bytes}")
        return out


@dataclass
class LossConfig:
    """Surrogate and SogCLR estimator settings (temperature is fixed from the checkpoint)."""

    surrogate: Surrogate = setting("auto", "auto = the method's (tuneclip: hgcl, fastclip: gcl, openclip: mbcl, "
                                   "siglip: siglip)", osr="surrogate")
    margin: float | str = setting(0.1, "HGCL margin m, or auto: the margin_inside_share rule at w0 (engine/objectives/margin.py)",
                                  osr=True)
    margin_inside_share: float = setting(0.5, "margin=auto: m puts this share of the pairs inside the hinge "
                                         "(d > -m) at w0", osr=True)
    margin_probe_batches: int = setting(8, "margin=auto: batches at w0 whose d the rule reads", osr=True)
    eps: float = setting(1e-14, "eps of log(eps + u) (keeps the weights of tiny u finite)", osr=True)
    chunk_size: int = setting(0, "columns of the global batch per block; 0 = whole batch")
    gamma_min: float = setting(0.9, "SogCLR moving-average weight gamma_t: its final value", osr=True)
    gamma_decay_epochs: int = setting(4, "epochs of gamma_t's cosine from 1 down to gamma_min", osr=True)
    terms: dict[str, float] = setting({"contrastive": 1.0}, "loss terms by name (engine.objectives.terms registry) "
                                      "and their weights; contrastive = the method's loss", osr=True)
    normaliser: str = setting("table", "the u estimates GCL/HGCL divide by (engine.objectives.normaliser registry): "
                              "table = SogCLR's per-sample rows, neural = NeuCLIP's prototype network", osr=True)
    neural_prototypes: int = setting(4096, "normaliser=neural: prototypes m of each side (W1, W2: m x embed_dim; "
                                     "a global batch B < m fills them with repeats, held as B rows with counts)", osr=True)
    neural_restart_every: int = setting(500, "normaliser=neural: restart W1, W2 from the global batch's embeddings "
                                        "every T_r steps (OSR and fine-tuning counted together)", osr=True)
    neural_updates: int = setting(10, "normaliser=neural: AdaGrad updates T_u of the network per step, on the "
                                  "step's batch", osr=True)
    neural_lr: float = setting(1.0, "normaliser=neural: the network's AdaGrad learning rate", osr=True)

    def errors(self) -> list[str]:
        out = choice_errors(self, "loss")
        if (not isinstance(self.terms, dict) or not self.terms
                or not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) for k, v in self.terms.items())):
            out.append(f"loss.terms must map term names to finite weights, e.g. {{contrastive: 1.0}}, "
                       f"got {self.terms!r}")
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
        for key in ("neural_prototypes", "neural_restart_every", "neural_updates"):
            if isinstance(getattr(self, key), bool) or getattr(self, key) < 1:
                out.append(f"loss.{key} must be an integer >= 1, got {getattr(self, key)!r}")
        if not (math.isfinite(self.neural_lr) and self.neural_lr > 0):
            out.append(f"loss.neural_lr must be > 0 (NeuCLIP: 1.0), got {self.neural_lr}")
        return out


@dataclass
class OptimConfig:
    """AdamW and the cosine learning-rate schedule of the fine-tuning stage."""

    lr: float = setting(1e-5, "peak learning rate of fine-tuning", resume="schedule")
    betas: tuple[float, float] = setting((0.9, 0.98), "AdamW betas (the moments OSR recovers use them)", osr=True)
    weight_decay: float = setting(0.02, "AdamW decoupled weight decay")
    eps: float = setting(1e-6, "AdamW epsilon")
    warmup_steps: int = setting(0, "linear warm-up steps before the cosine decay", resume="schedule")
    grad_clip: float = setting(0.0, "max global grad norm in fine-tuning; 0 = off (never applied in OSR)",
                               resume="schedule")
    # osr=True: the statistics hold no lr, but AdamW's saved moments are laid out by these param groups.
    layer_decay_image: float = setting(
        1.0, "layer-wise lr decay of the image tower: a parameter at depth d of L blocks learns at lr * "
        "decay^(L - d) (embeddings 0, block i i + 1, final norm and projection L); 1.0 = off", osr=True)
    layer_decay_text: float = setting(1.0, "layer-wise lr decay of the text tower, as layer_decay_image; "
                                      "logit_scale and logit_bias keep lr (factor 1); 1.0 = off", osr=True)

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
        for key in ("layer_decay_image", "layer_decay_text"):
            if not 0 < getattr(self, key) <= 1:
                out.append(f"optim.{key} must be in (0, 1] (1.0 = off), got {getattr(self, key)}")
        return out


@dataclass
class TeacherConfig:
    """The moving-average teacher of the `wma_teacher` loss term (TRACER): how its weights follow the student."""

    kind: TeacherKind = setting("wma", "wma = Beta-weighted average of the student's weights along fine-tuning "
                                "(TRACER); ema = exponential moving average (for comparison)")
    beta: float = setting(0.5, "wma: update k of K has weight BetaPDF((k + 0.5) / (K + 1); beta, beta); "
                          "1 = plain average")
    every_steps: int = setting(1, "fine-tuning optimizer steps between teacher updates")
    ema_momentum: float = setting(0.999, "ema: teacher <- m teacher + (1 - m) student")

    def errors(self) -> list[str]:
        out = choice_errors(self, "teacher")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            out.append(f"teacher.beta must be a number > 0 (0.5: TRACER's default, 1: plain average), got {self.beta!r}")
        if not (isinstance(self.every_steps, int) and self.every_steps >= 1):
            out.append(f"teacher.every_steps must be an integer >= 1, got {self.every_steps!r}")
        if not (isinstance(self.ema_momentum, (int, float)) and 0 <= self.ema_momentum < 1):
            out.append(f"teacher.ema_momentum must be in [0, 1), got {self.ema_momentum!r}")
        return out


@dataclass
class OSRConfig:
    """Stage I (paper Algorithm 1) and the stage-II seeding switches (paper Table 2)."""

    epochs: int = setting(5, "OSR epochs at the frozen starting weights", osr=True)
    seed_moments: bool = setting(True, "start fine-tuning's AdamW moments from the recovered ones")
    seed_u: bool = setting(True, "start fine-tuning's estimates u from the recovered ones")
    surrogate: OSRSurrogate = setting("auto", "auto = the stage-II surrogate (gcl for mbcl and siglip)",
                                      osr="surrogate")
    load_from: str | None = setting(None, "end-of-OSR checkpoint to start stage II from (skips OSR)",
                                    resume="may_change")

    def errors(self) -> list[str]:
        out = choice_errors(self, "osr")
        if self.load_from is not None and not Path(self.load_from).is_dir():
            out.append(f"osr.load_from: {self.load_from} is not a checkpoint folder (see `run.py osr`)")
        if self.epochs < 0:
            out.append(f"osr.epochs must be >= 0, got {self.epochs}")
        return out


@dataclass
class EvalConfig:
    """Local evaluation tasks, when to run them, and which metric picks the best checkpoint."""

    zeroshot: list[dict] = setting([], "zero-shot classification tasks: {name, csv | wds | clip_benchmark, "
                                   "classnames?, templates?, split?, main_metric?} (see README)")
    retrieval: list[dict] = setting([], "retrieval tasks: {name, csv | wds | clip_benchmark, split?, main_metric?}")
    every_steps: int = setting(0, "evaluate every this many fine-tuning steps; 0 = at epoch ends only",
                               resume="may_change")
    at_start: bool = setting(True, "evaluate the starting weights (the base every result is compared with)",
                             resume="may_change")
    best_metric: str = setting("", "task/metric that picks best.safetensors, e.g. imagenet/acc1; empty = the first "
                               "zero-shot acc1")
    batch_size: int = setting(128, "evaluation batch per rank", resume="may_change")
    num_workers: int = setting(2, "DataLoader processes decoding evaluation images (0 = in the main process)",
                               resume="may_change")

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

    out_dir: str = setting("runs/tuneclip", "the run folder: log, checkpoints, weights, summary",
                           resume="may_change")
    epochs: int = setting(5, "fine-tuning epochs", resume="may_grow")
    max_steps_per_epoch: int = setting(0, "0 = the whole epoch (useful for smoke runs)")
    seed: int = setting(0, "seeds the data order, augmentation and random initialisation", osr=True)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", resume="may_change")
    log_every: int = setting(10, "steps between log lines", resume="may_change")
    backend: str = setting("single", "any name in the backend registry (engine.backends): single | deepspeed | fsdp")
    zero_config: str | None = setting(None, "DeepSpeed config (zero_configs/*.json) for run.backend=deepspeed")
    progress: bool = setting(True, "progress bars (rank 0)", resume="may_change")
    save_every_steps: int = setting(0, "steps between periodic checkpoints; 0 = none", resume="may_change")
    save_every_epochs: int = setting(0, "also a checkpoint at every N-th epoch end of each stage; 0 = none",
                                     resume="may_change")
    keep_last_n: int = setting(2, "complete checkpoints kept; older ones are removed, except the u table's base "
                               "and deltas a kept checkpoint applies on", resume="may_change")
    u_table_full_every: int = setting(
        8, "the u table's checkpoints: a full copy every this many saves, in between only the pages written since "
        "the previous save (a delta on it); 1: a full copy every time", resume="may_change")
    async_checkpoint: bool = setting(
        False, "write checkpoints in the background (run.backend=fsdp): training goes on while the shards are "
        "written; a checkpoint counts (latest, resume) only once every rank's write has finished", resume="may_change")
    resume: str | None = setting(None, "latest or a checkpoint folder to continue from", resume="may_change")
    max_bad_steps: int = setting(5, "consecutive non-finite steps skipped before the run aborts", resume="schedule")
    collective_timeout_s: int = setting(600, "a rank waiting this long (seconds) in a collective fails the job "
                                        "(dead or frozen rank)", resume="may_change")
    node_local_dir: str | None = setting(
        None, "several nodes: a folder on each node's local disk for that node's replica of the u table (default: "
        "one folder per node under out_dir, each opened by its node only)", resume="may_change")
    below_base_tolerance: float = setting(0.005, "an evaluation more than this under the base (metric units) is "
                                          "warned about", resume="may_change")
    stop_below_base: int = setting(0, "stop fine-tuning after this many consecutive evaluations below the base; "
                                   "0 = never", resume="may_change")
    tensorboard: bool = setting(False, "also log scalars to <out_dir>/tensorboard (per step and per evaluation)",
                                resume="may_change")
    wandb_project: str | None = setting(None, "also log to Weights & Biases (optional package wandb)",
                                        resume="may_change")
    wandb_mode: WandbMode = setting("offline", "offline: files under <out_dir>/wandb (wandb sync later); online",
                                    resume="may_change")
    interpolate: str | None = setting(
        None, "weight-space interpolation at the end of fine-tuning (as run.py interpolate --alphas): a grid of a "
        "(START:STOP:STEP and/or a comma list, each in [0, 1]) evaluated on the eval tasks in one process after "
        "final.safetensors and summary.json are written; interpolate.json in out_dir; empty = off",
        resume="may_change")
    interpolate_select: str | None = setting(
        None, "with run.interpolate: TASK/METRIC of a task held out as validation; the best a on it is exported "
        "to out_dir/interpolated.safetensors (never chosen on the test tasks: empty = nothing exported)",
        resume="may_change")
    compile: CompileMode = setting(
        "none", "torch.compile: none | blocks (each transformer block of both towers: every backend but ZeRO-3) | "
        "model (the whole forward, both towers in one graph: single and ZeRO-1/2) | step (model's, blocks' on "
        "FSDP2, and GCL/HGCL's elementwise work per similarity block, fused); weights, checkpoints and resume "
        "unchanged", resume="may_change")
    compile_backend: str = setting("inductor", "torch.compile backend for run.compile (inductor; aot_eager or "
                                   "eager to debug a compile problem)", resume="may_change")
    plugins: list[str] = setting([], "modules the trainer imports (on every rank) before it builds the job: the loss "
                                 "terms and normalisers they register can be named in loss.terms / loss.normaliser",
                                 resume="may_change")

    @property
    def saves_periodically(self) -> bool:
        """Whether checkpoints are written during the run (every N steps or epochs), not only when stopped."""
        return self.save_every_steps > 0 or self.save_every_epochs > 0

    def errors(self) -> list[str]:
        out = choice_errors(self, "run")
        if self.epochs < 0:
            out.append(f"run.epochs must be >= 0, got {self.epochs}")
        if self.backend not in backend_names():
            out.append(f"run.backend must be one of {backend_names()}, got {self.backend!r}")
        if self.log_every < 1:
            out.append(f"run.log_every must be >= 1, got {self.log_every}")
        if self.save_every_steps < 0:
            out.append(f"run.save_every_steps must be >= 0 (0 = off), got {self.save_every_steps}")
        if self.save_every_epochs < 0:
            out.append(f"run.save_every_epochs must be >= 0 (0 = off), got {self.save_every_epochs}")
        if self.keep_last_n < 1:
            out.append(f"run.keep_last_n must be >= 1, got {self.keep_last_n}")
        if self.u_table_full_every < 1:
            out.append(f"run.u_table_full_every must be >= 1 (1: every save a full copy), got {self.u_table_full_every}")
        if self.collective_timeout_s < 1:
            out.append(f"run.collective_timeout_s must be >= 1 (seconds), got {self.collective_timeout_s}")
        if self.max_bad_steps < 1:
            out.append(f"run.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.below_base_tolerance < 0:
            out.append(f"run.below_base_tolerance must be >= 0 (metric units), got {self.below_base_tolerance}")
        if self.stop_below_base < 0:
            out.append(f"run.stop_below_base must be >= 0 (0 = never stop), got {self.stop_below_base}")
        if self.interpolate:
            from engine.results.interpolate import parse_alphas

            try:
                parse_alphas(self.interpolate, name="run.interpolate")
            except ValueError as exc:
                out.append(str(exc))
        elif self.interpolate_select:
            out.append(f"run.interpolate_select {self.interpolate_select!r} needs run.interpolate (the grid of a to "
                       "choose from), e.g. run.interpolate=0:1:0.25")
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

    method: Method = setting("tuneclip", "what runs (paper Table 9): tuneclip = OSR + HGCL, fastclip = GCL, "
                             "openclip = MBCL, siglip = SigLIP's sigmoid loss", osr="surrogate")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    osr: OSRConfig = field(default_factory=OSRConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
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
        out = choice_errors(self, "")
        out.extend(self.data.errors(training=training))
        for section in (self.model, self.loss, self.optim, self.osr, self.teacher, self.eval, self.run):
            out.extend(section.errors())
        out.extend(self._interpolate_errors())
        return out

    def _interpolate_errors(self) -> list[str]:
        """run.interpolate needs base weights to mix with and eval tasks to measure on; its select, one of them."""
        if not self.run.interpolate:
            return []
        out = []
        tasks = [str(task["name"]) for section in ("zeroshot", "retrieval") for task in getattr(self.eval, section)
                 if isinstance(task, dict) and "name" in task]
        if not self.model.weights and not self.model.has_own_weights():
            out.append("run.interpolate needs base weights (model.weights) to mix with; a run from a random init "
                       "has none: unset run.interpolate")
        if not tasks:
            out.append("run.interpolate needs evaluation tasks (eval.zeroshot / eval.retrieval) to measure each a on")
        select = self.run.interpolate_select
        if select and tasks and select.rpartition("/")[0] not in tasks:
            out.append(f"run.interpolate_select {select!r}: not an evaluation task; use TASK/METRIC with TASK one of "
                       f"{', '.join(tasks)}")
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


def config_fields(cls: type = JobConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf field of the config tree by its dotted key ('loss.margin'), in declaration order."""
    out = {}
    for f in dataclasses.fields(cls):
        section = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
        if section is not None:
            out.update(config_fields(section, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


@functools.cache
def _field_metadata() -> dict[str, typing.Mapping]:
    return {key: f.metadata for key, f in config_fields().items()}


def field_of(key: str) -> str | None:
    """The config field a flattened `key` belongs to ('loss.terms.x' -> 'loss.terms'); None if there is none."""
    fields = _field_metadata()
    while key not in fields and "." in key:
        key = key.rpartition(".")[0]
    return key if key in fields else None


def field_rule(key: str, rule: str):
    """Metadata `rule` ('resume', 'osr', 'doc') of the field at dotted `key`; a key inside a mapping field
    ('loss.terms.x') takes its field's; an unknown key (a removed field) the strict default."""
    fields = _field_metadata()
    while key not in fields and "." in key:
        key = key.rpartition(".")[0]
    return fields[key][rule] if key in fields else {"resume": "must_match", "osr": False, "doc": ""}[rule]


def keys_with(rule: str, *values) -> tuple[str, ...]:
    """The dotted keys whose metadata `rule` is one of `values` ('resume', 'may_change' -> ('run.out_dir', ...))."""
    return tuple(key for key, meta in _field_metadata().items() if meta[rule] in values)


class _Text(str):
    """Text typed in an override (`--set key=text`, a CLI flag): read by the field's declared type, never as free YAML."""


@dataclass(frozen=True)
class _Scalar:
    """A number, boolean or date read from a config file, with the text it was written as (`train: 2024_01`)."""

    value: object
    text: str


_NULL_TEXTS = ("", "~", "null", "Null", "NULL")  # YAML's spellings of null; also an override's empty text
_BOOL_TEXTS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


class _SourceLoader(yaml.SafeLoader):
    """YAML as usual, except that numbers, booleans and dates keep the text they were written as (`_Scalar`)."""


def _keep_text(construct):
    return lambda loader, node: _Scalar(construct(loader, node), node.value)


for _tag, _construct in (("int", yaml.SafeLoader.construct_yaml_int), ("float", yaml.SafeLoader.construct_yaml_float),
                         ("bool", yaml.SafeLoader.construct_yaml_bool),
                         ("timestamp", yaml.SafeLoader.construct_yaml_timestamp)):
    _SourceLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _keep_text(_construct))


class _StructureLoader(yaml.SafeLoader):
    """YAML structure only (lists, mappings, quotes): every plain scalar stays text, except null."""


_StructureLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag == "tag:yaml.org,2002:null"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _parse_structure(text: _Text, where: str):
    """An override's list or mapping (`[0.9, 0.98]`, `[{name: x, csv: f}]`), its scalars left as `_Text`."""
    try:
        tree = yaml.load(text, Loader=_StructureLoader)  # a SafeLoader that resolves null only
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{where}: {str(text)!r} is not a YAML list or mapping ({problem})") from None

    def wrap(node):
        if isinstance(node, list):
            return [wrap(v) for v in node]
        if isinstance(node, dict):
            return {wrap(k): wrap(v) for k, v in node.items()}
        return None if node is None else _Text(node)

    return wrap(tree)


def _plain(value):
    """`value` without the markers of where it came from (an untyped leaf keeps override text as text)."""
    if isinstance(value, _Scalar):
        return value.value
    if isinstance(value, _Text):
        return str.__str__(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _choice_error(where: str, value, choices: tuple) -> str:
    return f"{where} must be one of {choices}, got {value!r}"


def _coerce(value, annotation, where: str):
    """Convert a value to the field's declared type: override text by that type, YAML values as read.

    A `str` field keeps the text as written (override or file); numbers, booleans and list elements are
    converted per element by their declared type; untyped values (task mappings) are left as they are.
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, _Text) and value in _NULL_TEXTS)):
            return None
        non_none = [a for a in args if a is not type(None)]
        for option in non_none[:-1]:  # the first type that takes the value (float | str: numbers stay numbers)
            try:
                return _coerce(value, option, where)
            except ValueError:
                pass
        return _coerce(value, non_none[-1], where)
    container = origin in (list, tuple, dict) or annotation in (list, tuple, dict)
    if isinstance(value, _Text) and container:
        value = _parse_structure(value, where)
    if origin is Literal:
        text = value.text if isinstance(value, _Scalar) else value
        if not isinstance(text, str) or text not in args:
            raise ValueError(_choice_error(where, _plain(text), args))
        return str.__str__(text)
    if annotation is str:
        if isinstance(value, _Scalar):  # `train: 2024_01` in a file: the folder as written, not 202401
            return value.text
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):  # a `base` dict's number: its str
            raise ValueError(f"{where} must be a string, got {value!r}")
        return str.__str__(value) if isinstance(value, str) else str(value)
    if isinstance(value, _Scalar):
        value = value.value
    if annotation is bool:
        if isinstance(value, _Text) and value.lower() in _BOOL_TEXTS:
            return _BOOL_TEXTS[value.lower()]
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} must be true or false, got {_plain(value)!r}")
    if annotation is int:
        if isinstance(value, _Text):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{where} must be an integer, got {str(value)!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # override text, or YAML 1.1's "1e-5" (no dot), which it reads as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number, got {_plain(value)!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, got {_plain(value)!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or annotation is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {_plain(value)!r}")
        item = args[0] if args else typing.Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {_plain(value)!r}")
        key_type, item = args if args else (typing.Any, typing.Any)
        return {_coerce(k, key_type, where): _coerce(v, item, f"{where}.{_plain(k)}") for k, v in value.items()}
    return _plain(value)


def _field_choices(annotation) -> tuple | None:
    """The allowed values of a `Literal` field (also `Literal[...] | None`), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        literals = [a for a in typing.get_args(annotation) if typing.get_origin(a) is Literal]
        return typing.get_args(literals[0]) if literals else None
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else None


def choice_errors(section, name: str) -> list[str]:
    """One line per `Literal` field of dataclass `section` (called `name`) whose value is not one of its choices."""
    out = []
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        choices = _field_choices(hints[f.name])
        value = getattr(section, f.name)
        if choices is not None and value not in choices and value is not None:
            out.append(_choice_error(f"{name}.{f.name}" if name else f.name, value, choices))
    return out


def _fill(instance, values: dict, prefix: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(type(instance))
    names = {f.name for f in dataclasses.fields(instance)}
    for key, value in values.items():
        key = _plain(key)
        where = f"{prefix}{key}"
        if key not in names:
            problems.append(f"unknown key '{where}' (known: {', '.join(sorted(names))})")
            continue
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, _Text):  # --set 'loss={margin: 0.2}': each field still by its type
                try:
                    value = _parse_structure(value, where)
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
            if not isinstance(value, dict):
                problems.append(f"'{where}' must be a mapping of its fields")
                continue
            _fill(current, value, f"{where}.", problems)
            continue
        try:
            setattr(instance, key, _coerce(value, hints[key], where))
        except ValueError as exc:  # the field keeps its default, so its checks report nothing more
            problems.append(str(exc))


def parse_override(text: str) -> tuple[list[str], str]:
    """'loss.margin=0.2' -> (['loss', 'margin'], '0.2'); the field's declared type reads the text later."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), _Text(raw)


def read_yaml(path: str | Path, *, what: str, keep_text: bool = False) -> object:
    """The YAML document in file `path`; a syntax error is a ValueError naming `what`, the file and the line.

    `keep_text`: numbers, booleans and dates also keep their text, which `load_config` gives `str` fields.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        return yaml.load(text, Loader=_SourceLoader) if keep_text else yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{what} {path} is not valid YAML ({problem}{where}); fix the file") from None


def load_config(path: str | None = None, overrides: list[str] | tuple = (), *, base: dict | None = None,
                training: bool = True) -> JobConfig:
    """Build a JobConfig from defaults, an optional `base` dict, a YAML file and overrides.

    Override text is read by the field's declared type (a `str` field keeps it as typed); the file is
    YAML, except that a `str` field given a number, boolean or date takes it as written (`train: 2024_01`).
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
        loaded = read_yaml(file, what="config file", keep_text=True) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
        merge(values, loaded)
    defaults = JobConfig()
    for text in overrides:
        keys, value = parse_override(text)
        node, default = values, defaults
        for k in keys[:-1]:
            default = getattr(default, k, None) if dataclasses.is_dataclass(default) else None
            # A key inside a mapping field (`loss.terms.toy=0.5`) adds to the mapping it has so far, its default
            # included; the whole field given at once (`loss.terms={toy: 1}`) replaces it.
            node = node.setdefault(k, copy.deepcopy(default) if isinstance(default, dict) else {})
        node[keys[-1]] = value
    cfg = JobConfig()
    problems: list[str] = []
    _fill(cfg, values, "", problems)
    problems.extend(cfg.errors(training=training))
    if problems:
        raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg
