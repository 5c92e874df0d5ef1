"""The `eval` section: local evaluation tasks, their cadence and the metric that picks the best checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.config.choices import EVAL_METRICS
from engine.config.fields import setting


@dataclass
class EvalConfig:
    """Local evaluation tasks, when to run them, and which metric picks the best checkpoint."""

    zeroshot: list[dict] = setting([], "zero-shot classification tasks: {name, csv | wds | clip_benchmark, "
                                   "classnames?, templates?, split?, main_metric?} (see README)")
    retrieval: list[dict] = setting([], "retrieval tasks: {name, csv | wds | clip_benchmark, split?, main_metric?}")
    every_steps: int = setting(0, "evaluate every this many fine-tuning steps; 0 = at epoch ends only",
                               resume="may_change")
    at_start: bool = setting(True, "evaluate the starting weights (the base every result is compared with)",
                             resume="may_change")
    best_metric: str = setting("", "task/metric that picks best.safetensors, e.g. imagenet/acc1; empty = the first "
                               "zero-shot acc1")
    batch_size: int = setting(128, "evaluation batch per rank", resume="may_change")
    num_workers: int = setting(2, "DataLoader processes decoding evaluation images (0 = in the main process)",
                               resume="may_change")

    def errors(self) -> list[str]:
        out = []
        for section in ("zeroshot", "retrieval"):
            for i, task in enumerate(getattr(self, section)):
                if not isinstance(task, dict) or "name" not in task:
                    out.append(f"eval.{section}[{i}] needs 'name'")
                elif not any(key in task for key in ("csv", "wds", "clip_benchmark")):
                    out.append(f"eval.{section}[{i}] needs one of 'csv', 'wds', 'clip_benchmark'")
                else:
                    out.extend(_task_path_errors(f"eval.{section}[{i}] {task['name']!r}", task))
        out.extend(self._metric_errors())
        if self.every_steps < 0:
            out.append(f"eval.every_steps must be >= 0, got {self.every_steps}")
        if self.num_workers < 0:
            out.append(f"eval.num_workers must be >= 0, got {self.num_workers}")
        return out

    def _metric_errors(self) -> list[str]:
        """Metric names (each task's main_metric, best_metric) that no configured task reports."""
        out, metrics = [], {}
        for section in ("zeroshot", "retrieval"):
            for i, task in enumerate(getattr(self, section)):
                if not isinstance(task, dict) or "name" not in task:
                    continue
                metrics[str(task["name"])] = EVAL_METRICS[section]
                main = task.get("main_metric")
                if main is not None and main not in EVAL_METRICS[section]:
                    out.append(f"eval.{section}[{i}].main_metric {main!r} is not a {section} metric; use one of "
                               f"{', '.join(EVAL_METRICS[section])}")
        task_name, _, metric = self.best_metric.rpartition("/")
        if self.best_metric and metrics and metric not in metrics.get(task_name, ()):
            known = [f"{name}/{m}" for name, names in metrics.items() for m in names]
            out.append(f"eval.best_metric {self.best_metric!r} is not a metric of the eval tasks; use "
                       f"'<task>/<metric>', one of: {', '.join(known)}")
        return out


# Task keys naming files or folders; a value without a folder or suffix may be a built-in list (imagenet1k, openai).
_TASK_PATH_KEYS = ("csv", "clip_benchmark", "classnames", "templates", "wds")


def _task_path_errors(where: str, task: dict) -> list[str]:
    """The paths of one eval task that do not exist (patterns and `::` lists of `wds` are left to the task)."""
    out = []
    for key in _TASK_PATH_KEYS:
        value = task.get(key)
        if not isinstance(value, str) or any(mark in value for mark in ("{", "*", "?", "[", "::")):
            continue
        path = Path(value)
        if key in ("classnames", "templates") and path.parent == Path(".") and not path.suffix:
            continue  # a built-in name; the task checks it
        if not path.exists():
            out.append(f"{where}: {key} {value} does not exist (paths are relative to {Path.cwd()}); fix the path")
    return out
