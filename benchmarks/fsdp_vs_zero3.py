"""FSDP2 vs. DeepSpeed ZeRO-3, side by side: ViT-H-14-quickgelu, bf16, 2 CPU ranks, OSR and fine-tuning steps.

Target: FSDP2's largest per-rank peak RSS <= ZeRO-3's, and FSDP2's median seconds per step (OSR and
fine-tuning each) <= 1.1x ZeRO-3's. Exits non-zero when a target is missed or a check fails (an OSR
step that moves weights, a fine-tuning step that does not). The last line prints the ratios.

What runs, one backend after the other (never both at once: each alone needs most of the machine), each
as 2 ranks (tests.helpers.harness: gloo, one thread per rank, glibc `MALLOC_MMAP_THRESHOLD_` as in
benchmarks/zero3_vith.py): one untimed warm-up step (lr = 0), `--steps` OSR steps (lr = 0), then `--steps` fine-tuning steps (lr = 1e-5) on
each rank's slice of a random global batch at the model's 224 px, HGCL through the distributed
`GlobalContrastiveLoss`, u rows carried from step to step.
- ZeRO-3: `DeepSpeedBackend` with `zero_configs/zero3_bf16.json` as shipped, on a model built the way the
  trainer builds it under ZeRO-3 (`models.zero3.build_model_zero3`: partitioned under zero.Init as it is
  created, so no rank holds the whole fp32 model).
- FSDP2: `FSDPBackend` on a model built on the meta device (`models.meta.build_model_on_meta`) on every
  rank; rank 0 builds the same random-init model (the stand-in for reading a checkpoint file) and its
  full state dict is broadcast into the shards (`set_model_state_dict(broadcast_from_rank0=True)`).

Memory: `ru_maxrss` of each rank after build, wrap and each step. Time: wall seconds per step (forward,
loss, backward, optimizer step), median over the `--steps` steps of each stage.

    python benchmarks/fsdp_vs_zero3.py            # ViT-H-14-quickgelu, ~15-25 min
    python benchmarks/fsdp_vs_zero3.py --model tiny-vit --global-batch 4 # plumbing check, ~1 min
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import (
    FIXED_MMAP_THRESHOLD_ENV,
    Column,
    MemoryWatch,
    Table,
    available_memory_bytes,
    peak_rss_bytes,
    side_by_side,
)
from benchmarks.zero3_vith import zero_config

DEFAULT_MODEL = "ViT-H-14-quickgelu"
WORLD_SIZE = 2
OSR_LR, FINETUNE_LR = 0.0, 1e-5
BETAS, WEIGHT_DECAY, ADAM_EPS = (0.9, 0.98), 0.02, 1e-6
MARGIN, GAMMA = 0.1, 0.9
MEMORY_TARGET = 1.0  # FSDP2 peak / ZeRO-3 peak
TIME_TARGET = 1.1  # FSDP2 seconds per step / ZeRO-3's
BACKENDS = ("zero3", "fsdp")
GB = 1e9


def _peak_gb() -> float:
    return peak_rss_bytes() / GB


def _freeze_temperature(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():  # fixed, as in the trainer
        if "logit_scale" in name or "logit_bias" in name:
            param.requires_grad_(False)


def _build(kind: str, model_name: str, global_batch: int, seed: int, rank: int):
    """The backend `kind` around `model_name` (bf16), and the facts the steps need."""
    from engine.backends.deepspeed import DeepSpeedBackend
    from engine.backends.fsdp import FSDPBackend
    from models import build_model, temperature
    from models.meta import build_model_on_meta

    if kind == "zero3":  # the trainer's ZeRO-3 build: partitioned under zero.Init as it is created
        from engine.backends.deepspeed import build_deepspeed_config
        from models.zero3 import build_model_zero3

        ds_config = build_deepspeed_config(zero_config({}), micro_batch_size=global_batch // WORLD_SIZE,
                                           world_size=WORLD_SIZE, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                           eps=ADAM_EPS, grad_clip=0.0, precision="bf16")
        model = build_model_zero3(model_name, ds_config=ds_config, seed=seed).model
        facts = {"tau": temperature(model), "context_length": model.context_length, "vocab_size": model.vocab_size,
                 "image_size": model.visual.image_size,
                 "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}
        _freeze_temperature(model)
        peak_build = _peak_gb()
        backend = DeepSpeedBackend(model, device=torch.device("cpu"), zero_config=zero_config({}),
                                   micro_batch_size=global_batch // WORLD_SIZE, betas=BETAS,
                                   weight_decay=WEIGHT_DECAY, eps=ADAM_EPS, precision="bf16")
        del model
        return backend, facts, peak_build
    weights = build_model(model_name, seed=seed).model.state_dict() if rank == 0 else None
    model = build_model_on_meta(model_name).model
    facts = {"tau": float(torch.exp(-weights["logit_scale"]).item()) if weights is not None else None,
             "context_length": model.context_length, "vocab_size": model.vocab_size,
             "image_size": model.visual.image_size, "num_params": sum(p.numel() for p in model.parameters())}
    _freeze_temperature(model)
    peak_build = _peak_gb()
    backend = FSDPBackend(model, device=torch.device("cpu"), betas=BETAS, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS,
                          precision="bf16", weights=weights)
    del weights, model
    return backend, facts, peak_build


def rank_run(kind: str, model_name: str, global_batch: int, steps: int, seed: int = 0) -> dict:
    """One rank: build `kind`, `steps` OSR then `steps` fine-tuning steps; returns peaks and step times."""
    from engine.distributed import all_reduce_sum, broadcast_object, context_from_env, gather_no_grad
    from engine.objectives.contrastive import GlobalContrastiveLoss, SurrogateSpec
    from models import features_of

    started = time.perf_counter()
    ctx = context_from_env()
    if kind == "zero3":
        from engine.backends.deepspeed import DeepSpeedBackend as cls
    else:
        from engine.backends.fsdp import FSDPBackend as cls
    cls.init_distributed(ctx)

    def say(text: str) -> None:
        print(f"[rank {ctx.rank} {kind} {time.perf_counter() - started:6.0f} s] {text}", flush=True)

    out = {"rank": ctx.rank, "kind": kind, "peak_gb": {"start": _peak_gb()}}
    backend, facts, out["peak_gb"]["build"] = _build(kind, model_name, global_batch, seed, ctx.rank)
    facts["tau"] = broadcast_object(facts["tau"])
    out["peak_gb"]["wrap"] = _peak_gb()
    out["build_s"] = time.perf_counter() - started
    out["num_params"] = facts["num_params"]
    say(f"built and wrapped {facts['num_params']:,} params in {out['build_s']:.0f} s; peak build "
        f"{out['peak_gb']['build']:.2f} GB, wrap {out['peak_gb']['wrap']:.2f} GB")

    local = global_batch // ctx.world_size
    loss_fn = GlobalContrastiveLoss(SurrogateSpec(kind="hgcl", margin=MARGIN, tau=facts["tau"]), gather=gather_no_grad,
                                    reduce_sum=all_reduce_sum, world_size=ctx.world_size)
    lo = ctx.rank * local
    log_u_x = log_u_z = torch.zeros(local)
    seen = torch.zeros(local, dtype=torch.bool)
    input_dtype = getattr(backend, "input_dtype", torch.float32)
    out["steps"] = []
    for index in range(1 + 2 * steps):  # step 0: warm-up (lazy initialisation, first allocations), not timed
        stage, lr = ("warmup", OSR_LR) if index == 0 else ("osr", OSR_LR) if index <= steps else ("finetune", FINETUNE_LR)
        gen = torch.Generator().manual_seed(seed + 1 + index)  # the same global batch on every rank
        images = torch.randn(global_batch, 3, *facts["image_size"], generator=gen)[lo:lo + local]
        texts = torch.randint(1, facts["vocab_size"], (global_batch, facts["context_length"]), generator=gen)
        before = backend.weights_digest()
        t0 = time.perf_counter()
        image_features, text_features = features_of(backend.forward(images.to(input_dtype), texts[lo:lo + local]))
        result = loss_fn(image_features, text_features, log_u_x=log_u_x, log_u_z=log_u_z, seen=seen, gamma=GAMMA,
                         offset=lo, output_dict=True)
        t1 = time.perf_counter()
        backend.backward(result["loss"])
        t2 = time.perf_counter()
        grad_norm = backend.step(lr=lr)
        t3 = time.perf_counter()
        seconds = t3 - t0
        log_u_x, log_u_z, seen = result["log_u_x"], result["log_u_z"], torch.ones(local, dtype=torch.bool)
        changed = backend.weights_digest() != before
        out["steps"].append({"stage": stage, "seconds": seconds, "forward_s": t1 - t0, "backward_s": t2 - t1,
                             "optimizer_s": t3 - t2, "changed": changed, "grad_norm": grad_norm,
                             "loss": float(result["loss_value"]), "count": backend.optimizer_step_count(),
                             "peak_gb": _peak_gb()})
        say(f"{stage} step {index}: {seconds:.1f} s (fwd+loss {t1 - t0:.1f}, bwd {t2 - t1:.1f}, opt {t3 - t2:.1f}), loss {out['steps'][-1]['loss']:.4f}, weights changed "
            f"{changed}, peak {_peak_gb():.2f} GB")
    out["peak_gb"]["end"] = _peak_gb()
    backend.close()
    return out


def run_backend(kind: str, args) -> list[dict] | None:
    from tests.helpers.harness import run_ranks

    watch = MemoryWatch(min_free_bytes=args.min_free_gb * GB)
    print(f"--- {kind}: {args.model}, bf16, {WORLD_SIZE} CPU ranks, global batch {args.global_batch}, "
          f"{args.steps} OSR + {args.steps} fine-tuning steps; machine available {available_memory_bytes() / GB:.1f} GB",
          flush=True)
    watch.start()
    try:
        return run_ranks("benchmarks.fsdp_vs_zero3:rank_run", world_size=WORLD_SIZE, timeout=args.timeout,
                         env=FIXED_MMAP_THRESHOLD_ENV, kind=kind, model_name=args.model, global_batch=args.global_batch,
                         steps=args.steps)
    except AssertionError as err:
        print(f"{kind} FAILED{' (stopped by the memory watch)' if watch.killed else ''}:\n{err}", file=sys.stderr)
        return None
    finally:
        watch.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--global-batch", type=int, default=WORLD_SIZE)
    parser.add_argument("--steps", type=int, default=2, help="OSR steps and fine-tuning steps, each")
    parser.add_argument("--timeout", type=float, default=2400.0, help="seconds before a backend's ranks are killed")
    parser.add_argument("--only", choices=BACKENDS, default=None,
                        help="run one backend and print its rows (no comparison): for trying a change")
    parser.add_argument("--min-free-gb", type=float, default=1.5,
                        help="stop the ranks when the machine's available memory falls below this")
    args = parser.parse_args()
    if args.global_batch % WORLD_SIZE or args.steps < 1:
        parser.error(f"--global-batch must be a multiple of {WORLD_SIZE} and --steps >= 1")

    results = {kind: run_backend(kind, args) for kind in ([args.only] if args.only else BACKENDS)}
    if any(r is None for r in results.values()):
        print("result: a backend failed; no comparison")
        return 2
    if args.only:
        for r in results[args.only]:
            print(json.dumps({key: r[key] for key in ("rank", "kind", "peak_gb", "build_s")}))
            for step in r["steps"]:
                print(json.dumps({key: round(v, 2) if isinstance(v, float) else v for key, v in step.items()}))
        return 0
    problems = []
    rows = {}
    for kind, ranks in results.items():
        for r in ranks:
            for step in r["steps"]:
                if step["changed"] != (step["stage"] == "finetune"):  # warm-up and OSR at lr = 0
                    problems.append(f"{kind} rank {r['rank']}: a {step['stage']} step "
                                    f"{'changed' if step['changed'] else 'did not change'} the weights")
        rows[kind] = {
            "peak": max(r["peak_gb"]["end"] for r in ranks),
            "peaks": [r["peak_gb"] for r in ranks],
            "osr_s": [s["seconds"] for s in ranks[0]["steps"] if s["stage"] == "osr"],
            "ft_s": [s["seconds"] for s in ranks[0]["steps"] if s["stage"] == "finetune"],
            "split": {stage: [statistics.median(s[key] for s in ranks[0]["steps"] if s["stage"] == stage)
                              for key in ("forward_s", "backward_s", "optimizer_s")] for stage in ("osr", "finetune")},
            "count": ranks[0]["steps"][-1]["count"],
            "loss": ranks[0]["steps"][0]["loss"],
        }
    table = Table(Column("backend", 8, align="<"), Column("rank", 4), Column("peak build"), Column("peak wrap"),
                  Column("peak end"), Column("OSR s/step", spec=".1f"), Column("FT s/step", spec=".1f"),
                  Column("OSR loss", 9, ".4f"), Column("Adam t", 6))
    print(f"\n{args.model}: {results['fsdp'][0]['num_params']:,} parameters, bf16, {WORLD_SIZE} CPU ranks, "
          f"global batch {args.global_batch}, median of {args.steps} step(s) per stage")
    print(table.header())
    print(table.rule())
    for kind, ranks in results.items():
        row = rows[kind]
        for r, peaks in zip(ranks, row["peaks"]):
            print(table.row(kind, r["rank"], *(f"{peaks[phase]:.2f}G" for phase in ("build", "wrap", "end")),
                            statistics.median(row["osr_s"]), statistics.median(row["ft_s"]), row["loss"],
                            row["count"]))
    for kind in results:
        split = rows[kind]["split"]
        print(f"{kind} median seconds fwd+loss / bwd / optimizer: OSR {' / '.join(f'{x:.1f}' for x in split['osr'])}, "
              f"FT {' / '.join(f'{x:.1f}' for x in split['finetune'])}")
    memory = rows["fsdp"]["peak"] / rows["zero3"]["peak"]
    osr_time = side_by_side(rows["fsdp"]["osr_s"], rows["zero3"]["osr_s"]).median
    ft_time = side_by_side(rows["fsdp"]["ft_s"], rows["zero3"]["ft_s"]).median
    if memory > MEMORY_TARGET:
        problems.append(f"FSDP2 peak {rows['fsdp']['peak']:.2f} GB > ZeRO-3's {rows['zero3']['peak']:.2f} GB")
    for what, ratio in (("OSR", osr_time), ("fine-tuning", ft_time)):
        if ratio > TIME_TARGET:
            problems.append(f"FSDP2 {what} step takes {ratio:.2f}x ZeRO-3's (target <= {TIME_TARGET}x)")
    for problem in problems:
        print(f"FAIL: {problem}")
    print(f"ratio FSDP2 / ZeRO-3: peak RSS per rank {memory:.2f}x (target <= {MEMORY_TARGET}), seconds per OSR step "
          f"{osr_time:.2f}x, per fine-tuning step {ft_time:.2f}x (target <= {TIME_TARGET}); "
          f"{'met' if not problems else 'NOT met'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
