"""The backend interface (what the trainer needs from whoever owns model, optimizer and their state)
and the helpers every backend shares."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from engine.config import JobConfig, OptimConfig
    from engine.distributed import DistContext
    from models import ClipBundle


@dataclass(frozen=True)
class OptimSettings:
    """AdamW's settings, built once from the optim section and handed to every backend."""

    betas: tuple[float, float]
    weight_decay: float
    eps: float
    grad_clip: float = 0.0  # fine-tuning's max global grad norm; 0 = off
    # Parameter name -> learning-rate factor (layer decay, `models.towers.layer_decay_scales`); unlisted: 1.
    lr_scales: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, optim: OptimConfig) -> OptimSettings:
        return cls(betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps,
                   grad_clip=optim.grad_clip)


class Backend(Protocol):
    """Owns the model and AdamW for one rank: forward, backward, step; moments for OSR; checkpoints.

    Every method that gathers or writes (`full_moments`, `full_state_dict`, `save`, `load`) is
    collective: call it on every rank. A backend subclasses this protocol to get the defaults of its
    capabilities (`build_bundle`: the full model on every rank; no background `save_async`).
    """

    name: ClassVar[str]
    supports_reshard: ClassVar[bool]  # can `load` a checkpoint written by another number of ranks
    max_ranks: ClassVar[int | None]  # None: any number of ranks
    supports_async_save: ClassVar[bool] = False  # has a background `save_async` (run.async_checkpoint)
    model: nn.Module
    device: torch.device

    @classmethod
    def build_bundle(cls, cfg: JobConfig, *, ctx: DistContext, micro_batch_size: int,
                     optim: OptimSettings) -> tuple[ClipBundle, float]:
        """The job's model and its fixed temperature tau. Default: every rank builds the full model with its
        weights; a backend overrides it so that no rank holds the whole model (ZeRO-3: partitioned while
        constructing; FSDP2: on the meta device)."""
        return full_bundle(cfg)

    @classmethod
    def from_config(cls, cfg: JobConfig, model: nn.Module, *, ctx: DistContext, device: torch.device,
                    micro_batch_size: int, optim: OptimSettings) -> Backend:
        """Wrap `model` with AdamW's settings `optim` and the precision of `cfg`'s model section."""

    @classmethod
    def init_distributed(cls, ctx: DistContext, *, timeout_s: float = 600) -> None:
        """Join the job's process group the way this backend needs (default: no-op for one process); a
        collective that waits `timeout_s` for a rank fails instead of hanging. Every backend joins through
        `engine.distributed.init_process_group`."""
        from engine.distributed import init_process_group

        init_process_group(ctx, timeout_s=timeout_s)

    def forward(self, images: Tensor, texts: Tensor):
        """The model's forward on a batch, in this backend's precision (open_clip: normalised features)."""

    def forward_no_grad(self, images: Tensor, texts: Tensor):
        """`forward` without gradient, leaving no gathered weights behind, so the values in `parameter_shards()`
        may be changed just before and after it (a teacher's forward between the step's forward and backward).
        Default: `forward` under `torch.no_grad` (backends that keep nothing gathered after a forward)."""
        with torch.no_grad():
            return self.forward(images, texts)

    def parameter_shards(self) -> dict[str, Tensor]:
        """Name -> the tensor holding this rank's part of each trained parameter, the one the forward reads
        (writable in place, no autograd history). Default: the whole parameter (`param.data`), as a replicated
        model holds it (one process, ZeRO-1/2)."""
        return {name: param.data for name, param in self.model.named_parameters() if param.requires_grad}

    def parameter_spans(self) -> dict[str, tuple[int, int, tuple[int, ...]]]:
        """Name -> (start, stop, shape): `parameter_shards()[name]` holds elements start..stop-1 of the flattened
        whole parameter of `shape`, in its first stop - start entries (any rest is padding). Default: all of it."""
        return {name: (0, shard.numel(), tuple(shard.shape)) for name, shard in self.parameter_shards().items()}

    @contextlib.contextmanager
    def shards_replaced(self, values: dict[str, Tensor]) -> Iterator[None]:
        """Inside: the forward reads `values` (name -> a tensor shaped like `parameter_shards()[name]`, cast to
        its dtype) in place of the trained parameters' shards; after (also on an error): the trained values
        again, bit-exact. Default: copies into `parameter_shards()` (fused over all tensors), the trained values
        kept aside meanwhile (a transient copy of this rank's shards in the module's dtype)."""
        shards = self.parameter_shards()
        targets = list(shards.values())
        aside = [target.clone() for target in targets]
        torch._foreach_copy_(targets, [values[name] for name in shards])
        try:
            yield
        finally:
            torch._foreach_copy_(targets, aside)

    def compile_problem(self, mode: str) -> str | None:
        """Why `run.compile=mode` ('blocks': each transformer block; 'model': the whole forward) cannot run on
        this backend, as the fix to make (one line); None when it can. Default: both run (whole parameters
        during the forward, no hooks inside the blocks)."""
        return None

    def begin_micro_batch(self, *, last: bool) -> None:
        """The next forward and backward are one micro-batch of an accumulated step (`data.accum_steps` > 1);
        `last`: the one after which `step` follows. Default: nothing (`backward` adds into the gradients)."""

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of `loss` (this rank's share of the global objective)."""

    def step(self, *, lr: float, grad_clip: float = 0.0) -> float:
        """One AdamW step at `lr` (0 in OSR: weights stay unchanged), each group's at `lr` times its layer-decay
        factor (`set_learning_rates`); returns the global grad norm.

        A backend that can see a non-finite norm before updating does not update (`state_finite`
        then still holds); one that cannot leaves the caller to find out through `state_finite`.
        """

    def state_finite(self) -> bool:
        """Whether weights and optimizer state are finite on every rank (collective)."""

    def zero_grad(self) -> None:
        """Drop accumulated gradients (a skipped step)."""

    def reset_optimizer_state(self) -> None:
        """Forget AdamW's moments and step counter (the 'no seeding' ablation)."""

    def optimizer_step_count(self) -> int:
        """AdamW's step counter t (bias correction uses t)."""

    def full_moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Parameter name -> (exp_avg, exp_avg_sq), complete tensors on CPU."""

    def save(self, directory: Path) -> None:
        """Write model and optimizer state into `directory` (each rank its own part)."""

    def save_async(self, directory: Path) -> Future:
        """`save` in the background (collective; only where `supports_async_save`): the state is copied to host
        memory before this returns, and the future says when (and whether) the files are written."""
        raise NotImplementedError(f"run.backend={self.name} writes checkpoints synchronously")

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        """Restore what `save` wrote; `reshard`: it was written by another number of ranks."""

    @classmethod
    def read_weights(cls, directory: Path, model: nn.Module) -> dict[str, Tensor]:
        """The complete weights `save` wrote into `directory` (by any number of ranks), read in one process
        without a process group; `model` is a full CPU model of the architecture (shapes, names)."""

    def weights_digest(self) -> str:
        """A digest of this rank's weight values (model and master copies): equal iff every value is
        equal (-0.0 and +0.0 alike: AdamW at lr = 0 may flip the sign of a zero)."""

    def full_weights(self) -> AbstractContextManager:
        """Context in which `model` holds complete (gathered) weights, e.g. for evaluation."""

    def full_state_dict(self) -> dict[str, Tensor]:
        """The complete model state dict on rank 0 (other ranks: the same, or {} where gathering to rank 0
        only saves memory, as FSDP2 does)."""

    def close(self) -> None:
        """Release what the backend holds (engines, buffers); the process group stays."""


class TorchAdamWState:
    """What a backend stepping a plain `torch.optim.AdamW` (its `optimizer`) answers about that optimizer."""

    optimizer: torch.optim.Optimizer

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def reset_optimizer_state(self) -> None:
        self.optimizer.state.clear()

    def optimizer_step_count(self) -> int:
        for state in self.optimizer.state.values():
            return int(state["step"])
        return 0


def adamw_param_groups(model: nn.Module, weight_decay: float,
                       lr_scales: Mapping[str, float] | None = None) -> list[dict]:
    """AdamW's groups of the trained parameters (frozen ones get no state): decay matrices; exempt biases, norms,
    embeddings' gains and scalars (open_clip's rule).

    Without `lr_scales` these are two groups (exempt, decayed), as checkpoints of earlier versions hold. With it
    (name -> lr factor; unlisted names 1), one such pair per factor, largest factor first, and no empty group
    besides the pair of factor 1. Every group records its factor as `lr_scale` (see `set_learning_rates`).
    """
    lr_scales = lr_scales or {}
    groups: dict[tuple[float, bool], list] = {}
    for scale in sorted({1.0, *lr_scales.values()}, reverse=True):
        groups[(scale, True)], groups[(scale, False)] = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        ndim = len(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partitioned parameter's data is empty
        exempt = ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        groups[(lr_scales.get(name, 1.0), exempt)].append(param)
    return [{"params": params, "weight_decay": 0.0 if exempt else weight_decay, "lr_scale": scale}
            for (scale, exempt), params in groups.items() if params or scale == 1.0]


def set_learning_rates(param_groups: Sequence[dict], lr: float, lr_scales: Sequence[float]) -> None:
    """Set each group's lr to `lr` times its factor. The factors are the backend's, in the order
    `adamw_param_groups` made the groups, never read back from the groups: a loaded optimizer state replaces
    them with the saved ones (older checkpoints have no `lr_scale`)."""
    for group, scale in zip(param_groups, lr_scales, strict=True):
        group["lr"] = lr * scale


def tensors_digest(tensors: Iterable[Tensor], *, names: Iterable[str] | None = None) -> str:
    """sha256 over the values of `tensors` (and their `names`, when given), in order.

    Floating zeros are hashed as +0.0: AdamW at lr = 0 turns a -0.0 weight whose gradient is negative
    into +0.0 (`w - 0 * update`), which changes bytes but not values (fp16 checkpoints hold -0.0).
    """
    digest = hashlib.sha256()
    names = iter(names) if names is not None else None
    for tensor in tensors:
        if names is not None:
            digest.update(next(names).encode())
        values = tensor.detach().cpu().contiguous().reshape(-1)
        if values.is_floating_point():
            values = values + 0.0  # -0.0 + 0.0 == +0.0; every other value is unchanged
        digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def full_bundle(cfg: JobConfig) -> tuple[ClipBundle, float]:
    """The full model with its weights (random init from `run.seed` without), and its tau."""
    from models import build_model, temperature

    bundle = build_model(cfg.model.name, **cfg.model.build_kwargs(), seed=cfg.run.seed)
    return bundle, temperature(bundle.model)

