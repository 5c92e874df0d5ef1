"""Loss terms: what a training step minimises, composed by name from `loss.terms`.

A term receives the batch and the model's outputs and returns a dict: `<name>_loss` entries are
scalar tensors whose value is the term's global value (all ranks' batches) and whose gradient is
this rank's share of the term's gradient (backends average gradients over ranks); other entries are
detached diagnostics (global values), logged by name. A term may hold state (`state_dict` /
`load_state_dict`, saved and restored with the checkpoint as part `objective`), may `prepare()` on
probe batches at w0 before OSR (HGCL's `loss.margin=auto`), and is told whether each optimizer step
was taken (`after_step` / `skip_step`) so what it updates changes only with the weights.

`loss.terms` maps term names to weights (default `{contrastive: 1.0}`, the method's loss); the
trainer back-propagates the sum of the weighted `*_loss` entries and logs each, weighted, under its
own key. `register_term(name, builder)` adds a term from anywhere (a module named in `run.plugins`);
`builder(ctx: TermContext) -> Term`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from engine.config import JobConfig
    from engine.data import Batch
    from engine.objectives.normaliser import Normaliser

TERM_SUFFIX = "_loss"


class StepOutputs(NamedTuple):
    """What the model gave for this rank's batch: L2-normalised features, the bias (SigLIP models), the raw output."""

    image_features: Tensor
    text_features: Tensor
    logit_bias: Tensor | None
    raw: Any


# probe(num_batches): the first batches of the current data epoch with the model's outputs at the current
# weights (no gradient, no update); every rank calls it with the same number.
Probe = Callable[[int], Iterator[tuple["Batch", StepOutputs]]]


@dataclass
class TermContext:
    """What a term may build itself from: the job's config, fixed temperature, normaliser, this rank's place
    in the global batch, collectives (no gradient) and the run log."""

    cfg: JobConfig
    tau: float
    normaliser: Normaliser
    rank: int
    world_size: int
    local_batch: int
    gather: Callable[[Tensor], Tensor]
    reduce_sum: Callable[[Tensor], Tensor]
    log_event: Callable[[dict], None]


class Term(Protocol):
    """One named part of the objective."""

    name: str

    def begin_stage(self, stage: str) -> None:
        """The next steps belong to `stage` (`osr`: weights frozen at w0, `finetune`)."""

    def prepare(self, probe: Probe) -> None:
        """Before OSR, at w0: read what the term needs from `probe(n)` batches (collective when it probes)."""

    def __call__(self, batch: Batch, outputs: StepOutputs) -> dict[str, Tensor | float]:
        """`<name>_loss` term(s) and diagnostics of this step (global values)."""

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


class TermBase:
    """Defaults for a stateless term: subclasses define `name` and `__call__`."""

    name = "term"

    def begin_stage(self, stage: str) -> None:
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


TermBuilder = Callable[[TermContext], Term]
_TERMS: dict[str, TermBuilder | str] = {"contrastive": "engine.objectives.contrastive_term:ContrastiveTerm"}


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
    """The weighted terms of `loss.terms`, driven as one: the trainer's only view of the loss."""

    def __init__(self, terms: dict[str, tuple[Term, float]]):
        self.terms = terms

    def term(self, name: str) -> Term:
        """The term configured as `name`."""
        return self.terms[name][0]

    def describe(self) -> str:
        return " + ".join(name if weight == 1.0 else f"{weight:g} {name}" for name, (_, weight) in self.terms.items())

    def begin_stage(self, stage: str) -> None:
        for term, _ in self.terms.values():
            term.begin_stage(stage)

    def prepare(self, probe: Probe) -> None:
        for term, _ in self.terms.values():
            term.prepare(probe)

    def __call__(self, batch: Batch, outputs: StepOutputs) -> dict:
        """Every term's entries; `*_loss` entries scaled by the term's weight (1.0 leaves them untouched)."""
        out: dict = {}
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


def build_terms(weights: dict[str, float], ctx: TermContext) -> ObjectiveTerms:
    """The objective of `loss.terms` (term name -> weight) for this rank of the job."""
    return ObjectiveTerms({name: (_builder(name)(ctx), float(weight)) for name, weight in weights.items()})
