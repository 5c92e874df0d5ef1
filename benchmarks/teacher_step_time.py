"""Step time with the `wma_teacher` term against the same step without it (single-process backend).

Target (issue 24): the teacher costs <= 1.25x TuneCLIP's step time at the demo's scale. Each side is a Trainer
of the same job (the demo's: TuneCLIP, batch 64, the tiny model `tiny-vit` at 32 px, fp32, unless --method,
--batch-size, --model), one with `loss.terms.wma_teacher=0.5`; both run `Trainer.train_step` in fine-tuning on
the same batches (forward, terms, backward, AdamW step; the teacher side also points the model at the teacher's
weights for one forward without gradient and folds the student into the teacher after the step). Rounds
interleave the two after warm-up; the checked ratio is the fastest teacher step over the fastest plain step (other
processes only add time), medians printed alongside. Exits non-zero when the ratio exceeds 1.25.

    python benchmarks/teacher_step_time.py                       # ~20 s on 2 idle cores
    python benchmarks/teacher_step_time.py --method fastclip --batch-size 32
    python benchmarks/teacher_step_time.py --model ViT-B-32 --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.25
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(shards: Path, out: Path, *, method: str, model: str, batch_size: int, teacher: bool):
    from engine.config import load_config
    from engine.trainer import Trainer

    terms = {"contrastive": 1.0, **({"wma_teacher": 0.5} if teacher else {})}
    trainer = Trainer(load_config(base={
        "method": method, "model": {"name": model}, "loss": {"terms": terms},
        "data": {"train": str(shards), "batch_size": batch_size, "shuffle_buffer": batch_size},
        "eval": {"at_start": False}, "run": {"out_dir": str(out), "progress": False, "seed": 0}}))
    trainer.objective.begin_stage("finetune", num_steps=1000)
    return trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="tuneclip")
    parser.add_argument("--model", default="tiny-vit")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    from engine.data.build import build_shards
    from engine.demo.synthetic import render_pairs

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv = render_pairs(root / "raw", num_samples=args.batch_size * 4, seed=0, split_name="train")
        build_shards(csv, root / "shards", samples_per_shard=args.batch_size * 2)
        sides = {name: build(root / "shards", root / name, method=args.method, model=args.model,
                             batch_size=args.batch_size, teacher=name == "teacher") for name in ("plain", "teacher")}
        batches = list(sides["plain"].loader.epoch(0))
        times: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.warmup + args.rounds):
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for name in order:
                started = time.perf_counter()
                sides[name].train_step(batches[i % len(batches)], lr=1e-5, grad_clip=0.0)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - started)
        for trainer in sides.values():
            trainer.close()
    print(f"{'side':<8} {'fastest ms':>11} {'median ms':>10}   ({args.method}, {args.model}, batch {args.batch_size}, "
          f"{args.rounds} rounds)")
    for name, values in times.items():
        print(f"{name:<8} {1e3 * min(values):>11.2f} {1e3 * statistics.median(values):>10.2f}")
    ratio = min(times["teacher"]) / min(times["plain"])
    median_ratio = statistics.median(times["teacher"]) / statistics.median(times["plain"])
    print(f"teacher / plain step time (fastest): {ratio:.3f}x (median {median_ratio:.3f}x); target <= {TARGET}x")
    return 0 if ratio <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
