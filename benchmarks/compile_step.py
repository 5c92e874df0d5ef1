"""Step time with `run.compile` (blocks, model, step) against eager, and the compile time, single-process backend.

Each side is a Trainer of the same job (TuneCLIP, ViT-B-32 at 224 px unless --model, fp32, batch 8 unless
--batch-size) running `Trainer.train_step` in fine-tuning on the same batches (forward, GCL/HGCL objective,
backward, AdamW step). The first step of a compiled side pays its compile: it is reported as the compile time
(first step minus the eager side's fastest step). Rounds interleave the sides after warm-up; the ratio printed is
the fastest step of each side over the fastest eager step (other processes only add time), medians alongside.
Nothing is asserted: on CPU inductor's gains are small, the number that matters is a GPU's
(benchmarks/gpu_check.sh runs this with --device cuda).

    python benchmarks/compile_step.py                          # ViT-B-32, ~10 min on 2 idle cores
    python benchmarks/compile_step.py --model tiny-vit --batch-size 64 --rounds 20
    python benchmarks/compile_step.py --model tiny-vit --batch-size 256 --modes none,model,step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(shards: Path, out: Path, *, model: str, batch_size: int, compile_mode: str, device: str,
          precision: str):
    from engine.config import load_config
    from engine.trainer import Trainer

    trainer = Trainer(load_config(base={
        "method": "tuneclip", "model": {"name": model, "precision": precision},
        "data": {"train": str(shards), "batch_size": batch_size, "shuffle_buffer": batch_size},
        "eval": {"at_start": False},
        "run": {"out_dir": str(out), "progress": False, "seed": 0, "compile": compile_mode, "device": device}}))
    trainer.objective.begin_stage("finetune", num_steps=1000)
    return trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", default="none,blocks,model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    from engine.data.build import build_shards
    from engine.demo.synthetic import render_pairs

    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv = render_pairs(root / "raw", num_samples=args.batch_size * 4, seed=0, split_name="train")
        build_shards(csv, root / "shards", samples_per_shard=args.batch_size * 2)
        sides = {mode: build(root / "shards", root / mode, model=args.model, batch_size=args.batch_size,
                             compile_mode=mode, device=args.device, precision=args.precision) for mode in modes}
        batches = list(sides[modes[0]].loader.epoch(0))
        first: dict[str, float] = {}
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for mode, trainer in sides.items():  # each side's first step: the compile (and one step)
            started = time.perf_counter()
            trainer.train_step(batches[0], lr=1e-5, grad_clip=0.0)
            first[mode] = time.perf_counter() - started
        for i in range(args.warmup + args.rounds):
            order = modes if i % 2 == 0 else list(reversed(modes))
            for mode in order:
                started = time.perf_counter()
                sides[mode].train_step(batches[(i + 1) % len(batches)], lr=1e-5, grad_clip=0.0)
                if i >= args.warmup:
                    times[mode].append(time.perf_counter() - started)
        for trainer in sides.values():
            trainer.close()
    eager = min(times["none"]) if "none" in times else None
    print(f"{'run.compile':<12} {'fastest s':>10} {'median s':>9} {'vs eager':>9} {'compile s':>10}   "
          f"({args.model}, batch {args.batch_size}, {args.device}, {args.precision}, {args.rounds} rounds)")
    for mode in modes:
        fastest, median = min(times[mode]), statistics.median(times[mode])
        ratio = f"{fastest / eager:.3f}x" if eager else "-"
        compile_s = f"{first[mode] - fastest:.1f}" if mode != "none" else "-"
        print(f"{mode:<12} {fastest:>10.3f} {median:>9.3f} {ratio:>9} {compile_s:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
