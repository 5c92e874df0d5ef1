"""Functions run on every rank by tests.helpers.harness.run_ranks (real processes, gloo)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.distributed import all_reduce_sum, context_from_env, gather_no_grad, init_process_group
from engine.objectives.contrastive import GlobalContrastiveLoss, MiniBatchContrastiveLoss, SurrogateSpec

LOCAL_BATCH, IN_DIM, DIM = 3, 10, 8


def toy_problem(world_size: int, seed: int = 0):
    """Identical on every rank: two linear 'encoders', the global inputs and u rows."""
    torch.manual_seed(seed)
    enc_img = torch.nn.Linear(IN_DIM, DIM, dtype=torch.float64)
    enc_txt = torch.nn.Linear(IN_DIM, DIM, dtype=torch.float64)
    num = LOCAL_BATCH * world_size
    x = torch.randn(num, IN_DIM, dtype=torch.float64)
    z = x + 0.5 * torch.randn(num, IN_DIM, dtype=torch.float64)
    log_u_x = torch.randn(num, dtype=torch.float64)
    log_u_z = torch.randn(num, dtype=torch.float64)
    seen = torch.arange(num) % 3 != 0
    return enc_img, enc_txt, x, z, log_u_x, log_u_z, seen


def run_global_loss(enc_img, enc_txt, x, z, log_u_x, log_u_z, seen, *, spec, world_size, rank, gather, reduce_sum):
    """One rank's step on its slice; returns feature/parameter grads and the loss outputs."""
    lo, hi = rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH
    f = F.normalize(enc_img(x[lo:hi]), dim=1)
    g = F.normalize(enc_txt(z[lo:hi]), dim=1)
    f.retain_grad()
    g.retain_grad()
    loss = GlobalContrastiveLoss(spec, gather=gather, reduce_sum=reduce_sum, world_size=world_size)
    out = loss(f, g, log_u_x=log_u_x[lo:hi], log_u_z=log_u_z[lo:hi], seen=seen[lo:hi], gamma=0.7,
               offset=lo, output_dict=True)
    out["loss"].backward()
    params = {f"img.{n}": p.grad for n, p in enc_img.named_parameters()}
    params.update({f"txt.{n}": p.grad for n, p in enc_txt.named_parameters()})
    return {
        "grad_f": f.grad, "grad_g": g.grad, "params": params,
        "loss_value": out["loss_value"], "batch_loss_value": out["batch_loss_value"],
        "log_u_x": out["log_u_x"], "log_u_z": out["log_u_z"],
    }


def global_loss_ranks(cases: list) -> dict:
    """Distributed GCL/HGCL on this rank for each (kind, chunk_size); parameter grads averaged
    over ranks as DeepSpeed/DDP do."""
    ctx = context_from_env()
    init_process_group(ctx)
    results = {}
    for kind, chunk_size in cases:
        spec = SurrogateSpec(kind=kind, margin=0.1, tau=0.05, eps=1e-10, chunk_size=chunk_size)
        result = run_global_loss(*toy_problem(ctx.world_size), spec=spec, world_size=ctx.world_size,
                                 rank=ctx.rank, gather=gather_no_grad, reduce_sum=all_reduce_sum)
        result["params"] = {k: all_reduce_sum(v) / ctx.world_size for k, v in result["params"].items()}
        results[f"{kind}-{chunk_size}"] = result
    return results


def mbcl_ranks() -> dict:
    """Distributed MBCL (open_clip local loss + gather with grad), grads averaged over ranks."""
    ctx = context_from_env()
    init_process_group(ctx)
    enc_img, enc_txt, x, z, *_ = toy_problem(ctx.world_size)
    lo, hi = ctx.rank * LOCAL_BATCH, (ctx.rank + 1) * LOCAL_BATCH
    f = F.normalize(enc_img(x[lo:hi]), dim=1)
    g = F.normalize(enc_txt(z[lo:hi]), dim=1)
    out = MiniBatchContrastiveLoss(tau=0.05, rank=ctx.rank, world_size=ctx.world_size,
                                   reduce_sum=all_reduce_sum)(f, g, output_dict=True)
    out["loss"].backward()
    grads = {f"img.{n}": p.grad for n, p in enc_img.named_parameters()}
    grads.update({f"txt.{n}": p.grad for n, p in enc_txt.named_parameters()})
    dist.barrier()
    return {"params": {k: all_reduce_sum(v) / ctx.world_size for k, v in grads.items()},
            "loss_value": out["loss_value"]}


def table_writer(directory: str, num_rows: int, rounds: int) -> dict:
    """Every rank writes its own interleaved rows (row % world == rank) of one shared table, many times."""
    from engine.objectives.table import UTable

    ctx = context_from_env()
    init_process_group(ctx)
    table = UTable.open(directory, dataset_fingerprint="shared")
    mine = torch.arange(ctx.rank, num_rows, ctx.world_size)
    dist.barrier()  # start writing together so the writes overlap in time
    for r in range(rounds):
        value = torch.full((len(mine),), float(r)) + mine.float() / 1000
        table.write(mine, value, -value)
    table.flush()
    return {"rows": mine}
