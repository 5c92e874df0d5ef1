"""SigLIP's pairwise sigmoid loss (open_clip's SigLipLoss) over the global batch: the baseline for
checkpoints trained with it. The temperature stays fixed from the checkpoint; the bias is learned."""

from __future__ import annotations

from collections.abc import Callable

import torch
from open_clip.loss import SigLipLoss
from torch import Tensor

from engine.objectives.padding import BatchMask, replicated_objective


class SigmoidObjective:
    """open_clip's SigLipLoss at fixed temperature tau and the model's `logit_bias`: term `sigmoid_loss`.

    With several ranks, SigLipLoss exchanges text features between neighbouring ranks (gradients
    flow back through the exchange); its per-rank losses average to the single-process loss of the
    concatenated batch, and their gradients, averaged over ranks as the backends do, to its gradient.
    """

    def __init__(self, *, tau: float, rank: int, world_size: int, reduce_sum: Callable[[Tensor], Tensor]):
        self.scale = 1.0 / tau
        self.world_size = world_size
        self.reduce_sum = reduce_sum
        self.loss = SigLipLoss(rank=rank, world_size=world_size)
        self.whole = SigLipLoss()  # one process's form, for padded batches

    def __call__(self, image_features: Tensor, text_features: Tensor, *, rows: Tensor,
                 logit_bias: Tensor | None = None, mask: BatchMask | None = None) -> dict[str, Tensor]:
        if logit_bias is None:
            raise ValueError("the siglip method needs a model with logit_bias (a SigLIP checkpoint, e.g. "
                             "ViT-B-16-SigLIP); use method tuneclip, fastclip or openclip for CLIP models")
        scale = torch.tensor(self.scale, dtype=torch.float32, device=image_features.device)
        if mask is not None and mask.padded:  # the real batch, evaluated whole on every rank
            term, value = replicated_objective(lambda f, g, bias: self.whole(f, g, scale, bias), image_features,
                                               text_features, mask, world_size=self.world_size, bias=logit_bias)
            return {"sigmoid_loss": term, "batch_loss_value": value}
        local = self.loss(image_features.float(), text_features.float(), scale, logit_bias.float().reshape(()))
        value = self.reduce_sum(local.detach()) / self.world_size  # ranks hold equal local batches
        return {"sigmoid_loss": local + (value - local).detach(), "batch_loss_value": value}

    def after_step(self) -> None:
        """Nothing is carried between steps."""

    def skip_step(self) -> None:
        """Nothing is carried between steps."""
