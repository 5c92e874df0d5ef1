"""The backend interface: what the trainer needs from whoever owns model, optimizer and state."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn


class Backend(Protocol):
    """Build once; then backward / step per iteration; moments and state for OSR and checkpoints."""

    model: nn.Module
    device: torch.device
    input_dtype: torch.dtype  # dtype the model's inputs are cast to

    def forward(self, images: Tensor, texts: Tensor):
        """The model's forward on a batch (open_clip CLIP: normalised features)."""

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of `loss` (already the global-batch objective of this rank)."""

    def step(self, *, lr: float, grad_clip: float = 0.0) -> float:
        """One AdamW step at learning rate `lr` (0 in OSR: weights stay bit-identical); returns grad norm."""

    def reset_optimizer_state(self) -> None:
        """Forget AdamW's moments and step counter (the 'no seeding' ablation)."""

    def optimizer_step_count(self) -> int:
        """AdamW's step counter t (bias correction uses t)."""

    def full_moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Parameter name -> (exp_avg, exp_avg_sq), full (unsharded) tensors on CPU."""

    def save(self, directory, *, client_state: dict) -> None:
        """Write model and optimizer state into `directory` (collective; each rank its own part)."""

    def load(self, directory) -> dict:
        """Restore what `save` wrote; returns its client_state."""

    def weights_digest(self) -> str:
        """A digest of this rank's weights (model and master copies): equal iff bit-identical."""

    def full_weights(self):
        """Context manager in which `model` holds complete (gathered) weights, e.g. for evaluation."""

    def full_state_dict(self) -> dict:
        """Complete model state dict, valid on rank 0 (collective call on every rank)."""

    def close(self) -> None:
        """Release what the backend holds (engines, process-group resources)."""
