"""DeepSpeed ZeRO backend: the model wrapped by `deepspeed.initialize`, AdamW state partitioned over ranks.

Same interface as `engine.backends.single.SingleProcessBackend`. OSR runs through it unchanged:
a step at lr = 0 with clipping off accumulates raw gradients into the partitioned fp32 moments,
advances every partition's step counter and leaves fp32 masters and model weights bit-identical
(AdamW's decoupled weight decay is multiplied by lr). The trainer drives lr itself: no DeepSpeed
LR scheduler is ever attached.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import glob
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from engine.backends.base import adamw_param_groups, full_bundle, tensors_digest
from engine.backends.zero_configs import resolve_zero_config
from engine.config import PRECISIONS
from engine.safe_load import UnsafeFileError, deepspeed_globals, load_tensor_file, tensor_only_torch_load
from models.weights import make_logit_scale_1d

if TYPE_CHECKING:
    from engine.config import JobConfig
    from engine.distributed import DistContext
    from models import ClipBundle

logger = logging.getLogger(__name__)

ZERO_STAGES = (1, 2, 3)
DEFAULT_ZERO_CONFIG = Path(__file__).resolve().parents[2] / "zero_configs" / "zero2.json"
CHECKPOINT_TAG = "deepspeed"  # one DeepSpeed checkpoint per directory; the checkpoint manager names them
UNIVERSAL_TAG = "universal"  # the same checkpoint converted for another world size
SHM_PREFIX = "/dev/shm/deepspeed_allreduce_buffer"
_ADAM_TYPES = ("adamw", "adam")
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
ENCODER_METHODS = ("encode_image", "encode_text")  # run through the engine (see _EngineRoutedEncoders)


def _load_zero_config(zero_config: str | os.PathLike | dict) -> tuple[dict, str]:
    """The config as a fresh dict, and how to name it in error messages."""
    if isinstance(zero_config, dict):
        return copy.deepcopy(zero_config), "the zero_config dict"
    path = resolve_zero_config(zero_config)  # a file, or a shipped config's name (zero2, zero3_bf16, ...)
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from err


def shm_op_build_folder() -> Path | None:
    """The folder DeepSpeed's process-group set-up will compile its shared-memory op into (CPU, first launch:
    ~40 s of silence), or None when the op is prebuilt, already in torch's extension cache, or not used."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")  # as deepspeed.comm's build_shm_op
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False) or installed_ops.get(
            builder.NAME, False):
        return None
    folder = Path(_get_build_directory(builder.NAME, verbose=False))
    return None if (folder / f"{builder.NAME}.so").is_file() else folder


def _same(ours, theirs) -> bool:
    if isinstance(ours, (list, tuple)):
        return isinstance(theirs, (list, tuple)) and len(ours) == len(theirs) and all(
            _same(a, b) for a, b in zip(ours, theirs))
    return isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and float(ours) == float(theirs)


def _fill(section: dict, key: str, ours, *, where: str, source: str, fix: str, errors: list[str]) -> None:
    """Set `section[key]` to ours; a different value already there is reported, never overridden."""
    if key in section and not _same(ours, section[key]):
        errors.append(f"{source}: {where}{key} = {section[key]!r} disagrees with the engine's value "
                      f"{ours!r}; {fix}")
    section[key] = list(ours) if isinstance(ours, tuple) else ours


def build_deepspeed_config(
    zero_config: str | os.PathLike | dict,
    *,
    micro_batch_size: int,
    world_size: int,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    grad_clip: float,
    precision: str = "fp32",
) -> dict:
    """The DeepSpeed config dict: the ZeRO file (or dict) with batch sizes and AdamW settings filled in.

    Raises ValueError listing every conflict (file, key, both values, fix), an unsupported ZeRO
    stage or precision, an LR scheduler, or a non-Adam optimizer. The input is not modified.
    """
    cfg, source = _load_zero_config(zero_config)
    errors: list[str] = []
    if micro_batch_size < 1:
        errors.append(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if world_size < 1:
        errors.append(f"world_size must be >= 1, got {world_size}")
    if precision not in PRECISIONS:
        errors.append(f"precision must be one of {PRECISIONS} with DeepSpeed, got {precision!r}")

    zero = cfg.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in ZERO_STAGES:
        errors.append(f"{source}: zero_optimization.stage = {stage!r} is not a supported ZeRO stage; "
                      f"set it to one of {ZERO_STAGES}")
    offload = isinstance(zero, dict) and (zero.get("offload_optimizer") or {}).get("device", "none") != "none"

    batch_fix = ("remove the key from the file: the engine sets batch sizes from data.batch_size and "
                 "the world size")
    for key, ours in (("train_micro_batch_size_per_gpu", micro_batch_size),
                      ("gradient_accumulation_steps", 1),
                      ("train_batch_size", micro_batch_size * world_size)):
        _fill(cfg, key, ours, where="", source=source, fix=batch_fix, errors=errors)
    _fill(cfg, "gradient_clipping", grad_clip, where="", source=source,
          fix="remove the key from the file and set optim.grad_clip instead", errors=errors)

    optimizer = cfg.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": not offload}})
    if str(optimizer.get("type", "")).lower() not in _ADAM_TYPES:
        errors.append(f"{source}: optimizer.type = {optimizer.get('type')!r} is not supported; use \"AdamW\" "
                      "(the method seeds AdamW's moments)")
    params = optimizer.setdefault("params", {})
    if params.get("adam_w_mode") is False:
        errors.append(f"{source}: optimizer.params.adam_w_mode = false gives L2-coupled Adam, whose weight "
                      "decay leaks into the OSR moments; remove the key")
    optim_fix = "remove the key from the file and set it in the optim section of the job config"
    _fill(params, "lr", 0.0, where="optimizer.params.", source=source,
          fix="remove the key from the file: the trainer sets lr every step (optim.lr and its schedule)",
          errors=errors)
    for key, ours in (("betas", tuple(betas)), ("eps", eps), ("weight_decay", weight_decay)):
        _fill(params, key, ours, where="optimizer.params.", source=source, fix=optim_fix, errors=errors)
    if "scheduler" in cfg:
        errors.append(f"{source}: has a \"scheduler\" section; remove it: the trainer drives lr itself "
                      "(a DeepSpeed scheduler would also move lr during OSR)")

    if (cfg.get("fp16") or {}).get("enabled", False):
        errors.append(f"{source}: fp16.enabled = true is not supported; use precision bf16 or fp32")
    bf16_key = "bfloat16" if "bfloat16" in cfg else "bf16"  # DeepSpeed reads either name
    file_bf16 = (cfg.get(bf16_key) or {}).get("enabled")
    if file_bf16 is not None and bool(file_bf16) != (precision == "bf16"):
        errors.append(f"{source}: {bf16_key}.enabled = {str(file_bf16).lower()} disagrees with the engine's "
                      f"precision {precision!r}; pick the matching file (zero*_bf16.json for bf16) or change "
                      "model.precision")
    if precision == "bf16":
        cfg.setdefault(bf16_key, {})["enabled"] = True

    if errors:
        raise ValueError("invalid DeepSpeed config:\n  " + "\n  ".join(errors))
    return cfg


def _world_size() -> int:
    """Ranks in the job: the process group's, or the launcher's before DeepSpeed creates the group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "MASTER_ADDR" not in os.environ:
        raise ValueError(
            "run.backend=deepspeed needs a launcher: run under `deepspeed` or `torchrun` (one process: "
            "`deepspeed --num_gpus 1 run.py ...`), or use run.backend=single"
        )
    return int(os.environ.get("WORLD_SIZE", "1"))


class DeepSpeedBackend:
    """Model + AdamW under DeepSpeed ZeRO 1/2/3; implements `engine.backends.base.Backend`.

    `model` is the unwrapped module (call `encode_image` / `encode_text` on it); `engine` is the
    DeepSpeed engine. Checkpoints go through `save` / `load` (each rank writes its own partition).
    Every method that gathers or writes (`full_moments`, `save`, `load`) is collective.
    """

    name: ClassVar[str] = "deepspeed"
    supports_reshard: ClassVar[bool] = True  # through DeepSpeed's universal checkpoint
    max_ranks: ClassVar[int | None] = None

    def __init__(self, model: nn.Module, *, device: torch.device, zero_config: str | os.PathLike | dict,
                 micro_batch_size: int, betas: tuple[float, float], weight_decay: float, eps: float,
                 grad_clip: float = 0.0, precision: str = "fp32"):
        import deepspeed

        world_size = _world_size()
        config = build_deepspeed_config(
            zero_config, micro_batch_size=micro_batch_size, world_size=world_size, betas=betas,
            weight_decay=weight_decay, eps=eps, grad_clip=grad_clip, precision=precision,
        )
        make_logit_scale_1d(model)  # DeepSpeed's parameter broadcast rejects 0-dim tensors
        groups = [g for g in adamw_param_groups(model, weight_decay) if g["params"]]
        if not any(hasattr(p, "ds_id") for p in model.parameters()):  # zero.Init placed its partitions already
            model = model.to(device)
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                                    config=config)
        self.model = self.engine.module
        self.device = device
        self.zero_stage = int(config["zero_optimization"]["stage"])
        self._trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._encoders = _EngineRoutedEncoders(self.engine, self.model, ENCODER_METHODS)
        self.input_dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # DeepSpeed holds bf16 weights
        logger.info("DeepSpeed ZeRO-%d, %s, %d rank(s), micro batch %d", self.zero_stage, precision,
                    world_size, micro_batch_size)

    @classmethod
    def from_config(cls, cfg: JobConfig, model: nn.Module, *, ctx: DistContext, device: torch.device,
                    micro_batch_size: int) -> DeepSpeedBackend:
        """ZeRO settings from run.zero_config (default zero_configs/zero2.json), AdamW from the optim section."""
        ocfg = cfg.optim
        return cls(model, device=device, zero_config=cfg.run.zero_config or DEFAULT_ZERO_CONFIG,
                   micro_batch_size=micro_batch_size, betas=tuple(ocfg.betas), weight_decay=ocfg.weight_decay,
                   eps=ocfg.eps, grad_clip=ocfg.grad_clip, precision=cfg.model.precision)

    @classmethod
    def build_bundle(cls, cfg: JobConfig, *, ctx: DistContext, micro_batch_size: int) -> tuple[ClipBundle, float]:
        """The model of `cfg` and its tau: under ZeRO-3 built partitioned (`deepspeed.zero.Init`) and loaded
        into the partitions, so no rank holds the whole model; under ZeRO-1/2 built whole on every rank."""
        from models import temperature
        from models.zero3 import build_model_zero3

        ocfg = cfg.optim
        config = build_deepspeed_config(
            cfg.run.zero_config or DEFAULT_ZERO_CONFIG, micro_batch_size=micro_batch_size, world_size=_world_size(),
            betas=tuple(ocfg.betas), weight_decay=ocfg.weight_decay, eps=ocfg.eps, grad_clip=ocfg.grad_clip,
            precision=cfg.model.precision,
        )
        if int(config["zero_optimization"]["stage"]) != 3:
            return full_bundle(cfg)
        bundle = build_model_zero3(cfg.model.name, ds_config=config, **cfg.model.build_kwargs(), seed=cfg.run.seed)
        return bundle, temperature(bundle.model)

    @classmethod
    def init_distributed(cls, ctx: DistContext, *, timeout_s: float = 600) -> None:
        """DeepSpeed's own process-group set-up (nccl on GPUs, gloo on CPU); no-op for one process."""
        if not ctx.distributed or dist.is_initialized():
            return
        import deepspeed

        if ctx.local_rank == 0:
            remove_stale_shm_buffers()
        if ctx.is_main and (folder := shm_op_build_folder()) is not None:
            logger.info("DeepSpeed is building its CPU communication op into %s (first launch only, ~1 min)", folder)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=datetime.timedelta(seconds=timeout_s))

    def forward(self, images: Tensor, texts: Tensor):
        """The model's forward as one engine forward (DeepSpeed's per-forward bookkeeping included)."""
        images = images.to(self.device, dtype=self.input_dtype, non_blocking=True)
        return self.engine(images, texts.to(self.device, non_blocking=True))

    def weights_digest(self) -> str:
        """sha256 of this rank's model parameters (its ZeRO-3 slices) and fp32 master partitions."""
        tensors = [getattr(p, "ds_tensor", p) for p in self.model.parameters()]
        tensors += [p for group in self._adam.param_groups for p in group["params"]]
        return tensors_digest(tensors)

    def full_weights(self):
        """Context in which every rank's module holds the complete weights (ZeRO-3 gathers them)."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    def full_state_dict(self) -> dict:
        """The complete module state dict on every rank, as float32: trained parameters are their fp32 masters
        (what a checkpoint holds; a bf16 run's module copies are rounded), the rest the module's tensors."""
        with self.full_weights():
            state = {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}
        for name, master in self._fp32_masters().items():
            state[name] = master.reshape(state[name].shape)
        return state

    def _fp32_masters(self) -> dict[str, Tensor]:
        """Name -> complete fp32 master of every trained parameter held in lower precision (collective:
        ZeRO-1/2 all-reduce each parameter's fragments, ZeRO-3 all-gathers its partitions)."""
        from deepspeed.utils import safe_get_full_fp32_param

        masters = {}
        for name, param in self._trainable:
            if param.dtype == torch.float32:  # fp32 runs: the module holds the masters' values
                continue
            master = safe_get_full_fp32_param(param)
            assert master is not None, f"DeepSpeed keeps no fp32 master of {name}"
            masters[name] = master.detach().float().cpu().clone()
        return masters

    @property
    def _adam(self) -> torch.optim.Optimizer:
        """The AdamW that owns this rank's fp32 partitions and their state."""
        return self.engine.optimizer.optimizer

    def backward(self, loss: Tensor) -> None:
        """Backward of this rank's objective; DeepSpeed averages gradients over ranks, unscaled here."""
        self.engine.backward(loss)

    def step(self, *, lr: float, grad_clip: float = 0.0) -> float:
        """AdamW step of every partition at `lr`, clipped to `grad_clip` if > 0; returns the grad norm."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        # Clipping lives in the ZeRO optimizer; off (0) in OSR so the moments see raw gradients.
        self.engine.optimizer.clip_grad = grad_clip
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def zero_grad(self) -> None:
        self.engine.optimizer.zero_grad(set_to_none=True)

    def state_finite(self) -> bool:
        """Model partitions, fp32 masters and moments of every rank all finite (one all-reduce)."""
        tensors = [getattr(p, "ds_tensor", p) for p in self.model.parameters()]
        tensors += [p for group in self._adam.param_groups for p in group["params"]]
        tensors += [v for state in self._adam.state.values() for v in state.values() if torch.is_tensor(v)]
        bad = torch.tensor([float(not all(bool(torch.isfinite(t).all()) for t in tensors))], device=self.device)
        dist.all_reduce(bad)
        return bad.item() == 0

    def reset_optimizer_state(self) -> None:
        # In place: ZeRO-1/2 parameters hold views into these state tensors.
        for state in self._adam.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.zero_()
                elif key == "step":
                    state[key] = 0

    def optimizer_step_count(self) -> int:
        for state in self._adam.state.values():
            return int(state["step"])
        return 0

    def full_moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        from deepspeed.utils import safe_get_full_optimizer_state

        if not self._adam.state:  # no step yet: DeepSpeed creates the state in the first one
            return {}
        if self.zero_stage in (1, 2):
            _relink_optimizer_state(self.engine.optimizer)
        out = {}
        for name, param in self._trainable:
            exp_avg, exp_avg_sq = (safe_get_full_optimizer_state(param, key) for key in _MOMENT_KEYS)
            out[name] = (exp_avg.detach().float().cpu().clone(), exp_avg_sq.detach().float().cpu().clone())
        return out

    def save(self, directory: str | os.PathLike) -> None:
        """Write this rank's partition of weights and optimizer state to `directory`."""
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)

    @classmethod
    def read_weights(cls, directory: Path, model: nn.Module) -> dict[str, Tensor]:
        """The complete fp32 weights of a checkpoint `save` wrote (any ZeRO stage, any number of ranks), read in
        one process by DeepSpeed's own `zero_to_fp32`, after every pickle in it has been vetted."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        vet_checkpoint_folder(Path(directory) / CHECKPOINT_TAG, expected_names=_checkpoint_names(model))
        with tensor_only_torch_load(deepspeed_globals()):
            return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=CHECKPOINT_TAG)

    def load(self, directory: str | os.PathLike, *, reshard: bool = False) -> None:
        """Restore weights, moments and step counter written by `save`.

        `reshard=True` (the checkpoint was written by another number of ranks) converts it to
        DeepSpeed's universal format (rank 0, into a fresh folder inside the checkpoint) and loads
        that. Every pickle DeepSpeed will read, converted ones included, is vetted first.
        """
        directory = Path(directory)
        tag = CHECKPOINT_TAG
        names = _checkpoint_names(self.engine.module)
        if dist.get_rank() == 0:
            vet_checkpoint_folder(directory / CHECKPOINT_TAG, expected_names=names)
        dist.barrier()
        if reshard:
            tag = UNIVERSAL_TAG
            if dist.get_rank() == 0:
                # Never trust a universal folder found on disk: it is rebuilt from the vetted files.
                _convert_to_universal(directory / CHECKPOINT_TAG, directory / UNIVERSAL_TAG)
                vet_checkpoint_folder(directory / UNIVERSAL_TAG, expected_names=names)
            dist.barrier()
            self.engine._config.load_universal_checkpoint = True
        try:
            with tensor_only_torch_load(deepspeed_globals()):
                path, _ = self.engine.load_checkpoint(str(directory), tag=tag)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' in {directory}")

    def close(self) -> None:
        """Release DeepSpeed's hooks, engine and this rank's CPU shared-memory buffer."""
        self._encoders.remove()
        self.engine.destroy()
        remove_shm_buffer()


_PARAM_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
# Entries of DeepSpeed's files whose keys (or items) are parameter names: the universal conversion builds
# folder names from them.
_NAME_FIELDS = ("param_shapes", "frozen_param_shapes", "shared_params", "buffer_names", "param_slice_mappings")


def _names_in(value) -> list:
    """Parameter names held by one of `_NAME_FIELDS` (a dict, or a list of dicts / names)."""
    if isinstance(value, dict):
        return [*value.keys(), *(v for v in value.values() if isinstance(v, str))]
    if isinstance(value, (list, tuple)):
        return [name for item in value for name in _names_in(item)] if any(isinstance(v, (dict, list, tuple))
                                                                           for v in value) else list(value)
    return []


def _names_of_file(state) -> list:
    names = []
    if isinstance(state, dict):
        for key, value in state.items():
            if key in _NAME_FIELDS:
                names.extend(_names_in(value))
            elif isinstance(value, dict):
                names.extend(_names_of_file(value))
    return names


def vet_checkpoint_folder(folder: Path, *, expected_names: set[str]) -> None:
    """Refuse a DeepSpeed checkpoint folder before DeepSpeed reads it: a symlink in it, a file that needs more
    than tensors and DeepSpeed's plain-data classes, or a parameter name that is not one of `expected_names`
    (the model's; DeepSpeed's universal conversion turns names into paths)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        raise ValueError(f"{folder} is not a DeepSpeed checkpoint folder of this engine (missing or a symlink)")
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise UnsafeFileError(f"checkpoint {folder} holds a symlink ({path}); this engine writes none: "
                                  "only load checkpoints written by this engine")
        if path.suffix != ".pt":
            continue
        state = load_tensor_file(path, mmap=True, extra_globals=deepspeed_globals())
        for name in _names_of_file(state):
            if not (isinstance(name, str) and _PARAM_NAME.fullmatch(name) and name in expected_names):
                raise UnsafeFileError(f"checkpoint file {path} names parameter {str(name)[:120]!r}, which the model "
                                      "does not have; only load checkpoints this engine wrote for this model")


def _checkpoint_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}


def _convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's own converter (ds_to_universal) into a fresh staging folder that replaces `target`; every
    torch.load inside it is weights_only."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))  # new: no symlink
    logger.info("converting %s to a universal checkpoint (world size changed)", source)
    try:
        with tensor_only_torch_load(deepspeed_globals()):
            ds_to_universal(Namespace(input_folder=str(source), output_folder=str(staging), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True))
        if target.is_symlink() or target.is_file():
            target.unlink()  # whatever was there is replaced, never loaded
        elif target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, (ValueError, OSError)):
            raise
        raise ValueError(f"DeepSpeed could not convert {source} for another world size "
                         f"({type(exc).__name__}: {exc}); resume on the world size it was written with") from None


def shm_buffers(master_port: str | int | None = None) -> list[str]:
    """DeepSpeed's CPU all-reduce shared-memory files (of one master port, or all)."""
    pattern = f"{SHM_PREFIX}*" if master_port is None else f"{SHM_PREFIX}*_{master_port}_*"
    return sorted(glob.glob(pattern))


def _mapped_files() -> set[str] | None:
    """Every file some process of this machine has mapped; None if any process could not be read."""
    mapped: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or entry.name == "1":  # the init process runs no job
            continue
        try:
            with open(f"/proc/{entry.name}/maps") as fh:
                mapped.update(line.split(maxsplit=5)[5].strip() for line in fh if line.count(" ") >= 5
                              and "/dev/shm/" in line)
        except FileNotFoundError:
            continue  # exited meanwhile
        except OSError:
            return None  # another user's process: cannot tell what it maps
    return mapped


def remove_stale_shm_buffers(*, min_age_s: float = 60.0) -> list[str]:
    """Remove DeepSpeed CPU all-reduce buffers no live process maps (left by killed jobs); returns them.

    Only regular files are buffers: a folder or link that merely carries the name is left alone."""
    candidates = []
    for path in shm_buffers():
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue  # removed meanwhile
        if stat.S_ISREG(info.st_mode) and time.time() - info.st_mtime > min_age_s:
            candidates.append(path)
    if not candidates:
        return []
    mapped = _mapped_files()
    if mapped is None:
        return []
    removed = []
    for path in candidates:
        if path not in mapped:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                removed.append(path)
    if removed:
        logger.info("removed %d stale DeepSpeed shared-memory buffer(s) of dead jobs", len(removed))
    return removed


def remove_shm_buffer() -> None:
    """Remove this rank's DeepSpeed CPU all-reduce buffer (DeepSpeed never deletes it)."""
    port, rank = os.environ.get("MASTER_PORT"), os.environ.get("RANK", "0")
    if port is None:
        return
    for path in shm_buffers(port):
        if path.endswith(f"_{port}_{rank}"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


class _EngineRoutedEncoders:
    """Runs the module's `encode_image` / `encode_text` as `engine(...)` calls.

    DeepSpeed does its per-forward bookkeeping in `engine.forward`: ZeRO-1/2 clear the previous
    step's gradient accumulators, ZeRO-3 gathers the root module's own parameters (open_clip's
    `positional_embedding`, `text_projection`) and those read outside their module's forward
    (`nn.MultiheadAttention.out_proj`). Calling the encoders on the bare module skips all of it.
    """

    def __init__(self, engine, module: nn.Module, method_names: tuple[str, ...]):
        self.engine = engine
        self.module = module
        self.depth = 0  # > 0 inside the module's forward: nested encoder calls run directly
        self.hooks = [module.register_forward_pre_hook(self._enter),
                      module.register_forward_hook(self._leave, always_call=True)]
        self.method_names = [name for name in method_names if callable(getattr(module, name, None))]
        for name in self.method_names:
            setattr(module, name, self._routed(getattr(module, name)))

    def remove(self) -> None:
        """Give the module back its own encoders."""
        for hook in self.hooks:
            hook.remove()
        for name in self.method_names:
            delattr(self.module, name)

    def _enter(self, module, args) -> None:
        self.depth += 1

    def _leave(self, module, args, output) -> None:
        self.depth -= 1

    def _routed(self, method):
        def call(*args, **kwargs):
            if self.depth > 0:
                return method(*args, **kwargs)
            self.module.forward = method  # the engine calls module.forward: point it at the encoder
            try:
                return self.engine(*args, **kwargs)
            finally:
                del self.module.forward

        call.__doc__ = method.__doc__
        return call


def _relink_optimizer_state(zero_optimizer) -> None:
    """Point every parameter's optimizer-state fragments at the current state tensors (ZeRO-1/2).

    ZeRO-1/2 link them once, right after the first param group's first step, so later groups
    (our decay group) stay unlinked; `load_checkpoint` drops the links. Until relinked,
    `safe_get_full_optimizer_state` raises on the ranks that own a fragment.
    """
    zero_optimizer._hp_optimizer_states_linked = False
    zero_optimizer._lazy_init_hp_params_optimizer_state()
