"""Evaluation of an open_clip model: tasks (`tasks.py`), the Evaluator and its results files (`evaluator.py`).

`build_tasks(cfg.eval)` is how the trainer and `run.py eval` turn the config's eval section into
tasks; a new kind of task is one class in `tasks.py` plus one entry in `TASK_BUILDERS`.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.config import EvalConfig
from engine.data.samples import DEFAULT_LIMITS, ReadLimits
from engine.evaluate.evaluator import (
    Evaluator,
    aggregate_metrics,
    eval_jsonl_records,
    headline_metric,
    results_table,
    write_eval_jsonl,
    write_results,
)
from engine.evaluate.tasks import (
    EvalTask,
    RetrievalTask,
    ShardRetrievalTask,
    ShardZeroShotTask,
    ZeroShotTask,
    from_clip_benchmark,
    zeroshot_from_shards,
)

SOURCES = ("csv", "wds", "clip_benchmark")  # exactly one per task: a CSV, webdataset tars, a clip_benchmark folder


def _source(spec: dict) -> str:
    given = [key for key in SOURCES if key in spec]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(SOURCES)} (got {given or 'none'})")
    return given[0]


def _zeroshot(spec: dict, limits: ReadLimits) -> EvalTask:
    source = _source(spec)
    if source == "clip_benchmark":
        task = from_clip_benchmark(spec["clip_benchmark"], name=spec["name"], split=spec.get("split", "test"),
                                   kind="zeroshot", classnames=spec.get("classnames"),
                                   templates=spec.get("templates"), limits=limits)
    elif "classnames" not in spec:
        raise ValueError("needs 'classnames' (a file with one class per line, or imagenet1k)")
    elif source == "csv":
        task = ZeroShotTask.from_csv(spec["csv"], spec["classnames"], spec.get("templates"), name=spec["name"],
                                     limits=limits)
    else:
        task = zeroshot_from_shards(spec["wds"], spec["classnames"], spec.get("templates"), name=spec["name"],
                                    limits=limits)
    task.main_metric = spec.get("main_metric", task.main_metric)
    return task


def _retrieval(spec: dict, limits: ReadLimits) -> EvalTask:
    source = _source(spec)
    if source == "clip_benchmark":
        task = from_clip_benchmark(spec["clip_benchmark"], name=spec["name"], split=spec.get("split", "test"),
                                   kind="retrieval", limits=limits)
    elif source == "csv":
        task = RetrievalTask.from_csv(spec["csv"], name=spec["name"], limits=limits)
    else:
        from engine.evaluate.sources import shard_list

        task = ShardRetrievalTask(spec["name"], shard_list(spec["wds"]), limits=limits)
    task.main_metric = spec.get("main_metric", task.main_metric)
    return task


# EvalConfig field -> (keys a task spec may have, builder of one task from its spec)
TASK_BUILDERS: dict[str, tuple[tuple[str, ...], Callable[[dict, ReadLimits], EvalTask]]] = {
    "zeroshot": (("name", *SOURCES, "split", "classnames", "templates", "main_metric"), _zeroshot),
    "retrieval": (("name", *SOURCES, "split", "main_metric"), _retrieval),
}


def build_tasks(eval_cfg: EvalConfig, *, limits: ReadLimits = DEFAULT_LIMITS) -> list[EvalTask]:
    """The tasks of a validated eval section, zero-shot first, in config order; [] when it has none.

    `limits` (the data section's, `read_limits(cfg.data)`) caps every image and tar member the tasks read.

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
                tasks.append(build(spec, limits))
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
    "ShardRetrievalTask",
    "ShardZeroShotTask",
    "ZeroShotTask",
    "aggregate_metrics",
    "build_tasks",
    "eval_jsonl_records",
    "headline_metric",
    "results_table",
    "write_eval_jsonl",
    "write_results",
]
