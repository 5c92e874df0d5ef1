"""Scale evidence: a random-init ViT-H-14-quickgelu (986 M parameters) trains under ZeRO-3 on 2 CPU ranks.

Target: under ZeRO-3 bf16 on 2 ranks, one OSR step (lr = 0) leaves every rank's weights
bit-identical (its bf16 model partition and fp32 masters) with AdamW's step counter at 1, one
fine-tuning step (lr = 1e-5) changes them, and each rank holds about 1/W of the parameters and of
the optimizer state; and with `zero.Init` model construction adds less than the whole fp32 model
to any rank. Exits non-zero when any of that fails. The headline: peak RSS of model construction
per rank, zero.Init build over full build, measured one after the other in the same run.

What runs, once per build (`--builds full zero_init`, both by default): 2 ranks
(tests.helpers.harness: gloo, DS_ACCELERATOR=cpu, one thread each) with glibc
`MALLOC_MMAP_THRESHOLD_=1048576`, so freed tensors go back to the OS instead of fragmenting the
heap. `full`: every rank builds the whole fp32 model with `models.build_model` (what the engine did
before; "peak build"). `zero_init`: `models.zero3.build_model_zero3`, what the trainer does under
ZeRO-3 now: parameters partitioned as each submodule is built, weights (`--weights`) streamed into
the partitions. Each rank wraps the model in `DeepSpeedBackend` (bf16) and runs two training steps
on its slice of a random global batch (images at the model's 224 px, random tokens): forward of both
towers through the engine, HGCL through `GlobalContrastiveLoss` with the all-gather and all-reduce
of the distributed path, the u rows carried from step 1 to step 2, backward, AdamW step.

Config: `zero_configs/zero3_bf16.json` as shipped. Its earlier values (OLD_FILE_VALUES,
`--old-file-values`) did not fit two ViT-H ranks in 24 GB: AdamW stepped each rank's whole 493
M-element partition at once (fp32 gradient copy 2 GB, temporaries 4 GB, on top of m and v), and
with stage3_max_reuse_distance 1e9 > N the second step kept every gathered layer (2 GB); an
earlier session measured the kernel's OOM killer stopping rank 0 at 11.4 GB during the first
optimizer step. The file now ships sub_group_size 5e7 and reuse distance / live parameters 1e8.

Memory: `ru_maxrss` (the process's peak resident set) after each phase, and the parent's 1 s
samples of each rank's RSS. The DDP comparison is computed from the parameter count N: fp32
training holds params + grads + Adam m, v = 16 B/param; bf16 mixed precision as DeepSpeed keeps
it (bf16 params 2 + bf16 grads 2 + fp32 master 4 + m 4 + v 4) is also 16 B/param; ZeRO-3 divides
all of it by W. Activations, gathered layers and the runtime come on top in every case.

    python benchmarks/zero3_vith.py                    # ViT-H-14-quickgelu, both builds, global batch 2
    python benchmarks/zero3_vith.py --model ViT-L-14   # a smaller model on a smaller machine

The parent stops the ranks when the machine's available memory falls below `--min-free-gb`,
rather than let the kernel's OOM killer pick a victim.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
    rss_bytes,
)

DEFAULT_MODEL = "ViT-H-14-quickgelu"
ZERO_CONFIG = REPO_ROOT / "zero_configs" / "zero3_bf16.json"
WORLD_SIZE = 2
OSR_LR, FINETUNE_LR = 0.0, 1e-5
BETAS, WEIGHT_DECAY, ADAM_EPS = (0.9, 0.98), 0.02, 1e-6
MARGIN, GAMMA = 0.1, 0.9
DDP_BYTES_PER_PARAM = {  # per rank, model state only
    "DDP fp32 (params 4 + grads 4 + m 4 + v 4)": 16,
    "DDP bf16 mixed (params 2 + grads 2 + master 4 + m 4 + v 4)": 16,
}
PARTITION_TOLERANCE = 0.01  # a rank's share may exceed 1/W by padding only
# On top of zero3_bf16.json, whose values do not fit two ViT-H ranks in 24 GB (see the module doc).
# What zero3_bf16.json shipped with before it was made to fit (DeepSpeed's sub_group_size default is 1e9):
# `--old-file-values` puts them back to reproduce the out-of-memory run.
OLD_FILE_VALUES = {
    "sub_group_size": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
}
BUILDS = ("full", "zero_init")
GB = 1e9


def _peak_gb() -> float:
    return peak_rss_bytes() / GB


def _digest(tensors) -> str:
    """sha256 over the bytes of `tensors`, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def zero_config(overrides: dict) -> dict:
    """zero3_bf16.json with `overrides` applied to its zero_optimization section."""
    config = json.loads(ZERO_CONFIG.read_text())
    config["zero_optimization"].update(overrides)
    return config


def rank_run(model_name: str, global_batch: int, overrides: dict, build: str = "zero_init", seed: int = 0,
             weights: str | None = None, stop_after: str = "train") -> dict:
    """One rank: build (`full`: whole fp32 model, or `zero_init`: partitioned while built), wrap in ZeRO-3
    bf16, OSR step, fine-tuning step; returns measurements."""
    from engine.backends.deepspeed import DeepSpeedBackend, build_deepspeed_config
    from engine.distributed import all_reduce_sum, context_from_env, gather_no_grad
    from engine.objectives.contrastive import GlobalContrastiveLoss, SurrogateSpec
    from models import build_model, features_of, temperature
    from models.zero3 import build_model_zero3

    def say(text: str) -> None:
        print(f"[rank {ctx.rank} {time.perf_counter() - started:6.0f} s] {text}", flush=True)

    started = time.perf_counter()
    ctx = context_from_env()
    DeepSpeedBackend.init_distributed(ctx)
    local_batch = global_batch // ctx.world_size
    out = {"rank": ctx.rank, "peak_gb": {}}
    out["peak_gb"]["start"] = _peak_gb()

    out["rss_before_build_gb"] = rss_bytes() / GB
    if build == "full":
        bundle = build_model(model_name, seed=seed, weights=weights)
    else:  # what the trainer does under ZeRO-3 (build_bundle)
        ds_config = build_deepspeed_config(zero_config(overrides), micro_batch_size=local_batch,
                                           world_size=ctx.world_size, betas=BETAS, weight_decay=WEIGHT_DECAY,
                                           eps=ADAM_EPS, grad_clip=0.0, precision="bf16")
        bundle = build_model_zero3(model_name, ds_config=ds_config, seed=seed, weights=weights)
    model = bundle.model
    tau = temperature(model)
    for name, param in model.named_parameters():  # the temperature stays fixed, as in the trainer
        if "logit_scale" in name or "logit_bias" in name:
            param.requires_grad_(False)
    num_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    context_length, vocab_size = model.context_length, model.vocab_size
    image_size = model.visual.image_size
    out["build_s"] = time.perf_counter() - started
    out["peak_gb"]["build"] = _peak_gb()
    out["rss_after_build_gb"] = rss_bytes() / GB
    say(f"built {model_name} ({build}): {num_params:,} params, peak {out['peak_gb']['build']:.2f} GB")
    if stop_after == "build":
        out["num_params"], out["peak_gb"]["wrap"] = num_params, float("nan")
        out["peak_gb"]["end"] = _peak_gb()
        return out

    mark = time.perf_counter()
    backend = DeepSpeedBackend(model, device=torch.device("cpu"), zero_config=zero_config(overrides),
                               micro_batch_size=local_batch, betas=BETAS, weight_decay=WEIGHT_DECAY,
                               eps=ADAM_EPS, precision="bf16")
    del model, bundle
    out["wrap_s"] = time.perf_counter() - mark
    out["peak_gb"]["wrap"] = _peak_gb()
    out["rss_after_wrap_gb"] = rss_bytes() / GB
    params = list(backend.model.parameters())
    zero_optimizer = backend.engine.optimizer
    out["num_params"] = sum(p.ds_numel for p in params)
    out["num_local_params"] = sum(p.ds_tensor.numel() for p in params)
    # Parameters below stage3_param_persistence_threshold stay whole on every rank besides their slice.
    out["num_persistent_params"] = sum(p.ds_numel for p in params if getattr(p, "ds_persist", False))
    out["num_local_master"] = sum(t.numel() for t in zero_optimizer.fp32_partitioned_groups_flat)
    out["param_dtypes"] = sorted({str(p.ds_tensor.dtype) for p in params})
    say(f"ZeRO-3 wrap: {out['num_local_params']:,} of {out['num_params']:,} params held here, "
        f"peak {out['peak_gb']['wrap']:.2f} GB, RSS now {out['rss_after_wrap_gb']:.2f} GB")

    if stop_after == "wrap":
        out["peak_gb"]["end"] = _peak_gb()
        backend.close()
        return out
    loss_fn = GlobalContrastiveLoss(SurrogateSpec(kind="hgcl", margin=MARGIN, tau=tau), gather=gather_no_grad,
                                    reduce_sum=all_reduce_sum, world_size=ctx.world_size)
    gen = torch.Generator().manual_seed(seed + 1)  # the same global batch on every rank
    images = torch.randn(global_batch, 3, *image_size, generator=gen)
    texts = torch.randint(1, vocab_size, (global_batch, context_length), generator=gen)
    lo, hi = ctx.rank * local_batch, (ctx.rank + 1) * local_batch
    images, texts = images[lo:hi].to(backend.input_dtype), texts[lo:hi]
    log_u_x = log_u_z = torch.zeros(local_batch)
    seen = torch.zeros(local_batch, dtype=torch.bool)

    def module_digest() -> str:
        return _digest(p.ds_tensor for p in params)

    steps = []
    for stage, lr in (("osr", OSR_LR), ("finetune", FINETUNE_LR)):
        before, before_module = backend.weights_digest(), module_digest()
        t0 = time.perf_counter()
        image_features, text_features = features_of(backend.forward(images, texts))
        result = loss_fn(image_features, text_features, log_u_x=log_u_x, log_u_z=log_u_z, seen=seen,
                         gamma=GAMMA, offset=lo, output_dict=True)
        t1, peak_forward = time.perf_counter(), _peak_gb()
        backend.backward(result["loss"])
        t2, peak_backward = time.perf_counter(), _peak_gb()
        grad_norm = backend.step(lr=lr)
        t3 = time.perf_counter()
        log_u_x, log_u_z = result["log_u_x"], result["log_u_z"]
        seen = torch.ones(local_batch, dtype=torch.bool)
        after, after_module = backend.weights_digest(), module_digest()
        steps.append({
            "stage": stage, "lr": lr, "loss": float(result["loss_value"]), "grad_norm": grad_norm,
            "forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t3 - t2, "total_s": t3 - t0,
            "weights_changed": before != after, "module_changed": before_module != after_module,
            "step_count": backend.optimizer_step_count(), "peak_forward_gb": peak_forward,
            "peak_backward_gb": peak_backward, "peak_gb": _peak_gb(),
        })
        say(f"{stage}: {t3 - t0:.1f} s (fwd {t1 - t0:.1f}, bwd {t2 - t1:.1f}, step {t3 - t2:.1f}), "
            f"loss {steps[-1]['loss']:.4f}, weights changed {before != after}, peak {_peak_gb():.2f} GB")
    out["steps"] = steps
    out["num_local_moments"] = sum(
        state["exp_avg"].numel() + state["exp_avg_sq"].numel()
        for state in zero_optimizer.optimizer.state.values()
    )
    out["peak_gb"]["end"] = _peak_gb()
    backend.close()  # removes this rank's DeepSpeed shared-memory buffer too
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--global-batch", type=int, default=WORLD_SIZE)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the ranks are killed")
    parser.add_argument("--min-free-gb", type=float, default=1.5,
                        help="stop the ranks when the machine's available memory falls below this")
    parser.add_argument("--builds", nargs="+", choices=BUILDS, default=list(BUILDS),
                        help="model construction(s) to run one after the other: full (every rank builds the "
                             "whole fp32 model, the engine before zero.Init) and/or zero_init (the engine now)")
    parser.add_argument("--weights", help="a weights file of --model that both builds load (construction then "
                        "includes reading it: whole on every rank for `full`, streamed into the partitions for "
                        "`zero_init`)")
    parser.add_argument("--stop-after", choices=("build", "wrap", "train"), default="train",
                        help="end each rank after model construction, after the DeepSpeed wrap, or after the two "
                             "training steps (the whole check)")
    parser.add_argument("--old-file-values", action="store_true",
                        help=f"run {ZERO_CONFIG.name} with the values it shipped with before (OLD_FILE_VALUES)")
    args = parser.parse_args()
    overrides = OLD_FILE_VALUES if args.old_file_values else {}
    if args.global_batch % WORLD_SIZE:
        parser.error(f"--global-batch must be a multiple of {WORLD_SIZE}")

    from tests.helpers.harness import run_ranks

    results, code = {}, 0
    for build in args.builds:
        watch = MemoryWatch(min_free_bytes=args.min_free_gb * GB)
        print(f"\n=== build {build}: {args.model} under ZeRO-3 bf16 ({ZERO_CONFIG.name} as shipped"
              f"{', with ' + str(overrides) if overrides else ''}), {WORLD_SIZE} CPU ranks, "
              f"{'weights ' + args.weights if args.weights else 'random init'}, global batch "
              f"{args.global_batch}, random images at the model's size; machine available "
              f"{available_memory_bytes() / GB:.1f} GB", flush=True)
        started = time.perf_counter()
        watch.start()
        try:
            ranks = run_ranks("benchmarks.zero3_vith:rank_run", world_size=WORLD_SIZE, timeout=args.timeout,
                              env=FIXED_MMAP_THRESHOLD_ENV, model_name=args.model, global_batch=args.global_batch,
                              overrides=overrides, build=build, weights=args.weights,
                              stop_after=args.stop_after)
        except AssertionError as err:
            print(f"FAILED ({build}) after {time.perf_counter() - started:.0f} s"
                  f"{' (stopped by the memory watch)' if watch.killed else ''}:\n{err}", file=sys.stderr)
            print(f"machine: lowest available memory {watch.min_available_bytes / GB:.1f} GB; sampled RSS maxima "
                  f"per rank {', '.join(f'{v / GB:.2f}' for v in watch.max_rss_bytes.values())} GB")
            code = 2
            continue
        finally:
            watch.stop()
        if args.stop_after == "train":
            code = max(code, report(ranks, args, elapsed=time.perf_counter() - started, watch=watch))
        results[build] = (ranks, watch)
    return max(code, compare(results))


def compare(results: dict) -> int:
    """Before/after table of the builds that ran; the headline: construction peak per rank, zero.Init vs full."""
    if not results:
        return 2
    num_params = next(iter(results.values()))[0][0]["num_params"]
    fp32_gb = num_params * 4 / GB
    table = Table(Column("build", 10, align="<"), Column("rank", 4), *(Column(name, spec=".2f") for name in (
        "RSS before", "peak build", "build added", "RSS built", "peak wrap", "peak end", "sampled max")))
    print(f"\nconstruction and training peaks per rank (GB; the whole fp32 model is {fp32_gb:.2f} GB; "
          "'build added' = peak during construction - RSS before it)")
    print(table.header())
    print(table.rule())
    for build, (ranks, watch) in results.items():
        sampled = [value / GB for value in watch.max_rss_bytes.values()]  # by pid: the ranks in start order
        for r in ranks:
            value = sampled[r["rank"]] if r["rank"] < len(sampled) else float("nan")
            print(table.row(build, r["rank"], r["rss_before_build_gb"], r["peak_gb"]["build"],
                            r["peak_gb"]["build"] - r["rss_before_build_gb"], r["rss_after_build_gb"],
                            r["peak_gb"]["wrap"], r["peak_gb"]["end"], value))
    code = 0
    if "zero_init" in results:
        added = max(r["peak_gb"]["build"] - r["rss_before_build_gb"] for r in results["zero_init"][0])
        if added >= fp32_gb:
            print(f"FAIL: with zero.Init construction added {added:.2f} GB to a rank, not less than the whole "
                  f"fp32 model ({fp32_gb:.2f} GB)")
            code = 1
    if set(results) == set(BUILDS):
        full = max(r["peak_gb"]["build"] for r in results["full"][0])
        zinit = max(r["peak_gb"]["build"] for r in results["zero_init"][0])
        full_end = max(r["peak_gb"]["end"] for r in results["full"][0])
        zinit_end = max(r["peak_gb"]["end"] for r in results["zero_init"][0])
        print(f"headline: peak RSS of model construction per rank {zinit:.2f} GB with zero.Init vs {full:.2f} GB "
              f"building the whole model = {zinit / full:.2f}x; whole run peak {zinit_end:.2f} vs {full_end:.2f} GB")
    return code


def report(ranks: list[dict], args, *, elapsed: float, watch: MemoryWatch) -> int:
    """Print the per-rank table, the DDP comparison and the headline; return the exit code."""
    num_params = ranks[0]["num_params"]
    share = 1.0 / WORLD_SIZE
    table = Table(Column("rank", 4), Column("params held", 13, ","), Column("share", 6, ".3f"),
                  Column("fp32 master", 12, ","), Column("m+v elems", 13, ","), Column("peak build", 10),
                  Column("peak wrap", 9), Column("peak end", 8), Column("OSR s", 6, ".1f"), Column("FT s", 6, ".1f"),
                  Column("OSR same", 8), Column("FT moved", 8), Column("t after", 7))
    print(f"\nparameters: {num_params:,} in total; local partition dtype {ranks[0]['param_dtypes']}; "
          f"{ranks[0]['num_persistent_params']:,} of them in small persistent tensors that every rank also "
          "keeps whole (stage3_param_persistence_threshold)")
    print(table.header())
    print(table.rule())
    problems = []
    for r in ranks:
        osr, ft = r["steps"]
        held = r["num_local_params"] / num_params
        print(table.row(r["rank"], r["num_local_params"], held, r["num_local_master"], r["num_local_moments"],
                        *(f"{r['peak_gb'][phase]:.2f}G" for phase in ("build", "wrap", "end")),
                        osr["total_s"], ft["total_s"], "NO" if osr["weights_changed"] else "yes",
                        "yes" if ft["weights_changed"] else "NO", f"{osr['step_count']}->{ft['step_count']}"))
        if osr["weights_changed"]:
            problems.append(f"rank {r['rank']}: the OSR step (lr = 0) changed the weights")
        if osr["step_count"] != 1:
            problems.append(f"rank {r['rank']}: step counter after OSR is {osr['step_count']}, expected 1")
        if not ft["weights_changed"]:
            problems.append(f"rank {r['rank']}: the fine-tuning step (lr = {FINETUNE_LR}) left the weights "
                            "unchanged")
        for what, count, per_param in (("parameters", r["num_local_params"], 1),
                                       ("fp32 masters", r["num_local_master"], 1),
                                       ("Adam moments", r["num_local_moments"], 2)):
            fraction = count / (per_param * num_params)
            if not fraction <= share + PARTITION_TOLERANCE:
                problems.append(f"rank {r['rank']}: holds {fraction:.3f} of the {what}, "
                                f"expected ~{share:.3f}")
    rank0 = ranks[0]
    for r in ranks:
        osr, ft = r["steps"]
        print(f"rank {r['rank']} seconds, fwd+loss / bwd / step: OSR {osr['forward_s']:.1f} / "
              f"{osr['backward_s']:.1f} / {osr['step_s']:.1f}, FT {ft['forward_s']:.1f} / "
              f"{ft['backward_s']:.1f} / {ft['step_s']:.1f}; build {r['build_s']:.0f} s, "
              f"wrap {r['wrap_s']:.0f} s")
        print(f"rank {r['rank']} peak GB after fwd / bwd / step: OSR {osr['peak_forward_gb']:.2f} / "
              f"{osr['peak_backward_gb']:.2f} / {osr['peak_gb']:.2f}, FT {ft['peak_forward_gb']:.2f} / "
              f"{ft['peak_backward_gb']:.2f} / {ft['peak_gb']:.2f}; RSS right after the wrap "
              f"{r['rss_after_wrap_gb']:.2f}; bf16 module partition changed: OSR {osr['module_changed']}, "
              f"FT {ft['module_changed']}")
    print(f"losses: OSR {rank0['steps'][0]['loss']:.4f}, FT {rank0['steps'][1]['loss']:.4f}; "
          f"grad norms {rank0['steps'][0]['grad_norm']:.4g}, {rank0['steps'][1]['grad_norm']:.4g}")

    print("\nper-rank memory for the model state, from the parameter count:")
    for label, per_param in DDP_BYTES_PER_PARAM.items():
        print(f"  {label:<62} {per_param:>2} B/param = {num_params * per_param / GB:6.2f} GB")
    zero3_state = num_params * 16 / WORLD_SIZE / GB
    zero3_label = f"ZeRO-3 bf16, W = {WORLD_SIZE} (16 B/param / W)"
    print(f"  {zero3_label:<62} {16 / WORLD_SIZE:>2.0f} B/param = {zero3_state:6.2f} GB")
    ddp_gb = num_params * 16 / GB
    peak = max(r["peak_gb"]["end"] for r in ranks)
    sampled = ", ".join(f"{value / GB:.2f}" for value in watch.max_rss_bytes.values())
    print(f"machine: lowest available memory {watch.min_available_bytes / GB:.1f} GB; sampled RSS maxima per rank "
          f"{sampled} GB, of both together {watch.max_children_rss_bytes / GB:.1f} GB; wall time {elapsed:.0f} s")
    for problem in problems:
        print(f"FAIL: {problem}")
    print(f"result: {args.model} ZeRO-3 bf16 on {WORLD_SIZE} ranks peaks at {peak:.2f} GB per rank = "
          f"{peak / ddp_gb:.2f}x the {ddp_gb:.2f} GB model state DDP would need per rank; "
          f"OSR unchanged, FT changed, state sharded: {'yes' if not problems else 'NO'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
