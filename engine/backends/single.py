"""Single-process backend: the model on one device with torch AdamW (bf16 through autocast)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine.backends.base import (
    Backend,
    OptimSettings,
    TorchAdamWState,
    adamw_param_groups,
    set_learning_rates,
    tensors_digest,
)
from engine.safe_load import load_tensor_file

if TYPE_CHECKING:
    from engine.config import JobConfig
    from engine.distributed import DistContext


class SingleProcessBackend(TorchAdamWState, Backend):
    """Model + torch AdamW on one device; implements `engine.backends.base.Backend`."""

    name: ClassVar[str] = "single"
    supports_reshard: ClassVar[bool] = False
    max_ranks: ClassVar[int | None] = 1

    def __init__(self, model: nn.Module, *, device: torch.device, betas: tuple[float, float],
                 weight_decay: float, eps: float, precision: str = "fp32",
                 lr_scales: Mapping[str, float] | None = None):
        """`lr_scales`: parameter name -> learning-rate factor (layer decay); frozen parameters are left out."""
        self.model = model.to(device)
        self.device = device
        groups = adamw_param_groups(self.model, weight_decay, lr_scales)
        self._lr_scales = [group["lr_scale"] for group in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps)
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None  # fp32 weights either way

    @classmethod
    def from_config(cls, cfg: JobConfig, model: nn.Module, *, ctx: DistContext, device: torch.device,
                    micro_batch_size: int, optim: OptimSettings) -> SingleProcessBackend:
        return cls(model, device=device, betas=optim.betas, weight_decay=optim.weight_decay, eps=optim.eps,
                   precision=cfg.model.precision, lr_scales=optim.lr_scales)

    @classmethod
    def init_distributed(cls, ctx: DistContext, *, timeout_s: float = 600) -> None:
        """One process: no process group."""

    def forward(self, images: Tensor, texts: Tensor):
        """The model's own forward (normalised image and text features), under bf16 autocast if asked."""
        images = images.to(self.device, dtype=torch.float32, non_blocking=True)
        texts = texts.to(self.device, non_blocking=True)
        if self.autocast_dtype is None:
            return self.model(images, texts)
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            return self.model(images, texts)

    @contextlib.contextmanager
    def shards_replaced(self, values: dict[str, Tensor]) -> Iterator[None]:
        """As `Backend.shards_replaced`, without copying: each trained parameter's storage is pointed at its
        value (cast first where the dtype differs) and back afterwards (the parameters stay the same objects)."""
        trained = [(param, values[name]) for name, param in self.model.named_parameters() if param.requires_grad]
        held = [param.data for param, _ in trained]
        try:
            for param, value in trained:
                param.data = value.to(param.dtype)
            yield
        finally:
            for (param, _), data in zip(trained, held):
                param.data = data

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self, *, lr: float, grad_clip: float = 0.0) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        set_learning_rates(self.optimizer.param_groups, lr, self._lr_scales)
        if torch.isfinite(norm):  # a non-finite gradient would poison weights and moments: not applied
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def state_finite(self) -> bool:
        tensors = [*self.model.parameters()]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    def full_moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for param, state in self.optimizer.state.items():
            out[self._names[id(param)]] = (state["exp_avg"].detach().cpu(), state["exp_avg_sq"].detach().cpu())
        return out

    def save(self, directory: Path) -> None:
        """Model weights (safetensors) and AdamW state (tensors only) into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  directory / "model.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict()}, directory / "optim.pt")

    @classmethod
    def read_weights(cls, directory: Path, model: nn.Module) -> dict[str, Tensor]:
        """The weights `save` wrote into `directory` (no process group, no optimizer state)."""
        return load_file(Path(directory) / "model.safetensors")

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        """Restore what `save` wrote (no pickled code is executed: weights_only loading)."""
        if reshard:
            raise ValueError("run.backend=single cannot load a checkpoint written by several ranks")
        self.model.load_state_dict(load_file(directory / "model.safetensors", device=str(self.device)))
        state = load_tensor_file(directory / "optim.pt", map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])

    def weights_digest(self) -> str:
        """sha256 over every parameter's name and bytes (OSR must leave it unchanged)."""
        names, params = zip(*self.model.named_parameters())
        return tensors_digest(params, names=names)

    def full_weights(self):
        """Context in which `model` holds its full weights (always true here)."""
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict[str, Tensor]:
        """The model's complete state dict (for export)."""
        return self.model.state_dict()

    def close(self) -> None:
        """Nothing to release for one process."""
