"""Evaluation of an open_clip model: tasks (`tasks.py`), the Evaluator and its results files (`evaluator.py`).

`build_tasks(cfg.eval)` is how the trainer and `run.py eval` turn the config's eval section into
tasks; a new kind of task is one class in `tasks.py` plus one entry in `TASK_BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.config import EvalConfig
from engine.evaluate.evaluator import Evaluator, headline_metric, results_table, write_results
from engine.evaluate.tasks import EvalTask, RetrievalTask, ZeroShotTask


def _zeroshot(spec: dict) -> ZeroShotTask:
    return ZeroShotTask.from_csv(spec["csv"], spec["classnames"], spec.get("templates"), name=spec["name"])


def _retrieval(spec: dict) -> RetrievalTask:
    return RetrievalTask.from_csv(spec["csv"], name=spec["name"])


# EvalConfig field -> (keys a task spec may have, builder of one task from its spec)
TASK_BUILDERS: dict[str, tuple[tuple[str, ...], Callable[[dict], EvalTask]]] = {
    "zeroshot": (("name", "csv", "classnames", "templates"), _zeroshot),
    "retrieval": (("name", "csv"), _retrieval),
}


def build_tasks(eval_cfg: EvalConfig) -> list[EvalTask]:
    """The tasks of a validated eval section, zero-shot first, in config order; [] when it has none.

    File paths are relative to the working directory. Raises one ValueError naming every spec
    (`eval.zeroshot[0] 'imagenet'`) whose files are missing or malformed or that has unknown keys.
    """
    tasks, errors = [], []
    for section, (keys, build) in TASK_BUILDERS.items():
        for i, spec in enumerate(getattr(eval_cfg, section)):
            where = f"eval.{section}[{i}] {spec.get('name')!r}"
            unknown = sorted(set(spec) - set(keys))
            if unknown:
                errors.append(f"{where}: unknown key(s) {unknown}; a {section} task takes {', '.join(keys)}")
                continue
            try:
                tasks.append(build(spec))
            except (ValueError, FileNotFoundError) as exc:
                errors.append(f"{where}: {exc}")
    if errors:
        raise ValueError("; ".join(errors))
    return tasks


__all__ = [
    "TASK_BUILDERS",
    "EvalTask",
    "Evaluator",
    "RetrievalTask",
    "ZeroShotTask",
    "build_tasks",
    "headline_metric",
    "results_table",
    "write_results",
]
