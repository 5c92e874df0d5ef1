"""The end-of-run report: did fine-tuning help? Base, final and best on the selection metric, cost, paths.

Built from the run's `log.jsonl` through `engine.results.summary` (every evaluation of every launch, so a
resumed run reports its whole history), never from memory.
"""

from __future__ import annotations

from pathlib import Path

from engine.results.summary import default_metric, format_summary, run_summary

__all__ = ["default_metric", "run_report"]


def run_report(out_dir: Path, *, metric: str) -> str:
    """Lines for the user: the metric at the base model, at the end and at its best (the base included),
    what changed, what OSR and fine-tuning cost, where the files are; `warning:` lines when evaluations
    fell below the base or the final model is worse than it. `metric` is `task/metric`, or empty for the
    first zero-shot acc1 (as best-checkpoint selection does)."""
    return format_summary(run_summary(Path(out_dir), metric=metric))
