"""EvalPolicy: what a run does with each evaluation - keep the best weights, warn below the base, stop early.

The base model (the evaluation at the start) is a candidate for the best like any other, so
best.safetensors is never worse than the base on the selection metric; equal scores keep the earlier
one. A fine-tuned evaluation more than run.below_base_tolerance under the base is warned about, and
run.stop_below_base such evaluations in a row stop fine-tuning.

A Stateful part of every checkpoint: the best score and its step, the base score and the number of
consecutive evaluations below it are saved and restored, so a resumed run decides as a straight run
does. The stop itself is not state: a resumed run (which may raise run.stop_below_base or run.epochs)
decides again at its next evaluation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from engine.evaluate.evaluator import Results, headline_metric

logger = logging.getLogger(__name__)


def default_metric(results: Results) -> str:
    """The first zero-shot acc1 of `results` (else its first metric), as `task/metric`."""
    for task, metrics in results.items():
        if "acc1" in metrics:
            return f"{task}/acc1"
    task, metrics = next(iter(results.items()))
    return f"{task}/{next(iter(metrics))}"


def is_below_base(score: float, base: float | None, *, tolerance: float) -> bool:
    """Whether `score` is more than `tolerance` under the base model's score (never when there is no base)."""
    return base is not None and score < base - tolerance


@dataclass
class Verdict:
    """The policy's decisions on one evaluation."""

    key: str  # the selection metric, `task/metric`
    score: float
    is_best: bool  # better than every earlier evaluation: write best.safetensors now
    events: list[dict] = field(default_factory=list)  # run-log records: below_base, early_stop
    stop: str | None = None  # why fine-tuning stops now, else None


class EvalPolicy:
    """Best checkpoint, below-base warnings and early stop over a run's evaluations; `observe` each one.

    `best_metric`: `task/metric` (empty: the first zero-shot acc1 of the results). `below_base_tolerance`:
    metric units. `stop_below_base`: consecutive evaluations below the base that stop fine-tuning (0: never).
    """

    def __init__(self, *, best_metric: str = "", below_base_tolerance: float = 0.0, stop_below_base: int = 0):
        self.best_metric = best_metric
        self.below_base_tolerance = below_base_tolerance
        self.stop_below_base = stop_below_base
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.base_score: float | None = None  # the selection metric of the base model
        self.num_below_base = 0  # consecutive fine-tuned evaluations below the base
        self.stopped_early: str | None = None  # why fine-tuning stopped in this launch

    def observe(self, results: Results, *, stage: str, step: int, ft_step: int) -> Verdict:
        """Judge the evaluation `results` of `stage` ("start": the base model) at global step `step` and
        fine-tuning step `ft_step`; logs it and returns what to do."""
        key = self.best_metric or default_metric(results)
        score = headline_metric(results, key)
        verdict = Verdict(key=key, score=score,
                          is_best=score > (self.best_score if self.best_score is not None else -math.inf))
        if verdict.is_best:
            self.best_score, self.best_step = score, step
        logger.info("eval at step %d (%s): %s = %.4f", step, stage, key, score)
        if stage == "start":
            self.base_score = score
        else:
            self._check_below_base(verdict, step=step, ft_step=ft_step)
        return verdict

    def _check_below_base(self, verdict: Verdict, *, step: int, ft_step: int) -> None:
        """Warn when the score is more than below_base_tolerance under the base; stop after stop_below_base
        such evaluations in a row."""
        key, score, base = verdict.key, verdict.score, self.base_score
        if not is_below_base(score, base, tolerance=self.below_base_tolerance):
            self.num_below_base = 0
            return
        self.num_below_base += 1
        logger.warning("%s = %.4f at fine-tuning step %d is %.4f below the base model (%.4f)%s", key, score,
                       ft_step, base - score, base,
                       f"; {self.num_below_base} evaluation(s) in a row" if self.stop_below_base else "")
        verdict.events.append({"event": "below_base", "step": step, "ft_step": ft_step, "metric": key,
                               "value": score, "base": base, "consecutive": self.num_below_base})
        if self.stop_below_base and self.num_below_base >= self.stop_below_base:
            self.stopped_early = verdict.stop = (
                f"{self.num_below_base} consecutive evaluations below the base on {key} "
                f"(run.stop_below_base={self.stop_below_base})")
            logger.warning("stopping fine-tuning early: %s", verdict.stop)
            verdict.events.append({"event": "early_stop", "step": step, "ft_step": ft_step, "reason": verdict.stop})

    def state_dict(self) -> dict:
        """The best so far (score and global step), the base score and the consecutive count below it."""
        return {"best_score": self.best_score, "best_step": self.best_step, "base_score": self.base_score,
                "num_below_base": self.num_below_base}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`; ValueError naming the field when a value has the wrong type."""
        number, count = (int, float, type(None)), (int, type(None))
        expected = {"best_score": number, "best_step": count, "base_score": number, "num_below_base": (int,)}
        problems = [f"{name} is {state[name]!r}" for name, types in expected.items()
                    if name in state and (not isinstance(state[name], types) or isinstance(state[name], bool))]
        if problems:
            raise ValueError(f"checkpoint state.json, eval_policy: {'; '.join(problems)}, not a number or null: not "
                             "a checkpoint this engine wrote; resume from another step_* folder")
        self.best_score, self.best_step = state.get("best_score"), state.get("best_step")
        self.base_score, self.num_below_base = state.get("base_score"), state.get("num_below_base", 0)
