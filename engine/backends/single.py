"""Single-process backend: the model on one device with torch AdamW."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; exempt biases, norms, embeddings' gains and scalars (open_clip's rule)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


class SingleProcessBackend:
    """Model + torch AdamW on one device; implements `engine.backends.base.Backend`."""

    def __init__(self, model: nn.Module, *, device: torch.device, betas: tuple[float, float],
                 weight_decay: float, eps: float):
        self.model = model.to(device)
        self.device = device
        self.optimizer = torch.optim.AdamW(
            adamw_param_groups(self.model, weight_decay), lr=0.0, betas=betas, eps=eps
        )
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        self.input_dtype = torch.float32  # bf16 runs under autocast with fp32 weights

    def forward(self, images: Tensor, texts: Tensor):
        """The model's own forward (normalised image and text features)."""
        return self.model(images, texts)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self, *, lr: float, grad_clip: float = 0.0) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def reset_optimizer_state(self) -> None:
        self.optimizer.state.clear()

    def optimizer_step_count(self) -> int:
        for state in self.optimizer.state.values():
            return int(state["step"])
        return 0

    def full_moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for param, state in self.optimizer.state.items():
            out[self._names[id(param)]] = (state["exp_avg"].detach().cpu(), state["exp_avg_sq"].detach().cpu())
        return out

    def save(self, directory: Path, *, client_state: dict) -> None:
        """Model weights (safetensors) and AdamW state (tensors only) into `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()},
                  directory / "model.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "client_state": client_state}, directory / "optim.pt")

    def load(self, directory: Path) -> dict:
        """Restore what `save` wrote (no pickled code is executed: weights_only loading)."""
        self.model.load_state_dict(load_file(directory / "model.safetensors", device=str(self.device)))
        state = torch.load(directory / "optim.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        return state["client_state"]

    def weights_digest(self) -> str:
        """sha256 over every parameter's bytes (OSR must leave it unchanged)."""
        digest = hashlib.sha256()
        for name, param in self.model.named_parameters():
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def full_weights(self):
        """Context in which `model` holds its full weights (always true here)."""
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict:
        """The model's complete state dict (for export)."""
        return self.model.state_dict()

    def close(self) -> None:
        """Nothing to release for one process."""
