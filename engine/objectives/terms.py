"""Loss terms: what a training step minimises, composed by name from `loss.terms`.

A term receives the batch and the model's outputs and returns a dict: `<name>_loss` entries are
scalar tensors whose value is the term's global value (all ranks' batches) and whose gradient is
this rank's share of the term's gradient (backends average gradients over ranks); other entries are
detached diagnostics (global values), logged by name. A term may hold state (`state_dict` /
`load_state_dict`, saved and restored with the checkpoint as part `objective`; tensors through `save` /
`load` into its own folder `objective/<name>/` of the checkpoint), may `prepare()` on
probe batches at w0 before OSR (HGCL's `loss.margin=auto`), and is told whether each optimizer step
was taken (`after_step` / `skip_step`) so what it updates changes only with the weights.

`loss.terms` maps term names to weights (default `{contrastive: 1.0}`, the method's loss); the
trainer back-propagates the sum of the weighted `*_loss` entries and logs each, weighted, under its
own key. `register_term(name, builder)` adds a term from anywhere (a module named in `run.plugins`);
`builder(ctx: TermContext) -> Term`.

A term that needs the model itself (a teacher held as a second set of weights) reads it through
`TermContext.model` (`ModelAccess`): this rank's parameter shards as the forward reads them and a forward
without gradient, whatever the backend; it never reaches into the trainer or the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from torch import Tensor

from engine.objectives.padding import BatchMask

if TYPE_CHECKING:
    from engine.config import JobConfig
    from engine.data import Batch
    from engine.objectives.block_kernels import BlockKernels
    from engine.objectives.normaliser import Normaliser

TERM_SUFFIX = "_loss"


class StepOutputs(NamedTuple):
    """What the model gave for this rank's batch: L2-normalised features, the bias (SigLIP models), the raw output;
    `mask`: the global batch's real slots (set by `ObjectiveTerms`; None: every slot is real)."""

    image_features: Tensor
    text_features: Tensor
    logit_bias: Tensor | None
    raw: Any
    mask: BatchMask | None = None


# probe(num_batches): the first batches of the current data epoch with the model's outputs at the current
# weights (no gradient, no update); every rank calls it with the same number.
Probe = Callable[[int], Iterator[tuple["Batch", StepOutputs]]]


class ModelAccess(NamedTuple):
    """The trained model as a term may use it.

    `parameter_shards()`: name -> the tensor holding this rank's part of each trained parameter, the one the
    forward reads (one process and ZeRO-1/2: the whole parameter; FSDP2: the local shard; ZeRO-3: the
    partition). `parameter_spans()`: name -> (start, stop, shape), the elements of the flattened whole
    parameter its shard holds (`Backend.parameter_spans`). `shards_replaced(values)`: a context inside which the forward reads `values` (shaped like
    `parameter_shards()`) instead, the student's values restored bit-exact after it (before the step's
    backward). `forward_no_grad(images, texts)`: the model's outputs on this rank's batch at the values the
    shards hold, without gradient, leaving no gathered copy behind (collective under sharding backends: every
    rank calls it).
    """

    parameter_shards: Callable[[], dict[str, Tensor]]
    parameter_spans: Callable[[], dict[str, tuple[int, int, tuple[int, ...]]]]
    shards_replaced: Callable[[dict[str, Tensor]], AbstractContextManager]
    forward_no_grad: Callable[[Tensor, Tensor], StepOutputs]


@dataclass
class TermContext:
    """What a term may build itself from: the job's config, fixed temperature, normaliser, this rank's place
    in the global batch, collectives (no gradient), the run log, (`model`) the trained model (None where
    there is none, e.g. a term built outside a trainer) and (`loss_kernels`) the compiled block functions of
    GCL / HGCL under `run.compile=step` (None: eager)."""

    cfg: JobConfig
    tau: float
    normaliser: Normaliser
    rank: int
    world_size: int
    local_batch: int
    gather: Callable[[Tensor], Tensor]
    reduce_sum: Callable[[Tensor], Tensor]
    log_event: Callable[[dict], None]
    model: ModelAccess | None = None
    loss_kernels: BlockKernels | None = None


class Term(Protocol):
    """One named part of the objective."""

    name: str
    # data.accum_steps > 1 calls the term once per global batch on cached outputs (features and bias detached
    # from the model, `raw` None) and takes its gradient through them: a term that needs more is refused.
    supports_accumulation: bool

    def begin_stage(self, stage: str, *, num_steps: int) -> None:
        """The next steps belong to `stage` (`osr`: weights frozen at w0, `finetune`), which has `num_steps`
        batches in all (those done before a resume included)."""

    def prepare(self, probe: Probe) -> None:
        """Before OSR, at w0: read what the term needs from `probe(n)` batches (collective when it probes)."""

    def __call__(self, batch: Batch, outputs: StepOutputs) -> dict[str, Tensor | float]:
        """`<name>_loss` term(s) and diagnostics of this step (global values), of the real samples only:
        `outputs.mask` marks the padding slots of a last batch (`engine.objectives.padding`)."""

    def after_step(self) -> None:
        """The optimizer step was taken: keep what this step updated."""

    def skip_step(self) -> None:
        """The step was skipped (non-finite values): forget what this step updated."""

    def summary(self) -> dict:
        """What the run log records about the term at the end of OSR (e.g. HGCL's margin, where d sat)."""

    def provenance(self) -> dict:
        """What defines the statistics OSR recovered with this term (recorded with them, e.g. the margin)."""

    def state_dict(self) -> dict:
        """Small JSON state."""

    def load_state_dict(self, state: dict, *, origin: str | None = None) -> None:
        """Restore `state_dict()`; `origin` names an OSR run whose statistics are reused (None: a resume)."""

    def save(self, directory: Path) -> None:
        """Write the term's tensors (this rank's) into `directory` (collective; nothing to write: no folder)."""

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        """Read what `save` wrote (before `load_state_dict`); `directory` may not exist (nothing was saved);
        `reshard`: written by another number of ranks."""


class TermBase:
    """Defaults for a stateless term: subclasses define `name` and `__call__`."""

    name = "term"
    supports_accumulation = False  # a term declares it (engine.accumulate)

    def begin_stage(self, stage: str, *, num_steps: int) -> None:
        pass

    def prepare(self, probe: Probe) -> None:
        pass

    def after_step(self) -> None:
        pass

    def skip_step(self) -> None:
        pass

    def summary(self) -> dict:
        return {}

    def provenance(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, *, origin: str | None = None) -> None:
        pass

    def save(self, directory: Path) -> None:
        pass

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        pass


TermBuilder = Callable[[TermContext], Term]
_TERMS: dict[str, TermBuilder | str] = {"contrastive": "engine.objectives.contrastive_term:ContrastiveTerm",
                                        "wma_teacher": "engine.objectives.teacher_term:TeacherTerm"}


def register_term(name: str, builder: TermBuilder) -> None:
    """Make `builder(ctx) -> Term` usable as a key of loss.terms."""
    _TERMS[name] = builder


def term_names() -> tuple[str, ...]:
    """Every name loss.terms may use."""
    return tuple(sorted(_TERMS))


def _builder(name: str) -> TermBuilder:
    if name not in _TERMS:
        raise ValueError(f"loss.terms: unknown term {name!r}; use any of {', '.join(term_names())} "
                         "(or register one in a module named in run.plugins)")
    entry = _TERMS[name]
    if isinstance(entry, str):
        import importlib

        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    return entry


def total_loss(out: dict[str, Tensor]) -> Tensor:
    """The sum of an objective's `*_loss` terms (what is back-propagated)."""
    return sum(value for key, value in out.items() if key.endswith(TERM_SUFFIX))


class ObjectiveTerms:
    """The weighted terms of `loss.terms`, driven as one: the trainer's only view of the loss.

    Each step it finds the global batch's real slots (`BatchMask`, collective with `gather`) and hands them to
    the terms in `StepOutputs.mask`; its output's `samples` is the number of real samples of the global batch.
    A batch with no real sample on any rank (padding only) calls no term and has no `*_loss` entry.
    """

    def __init__(self, terms: dict[str, tuple[Term, float]], *, rank: int = 0,
                 gather: Callable[[Tensor], Tensor] | None = None):
        self.terms = terms
        self.rank = rank
        self.gather = gather if gather is not None else _no_gather

    def term(self, name: str) -> Term:
        """The term configured as `name`."""
        return self.terms[name][0]

    def describe(self) -> str:
        return " + ".join(name if weight == 1.0 else f"{weight:g} {name}" for name, (_, weight) in self.terms.items())

    def begin_stage(self, stage: str, *, num_steps: int) -> None:
        for term, _ in self.terms.values():
            term.begin_stage(stage, num_steps=num_steps)

    def prepare(self, probe: Probe) -> None:
        for term, _ in self.terms.values():
            term.prepare(probe)

    def __call__(self, batch: Batch, outputs: StepOutputs) -> dict:
        """Every term's entries; `*_loss` entries scaled by the term's weight (1.0 leaves them untouched)."""
        out: dict = {}
        if isinstance(outputs, StepOutputs):
            features = outputs.image_features
            mask = BatchMask.of(getattr(batch, "valid", None), num_local=features.shape[0], rank=self.rank,
                                gather=self.gather, device=features.device)
            outputs = outputs._replace(mask=mask)
            out["samples"] = float(mask.num_real)
            if mask.num_real == 0:
                return out
        for term, weight in self.terms.values():
            for key, value in term(batch, outputs).items():
                if weight != 1.0 and key.endswith(TERM_SUFFIX):
                    value = value * weight
                out[key] = value
        return out

    def after_step(self) -> None:
        for term, _ in self.terms.values():
            term.after_step()

    def skip_step(self) -> None:
        for term, _ in self.terms.values():
            term.skip_step()

    def summary(self) -> dict:
        return {key: value for term, _ in self.terms.values() for key, value in term.summary().items()}

    def provenance(self) -> dict:
        return {key: value for term, _ in self.terms.values() for key, value in term.provenance().items()}

    def state_dict(self) -> dict:
        return {name: term.state_dict() for name, (term, _) in self.terms.items()}

    def load_state_dict(self, state: dict, *, origin: str | None = None) -> None:
        for name, (term, _) in self.terms.items():
            if name in state:
                term.load_state_dict(state[name], origin=origin)

    def save(self, directory: Path) -> None:
        """Each term's tensors into `directory/<name>` (a checkpoint's folder part; collective)."""
        for name, (term, _) in self.terms.items():
            term.save(Path(directory) / name)

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        """What `save` wrote (a checkpoint written before terms saved tensors has no such folder)."""
        for name, (term, _) in self.terms.items():
            term.load(Path(directory) / name, reshard=reshard)


def build_terms(weights: dict[str, float], ctx: TermContext) -> ObjectiveTerms:
    """The objective of `loss.terms` (term name -> weight) for this rank of the job."""
    return ObjectiveTerms({name: (_builder(name)(ctx), float(weight)) for name, weight in weights.items()},
                          rank=ctx.rank, gather=ctx.gather)


def _no_gather(x: Tensor) -> Tensor:
    return x.detach()
