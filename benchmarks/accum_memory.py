"""What `data.accum_steps` costs: peak memory per rank flat in K, time per sample about one extra forward.

Target: with a fixed micro-batch per rank and K = 1, 2, 4, 8 micro-batches per step (a global batch K times
larger), each rank's peak RSS stays within 10 % of K = 1's, and the seconds per sample are at most 1.4x K = 1's
(the second forward of the feature cache). Exits non-zero when missed.

What runs: for each backend (ZeRO-2 with `zero_configs/zero2.json`, FSDP2) and each K, one fine-tuning job as 2
ranks (tests.helpers.harness: gloo, one thread each, fresh processes, so each peak is that job's): `--model`
(random init, fp32), FastCLIP's loss, `--micro-batch` pairs per rank per forward, `--steps` steps of which the
first is not timed, no evaluation. Per rank: peak RSS (`ru_maxrss`) at the end of fine-tuning, before any export;
CPU and wall seconds per sample over the timed steps (of `train_step`). The time target reads CPU seconds (each
rank runs one thread, so they count the work done), which a busy machine leaves nearly unchanged; wall seconds
are printed beside them.

    python benchmarks/accum_memory.py                                  # ViT-B-16: long on 2 cores
    python benchmarks/accum_memory.py --model ViT-B-32 --ks 1 2 4      # smaller
    python benchmarks/accum_memory.py --model tiny-vit                 # plumbing check, ~2 min
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import FIXED_MMAP_THRESHOLD_ENV

TARGET_RSS, TARGET_TIME = 1.10, 1.4
MB = 1024 * 1024  # ru_maxrss is in KiB


def rank_run(model: str, shards: str, out: str, backend: str, micro_batch: int, accum_steps: int,
             steps: int) -> dict:
    """One rank of the job: peak RSS after fine-tuning and seconds per sample of the steps after the first."""
    from engine.config import load_config
    from engine.trainer import Trainer

    backend_run = {"backend": "deepspeed", "zero_config": "zero2"} if backend == "zero2" else {"backend": "fsdp"}
    trainer = Trainer(load_config(base={
        "method": "fastclip", "model": {"name": model},
        "data": {"train": shards, "batch_size": 2 * micro_batch * accum_steps, "accum_steps": accum_steps,
                 "shuffle_buffer": 4},
        "eval": {"at_start": False},
        "run": {"out_dir": out, "progress": False, "seed": 0, **backend_run, "epochs": 1,
                "max_steps_per_epoch": steps, "log_every": 1, "save_every_epochs": 0}}))
    seconds, cpu = [], []
    step = trainer.train_step

    def timed_step(*args, **kwargs):
        started, started_cpu = time.perf_counter(), time.process_time()
        metrics = step(*args, **kwargs)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
        return metrics

    trainer.train_step = timed_step
    trainer.run_stage("finetune", epochs=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer.close()
    num = max(1, len(seconds) - 1) * micro_batch * accum_steps  # samples of the timed steps
    return {"peak_bytes": peak, "s_per_sample": sum(seconds[1:] or seconds) / num,
            "cpu_per_sample": sum(cpu[1:] or cpu) / num}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--micro-batch", type=int, default=2, help="pairs per rank per forward")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=3, help="fine-tuning steps per job (the first is not timed)")
    parser.add_argument("--backends", nargs="+", default=["zero2", "fsdp"], choices=["zero2", "fsdp"])
    args = parser.parse_args()
    from engine.data.build import build_shards
    from engine.demo.synthetic import render_pairs
    from tests.helpers.harness import run_ranks

    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        num = 2 * args.micro_batch * max(args.ks) * args.steps
        csv = render_pairs(root / "raw", num_samples=num, seed=0, split_name="train")
        build_shards(csv, root / "shards", samples_per_shard=max(4, num // 4))
        for backend in args.backends:
            base = None
            for k in args.ks:
                ranks = run_ranks("benchmarks.accum_memory:rank_run", world_size=2, timeout=3600,
                                  env=FIXED_MMAP_THRESHOLD_ENV, model=args.model, shards=str(root / "shards"),
                                  out=str(root / f"{backend}_k{k}"), backend=backend, micro_batch=args.micro_batch,
                                  accum_steps=k, steps=args.steps)
                peak = max(r["peak_bytes"] for r in ranks) / MB
                per_sample = max(r["cpu_per_sample"] for r in ranks)
                wall = max(r["s_per_sample"] for r in ranks)
                base = base or (peak, per_sample, wall)
                rss_ratio, time_ratio = peak / base[0], per_sample / base[1]
                ok &= rss_ratio <= TARGET_RSS and time_ratio <= TARGET_TIME
                rows.append((backend, k, 2 * args.micro_batch * k, peak, rss_ratio, per_sample, time_ratio,
                             wall / base[2]))
                print(f"{backend} K={k}: peak {peak:.0f} MB ({rss_ratio:.2f}x), {per_sample:.3f} CPU s/sample "
                      f"({time_ratio:.2f}x), wall {wall:.3f} s/sample ({wall / base[2]:.2f}x)", flush=True)
    print(f"\n{args.model}, 2 CPU ranks, fp32, micro-batch {args.micro_batch} per rank, {args.steps} steps "
          "(first not timed)")
    print(f"{'backend':>8} {'K':>3} {'global':>6} {'peak RSS/rank MB':>17} {'vs K=1':>7} {'CPU s/sample':>13} "
          f"{'vs K=1':>7} {'wall vs K=1':>12}")
    for backend, k, global_batch, peak, rss_ratio, per_sample, time_ratio, wall_ratio in rows:
        print(f"{backend:>8} {k:>3} {global_batch:>6} {peak:>17.0f} {rss_ratio:>6.2f}x {per_sample:>13.3f} "
              f"{time_ratio:>6.2f}x {wall_ratio:>11.2f}x")
    worst_rss, worst_time = max(r[4] for r in rows), max(r[6] for r in rows)
    print(f"largest peak RSS vs K=1: {worst_rss:.2f}x (target <= {TARGET_RSS}); largest CPU time per sample vs K=1: "
          f"{worst_time:.2f}x (target <= {TARGET_TIME}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
