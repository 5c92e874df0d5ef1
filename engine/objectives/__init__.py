"""Objectives: what a training step minimises, as named terms.

`engine.objectives.terms` composes the job's objective from `loss.terms` (the seam: a term sees the
batch and the model outputs and may hold state); the built-in term `contrastive` is the method's loss,
one of the objectives below, chosen per stage by the surrogate.

An objective is called on this rank's features and batch and returns a dict. Every entry whose key
ends in `_loss` is a term: a scalar tensor whose value is the term's global value (all ranks'
batches) and whose gradient is this rank's share of the term's gradient, so the trainer
back-propagates `sum(terms)` and logs each. Other entries are detached diagnostics (global values)
logged by name. `after_step()` / `skip_step()` tell the objective whether the optimizer step was
taken, so state it updates (a normaliser's estimates) changes only with the weights.

`build_objective(kind, ...)` is the registry: `mbcl` (OpenCLIP), `gcl` (FastCLIP), `hgcl` (TuneCLIP),
`siglip` (SigLIP's sigmoid loss, the baseline of SigLIP checkpoints). `TRAINED_SCALARS` names the model
scalars (besides the encoders) an objective learns; every other `logit_*` stays fixed from the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

from engine.objectives.block_kernels import BlockKernels
from engine.objectives.contrastive import (
    GlobalContrastiveLoss,
    MiniBatchContrastiveLoss,
    SurrogateSpec,
)
from engine.objectives.normaliser import Normaliser
from engine.objectives.padding import BatchMask, replicated_objective
from engine.objectives.sigmoid import SigmoidObjective
from engine.objectives.terms import (  # noqa: F401 (the public seam)
    TERM_SUFFIX,
    ModelAccess,
    ObjectiveTerms,
    StepOutputs,
    Term,
    TermBase,
    TermContext,
    build_terms,
    register_term,
    term_names,
    total_loss,
)


class Objective(Protocol):
    """Named terms of one step; told afterwards whether the step was taken."""

    def __call__(self, image_features: Tensor, text_features: Tensor, *, rows: Tensor,
                 logit_bias: Tensor | None = None, mask: BatchMask | None = None) -> dict[str, Tensor]:
        """Terms (`*_loss`) and diagnostics of the global batch; `rows` are this rank's sample ids;
        `logit_bias` is the model's (SigLIP models), from its forward; `mask` the batch's real slots (None: all
        real): padding slots are neither anchors nor negatives, update no estimate and the terms are those of
        the real batch alone (`engine.objectives.padding`)."""

    def after_step(self) -> None:
        """The optimizer step was taken: keep what this step updated."""

    def skip_step(self) -> None:
        """The step was skipped (non-finite values): forget what this step updated."""


class MiniBatchObjective:
    """OpenCLIP's mini-batch contrastive loss (MBCL) over the global batch: term `contrastive_loss`."""

    def __init__(self, *, tau: float, rank: int, world_size: int, reduce_sum: Callable[[Tensor], Tensor]):
        self.loss = MiniBatchContrastiveLoss(tau=tau, rank=rank, world_size=world_size, reduce_sum=reduce_sum)
        self.whole = MiniBatchContrastiveLoss(tau=tau)  # one process's form, for padded batches
        self.world_size = world_size

    def __call__(self, image_features: Tensor, text_features: Tensor, *, rows: Tensor,
                 logit_bias: Tensor | None = None, mask: BatchMask | None = None) -> dict[str, Tensor]:
        if mask is not None and mask.padded:  # the real batch, evaluated whole on every rank
            term, value = replicated_objective(self.whole, image_features, text_features, mask,
                                               world_size=self.world_size)
            return {"contrastive_loss": term, "batch_loss_value": value}
        out = self.loss(image_features, text_features, output_dict=True)
        # Value of the global batch, gradient of this rank's local loss.
        term = out["loss"] + (out["loss_value"] - out["loss"]).detach()
        return {"contrastive_loss": term, "batch_loss_value": out["batch_loss_value"]}

    def after_step(self) -> None:
        """Nothing is carried between steps."""

    def skip_step(self) -> None:
        """Nothing is carried between steps."""


class GlobalContrastiveObjective:
    """GCL / HGCL divided by a normaliser's estimates: term `contrastive_loss`.

    The loss gives the batch estimates log Phi; the normaliser turns them into the estimates u this
    step divides by (the table: SogCLR's moving average) and keeps them only after the optimizer
    step is taken.
    """

    def __init__(self, spec: SurrogateSpec, normaliser: Normaliser, *, offset: int,
                 gather: Callable[[Tensor], Tensor], reduce_sum: Callable[[Tensor], Tensor], world_size: int,
                 kernels: BlockKernels | None = None):
        self.loss = GlobalContrastiveLoss(spec, gather=gather, reduce_sum=reduce_sum, world_size=world_size,
                                          kernels=kernels)
        self.normaliser = normaliser
        self.offset = offset  # this rank's first index in the global batch

    def __call__(self, image_features: Tensor, text_features: Tensor, *, rows: Tensor,
                 logit_bias: Tensor | None = None, mask: BatchMask | None = None) -> dict[str, Tensor]:
        loss, offset = self.loss, self.offset
        if mask is not None and mask.padded:  # the real batch: this rank's real rows, gathered real rows
            image_features, text_features = mask.real(image_features), mask.real(text_features)
            rows = rows[mask.local.to(rows.device)]
            loss = GlobalContrastiveLoss(loss.spec, gather=mask.gather, reduce_sum=loss.reduce_sum,
                                         world_size=int(loss.grad_scale), kernels=loss.kernels)
            offset = mask.offset
        batch = loss.batch_estimates(image_features, text_features, offset=offset)
        log_u_x, log_u_z = self.normaliser.estimate(rows, batch.log_phi_x, batch.log_phi_z,
                                                    image_features=image_features, text_features=text_features,
                                                    surrogate=loss.spec, gather=loss.gather)
        out = loss.divided(image_features, text_features, batch, log_u_x=log_u_x, log_u_z=log_u_z,
                           offset=offset, output_dict=True)
        # loss_value is summed over ranks, and a non-finite feature or u row on any rank makes it
        # non-finite: the term's value carries that to every rank.
        return {"contrastive_loss": out["loss"], "batch_loss_value": out["batch_loss_value"]}

    def after_step(self) -> None:
        self.normaliser.commit()

    def skip_step(self) -> None:
        self.normaliser.discard()


def _mbcl(*, tau: float, rank: int, world_size: int, reduce_sum, **_) -> Objective:
    return MiniBatchObjective(tau=tau, rank=rank, world_size=world_size, reduce_sum=reduce_sum)


def _global(kind: str):
    def build(*, tau: float, margin: float, eps: float, chunk_size: int, normaliser: Normaliser, rank: int,
              world_size: int, local_batch: int, gather, reduce_sum, kernels: BlockKernels | None) -> Objective:
        spec = SurrogateSpec(kind=kind, margin=margin, tau=tau, eps=eps, chunk_size=chunk_size)
        return GlobalContrastiveObjective(spec, normaliser, offset=rank * local_batch, gather=gather,
                                          reduce_sum=reduce_sum, world_size=world_size, kernels=kernels)

    return build


def _siglip(*, tau: float, rank: int, world_size: int, reduce_sum, **_) -> Objective:
    return SigmoidObjective(tau=tau, rank=rank, world_size=world_size, reduce_sum=reduce_sum)


OBJECTIVES: dict[str, Callable[..., Objective]] = {"mbcl": _mbcl, "gcl": _global("gcl"), "hgcl": _global("hgcl"),
                                                   "siglip": _siglip}
TRAINED_SCALARS: dict[str, tuple[str, ...]] = {"siglip": ("logit_bias",)}  # SigLIP's loss learns its bias


def trained_scalars(kind: str) -> tuple[str, ...]:
    """Model scalars (`logit_bias`, ...) the objective `kind` learns; the others stay at the checkpoint's value."""
    return TRAINED_SCALARS.get(kind, ())


def build_objective(kind: str, *, tau: float, margin: float, eps: float, chunk_size: int,
                    normaliser: Normaliser, rank: int, world_size: int, local_batch: int,
                    gather: Callable[[Tensor], Tensor], reduce_sum: Callable[[Tensor], Tensor],
                    kernels: BlockKernels | None = None) -> Objective:
    """The objective registered as `kind` (`mbcl`, `gcl`, `hgcl`, `siglip`) for this rank of the job; `kernels`:
    GCL / HGCL's block work compiled (`run.compile=step`), None eager (the other objectives take none)."""
    if kind not in OBJECTIVES:
        raise ValueError(f"unknown objective {kind!r}; registered: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[kind](tau=tau, margin=margin, eps=eps, chunk_size=chunk_size, normaliser=normaliser,
                            rank=rank, world_size=world_size, local_batch=local_batch, gather=gather,
                            reduce_sum=reduce_sum, kernels=kernels)
