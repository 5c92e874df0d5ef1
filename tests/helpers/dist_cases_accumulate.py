"""data.accum_steps on 2 real ranks (see harness.py): ZeRO-2 and FSDP2, the same global batches with K=1 and K=2."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from engine.accumulate import ForwardBackward
from engine.backends.deepspeed import DeepSpeedBackend
from engine.data import Batch
from engine.distributed import all_reduce_sum, context_from_env, gather_no_grad
from engine.objectives import ObjectiveTerms, TermContext
from engine.objectives.contrastive_term import ContrastiveTerm
from tests.helpers.dist_cases_deepspeed import (
    BETAS,
    EPS,
    ROOT,
    WEIGHT_DECAY,
    _gathered,
    fsdp_backend,
    global_batch,
    tiny_model,
)

LOCAL_BATCH, LR = 4, 1e-3
OBJECTIVES = ("mbcl", "gcl", "hgcl")  # one step each, in this order (SigLIP needs a model with a bias: one process)


class RecordingNormaliser:
    """u = the mean of a fixed prior and the batch estimate; records what each step staged (and how often)."""

    placement = "sharded"

    def __init__(self):
        self.staged, self.kept, self.num_estimates = None, [], 0

    def estimate(self, rows, log_phi_x, log_phi_z, *, image_features, text_features, surrogate, gather):
        self.num_estimates += 1
        prior = torch.log(1.0 + rows.to(log_phi_x.dtype))
        half = torch.log(torch.tensor(0.5, dtype=log_phi_x.dtype))
        self.staged = (torch.logaddexp(half + prior, half + log_phi_x), torch.logaddexp(half + prior, half + log_phi_z))
        return self.staged

    def commit(self):
        self.kept.append(tuple(t.detach().clone() for t in self.staged))

    def discard(self):
        self.staged = None


def _backend(kind: str, micro_batch: int):
    if kind == "fsdp":
        return fsdp_backend(0)
    return DeepSpeedBackend(tiny_model(0), device=torch.device("cpu"), zero_config=str(ROOT / "zero_configs" / f"{kind}.json"),
                            micro_batch_size=micro_batch, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=EPS)


def accumulation_ranks(kinds: tuple[str, ...] = ("zero2", "fsdp")) -> dict:
    """An MBCL, a GCL and an HGCL step on each of `kinds` (zero1/2/3: zero_configs/<kind>.json; fsdp: FSDP2) with
    data.accum_steps 1 and 2: losses, grad norms, u rows, weights."""
    ctx = context_from_env()
    DeepSpeedBackend.init_distributed(ctx)  # one gloo group, FSDP2 joins it
    results = {}
    for kind in kinds:
        for accum_steps in (1, 2):
            backend = _backend(kind, LOCAL_BATCH // accum_steps)
            normaliser = RecordingNormaliser()
            losses, norms = [], []
            for step, objective_kind in enumerate(OBJECTIVES):
                cfg = SimpleNamespace(loss=SimpleNamespace(margin=0.1, eps=1e-10, chunk_size=3),
                                      surrogate=objective_kind, osr_surrogate="gcl")
                term = ContrastiveTerm(TermContext(cfg=cfg, tau=0.05, normaliser=normaliser, rank=ctx.rank,
                                                   world_size=ctx.world_size, local_batch=LOCAL_BATCH,
                                                   gather=gather_no_grad, reduce_sum=all_reduce_sum,
                                                   log_event=lambda record: None))
                term.begin_stage("finetune", num_steps=len(OBJECTIVES))
                objective = ObjectiveTerms({"contrastive": (term, 1.0)})
                forward_backward = ForwardBackward(backend, objective, accum_steps=accum_steps)
                images, texts = global_batch(10 + step, 2 * ctx.world_size)  # LOCAL_BATCH (4) per rank
                mine = slice(ctx.rank * LOCAL_BATCH, (ctx.rank + 1) * LOCAL_BATCH)
                rows = torch.arange(len(images))[mine] + 100 * step
                _, total, backward = forward_backward(Batch(images[mine], texts[mine], rows, [str(int(r)) for r in rows]))
                backward()
                norms.append(backend.step(lr=LR, grad_clip=0.0))
                objective.after_step()
                losses.append(float(total))
            weights, _ = _gathered(backend)
            results[f"{kind}_k{accum_steps}"] = {"losses": losses, "norms": norms, "u": normaliser.kept,
                                                 "num_estimates": normaliser.num_estimates, "weights": weights}
            backend.close()
    return results
