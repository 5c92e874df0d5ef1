"""Padded global batches: which slots hold real samples, and the real batch the objective computes on.

A rank's last batch of an epoch keeps its fixed shape but may end in padding slots (its share of the
epoch ran out; `Batch.valid` is False there, the slots hold copies of its first samples so the model
sees ordinary inputs). Padding is masked: every term computes on the *real batch*, the real slots of
all ranks in global order, exactly as if the global batch held only those n samples (anchors,
negatives, normaliser rows, the 1/n divisor). `BatchMask` gives a rank what that takes: its real
rows (`real`), its first real sample's index in the real batch (`offset`) and `gather`, which turns
this rank's real rows into the real global batch with the job's fixed-shape collective. Without
padding anywhere, `real` and `gather` are the plain ones and `offset` is rank x local batch, so a
term computes exactly what it did before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BatchMask:
    """The real slots of one step's global batch, seen from one rank."""

    local: Tensor  # [b] bool: this rank's real slots (on the features' device)
    global_valid: Tensor  # [B] bool: every rank's, in rank order
    offset: int  # index of this rank's first real sample in the real global batch
    num_real: int  # n: real samples of the global batch
    full_gather: Callable[[Tensor], Tensor]  # the job's gather (equal shapes, no gradient)

    @classmethod
    def of(cls, valid: Tensor | None, *, num_local: int, rank: int, gather: Callable[[Tensor], Tensor],
           device: torch.device | str = "cpu") -> BatchMask:
        """The mask of a batch whose local slots are `valid` ([b] bool; None: all real). Collective (one gather
        of b bytes per rank) in a distributed job: every rank calls it for the same step."""
        local = (torch.ones(num_local, dtype=torch.bool) if valid is None else valid).to(device, torch.bool)
        global_valid = gather(local.to(torch.uint8)).bool()
        offset = int(global_valid[: rank * num_local].sum())
        return cls(local, global_valid, offset, int(global_valid.sum()), gather)

    @classmethod
    def unpadded(cls, *, num_local: int, rank: int, world_size: int,
                 gather: Callable[[Tensor], Tensor]) -> BatchMask:
        """A batch without padding (no collective)."""
        return cls(torch.ones(num_local, dtype=torch.bool), torch.ones(num_local * world_size, dtype=torch.bool),
                   rank * num_local, num_local * world_size, gather)

    @property
    def padded(self) -> bool:
        """Some slot of the global batch is padding."""
        return self.num_real < self.global_valid.numel()

    @property
    def num_local_real(self) -> int:
        return int(self.local.sum()) if self.padded else self.local.numel()

    def real(self, x: Tensor) -> Tensor:
        """This rank's real rows of `x` ([b, ...] -> [b_real, ...]; gradients reach only those rows)."""
        return x[self.local.to(x.device)] if self.padded else x

    def gather(self, x: Tensor) -> Tensor:
        """The real global batch of this rank's real rows `x` ([b_real, ...] -> [n, ...]), without gradient."""
        if not self.padded:
            return self.full_gather(x)
        local = self.local.to(x.device)
        full = x.new_zeros((local.numel(), *x.shape[1:]))
        full[local] = x.detach()
        return self.full_gather(full)[self.global_valid.to(x.device)]


def replicated_objective(loss: Callable[..., Tensor], image_features: Tensor, text_features: Tensor,
                         mask: BatchMask, *, world_size: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(term, value) of `loss(f, g[, bias])`, a whole-batch loss (one process's form), on the real global batch.

    Every rank evaluates the loss on the gathered real batch (no gradient through the gather) and carries the
    gradient of it with respect to its own real features, times `world_size` (backends average parameter
    gradients over ranks), and with respect to `bias` once. The term's value is the loss. Used for masked
    batches of MBCL and SigLIP, whose distributed forms assume equal real batches per rank.
    """
    f_real, g_real = mask.real(image_features), mask.real(text_features)
    leaves = [mask.gather(f_real).float().requires_grad_(True), mask.gather(g_real).float().requires_grad_(True)]
    if bias is not None:
        leaves.append(bias.detach().float().reshape(()).requires_grad_(True))
    with torch.enable_grad():
        value = loss(*leaves)
        grads = torch.autograd.grad(value, leaves)
    local = slice(mask.offset, mask.offset + f_real.shape[0])
    surrogate = world_size * ((f_real * grads[0][local].to(f_real.dtype)).sum()
                              + (g_real * grads[1][local].to(g_real.dtype)).sum())
    if bias is not None:
        surrogate = surrogate + (bias.reshape(()) * grads[2].to(bias.dtype)).sum()
    value = value.detach()
    return value + (surrogate - surrogate.detach()), value
