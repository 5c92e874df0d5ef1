"""DeepSpeed ZeRO backend: the model wrapped by `deepspeed.initialize`, AdamW state partitioned over ranks.

Same interface as `engine.backends.single.SingleProcessBackend`. OSR runs through it unchanged:
a step at lr = 0 with clipping off accumulates raw gradients into the partitioned fp32 moments,
advances every partition's step counter and leaves fp32 masters and model weights bit-identical
(AdamW's decoupled weight decay is multiplied by lr). The trainer drives lr itself: no DeepSpeed
LR scheduler is ever attached.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from engine.backends.base import (
    Backend,
    OptimSettings,
    adamw_param_groups,
    full_bundle,
    set_learning_rates,
    tensors_digest,
)
from engine.backends.deepspeed.config import DEFAULT_ZERO_CONFIG, job_deepspeed_config
from engine.backends.deepspeed.shm import remove_shm_buffer, remove_stale_shm_buffers, shm_op_build_folder
from engine.backends.deepspeed.universal import convert_to_universal
from engine.backends.deepspeed.vetting import checkpoint_names, read_frozen_values, vet_checkpoint_folder
from engine.distributed import init_process_group
from engine.safe_load import deepspeed_globals, tensor_only_torch_load
from models.weights import LOADED_FP32_ATTR, make_logit_scale_1d

if TYPE_CHECKING:
    from engine.config import JobConfig
    from engine.distributed import DistContext
    from models import ClipBundle

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "deepspeed"  # one DeepSpeed checkpoint per directory; the checkpoint manager names them
UNIVERSAL_TAG = "universal"  # the same checkpoint converted for another world size
# Beside the DeepSpeed checkpoint: the fp32 values of the frozen parameters, which DeepSpeed keeps only in the
# module's precision (no fp32 master), so a bf16 run would otherwise round them.
FROZEN_FILE = "frozen_fp32.safetensors"
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
ENCODER_METHODS = ("encode_image", "encode_text")  # run through the engine (see _EngineRoutedEncoders)


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


class DeepSpeedBackend(Backend):
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
                 grad_clip: float = 0.0, precision: str = "fp32", lr_scales: Mapping[str, float] | None = None):
        """`lr_scales`: parameter name -> learning-rate factor (layer decay); frozen parameters are left out of
        the optimizer (no fp32 master, no moments)."""
        import deepspeed

        world_size = _world_size()
        config = job_deepspeed_config(
            zero_config, micro_batch_size=micro_batch_size, world_size=world_size, betas=betas,
            weight_decay=weight_decay, eps=eps, grad_clip=grad_clip, precision=precision,
        )
        make_logit_scale_1d(model)  # DeepSpeed's parameter broadcast rejects 0-dim tensors
        # Taken before deepspeed.initialize casts the module; an fp32 module keeps them exactly itself.
        self._frozen_fp32 = _frozen_fp32_values(model) if precision != "fp32" else {}
        groups = [g for g in adamw_param_groups(model, weight_decay, lr_scales) if g["params"]]
        self._lr_scales = [group["lr_scale"] for group in groups]  # ZeRO keeps the groups, in this order
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
                    micro_batch_size: int, optim: OptimSettings) -> DeepSpeedBackend:
        """ZeRO settings from run.zero_config (default zero_configs/zero2.json), AdamW with `optim`."""
        return cls(model, device=device, zero_config=cfg.run.zero_config or DEFAULT_ZERO_CONFIG,
                   micro_batch_size=micro_batch_size, betas=optim.betas, weight_decay=optim.weight_decay,
                   eps=optim.eps, grad_clip=optim.grad_clip, precision=cfg.model.precision,
                   lr_scales=optim.lr_scales)

    @classmethod
    def build_bundle(cls, cfg: JobConfig, *, ctx: DistContext, micro_batch_size: int,
                     optim: OptimSettings) -> tuple[ClipBundle, float]:
        """The model of `cfg` and its tau: under ZeRO-3 built partitioned (`deepspeed.zero.Init`) and loaded
        into the partitions, so no rank holds the whole model; under ZeRO-1/2 built whole on every rank."""
        from models import temperature
        from models.zero3 import build_model_zero3

        config = job_deepspeed_config(
            cfg.run.zero_config or DEFAULT_ZERO_CONFIG, micro_batch_size=micro_batch_size, world_size=_world_size(),
            betas=optim.betas, weight_decay=optim.weight_decay, eps=optim.eps, grad_clip=optim.grad_clip,
            precision=cfg.model.precision,
        )
        if int(config["zero_optimization"]["stage"]) != 3:
            return full_bundle(cfg)
        bundle = build_model_zero3(cfg.model.name, ds_config=config, **cfg.model.build_kwargs(), seed=cfg.run.seed,
                                   keep_fp32=_locked_names(cfg))
        return bundle, temperature(bundle.model)

    @classmethod
    def init_distributed(cls, ctx: DistContext, *, timeout_s: float = 600) -> None:
        """DeepSpeed's own process-group set-up (nccl on GPUs, gloo on CPU, and its communication layer);
        no-op for one process. Buffers of dead jobs in /dev/shm are removed first (local rank 0)."""
        if not ctx.distributed or dist.is_initialized():
            return
        import deepspeed

        if ctx.local_rank == 0:
            remove_stale_shm_buffers()
        if ctx.is_main and (folder := shm_op_build_folder()) is not None:
            logger.info("DeepSpeed is building its CPU communication op into %s (first launch only, ~1 min)", folder)
        init_process_group(ctx, timeout_s=timeout_s,
                           create=lambda backend, timeout: deepspeed.init_distributed(dist_backend=backend,
                                                                                      timeout=timeout))

    def compile_problem(self, mode: str) -> str | None:
        """ZeRO-1/2 compile (whole parameters in the forward); ZeRO-3 gathers in hooks of every sub-module."""
        if self.zero_stage == 3:
            return (f"run.compile={mode} is not supported under ZeRO-3 (its per-layer gathering hooks sit inside "
                    "any compiled graph): use run.backend=fsdp with run.compile=blocks, a ZeRO-1/2 config, or "
                    "run.compile=none")
        return None

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
        return _with_frozen_values(state, self._frozen_fp32)

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

    def parameter_shards(self) -> dict[str, Tensor]:
        """This rank's part of each trained parameter, in the module's dtype (bf16 runs: the bf16 copy the forward
        reads). ZeRO-1/2: the whole parameter (replicated). ZeRO-3: its partition `ds_tensor` (flat, the last
        rank's zero-padded), also for the small parameters DeepSpeed keeps gathered (`ds_persist`): their gathered
        copy is refreshed from the partitions after each step, and `forward_no_grad` gathers it afresh."""
        if self.zero_stage != 3:
            return super().parameter_shards()
        return {name: param.ds_tensor for name, param in self._trainable}

    def parameter_spans(self) -> dict[str, tuple[int, int, tuple[int, ...]]]:
        """ZeRO-3: rank r's partition holds elements r * p on of the flattened parameter (p: the partition's size,
        the last one's tail padding); ZeRO-1/2: whole parameters."""
        if self.zero_stage != 3:
            return super().parameter_spans()
        rank, spans = dist.get_rank(), {}
        for name, param in self._trainable:
            size = param.ds_tensor.numel()
            start = min(rank * size, param.ds_numel)
            spans[name] = (start, min(start + size, param.ds_numel), tuple(param.ds_shape))
        return spans

    def forward_no_grad(self, images: Tensor, texts: Tensor):
        """`forward` without gradient, through the engine (its gathering hooks run). ZeRO-3: every gathered
        parameter, persistent ones included, is released before and after, so this forward gathers the
        partitions' current values and the step's backward gathers them again."""
        if self.zero_stage != 3:
            return super().forward_no_grad(images, texts)
        offload = self.engine.optimizer.parameter_offload
        offload.partition_all_parameters()  # the step's forward left some gathered (persistent, reused)
        try:
            with torch.no_grad():
                return self.forward(images, texts)
        finally:
            offload.partition_all_parameters()

    def begin_micro_batch(self, *, last: bool) -> None:
        """DeepSpeed's own accumulation boundary: gradients reduce and the step applies only after the last
        micro-batch (its gradient_accumulation_steps stays 1, so no backward is scaled by 1/K)."""
        self.engine.set_gradient_accumulation_boundary(last)

    def backward(self, loss: Tensor) -> None:
        """Backward of this rank's objective; DeepSpeed averages gradients over ranks, unscaled here."""
        self.engine.backward(loss)

    def step(self, *, lr: float, grad_clip: float = 0.0) -> float:
        """AdamW step of every partition at `lr`, clipped to `grad_clip` if > 0; returns the grad norm."""
        set_learning_rates(self.engine.optimizer.param_groups, lr, self._lr_scales)
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
        """Write this rank's partition of weights and optimizer state to `directory` (rank 0 also the frozen
        parameters' fp32 values)."""
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)
        if self._frozen_fp32 and dist.get_rank() == 0:
            from safetensors.torch import save_file

            save_file({name: value.contiguous() for name, value in self._frozen_fp32.items()},
                      str(Path(directory) / FROZEN_FILE), metadata={"format": "pt"})

    @classmethod
    def read_weights(cls, directory: Path, model: nn.Module) -> dict[str, Tensor]:
        """The complete fp32 weights of a checkpoint `save` wrote (any ZeRO stage, any number of ranks), read in
        one process by DeepSpeed's own `zero_to_fp32`, after every pickle in it has been vetted."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        directory = Path(directory)
        vet_checkpoint_folder(directory / CHECKPOINT_TAG, expected_names=checkpoint_names(model))
        frozen = _read_frozen_file(directory, model)
        with tensor_only_torch_load(deepspeed_globals()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        return _with_frozen_values(state, frozen)

    def load(self, directory: str | os.PathLike, *, reshard: bool = False) -> None:
        """Restore weights, moments and step counter written by `save`.

        `reshard=True` (the checkpoint was written by another number of ranks) converts it to
        DeepSpeed's universal format (rank 0, into a fresh folder inside the checkpoint) and loads
        that. Every pickle DeepSpeed will read, converted ones included, is vetted first.
        """
        directory = Path(directory)
        tag = CHECKPOINT_TAG
        names = checkpoint_names(self.engine.module)
        if dist.get_rank() == 0:
            vet_checkpoint_folder(directory / CHECKPOINT_TAG, expected_names=names)
            _read_frozen_file(directory, self.model)
        dist.barrier()
        if reshard:
            tag = UNIVERSAL_TAG
            if dist.get_rank() == 0:
                # Never trust a universal folder found on disk: it is rebuilt from the vetted files.
                convert_to_universal(directory / CHECKPOINT_TAG, directory / UNIVERSAL_TAG)
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
        # The run's start values travel with its checkpoints (older ones without the file keep this build's); a
        # ZeRO-3 job resumed without model.weights gets them here only.
        saved = _read_frozen_file(directory, self.model)
        frozen = {name for name, param in self.model.named_parameters() if not param.requires_grad}
        self._frozen_fp32.update({name: value for name, value in saved.items() if name in frozen})

    def close(self) -> None:
        """Release DeepSpeed's hooks, engine and this rank's CPU shared-memory buffer."""
        self._encoders.remove()
        self.engine.destroy()
        remove_shm_buffer()


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


def _locked_names(cfg: JobConfig) -> set[str]:
    """The parameters model.lock_image / model.lock_text will freeze in a bf16 job that loads weights (read on a
    model built on the meta device): ZeRO-3 rounds their partitions, so rank 0 keeps the file's values."""
    if cfg.model.precision == "fp32" or cfg.model.weights is None or not cfg.model.locks():
        return set()
    from engine.freezing import freeze_untrained
    from models.meta import build_model_on_meta

    frozen = freeze_untrained(build_model_on_meta(cfg.model.name, **cfg.model.build_kwargs()).model, cfg)
    return {name for kind in cfg.model.locks() for name in frozen[kind]}


def _frozen_fp32_values(model: nn.Module) -> dict[str, Tensor]:
    """Name -> float32 value of every frozen parameter, taken before DeepSpeed casts the module: the module's
    own value, or under ZeRO-3 (partitions already in the run's precision) the value read from the weights file
    (`models.weights.LOADED_FP32_ATTR`); a partitioned one without it was created in that precision (random
    init) and is its own start value."""
    values = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        loaded = getattr(param, LOADED_FP32_ATTR, None)
        if loaded is not None:
            values[name] = loaded.detach().float().cpu().reshape(getattr(param, "ds_shape", param.shape)).clone()
        elif not hasattr(param, "ds_id"):
            values[name] = param.detach().float().cpu().clone()
    return values


def _with_frozen_values(state: dict[str, Tensor], frozen: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with each frozen parameter's fp32 value in place of DeepSpeed's (held in the run's precision)."""
    for name, value in frozen.items():
        if name in state:
            state[name] = value.reshape(state[name].shape).clone()
    return state


def _read_frozen_file(directory: Path, model: nn.Module) -> dict[str, Tensor]:
    """The frozen parameters' fp32 values `save` wrote into checkpoint `directory`, vetted ({} for a checkpoint
    written before the file existed)."""
    path = Path(directory) / FROZEN_FILE
    if not (path.exists() or path.is_symlink()):
        return {}
    numel = {name: getattr(param, "ds_numel", param.numel()) for name, param in model.named_parameters()}
    return read_frozen_values(path, expected_numel=numel)


def _relink_optimizer_state(zero_optimizer) -> None:
    """Point every parameter's optimizer-state fragments at the current state tensors (ZeRO-1/2).

    ZeRO-1/2 link them once, right after the first param group's first step, so later groups
    (our decay group) stay unlinked; `load_checkpoint` drops the links. Until relinked,
    `safe_get_full_optimizer_state` raises on the ranks that own a fragment.
    """
    zero_optimizer._hp_optimizer_states_linked = False
    zero_optimizer._lazy_init_hp_params_optimizer_state()
