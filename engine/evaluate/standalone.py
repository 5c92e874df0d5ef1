"""Standalone evaluation (`run.py eval`): one model on the config's eval tasks, without training data or a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import JobConfig

EVAL_FILES = ("eval_results.json", "eval_results.jsonl", "eval_aggregates.json")


def read_task_file(path: str) -> dict:
    """The eval-section mapping a --tasks YAML file holds ({zeroshot: [...], retrieval: [...]})."""
    from engine.config import read_yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--tasks {path}: file not found")
    loaded = read_yaml(file, what="--tasks") or {}
    if not isinstance(loaded, dict) or not set(loaded) <= {"zeroshot", "retrieval"}:
        raise ValueError(f"--tasks {path}: must be a mapping with 'zeroshot' and/or 'retrieval' lists of tasks")
    return loaded


@dataclass
class StandaloneResults:
    """What one standalone evaluation measured (rank 0), ready to print and write."""

    results: dict
    aggregates: dict
    main_metrics: dict
    model_name: str
    weights: Path | None

    def table(self) -> str:
        from engine.evaluate.evaluator import results_table

        return results_table(self.results, self.aggregates)

    def write(self, out: Path) -> list[Path]:
        """eval_results.json (clip_benchmark-style), eval_results.jsonl (DataComp-style) and
        eval_aggregates.json in `out`; returns their paths."""
        from engine.evaluate.evaluator import write_eval_jsonl, write_results
        from engine.io import write_json_atomic

        results_json, results_jsonl, aggregates_json = (Path(out) / name for name in EVAL_FILES)
        return [write_results(results_json, self.results, model_name=self.model_name,
                              pretrained=str(self.weights or "")),
                write_eval_jsonl(results_jsonl, self.results, self.main_metrics),
                write_json_atomic(aggregates_json, self.aggregates)]


def evaluate_standalone(cfg: JobConfig, *, local_rank: int | None = None) -> StandaloneResults | None:
    """Evaluate `cfg.model` (its weights: a file, a run folder or a checkpoint folder) on `cfg.eval`'s tasks.

    Under torchrun / deepspeed every rank evaluates its part of each task; rank 0 gets the results, the
    other ranks None.
    """
    from engine.checkpoint import build_model_from, resolve_weights
    from engine.data.samples import read_limits
    from engine.distributed import context_from_env, default_device, destroy_process_group, init_process_group
    from engine.evaluate import Evaluator, aggregate_metrics, build_tasks

    tasks = build_tasks(cfg.eval, limits=read_limits(cfg.data))
    if not tasks:
        raise ValueError("no evaluation tasks: list them in --tasks FILE or under eval.zeroshot / eval.retrieval "
                         "in --config, or --set 'eval.retrieval=[{name: NAME, csv: FILE}]'")
    weights = resolve_weights(cfg.model.weights)
    ctx = context_from_env(local_rank)
    init_process_group(ctx, timeout_s=cfg.run.collective_timeout_s)
    try:
        device = default_device(ctx, cfg.run.device)
        bundle = build_model_from(cfg.model.name, cfg.model.build_kwargs(), weights, seed=cfg.run.seed)
        evaluator = Evaluator(tasks, batch_size=cfg.eval.batch_size, device=device, num_workers=cfg.eval.num_workers)
        results = evaluator(bundle.model.to(device), bundle.tokenizer, bundle.eval_transform)
    finally:
        destroy_process_group()
    if not ctx.is_main:
        return None
    return StandaloneResults(results=results, aggregates=aggregate_metrics(results, evaluator.main_metrics,
                                                                           evaluator.kinds),
                             main_metrics=evaluator.main_metrics, model_name=bundle.model_name, weights=weights)
