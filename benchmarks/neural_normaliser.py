"""The u table against NeuCLIP's network (`loss.normaliser: neural`): estimation error, state size, step time.

1. Estimation error at frozen weights. Synthetic unit features (n pairs in D = 64 dimensions around 100
   cluster centres, each text a noisy copy of its image: s_ii about 0.45, 1.7 % of the pairs inside HGCL's
   hinge at m 0.1, log u over anchors with sd 1.2 at tau 0.01) stand for a frozen encoder's outputs. The exact
   log-normaliser of every evaluated anchor is computed over the whole dataset with the engine's divisor
   convention, log(1/n sum_{j != i} exp(l(s_ij - s_ii) / tau)) (the batch estimate's B -> n limit). Both
   estimators then see the same shuffled batches for `--epochs` passes, as OSR does: the table by the
   engine's SogCLR rule (`update_log_estimate`, gamma_t of the default schedule, rows in memory instead of
   the memory-mapped file), the network by `NeuralNormaliser` itself (m 4096, T_r 500, T_u 10, AdaGrad lr
   1.0: the defaults). The error is |estimate - exact| of log u, over 512 anchors and both sides, after the
   last pass: the table's stored rows (of the anchors some batch visited: the loader cuts whole batches, so
   a pass may leave a few out; column "visited"), the network's prediction from the anchors' features. Batch
   estimates log Phi come from `GlobalContrastiveLoss.batch_estimates` (HGCL m 0.1 at tau 0.01 unless set).
2. State size: the table's 12 bytes a sample (computed at 1 M, 100 M and 5 B samples); the network's
   checkpoint file measured at m 4096, D 1024 (W1, W2 and their AdaGrad sums, float32).
3. Step time at the demo's scale: `Trainer.train_step` of tiny-vit at batch 64 (the demo's model and
   batch), single process, one thread (as every part here: on shared cores small ops wait for a
   descheduled second thread; one thread made the error runs 100x faster), HGCL over the trainer's u table against HGCL over the network, interleaved
   rounds, best step of each (other processes can only add time). Target: network / table <= 1.15.

    python benchmarks/neural_normaliser.py            # about 10 min on 2 shared cores
    python benchmarks/neural_normaliser.py --quick    # sizes 1k and 10k, batches 32 and 256, fewer rounds

Exits non-zero when the step-time ratio exceeds the target.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import Column, Table, round_order, timed
from engine.objectives.contrastive import GlobalContrastiveLoss, SurrogateSpec, pairwise_surrogate
from engine.objectives.neural_normaliser import STATE_FILE, NeuralNormaliser, prototype_log_normaliser
from engine.objectives.normaliser import update_log_estimate
from engine.schedules import gamma_at_epoch

TARGET_RATIO = 1.15
DIM, NUM_CLUSTERS, NUM_EVAL = 64, 100, 512
TABLE_ROW_BYTES = 12  # UTable: log u_x, log u_z (float32) and a visit count (uint32) per sample


def synthetic_pairs(n: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n unit (image, text) feature pairs around NUM_CLUSTERS centres; each text a noisy copy of its image."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(NUM_CLUSTERS, DIM, generator=gen), dim=1)
    which = torch.randint(0, NUM_CLUSTERS, (n,), generator=gen)
    f = torch.nn.functional.normalize(centres[which] + 0.15 * torch.randn(n, DIM, generator=gen), dim=1)
    g = torch.nn.functional.normalize(f + 0.25 * torch.randn(n, DIM, generator=gen), dim=1)
    return f, g


def exact_log_u(f: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, spec: SurrogateSpec) -> tuple[torch.Tensor, ...]:
    """log(1/n sum_{j != i} exp(l(s_ij - s_ii)/tau)) for the image and the text anchors `rows`, in float64."""
    f64, g64 = f.double(), g.double()
    pos = (f64[rows] * g64[rows]).sum(1)
    out = []
    for anchors, others in ((f64[rows], g64), (g64[rows], f64)):
        scaled = pairwise_surrogate(anchors @ others.T - pos[:, None], kind=spec.kind, margin=spec.margin) / spec.tau
        scaled[torch.arange(len(rows)), rows] = -math.inf  # j != i
        out.append(torch.logsumexp(scaled, dim=1) - math.log(f.shape[0]))
    return tuple(out)


def estimation_errors(n: int, batch: int, *, epochs: int, spec: SurrogateSpec, seed: int = 0,
                      drift: float = 0.0) -> dict:
    """Mean |log u - exact| (and the mean signed error) of the table and the network after `epochs` passes.

    `drift` > 0 stands for moving weights: every feature moves linearly along its own random direction of
    norm `drift` over the run (renormalised), and the exact values are those of the final features."""
    f0, g0 = synthetic_pairs(n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(n, generator=gen)[:NUM_EVAL]
    move_f, move_g = (drift * torch.nn.functional.normalize(torch.randn(n, DIM, generator=gen), dim=1)
                      for _ in range(2))
    total_steps = epochs * (n // batch)

    def features(index: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        share = step / max(total_steps - 1, 1)
        return (torch.nn.functional.normalize(f0[index] + share * move_f[index], dim=1),
                torch.nn.functional.normalize(g0[index] + share * move_g[index], dim=1))

    f, g = features(torch.arange(n), total_steps - 1)  # where the run ends (f0, g0 without drift)
    exact_x, exact_z = exact_log_u(f, g, rows, spec)
    loss = GlobalContrastiveLoss(spec)
    table = torch.zeros(2, n)
    seen = torch.zeros(n, dtype=torch.bool)
    network = NeuralNormaliser()  # the defaults: m 4096, T_r 500, T_u 10, lr 1.0
    start, step = time.perf_counter(), 0
    for epoch in range(epochs):
        gamma = gamma_at_epoch(epoch, gamma_min=0.9, decay_epochs=4)
        order = torch.randperm(n, generator=gen)
        for first in range(0, n - batch + 1, batch):  # whole batches only, as the loader cuts them
            index = order[first:first + batch]
            fb, gb = features(index, step)
            step += 1
            est = loss.batch_estimates(fb, gb)
            for side, log_phi in enumerate((est.log_phi_x, est.log_phi_z)):
                table[side, index] = update_log_estimate(table[side, index], seen[index], log_phi, gamma).float()
            seen[index] = True
            network.estimate(index, est.log_phi_x, est.log_phi_z, image_features=fb, text_features=gb,
                             surrogate=spec)
            network.commit()
    seconds = time.perf_counter() - start
    state = network.state
    pos = (f[rows] * g[rows]).sum(1)
    net_x = prototype_log_normaliser(f[rows], pos, state["w1"], surrogate=spec, counts=state["counts"]).double()
    net_z = prototype_log_normaliser(g[rows], pos, state["w2"], surrogate=spec, counts=state["counts"]).double()
    # The table holds nothing for a sample no batch has visited yet (whole batches only: a pass may leave some
    # out); its first visit takes that batch's estimate. Its error is over the visited anchors.
    visited = seen[rows]
    table_err = torch.cat([table[0, rows][visited].double() - exact_x[visited],
                           table[1, rows][visited].double() - exact_z[visited]])
    net_err = torch.cat([net_x - exact_x, net_z - exact_z])
    return {"table_mae": table_err.abs().mean().item(), "table_bias": table_err.mean().item(),
            "net_mae": net_err.abs().mean().item(), "net_bias": net_err.mean().item(),
            "exact_sd": torch.cat([exact_x, exact_z]).std().item(), "seconds": seconds,
            "steps": network.steps, "restarts": network.restarts, "visited": visited.float().mean().item()}


def network_checkpoint_bytes(num_prototypes: int = 4096, dim: int = 1024) -> int:
    """Size of the network's checkpoint file at m x D (a global batch of at least m pairs restarts it)."""
    net = NeuralNormaliser(num_prototypes=num_prototypes)
    f = torch.nn.functional.normalize(torch.randn(num_prototypes, dim), dim=1)
    net.state = net._restarted(f, f.flip(0))  # a restart: the state's shapes are what the size depends on
    with tempfile.TemporaryDirectory() as tmp:
        net.save(Path(tmp))
        return (Path(tmp) / STATE_FILE).stat().st_size


def step_times(*, rounds: int, warmup: int = 2) -> dict:
    """Best train_step seconds of HGCL over the u table and over the network, tiny-vit, batch 64, one process."""
    from engine.config import load_config
    from engine.data import Batch
    from engine.data.build import build_shards
    from engine.demo.synthetic import render_pairs
    from engine.objectives import build_objective
    from engine.trainer import Trainer

    batch_size = 64
    with tempfile.TemporaryDirectory() as tmp:
        csv = render_pairs(Path(tmp) / "raw", num_samples=batch_size, seed=0, split_name="train")
        build_shards(csv, Path(tmp) / "shards", samples_per_shard=batch_size)
        trainer = Trainer(load_config(base={
            "method": "tuneclip", "model": {"name": "tiny-vit"},
            "data": {"train": str(Path(tmp) / "shards"), "batch_size": batch_size, "shuffle_buffer": 1},
            "optim": {"lr": 1e-5}, "eval": {"at_start": False},
            "run": {"out_dir": str(Path(tmp) / "run"), "progress": False, "seed": 0}}))
        term = trainer.objective.term("contrastive")
        term.begin_stage("finetune", num_steps=0)
        table_objective = term.objective
        cfg = trainer.cfg.loss
        network = NeuralNormaliser(num_prototypes=cfg.neural_prototypes, restart_every=cfg.neural_restart_every,
                                   updates=cfg.neural_updates, lr=cfg.neural_lr)
        spec = table_objective.loss.spec
        neural_objective = build_objective("hgcl", tau=spec.tau, margin=spec.margin, eps=spec.eps,
                                           chunk_size=spec.chunk_size, normaliser=network, rank=0, world_size=1,
                                           local_batch=batch_size, gather=lambda x: x, reduce_sum=lambda x: x)
        model = trainer.backend.model
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, *model.visual.image_size, generator=gen)
        texts = torch.randint(1, model.vocab_size, (batch_size, model.context_length), generator=gen)
        objectives = {"table": table_objective, "neural": neural_objective}
        wall = {name: [] for name in objectives}
        for round_index in range(warmup + rounds):
            for name in round_order(tuple(objectives), round_index):
                rows = torch.randperm(trainer.manifest.num_samples, generator=gen)[:batch_size]
                batch = Batch(images=images, texts=texts, rows=rows, keys=[f"s{i}" for i in range(batch_size)])
                term.objective = objectives[name]
                with timed() as timing:
                    metrics = trainer.train_step(batch, lr=1e-5, grad_clip=0.0)
                if metrics.get("skipped"):
                    raise FloatingPointError(f"the {name} step was skipped (non-finite values)")
                if round_index >= warmup:
                    wall[name].append(timing.wall_s)
        trainer.close()
    return {name: min(times) for name, times in wall.items()} | {"median": {k: sorted(v)[len(v) // 2]
                                                                           for k, v in wall.items()}}


def network_alone_ms(*, batch: int = 64, dim: int = 64, repeats: int = 30) -> float:
    """Best milliseconds of the network's share of a step alone (estimate + commit: T_u updates and the
    prediction) at the defaults, on fixed features of the demo's batch and embedding size."""
    spec = SurrogateSpec(kind="hgcl", margin=0.1, tau=0.01)
    f, g = synthetic_pairs(batch, seed=0)
    f, g = f[:, :dim], g[:, :dim]
    est = GlobalContrastiveLoss(spec).batch_estimates(f, g)
    network, times = NeuralNormaliser(), []
    for _ in range(repeats):
        with timed() as timing:
            network.estimate(torch.arange(batch), est.log_phi_x, est.log_phi_z, image_features=f, text_features=g,
                             surrogate=spec)
            network.commit()
        times.append(timing.wall_s)
    return min(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the data at frozen features")
    parser.add_argument("--surrogate", choices=("gcl", "hgcl"), default="hgcl")
    parser.add_argument("--margin", type=float, default=0.1)
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--skip-error", action="store_true", help="state size and step time only")
    parser.add_argument("--error-only", action="store_true", help="the estimation errors only (no step time check)")
    parser.add_argument("--drift", type=float, default=0.0,
                        help="moving weights: each feature moves by this norm over the run (0: frozen)")
    parser.add_argument("--sizes", type=int, nargs="+", help="dataset sizes (default 1k 10k 100k)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 32 128 512)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # small ops: on shared cores a second, descheduled thread costs more than it gives
    spec = SurrogateSpec(kind=args.surrogate, margin=args.margin, tau=args.tau, eps=1e-14)
    sizes = args.sizes or ((1_000, 10_000) if args.quick else (1_000, 10_000, 100_000))
    batches = args.batches or ((32, 256) if args.quick else (32, 128, 512))

    if not args.skip_error:
        table = Table(Column("n", 8), Column("B", 5), Column("table |err|", 12), Column("table bias", 11),
                       Column("network |err|", 14), Column("network bias", 13), Column("sd(exact)", 10),
                       Column("visited", 8), Column("s", 6))
        what = f"features drifting by {args.drift:g}" if args.drift else "frozen features"
        print(f"1. log-normaliser error at {what} ({args.surrogate}, m {args.margin:g}, tau {args.tau:g}, "
              f"{args.epochs} passes; mean over {NUM_EVAL} anchors x 2 sides)")
        print(table.header())
        for n in sizes:
            for batch in batches:
                r = estimation_errors(n, batch, epochs=args.epochs, spec=spec, drift=args.drift)
                print(table.row(f"{n:,}", batch, f"{r['table_mae']:.3f}", f"{r['table_bias']:+.3f}",
                                f"{r['net_mae']:.3f}", f"{r['net_bias']:+.3f}", f"{r['exact_sd']:.2f}",
                                f"{r['visited']:.0%}", f"{r['seconds']:.0f}"), flush=True)

    if args.error_only:
        return 0
    net_bytes = network_checkpoint_bytes()
    print("\n2. state (and checkpoint) size")
    sizes_table = Table(Column("samples", 10), Column("table", 10), Column("network (m 4096, D 1024)", 26))
    print(sizes_table.header())
    for n in (1_000_000, 100_000_000, 5_000_000_000):
        print(sizes_table.row(f"{n:,}", _bytes(n * TABLE_ROW_BYTES), f"{_bytes(net_bytes)} (measured)"))

    times = step_times(rounds=6 if args.quick else 16)
    ratio = times["neural"] / times["table"]
    print("\n3. train_step, tiny-vit, batch 64, one process (best of rounds; median in brackets)")
    for name in ("table", "neural"):
        print(f"   {name:7s} {times[name] * 1e3:8.1f} ms  [{times['median'][name] * 1e3:.1f} ms]")
    print(f"   the network's share alone (estimate + commit, B 64, D 64, m 4096, T_u 10): "
          f"{network_alone_ms():.1f} ms")
    print(f"step time network / table: {ratio:.2f}x (target <= {TARGET_RATIO:.2f}x)")
    return 0 if ratio <= TARGET_RATIO else 1


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.0f} PB"


if __name__ == "__main__":
    sys.exit(main())
