"""The siglip objective on every rank (real processes, gloo), for tests/test_objectives_sigmoid.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.distributed import all_reduce_sum, context_from_env, init_process_group
from engine.objectives.sigmoid import SigmoidObjective
from tests.helpers.dist_cases import LOCAL_BATCH, toy_problem

TAU, BIAS = 0.1, -2.0


def sigmoid_ranks() -> dict:
    """This rank's slice through the siglip objective; parameter grads (bias included) averaged over
    ranks as DeepSpeed/DDP do."""
    ctx = context_from_env()
    init_process_group(ctx)
    enc_img, enc_txt, x, z, *_ = toy_problem(ctx.world_size)
    bias = torch.nn.Parameter(torch.tensor(BIAS, dtype=torch.float64))
    lo, hi = ctx.rank * LOCAL_BATCH, (ctx.rank + 1) * LOCAL_BATCH
    f = F.normalize(enc_img(x[lo:hi]), dim=1)
    g = F.normalize(enc_txt(z[lo:hi]), dim=1)
    objective = SigmoidObjective(tau=TAU, rank=ctx.rank, world_size=ctx.world_size, reduce_sum=all_reduce_sum)
    out = objective(f, g, rows=torch.arange(lo, hi), logit_bias=bias)
    out["sigmoid_loss"].backward()
    grads = {f"img.{n}": p.grad for n, p in enc_img.named_parameters()}
    grads.update({f"txt.{n}": p.grad for n, p in enc_txt.named_parameters()}, bias=bias.grad)
    return {"params": {k: all_reduce_sum(v) / ctx.world_size for k, v in grads.items()},
            "loss_value": out["sigmoid_loss"].detach(), "batch_loss_value": out["batch_loss_value"]}
