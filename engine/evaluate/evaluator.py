"""The Evaluator (a model, its tokenizer and transform, over tasks) and its results files.

Results are `{task name: {metric: value}}`; `write_results` stores them as clip_benchmark-style
records, `headline_metric` picks the one that ranks checkpoints, `results_table` prints them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from engine.evaluate.tasks import EvalTask, Tokenizer
from engine.io import write_json_atomic

logger = logging.getLogger(__name__)

ZEROSHOT_CLASSIFICATION = "zeroshot_classification"
ZEROSHOT_RETRIEVAL = "zeroshot_retrieval"

Transform = Callable[[Image.Image], torch.Tensor]
Results = dict[str, dict[str, float]]


@contextlib.contextmanager
def _inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; every submodule's own train/eval flag restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _encode_images(
    model: torch.nn.Module, images: torch.Tensor, *, batch_size: int, device: str | torch.device
) -> torch.Tensor:
    """[N, D] L2-normalised float32 image features, computed `batch_size` images at a time."""
    features = [
        model.encode_image(images[i : i + batch_size].to(device)).float()
        for i in range(0, len(images), batch_size)
    ]
    return F.normalize(torch.cat(features), dim=-1)


class Evaluator:
    """Evaluate a model on several tasks, caching each task's transformed images across calls."""

    def __init__(
        self, tasks: Sequence[EvalTask], *, batch_size: int = 64, device: str | torch.device = "cpu"
    ) -> None:
        tasks = list(tasks)
        errors = []
        if not tasks:
            errors.append("tasks is empty; give at least one ZeroShotTask or RetrievalTask")
        errors += [
            f"task {i} is a {type(t).__name__}, not an EvalTask (needs name, images() and score())"
            for i, t in enumerate(tasks)
            if not isinstance(t, EvalTask)
        ]
        names = [getattr(t, "name", None) for t in tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            errors.append(f"task names {duplicates} are used more than once; names must be unique")
        if batch_size <= 0:
            errors.append(f"batch_size must be greater than 0, got {batch_size}")
        if errors:
            raise ValueError("Evaluator: " + "; ".join(errors))
        self.tasks = tasks
        self.batch_size = batch_size
        self.device = device
        # Keyed by task name; the transform is kept so that a different one invalidates the entry.
        self._images: dict[str, tuple[Transform, torch.Tensor]] = {}

    def __call__(self, model: torch.nn.Module, tokenizer: Tokenizer, transform: Transform) -> Results:
        """Metrics of every task, keyed by task name; `model` (already on `device`) keeps its train/eval mode."""
        results = {}
        with _inference_mode(model):
            for task in self.tasks:
                start = time.perf_counter()
                image_features = _encode_images(
                    model, self._cached_images(task, transform), batch_size=self.batch_size, device=self.device
                )
                results[task.name] = task.score(
                    model, tokenizer, image_features, batch_size=self.batch_size, device=self.device
                )
                logger.info(
                    "eval %s (%.1fs): %s",
                    task.name,
                    time.perf_counter() - start,
                    " ".join(f"{k}={v:.4f}" for k, v in results[task.name].items()),
                )
        return results

    def _cached_images(self, task: EvalTask, transform: Transform) -> torch.Tensor:
        """[N, ...] stack of `transform(image)` for the task's images, computed once per transform."""
        cached = self._images.get(task.name)
        if cached is None or cached[0] is not transform:
            cached = (transform, torch.stack([transform(image) for image in task.images()]))
            self._images[task.name] = cached
        return cached[1]


# ---------------------------------------------------------------------------- results


def _task_kind(task_name: str, metrics: dict[str, float]) -> str:
    if "acc1" in metrics:
        return ZEROSHOT_CLASSIFICATION
    if "image_retrieval_recall@1" in metrics:
        return ZEROSHOT_RETRIEVAL
    raise ValueError(
        f"results[{task_name!r}] has neither acc1 nor image_retrieval_recall@1; "
        f"cannot tell its task kind (metrics: {sorted(metrics)})"
    )


def write_results(path: str | Path, results: Results, *, model_name: str, pretrained: str) -> Path:
    """Write clip_benchmark-style records (one per task) as a JSON list, atomically; returns `path`."""
    records = [
        {
            "dataset": task_name,
            "model": model_name,
            "pretrained": pretrained,
            "task": _task_kind(task_name, metrics),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "language": "en",
        }
        for task_name, metrics in results.items()
    ]
    return write_json_atomic(path, records, sort_keys=False)


def headline_metric(results: Results, key: str) -> float:
    """The metric named `"<task>/<metric>"`, e.g. `"synthetic-zeroshot/acc1"`."""
    task_name, sep, metric = key.rpartition("/")
    if not sep or metric not in results.get(task_name, {}):
        available = [f"{t}/{m}" for t, metrics in results.items() for m in metrics]
        raise ValueError(
            f"headline metric {key!r} not found; use '<task>/<metric>', "
            f"one of: {', '.join(available) or 'none'}"
        )
    return float(results[task_name][metric])


def results_table(results: Results) -> str:
    """One `task  metric  value` line per metric under a header; values with 4 decimals."""
    rows = [("task", "metric", "value")]
    rows += [(task, metric, f"{value:.4f}") for task, metrics in results.items() for metric, value in metrics.items()]
    task_width = max(len(row[0]) for row in rows)
    metric_width = max(len(row[1]) for row in rows)
    return "\n".join(f"{t:<{task_width}}  {m:<{metric_width}}  {v:>6}" for t, m, v in rows)
