"""NeuCLIP's network on N real ranks (see harness.py): the objective's steps on fixed global batches, and trainer
jobs (straight, stopped by SIGTERM, resumed) under the DeepSpeed and FSDP2 backends, all in one launch."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.config import load_config
from engine.distributed import all_reduce_sum, gather_no_grad
from engine.objectives import GlobalContrastiveObjective
from engine.objectives.contrastive import SurrogateSpec
from engine.objectives.neural_normaliser import NeuralNormaliser
from engine.run.preemption import Preempted
from engine.trainer import Trainer
from tests.helpers.jobs import stop_after

SPEC = SurrogateSpec(kind="hgcl", margin=0.2, tau=0.05, eps=1e-8)
GLOBAL_BATCH, DIM, NUM_STEPS = 8, 6, 5


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `step`-th global batch of unit features (float64), the same on every rank."""
    gen = torch.Generator().manual_seed(100 + step)
    f, g = torch.randn(2, GLOBAL_BATCH, DIM, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(f, dim=1), torch.nn.functional.normalize(g, dim=1)


def objective_steps(*, rank: int = 0, world_size: int = 1) -> dict:
    """NUM_STEPS steps of HGCL over the network (12 prototypes, restarts every 3 steps, 3 updates, one step
    skipped); each step's loss value and this rank's feature gradients, and the network at the end."""
    norm = NeuralNormaliser(num_prototypes=12, restart_every=3, updates=3, lr=0.5)
    gather, reduce_sum = (gather_no_grad, all_reduce_sum) if world_size > 1 else (lambda x: x, lambda x: x)
    local = GLOBAL_BATCH // world_size
    objective = GlobalContrastiveObjective(SPEC, norm, offset=rank * local, gather=gather, reduce_sum=reduce_sum,
                                           world_size=world_size)
    out = {"loss": [], "grads": []}
    for step in range(NUM_STEPS):
        f, g = (x[rank * local:(rank + 1) * local].clone().requires_grad_(True) for x in global_batch(step))
        terms = objective(f, g, rows=torch.arange(rank * local, (rank + 1) * local))
        terms["contrastive_loss"].backward()
        out["loss"].append(terms["contrastive_loss"].detach())
        out["grads"].append(torch.cat([f.grad, g.grad]) / world_size)  # backends average gradients over ranks
        (objective.skip_step if step == 2 else objective.after_step)()
    out["network"] = {k: v.clone() for k, v in norm.state.items()}
    out["summary"] = norm.summary()
    return out


def tune(config: dict, stop_at: int | None = None) -> dict:
    """`run.py tune` of `config`, stopped as by SIGTERM after global step `stop_at`; a finished run returns its
    network (every rank's own copy) and, on rank 0, the final weights."""
    trainer = Trainer(load_config(base=config))
    stop_after(trainer, stop_at)
    try:
        trainer.tune()
    except Preempted:
        trainer.close()
        return {"finished": False, "global_step": trainer.global_step, "steps": trainer.normaliser.steps}
    trainer.close()
    out = Path(config["run"]["out_dir"])
    return {"finished": True, "global_step": trainer.global_step, "state": trainer.normaliser.state_dict(),
            "network": {k: v.cpu() for k, v in trainer.normaliser.state.items()},
            "weights": load_file(out / "final.safetensors") if trainer.ctx.is_main else None}


def neural_on_ranks(jobs: dict, stop_at: int) -> dict:
    """One launch: the objective's steps, then per backend in `jobs` (name -> (straight, stopped, resumed)
    configs) the straight run, a run stopped after step `stop_at` and its resumption."""
    import torch.distributed as dist  # the trainers joined the process group

    results: dict = {}
    for name, (straight, stopped, resumed) in jobs.items():
        first = tune(straight)
        second = tune(stopped, stop_at=stop_at)
        results[name] = {"straight": first, "stopped": second, "resumed": tune(resumed)}
    results["objective"] = objective_steps(rank=dist.get_rank(), world_size=dist.get_world_size())
    return results
