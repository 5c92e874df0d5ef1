"""The Evaluator (a model, its tokenizer and transform, over tasks) and its results files.

Images are decoded by DataLoader workers batch by batch and dropped once encoded: memory is
O(batch), plus what each task keeps (zero-shot: 6 integers per image; retrieval: the embeddings).
Each rank evaluates a disjoint part of every task; the kept tensors are gathered and put back in
sample order, so every rank computes the same metrics as one process would. Ranks take one small
collective per batch, so none waits in a collective for longer than the slowest rank takes for one
batch (far below the process-group timeout, `run.collective_timeout_s`).

Results are `{task name: {metric: value}}`; `write_results` stores them as clip_benchmark-style
records, `write_eval_jsonl` as DataComp-style lines, `aggregate_metrics` averages the groups papers
report, `headline_metric` picks the one that ranks checkpoints, `results_table` prints them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from engine.distributed import all_reduce_sum, gather_objects
from engine.evaluate.sources import EvalStream, SampleError, collate
from engine.evaluate.tasks import ZEROSHOT_CLASSIFICATION, ZEROSHOT_RETRIEVAL, EvalTask, Kept, Tokenizer
from engine.io import write_atomic, write_json_atomic

logger = logging.getLogger(__name__)

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


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (bf16 under DeepSpeed bf16), float32 if none."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc; a no-op elsewhere).

    Each batch's activations (megabytes) are freed between the small tensors kept per batch, which
    pins the heap: without this, resident memory grows by ~7 MB per 256-image batch of a 224-px
    model, i.e. with the dataset (measured: benchmarks/eval_memory.py).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _in_lockstep(batches, *, world_size: int, device: str | torch.device) -> Iterator:
    """`batches`, with one all-reduce after each so ranks advance together until every rank is done.

    A rank that has finished keeps joining these small collectives while another still works, so no
    rank waits in one collective for longer than one batch of the slowest rank.
    """
    iterator, done = iter(batches), False
    while True:
        batch = None if done else next(iterator, None)
        done = batch is None
        if batch is not None:
            yield batch
        if world_size == 1:
            if done:
                return
            continue
        if all_reduce_sum(torch.tensor([0.0 if done else 1.0], device=device)).item() == 0:
            return


def _concat(batches: list[tuple[torch.Tensor, Kept]]) -> tuple[torch.Tensor, Kept]:
    if not batches:
        return torch.empty(0, 2, dtype=torch.long), {}
    keys = torch.cat([k for k, _ in batches])
    kept = {name: torch.cat([b[name] for _, b in batches]) for name in batches[0][1]}
    return keys, kept


def key_order(keys: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts [N, 2] (shard, position) keys; raises if a key occurs twice."""
    flat = keys[:, 0] * (int(keys[:, 1].max()) + 1) + keys[:, 1]
    order = torch.argsort(flat, stable=True)
    if len(flat) > 1 and bool((flat[order][1:] == flat[order][:-1]).any()):
        raise AssertionError("a sample was evaluated twice (the split over ranks and workers overlaps)")
    return order


class Evaluator:
    """Evaluate a model on several tasks, streaming their images (see the module docstring)."""

    def __init__(
        self, tasks: Sequence[EvalTask], *, batch_size: int = 64, device: str | torch.device = "cpu",
        num_workers: int = 0,
    ) -> None:
        tasks = list(tasks)
        errors = []
        if not tasks:
            errors.append("tasks is empty; give at least one ZeroShotTask or RetrievalTask")
        errors += [
            f"task {i} is a {type(t).__name__}, not an EvalTask (needs name, kind, main_metric, samples(), "
            "prepare(), keep() and metrics())"
            for i, t in enumerate(tasks)
            if not isinstance(t, EvalTask)
        ]
        names = [getattr(t, "name", None) for t in tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            errors.append(f"task names {duplicates} are used more than once; names must be unique")
        if batch_size <= 0:
            errors.append(f"batch_size must be greater than 0, got {batch_size}")
        if num_workers < 0:
            errors.append(f"num_workers must be >= 0, got {num_workers}")
        if errors:
            raise ValueError("Evaluator: " + "; ".join(errors))
        self.tasks = tasks
        self.batch_size = batch_size
        self.device = device
        self.num_workers = num_workers
        self.seconds: dict[str, float] = {}  # evaluation time per task, of the last call

    @property
    def main_metrics(self) -> dict[str, str]:
        """Task name -> the metric that stands for it (in eval_results.jsonl and the aggregates)."""
        return {t.name: t.main_metric for t in self.tasks}

    @property
    def kinds(self) -> dict[str, str]:
        """Task name -> clip_benchmark task type."""
        return {t.name: t.kind for t in self.tasks}

    def __call__(self, model: torch.nn.Module, tokenizer: Tokenizer, transform: Transform) -> Results:
        """Metrics of every task, keyed by task name; `model` (already on `device`) keeps its train/eval mode.

        Collective when a process group is up: every rank calls it and gets the same results.
        """
        results = {}
        with _inference_mode(model):
            for task in self.tasks:
                start = time.perf_counter()
                results[task.name] = self._evaluate(task, model, tokenizer, transform)
                self.seconds[task.name] = time.perf_counter() - start
                logger.info(
                    "eval %s (%.1fs): %s",
                    task.name,
                    self.seconds[task.name],
                    " ".join(f"{k}={v:.4f}" for k, v in results[task.name].items()),
                )
        return results

    def _evaluate(self, task: EvalTask, model: torch.nn.Module, tokenizer: Tokenizer,
                  transform: Transform) -> dict[str, float]:
        rank, world_size = _rank_and_world()
        dtype = _input_dtype(model)
        prepared = task.prepare(model, tokenizer, batch_size=self.batch_size, device=self.device)
        loader = DataLoader(EvalStream(task.samples, transform, rank=rank, world_size=world_size),
                            batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate)
        batches = []
        for batch in _in_lockstep(loader, world_size=world_size, device=self.device):
            if isinstance(batch, SampleError):
                raise batch.error(task.name)
            keys, images, targets = batch
            images = images.to(self.device, dtype=dtype if images.is_floating_point() else None)
            features = F.normalize(model.encode_image(images).float(), dim=-1)
            batches.append((keys, task.keep(prepared, model, tokenizer, features, targets,
                                            batch_size=self.batch_size, device=self.device)))
            del images, features
            release_free_heap()
        parts = [part for part in gather_objects(_concat(batches)) if len(part[0])]
        if not parts:
            raise ValueError(f"task {task.name!r} has no samples; check its files")
        keys, kept = _concat(parts)
        return task.metrics(prepared, kept, key_order(keys))


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


# Task names (clip_benchmark's, "wds/" prefix allowed) that make up the aggregates papers report.
IMAGENET_NAMES = ("imagenet1k", "imagenet-1k", "imagenet")
IMAGENET_SHIFT_NAMES = ("imagenetv2", "imagenet_sketch", "imagenet-a", "imagenet-o", "imagenet-r", "objectnet")


def _main_value(results: Results, task_name: str, main_metrics: dict[str, str]) -> float:
    metric = main_metrics.get(task_name, "")
    if metric not in results[task_name]:
        raise ValueError(f"task {task_name!r}: main_metric {metric!r} is not one of its metrics "
                         f"{sorted(results[task_name])}; fix the task's main_metric")
    return float(results[task_name][metric])


def eval_jsonl_records(results: Results, main_metrics: dict[str, str],
                       datasets: dict[str, str] | None = None) -> list[dict]:
    """One DataComp-style record per task: key (the task name), dataset, metrics (with main_metric),
    main_metric (its value)."""
    records = []
    for task_name, metrics in results.items():
        main = _main_value(results, task_name, main_metrics)
        records.append({"key": task_name, "dataset": (datasets or {}).get(task_name, task_name),
                        "metrics": {**{k: float(v) for k, v in metrics.items()}, "main_metric": main},
                        "main_metric": main})
    return records


def write_eval_jsonl(path: str | Path, results: Results, main_metrics: dict[str, str],
                     datasets: dict[str, str] | None = None) -> Path:
    """Write `eval_jsonl_records` as JSON lines (DataComp's eval_results.jsonl), atomically; returns `path`."""
    lines = [json.dumps(record) for record in eval_jsonl_records(results, main_metrics, datasets)]
    return write_atomic(path, "".join(line + "\n" for line in lines))


def aggregate_metrics(results: Results, main_metrics: dict[str, str], kinds: dict[str, str]) -> dict[str, float]:
    """Means of the tasks' main metrics, for the groups present: `imagenet` (ImageNet-1k), `imagenet_shifts`
    (the mean over the ImageNet distribution-shift sets present: V2, Sketch, A, O, R, ObjectNet),
    `retrieval` (every retrieval task, e.g. Flickr30k, COCO), `average` (every task)."""
    def base(name: str) -> str:
        return name.lower().removeprefix("wds/")

    groups = {
        "imagenet": [t for t in results if base(t) in IMAGENET_NAMES],
        "imagenet_shifts": [t for t in results if base(t) in IMAGENET_SHIFT_NAMES],
        "retrieval": [t for t in results if kinds.get(t) == ZEROSHOT_RETRIEVAL],
        "average": list(results),
    }
    return {group: sum(_main_value(results, t, main_metrics) for t in tasks) / len(tasks)
            for group, tasks in groups.items() if tasks}


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


def results_table(results: Results, aggregates: dict[str, float] | None = None) -> str:
    """One `task  metric  value` line per metric under a header; values with 4 decimals; then one
    `aggregate  <group>  value` line per aggregate, if given."""
    rows = [("task", "metric", "value")]
    rows += [(task, metric, f"{value:.4f}") for task, metrics in results.items() for metric, value in metrics.items()]
    rows += [("aggregate", group, f"{value:.4f}") for group, value in (aggregates or {}).items()]
    task_width = max(len(row[0]) for row in rows)
    metric_width = max(len(row[1]) for row in rows)
    return "\n".join(f"{t:<{task_width}}  {m:<{metric_width}}  {v:>6}" for t, m, v in rows)
