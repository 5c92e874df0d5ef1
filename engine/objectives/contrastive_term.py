"""The `contrastive` term: the method's loss (MBCL, GCL, HGCL or SigLIP's), with HGCL's margin and its rule.

Per stage it builds the registered objective of the stage's surrogate (`osr_surrogate` in OSR, the
method's in fine-tuning) over the job's normaliser. HGCL's margin is `loss.margin`, or with
`loss.margin=auto` chosen in `prepare()` at w0 from the distribution of d = s_ij - s_ii
(engine/objectives/margin.py) and kept in the term's state, so a resumed run and a run reusing OSR statistics
use the margin OSR used. During OSR (weights frozen) each step also reports where the batch's d sits
against the hinge, and the OSR summary the quantiles over all of OSR.
"""

from __future__ import annotations

import logging
import math
from itertools import islice

from engine.objectives import build_objective
from engine.objectives.margin import (
    QUANTILES,
    DistanceHistogram,
    auto_margin,
    margin_diagnostics,
    pair_distances,
)
from engine.objectives.padding import BatchMask
from engine.objectives.terms import Probe, StepOutputs, TermBase, TermContext

logger = logging.getLogger(__name__)


class ContrastiveTerm(TermBase):
    """The method's contrastive loss as the term `contrastive` (its entries keep the objective's names)."""

    name = "contrastive"
    supports_accumulation = True  # a function of the features (and bias) alone

    def __init__(self, ctx: TermContext):
        self.ctx = ctx
        lcfg = ctx.cfg.loss
        # The configured number, or None until `prepare` chooses it (loss.margin=auto).
        self.margin: float | None = None if lcfg.margin == "auto" else lcfg.margin
        self.kinds = {"osr": ctx.cfg.osr_surrogate, "finetune": ctx.cfg.surrogate}
        self.histogram = DistanceHistogram()  # d over OSR (frozen w0)
        self.stage: str | None = None
        self.objective = None

    def begin_stage(self, stage: str, *, num_steps: int) -> None:
        self.stage = stage
        self.objective = self.build(self.kinds[stage])

    def build(self, kind: str):
        """The objective registered as `kind` (mbcl, gcl, hgcl, siglip) with this term's margin, over the job's
        normaliser (the stage's is built by `begin_stage`; benchmarks compare kinds on one job)."""
        ctx, lcfg = self.ctx, self.ctx.cfg.loss
        margin = self.margin if self.margin is not None else 0.0  # None: no hinge in this job
        return build_objective(
            kind, tau=ctx.tau, margin=margin, eps=lcfg.eps, chunk_size=lcfg.chunk_size,
            normaliser=ctx.normaliser, rank=ctx.rank, world_size=ctx.world_size, local_batch=ctx.local_batch,
            gather=ctx.gather, reduce_sum=ctx.reduce_sum, kernels=ctx.loss_kernels)

    def prepare(self, probe: Probe) -> None:
        if self.margin is None and "hgcl" in self.kinds.values():
            self.margin = self.choose_margin(probe)

    def choose_margin(self, probe: Probe) -> float:
        """loss.margin=auto: the margin that puts loss.margin_inside_share of the pairs inside the hinge
        (d > -m) at w0, read from the first loss.margin_probe_batches batches (no update)."""
        ctx, lcfg = self.ctx, self.ctx.cfg.loss
        hist = DistanceHistogram()
        for batch, outputs in islice(probe(lcfg.margin_probe_batches), lcfg.margin_probe_batches):
            features = outputs.image_features  # the real pairs only (a short epoch's probe may reach its tail)
            mask = BatchMask.of(getattr(batch, "valid", None), num_local=features.shape[0], rank=ctx.rank,
                                gather=ctx.gather, device=features.device)
            hist.add(self._distances(outputs._replace(mask=mask)), reduce_sum=ctx.reduce_sum)
        margin = auto_margin(hist, inside_share=lcfg.margin_inside_share)
        rule = (f"auto: {lcfg.margin_inside_share:g} of the pairs inside the hinge at w0, m = -Q_"
                f"{1 - lcfg.margin_inside_share:g}(d) over {lcfg.margin_probe_batches} batches")
        logger.info("loss.margin=auto: m = %.4f (%s; d median %.3f, tau %.4g)", margin, rule, hist.quantile(0.5),
                    ctx.tau)
        ctx.log_event({"event": "margin_chosen", "margin": margin, "rule": rule,
                       "d_quantiles": {f"{q:g}": hist.quantile(q) for q in QUANTILES}, "tau": ctx.tau})
        return margin

    def _distances(self, outputs: StepOutputs):
        """d of the real samples' pairs (padding slots are no anchors and no negatives)."""
        mask = outputs.mask
        if mask is None:
            return pair_distances(outputs.image_features, outputs.text_features,
                                  offset=self.ctx.rank * self.ctx.local_batch, gather=self.ctx.gather)
        return pair_distances(mask.real(outputs.image_features), mask.real(outputs.text_features),
                              offset=mask.offset, gather=mask.gather)

    def __call__(self, batch, outputs: StepOutputs) -> dict:
        # During OSR (w0 frozen), where the batch's d sits against the hinge: quantiles, share inside.
        stats = margin_diagnostics(self._distances(outputs), margin=self.margin or 0.0,
                                   reduce_sum=self.ctx.reduce_sum,
                                   histogram=self.histogram) if self.stage == "osr" else {}
        out = self.objective(outputs.image_features, outputs.text_features, rows=batch.rows,
                             logit_bias=outputs.logit_bias, mask=outputs.mask)
        return {**out, **stats}

    def after_step(self) -> None:
        self.objective.after_step()

    def skip_step(self) -> None:
        self.objective.skip_step()

    def summary(self) -> dict:
        hist = self.histogram
        return {"margin": self.margin, "d_quantiles": {f"{q:g}": hist.quantile(q) for q in QUANTILES},
                "inside_hinge": hist.share_above(-(self.margin or 0.0))}

    def provenance(self) -> dict:
        return {"surrogate": self.kinds["osr"], "margin": self.margin}

    def state_dict(self) -> dict:
        return {"margin": self.margin}

    def load_state_dict(self, state: dict, *, origin: str | None = None) -> None:
        margin = state.get("margin", self.margin)
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not (math.isfinite(margin) and margin >= 0)):
            raise ValueError(f"objective.contrastive.margin is {margin!r}, not a number >= 0 or null: not a "
                             "checkpoint this engine wrote; use another step_* folder")
        self.margin = margin
        if origin is not None and self.ctx.cfg.loss.margin == "auto":  # the margin OSR chose and used
            self.ctx.log_event({"event": "margin_chosen", "margin": self.margin,
                                "rule": f"auto, chosen at w0 by {origin}"})


def terms_state_of_old_checkpoint(train_state: dict) -> dict:
    """The loss terms' state of a checkpoint written before terms held it: HGCL's margin was in the train state."""
    return {"contrastive": {"margin": train_state["margin"]}} if "margin" in train_state else {}
