"""What the `wma_teacher` term adds to each rank's memory under ZeRO-3: one sharded copy, not a whole model.

Target: on 2 ZeRO-3 ranks, the teacher's fp32 values on each rank are at most 0.6x of one whole fp32 copy of
the trained parameters (its partitions, plus the small parameters DeepSpeed keeps whole), and each rank's peak
RSS grows by less than one whole fp32 copy when the teacher is on. Exits non-zero when missed.

What runs: the same job twice, one after the other, as 2 ranks (tests.helpers.harness: gloo, one thread each):
`--model` (ViT-B-16 by default, random init) under `zero_configs/zero3_bf16.json` as shipped, FastCLIP's loss,
a global batch of 4 synthetic pairs at the model's resolution, 2 fine-tuning steps, no evaluation; once plain and
once with `loss.terms.wma_teacher=1.0`. Per rank: peak RSS (`ru_maxrss`) at the end of fine-tuning, before the
final export gathers the model, and the teacher's bytes as its `teacher_started` record counts them.

    python benchmarks/teacher_memory.py                    # ViT-B-16, ~5 min on 2 cores
    python benchmarks/teacher_memory.py --model tiny-vit   # plumbing check, ~1 min
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import FIXED_MMAP_THRESHOLD_ENV

TARGET_SHARE = 0.6
MB = 1024 * 1024  # ru_maxrss is in KiB


def rank_run(model: str, shards: str, out: str, teacher: bool) -> dict:
    """One rank of the job: peak RSS after fine-tuning, and (rank 0) the teacher's logged bytes."""
    from engine.config import load_config
    from engine.run.log import read_jsonl
    from engine.trainer import Trainer

    terms = {"contrastive": 1.0, **({"wma_teacher": 1.0} if teacher else {})}
    trainer = Trainer(load_config(base={
        "method": "fastclip", "model": {"name": model, "precision": "bf16"}, "loss": {"terms": terms},
        "data": {"train": shards, "batch_size": 2, "shuffle_buffer": 4},
        "eval": {"at_start": False},
        "run": {"out_dir": out, "progress": False, "seed": 0, "backend": "deepspeed", "zero_config": "zero3_bf16",
                "epochs": 1, "max_steps_per_epoch": 2, "log_every": 1}}))
    trainer.run_stage("finetune", epochs=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = [r for r in read_jsonl(Path(out) / "log.jsonl") if r.get("event") == "teacher_started"]
    trainer.close()
    return {"peak_bytes": peak, "teacher": started[-1] if started else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    args = parser.parse_args()
    from engine.data.build import build_shards
    from engine.demo.synthetic import render_pairs
    from tests.helpers.harness import run_ranks

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv = render_pairs(root / "raw", num_samples=8, seed=0, split_name="train")
        build_shards(csv, root / "shards", samples_per_shard=4)
        for side in ("plain", "teacher"):
            results[side] = run_ranks("benchmarks.teacher_memory:rank_run", world_size=2, timeout=1800,
                                      env=FIXED_MMAP_THRESHOLD_ENV, model=args.model, shards=str(root / "shards"),
                                      out=str(root / side), teacher=side == "teacher")
    started = results["teacher"][0]["teacher"]
    whole, held = started["bytes_whole_fp32"], started["bytes_this_rank"]
    print(f"{args.model}, 2 ZeRO-3 bf16 ranks, 2 fine-tuning steps of 4 pairs")
    print(f"{'rank':>4} {'peak RSS plain MB':>18} {'with teacher MB':>16} {'growth MB':>10}")
    growths = []
    for rank in range(2):
        plain, with_teacher = (results[side][rank]["peak_bytes"] / MB for side in ("plain", "teacher"))
        growths.append(with_teacher - plain)
        print(f"{rank:>4} {plain:>18.0f} {with_teacher:>16.0f} {growths[-1]:>+10.0f}")
    share = held / whole
    ok = share <= TARGET_SHARE and max(growths) < whole / MB
    print(f"teacher on rank 0: {held / MB:.0f} MB = {share:.2f} of one whole fp32 copy ({whole / MB:.0f} MB; target <= "
          f"{TARGET_SHARE}); largest peak growth {max(growths):+.0f} MB (target < {whole / MB:.0f}): "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
