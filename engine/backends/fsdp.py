"""FSDP2 backend: `torch.distributed.fsdp.fully_shard` on every transformer block of both towers, then the
root; torch AdamW on the sharded fp32 (DTensor) parameters; checkpoints through `torch.distributed.checkpoint`.

Same interface as `engine.backends.single.SingleProcessBackend`. OSR runs through it unchanged: a
step at lr = 0 with clipping off accumulates raw gradients into the sharded moments, advances the
step counter and leaves the fp32 shards bit-identical (decoupled weight decay is multiplied by lr).
bf16 runs through `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: the sharded
parameters the optimizer steps stay fp32 (the masters), the gathered copies are bf16.

Checkpoints are DCP folders: each rank writes its shards, and a checkpoint written by any number of
ranks loads on any other (DCP reshards on load). `save_async` (run.async_checkpoint) writes them in the
background through DCP's `async_save`, on a gloo group of its own. DCP's `.metadata` file is a pickle: it is read
through an unpickler that accepts DCP's own metadata classes only, and only tensors are loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from engine.backends.base import (
    Backend,
    OptimSettings,
    TorchAdamWState,
    adamw_param_groups,
    full_bundle,
    set_learning_rates,
    tensors_digest,
)
from engine.distributed import broadcast_object, init_process_group
from engine.safe_load import read_dcp_metadata
from models.towers import BLOCK_LISTS
from models.weights import SCALAR_PARAMS, log_loaded_weights, make_logit_scale_1d

if TYPE_CHECKING:
    from engine.config import JobConfig
    from engine.distributed import DistContext
    from models import ClipBundle

logger = logging.getLogger(__name__)

ENCODER_METHODS = ("encode_image", "encode_text")  # open_clip entry points besides forward
STATE_FILE = "fsdp.json"  # what the DCP folder holds (JSON: read without unpickling)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
NEEDS_LAUNCHER = ("run.backend=fsdp needs a launcher: run under `torchrun` (one process: "
                  "`torchrun --nproc_per_node 1 run.py ...`), or use run.backend=single")


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _full(tensor: Tensor) -> Tensor:
    """The complete tensor (collective for a DTensor)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every residual block of both towers: the children of each outermost block list (BLOCK_LISTS)."""
    lists = []
    for name, module in model.named_modules():
        if (name.rsplit(".", 1)[-1] in BLOCK_LISTS and isinstance(module, (nn.ModuleList, nn.Sequential))
                and len(module) > 0 and not any(name.startswith(outer + ".") for outer, _ in lists)):
            lists.append((name, module))
    blocks = [block for _, module in lists for block in module]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer block lists ({', '.join(BLOCK_LISTS)}); "
                         "run.backend=fsdp shards transformer towers only: use run.backend=deepspeed for this model")
    return blocks


def parallelize_clip(model: nn.Module, *, mesh, precision: str) -> nn.Module:
    """`fully_shard` every transformer block, then the root (embeddings, projections, norms, logit_scale)."""
    if precision == "bf16":
        block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # The objective gets fp32 features, as from the single-process backend's autocast (root only:
        # fp32 between blocks would meet bf16 norm weights).
        root_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                           output_dtype=torch.float32)
    else:
        block_policy = root_policy = MixedPrecisionPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)
    for method in ENCODER_METHODS:  # the evaluator and tests call the encoders directly
        if callable(getattr(model, method, None)):
            register_fsdp_forward_method(model, method)
    return model


class FSDPBackend(TorchAdamWState, Backend):
    """Model sharded with FSDP2 + torch AdamW on the shards; implements `engine.backends.base.Backend`.

    `model` may be built on the meta device (no rank holds the full fp32 model): pass `weights`,
    a full state dict that rank 0 holds (other ranks pass None); it is broadcast shard by shard. `lr_scales`:
    parameter name -> learning-rate factor (layer decay); frozen parameters get no optimizer state.
    """

    name: ClassVar[str] = "fsdp"
    supports_reshard: ClassVar[bool] = True  # DCP reshards on load
    max_ranks: ClassVar[int | None] = None
    supports_async_save: ClassVar[bool] = True  # DCP's async_save

    def __init__(self, model: nn.Module, *, device: torch.device, betas: tuple[float, float], weight_decay: float,
                 eps: float, precision: str = "fp32", weights: dict[str, Tensor] | None = None,
                 lr_scales: Mapping[str, float] | None = None):
        if not dist.is_initialized():
            raise ValueError(NEEDS_LAUNCHER)
        make_logit_scale_1d(model)  # fully_shard rejects 0-dim parameters
        on_meta = any(p.is_meta for p in model.parameters())
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        self.model = parallelize_clip(model, mesh=mesh, precision=precision)
        self.device = device
        if on_meta:
            self._materialise(weights)
        elif weights is not None:
            raise ValueError("weights are for a model built on the meta device; this one has its weights")
        # fused: one kernel per parameter list, no temporaries the size of the shards (foreach keeps several:
        # +2-4 GB per ViT-H rank at the step), and not the per-tensor loop torch picks on CPU (slow with DTensors).
        groups = adamw_param_groups(self.model, weight_decay, lr_scales)
        self._lr_scales = [group["lr_scale"] for group in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, fused=True)
        self._trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._checkpoint_group = None  # a gloo group for background checkpoint writes, made on first use
        logger.info("FSDP2, %s, %d rank(s), %d blocks sharded", precision, dist.get_world_size(),
                    len(transformer_blocks(self.model)))

    @classmethod
    def build_bundle(cls, cfg: JobConfig, *, ctx: DistContext, micro_batch_size: int,
                     optim: OptimSettings) -> tuple[ClipBundle, float]:
        """With `model.weights`: the model on the meta device on every rank (no memory) and the checkpoint's
        temperature, read by rank 0. Without: the full random-init model (its values match one process)."""
        if cfg.model.weights is None:
            return full_bundle(cfg)
        from models.meta import build_model_on_meta, read_matching_state_dict

        bundle = build_model_on_meta(cfg.model.name, **cfg.model.build_kwargs())
        tau = None
        if ctx.rank == 0:  # checked here, before any rank allocates; read again (and broadcast) in from_config
            logit_scale = read_matching_state_dict(bundle.model, cfg.model.weights)["logit_scale"]
            tau = float(torch.exp(-logit_scale.float()).reshape(()))
        return bundle, broadcast_object(tau)

    @classmethod
    def from_config(cls, cfg: JobConfig, model: nn.Module, *, ctx: DistContext, device: torch.device,
                    micro_batch_size: int, optim: OptimSettings) -> FSDPBackend:
        """AdamW with `optim`, precision from the model section; a meta-device model gets its
        `model.weights` from rank 0, shard by shard."""
        weights = None
        if ctx.rank == 0 and any(p.is_meta for p in model.parameters()):
            from models.meta import read_matching_state_dict

            weights = read_matching_state_dict(model, cfg.model.weights)
        backend = cls(model, device=device, betas=optim.betas, weight_decay=optim.weight_decay, eps=optim.eps,
                      precision=cfg.model.precision, weights=weights, lr_scales=optim.lr_scales)
        if weights is not None:
            log_loaded_weights(cfg.model.weights, cfg.model.name, len(weights), into="the FSDP2 shards")
        return backend

    @classmethod
    def init_distributed(cls, ctx: DistContext, *, timeout_s: float = 600) -> None:
        """Join torchrun's process group (gloo on CPU, nccl on CUDA), also for one rank: FSDP needs one."""
        if not dist.is_initialized() and "MASTER_ADDR" not in os.environ:
            raise ValueError(NEEDS_LAUNCHER)
        init_process_group(ctx, timeout_s=timeout_s, even_for_one_rank=True)

    def _materialise(self, weights: dict[str, Tensor] | None) -> None:
        """Allocate this rank's shards and fill them from rank 0's full state dict (broadcast)."""
        from models.meta import init_non_persistent_buffers

        self.model.to_empty(device=self.device)
        init_non_persistent_buffers(self.model)
        if dist.get_rank() == 0 and weights is None:
            raise ValueError("a model built on the meta device needs its weights on rank 0")
        if weights is not None:
            for name in SCALAR_PARAMS:
                if name in weights and weights[name].ndim == 0:
                    weights = {**weights, name: weights[name].reshape(1)}
        set_model_state_dict(self.model, weights if dist.get_rank() == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def compile_problem(self, mode: str) -> str | None:
        """Blocks compile (FSDP2's gathers stay around them); the whole forward would hold the gathers."""
        if mode == "model":
            return ("run.compile=model is not supported with run.backend=fsdp (FSDP2's gathers sit between the "
                    "blocks of the graph): use run.compile=blocks")
        return None

    # ----- the step -----
    def forward(self, images: Tensor, texts: Tensor):
        """The model's forward (normalised image and text features); FSDP gathers each block in turn."""
        images = images.to(self.device, dtype=torch.float32, non_blocking=True)
        return self.model(images, texts.to(self.device, non_blocking=True))

    def forward_no_grad(self, images: Tensor, texts: Tensor):
        """`forward` without gradient; every module is resharded before and after it, so it reads the shards'
        current values and leaves none gathered (the root keeps its gathered weights after a forward)."""
        modules = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for module in modules:
            module.reshard()  # the step's forward left the root gathered: the backward gathers it again
        try:
            with torch.no_grad():
                return self.forward(images, texts)
        finally:
            for module in modules:
                module.reshard()

    def parameter_shards(self) -> dict[str, Tensor]:
        """This rank's local shard of each trained parameter (the DTensor's local tensor FSDP all-gathers from)."""
        return {name: _local(param.data) for name, param in self._trainable}

    def parameter_spans(self) -> dict[str, tuple[int, int, tuple[int, ...]]]:
        """Where each local shard lies in its flattened parameter: FSDP2 gives rank r rows r * ceil(n / world) on
        (dim 0, as `torch.chunk`)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        spans = {}
        for name, param in self._trainable:
            shape = tuple(param.shape)
            rows, row = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
            start = min(rank * -(-rows // world), rows) * row
            spans[name] = (start, start + _local(param.data).numel(), shape)
        return spans

    def backward(self, loss: Tensor) -> None:
        """Backward; FSDP reduce-scatters the gradients (averaged over ranks) into each rank's shards."""
        loss.backward()

    def _grads(self) -> list[Tensor]:
        return [p for _, p in self._trainable if p.grad is not None]

    def step(self, *, lr: float, grad_clip: float = 0.0) -> float:
        """AdamW step of every shard at `lr`, clipped to `grad_clip` if > 0; returns the global grad norm.

        A non-finite norm is seen before the update: nothing is applied then.
        """
        params = self._grads()
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = _full(norm)
        finite = bool(torch.isfinite(norm))
        if finite and grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
        set_learning_rates(self.optimizer.param_groups, lr, self._lr_scales)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_finite(self) -> bool:
        """Weight shards and moments of every rank all finite (one all-reduce)."""
        tensors = [_local(p) for p in self.model.parameters()]
        tensors += [_local(v) for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        bad = torch.tensor([float(not all(bool(torch.isfinite(t).all()) for t in tensors))], device=self.device)
        dist.all_reduce(bad)
        return bad.item() == 0

    # ----- moments -----
    def full_moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Parameter name -> (exp_avg, exp_avg_sq) gathered from every rank's shards (collective)."""
        out = {}
        for name, param in self._trainable:
            state = self.optimizer.state.get(param)
            if not state:
                return {}  # no step yet (the same on every rank)
            m, v = (_full(state[key]).detach().float().cpu().clone() for key in _MOMENT_KEYS)
            out[name] = (m, v)
        return out

    # ----- weights -----
    def weights_digest(self) -> str:
        """sha256 of this rank's fp32 weight shards (which are also AdamW's parameters)."""
        names, params = zip(*self.model.named_parameters())
        return tensors_digest([_local(p) for p in params], names=names)

    @contextlib.contextmanager
    def full_weights(self):
        """Context in which every rank's module holds the complete weights (gathered once, kept until the
        end), so ranks may run different numbers of forwards (evaluation splits)."""
        modules = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        try:
            yield self.model
        finally:
            for module in modules:
                module.reshard()
                module.set_reshard_after_forward(True, recurse=False)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The complete model state dict (fp32, CPU) on rank 0; other ranks get {} (collective)."""
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    # ----- checkpoints -----
    def _state(self) -> dict:
        """Model shards and AdamW state (tensors only) as DCP saves and loads them."""
        state = {"model": get_model_state_dict(self.model)}
        if self.optimizer.state:
            # get_optimizer_state_dict would create state by a step when there is none (and count it).
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)["state"]
        return state

    def _prepare_save(self, directory: Path) -> dict:
        directory.mkdir(parents=True, exist_ok=True)
        state = self._state()
        if dist.get_rank() == 0:
            (directory / STATE_FILE).write_text(json.dumps({
                "optimizer_state": "optim" in state, "world_size": dist.get_world_size(),
            }))
        return state

    def save(self, directory: Path) -> None:
        """Each rank writes its shards of weights and optimizer state into the DCP folder `directory`."""
        state = self._prepare_save(Path(directory))
        try:
            dcp.save(state, checkpoint_id=directory)
        except CheckpointException as exc:
            raise _first_failure(exc) from None

    def save_async(self, directory: Path) -> Future:
        """`save` in the background (collective): the shards are copied to host memory before this returns
        (the next steps may change them), then a DCP thread writes them. The future's exception is the
        lowest failing rank's (an OSError stays one). The copy costs host memory of the size of this
        rank's shards of weights and optimizer state while the write lasts."""
        state = self._prepare_save(Path(directory))
        if self._checkpoint_group is None:  # the writer's collectives stay apart from the training's
            self._checkpoint_group = dist.new_group(backend="gloo")
        written = dcp.async_save(state, checkpoint_id=directory, process_group=self._checkpoint_group)
        outcome: Future = Future()

        def settle(future: Future) -> None:
            exc = future.exception()
            if exc is None:
                outcome.set_result(None)
            else:
                outcome.set_exception(_first_failure(exc) if isinstance(exc, CheckpointException) else exc)

        written.add_done_callback(settle)
        return outcome

    @classmethod
    def read_weights(cls, directory: Path, model: nn.Module) -> dict[str, Tensor]:
        """The complete weights of the DCP folder `directory`, written by any number of ranks, read in one
        process without a process group into tensors shaped like `model`'s (a full CPU model)."""
        target = {name: torch.empty(tensor.shape if tensor.ndim else (1,), dtype=torch.float32)
                  for name, tensor in model.state_dict().items()}  # scalars were saved as shape [1]
        state = {"model": target}
        read_dcp_metadata(Path(directory) / ".metadata")  # refused here with its own line, before DCP reads it
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=TensorOnlyReader(directory), no_dist=True)
        except CheckpointException as exc:
            failure = _first_failure(exc)
            raise ValueError(f"{directory}: {type(failure).__name__}: {failure}") from None
        return state["model"]

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        """Restore weights, moments and step counter written by `save` on any number of ranks."""
        directory = Path(directory)
        try:
            info = json.loads((directory / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{directory / STATE_FILE} is missing or unreadable ({exc}); not an FSDP checkpoint "
                             "(written by another backend?)") from exc
        if info["optimizer_state"] and not self.optimizer.state:
            # Creates state to load into (a step at lr = 0 with zero gradients; overwritten below).
            get_optimizer_state_dict(self.model, self.optimizer)
        if not info["optimizer_state"]:
            self.optimizer.state.clear()
        state = self._state()
        read_dcp_metadata(directory / ".metadata")  # refused here with its own line, before DCP reads it
        try:
            dcp.load(state, storage_reader=TensorOnlyReader(directory))
        except CheckpointException as exc:
            failure = _first_failure(exc)
            raise ValueError(f"{directory}: {type(failure).__name__}: {failure}") from None
        set_model_state_dict(self.model, state["model"])
        if "optim" in state:
            groups = get_optimizer_state_dict(self.model, self.optimizer)["param_groups"]
            set_optimizer_state_dict(self.model, self.optimizer, {"state": state["optim"], "param_groups": groups})

    def close(self) -> None:
        """Drop the optimizer state and gradients; the process group stays."""
        self.optimizer.state.clear()
        self.optimizer.zero_grad(set_to_none=True)


def _first_failure(exc: CheckpointException) -> BaseException:
    """The exception of the lowest failing rank (DCP wraps every rank's in one BaseException); an OSError
    (disk full) stays one, so the checkpoint manager reports it."""
    failure = exc.failures[min(exc.failures)]
    failure = failure[0] if isinstance(failure, tuple) else failure
    return failure if isinstance(failure, Exception) else RuntimeError(str(exc))


class TensorOnlyReader(FileSystemReader):
    """DCP's file reader whose metadata is read by `engine.safe_load.read_dcp_metadata` (DCP's own classes by
    exact name, data files inside the folder, tensor entries only, since DCP unpickles any other entry)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / ".metadata"
        rank_path = Path(self.path) / f"__{int(kwargs.get('rank') or 0)}.metadata"
        if kwargs.get("rank") is not None and rank_path.is_file():  # DCP's fallback when the global one failed
            path = rank_path
        metadata = read_dcp_metadata(path)  # the global one again otherwise: its refusal is what to report
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
