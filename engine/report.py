"""The end-of-run report: did fine-tuning help? Base, final and best on the selection metric, and paths.

Built from the run's `log.jsonl` (every evaluation of every launch, so a resumed run reports its
whole history), never from memory.
"""

from __future__ import annotations

from pathlib import Path

from engine.evaluate import headline_metric
from engine.runlog import read_jsonl


def run_report(out_dir: Path, *, metric: str) -> str:
    """Lines for the user: the metric at the base model, at the end and at its best, what changed, where
    the files are; a warning line when the final model is worse than the base. `metric` is
    `task/metric`, or empty for the first zero-shot acc1 (as best-checkpoint selection does)."""
    out_dir = Path(out_dir)
    evals = [r for r in read_jsonl(out_dir / "log.jsonl") if r.get("event") == "eval"]
    files = f"final weights: {out_dir / 'final.safetensors'}; log: {out_dir / 'log.jsonl'}"
    if not evals:
        return ("no evaluation ran (eval.zeroshot / eval.retrieval are empty): nothing shows whether fine-tuning "
                f"helped; {files}")
    key = metric or default_metric(evals[-1]["results"])
    base = next((r for r in evals if r["stage"] == "start"), None)
    final = evals[-1]
    later = [r for r in evals if r["stage"] != "start"]
    best = max(later, key=lambda r: headline_metric(r["results"], key)) if later else None

    def score(record: dict) -> float:
        return 100 * headline_metric(record["results"], key)

    def change(record: dict) -> str:
        return f"  ({score(record) - score(base):+.2f})" if base else ""

    lines = [f"result on {key} (x100):"]
    if base:
        lines.append(f"  base  (step {base['step']:>6}) {score(base):7.2f}")
    lines.append(f"  final (step {final['step']:>6}) {score(final):7.2f}{change(final)}")
    if best is not None:
        lines.append(f"  best  (step {best['step']:>6}) {score(best):7.2f}{change(best)}  -> {out_dir / 'best.safetensors'}")
    lines.append(f"  {files}; evaluations: {out_dir}/eval_step*.json")
    if base and score(final) < score(base):
        kept = (f"best.safetensors (step {best['step']}) is {'no better than' if score(best) <= score(base) else 'above'}"
                " the base" if best else "no better checkpoint was kept")
        lines.append(f"warning: the final model is worse than the base on {key} ({score(final) - score(base):+.2f}); "
                     f"{kept}")
    return "\n".join(lines)


def default_metric(results: dict) -> str:
    """The first zero-shot acc1 of `results` (else its first metric), as `task/metric`."""
    for task, metrics in results.items():
        if "acc1" in metrics:
            return f"{task}/acc1"
    task, metrics = next(iter(results.items()))
    return f"{task}/{next(iter(metrics))}"
