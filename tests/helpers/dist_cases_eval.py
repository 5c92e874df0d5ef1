"""Evaluation on every rank (run by tests.helpers.harness.run_ranks): the same tasks, each rank its part."""

from __future__ import annotations

import time

import engine.evaluate.evaluator as evaluator_module
from engine.config import EvalConfig
from engine.distributed import context_from_env, init_process_group
from engine.evaluate import Evaluator, build_tasks
from models import build_model


def evaluate_ranks(specs: dict, *, batch_size: int, num_workers: int, timeout_s: float = 600,
                   slow_rank: int = -1, delay_s: float = 0.0) -> dict:
    """Results of the tiny model on `specs`; rank `slow_rank` sleeps `delay_s` before each image batch.

    Also returns this rank's evaluation time and the longest time it spent in one evaluator collective.
    """
    ctx = context_from_env()
    init_process_group(ctx, timeout_s=timeout_s)
    bundle = build_model("tiny-vit", seed=0)
    waits = [0.0]
    for name in ("all_reduce_sum", "gather_objects"):
        collective = getattr(evaluator_module, name)

        def timed(*args, _collective=collective):
            start = time.perf_counter()
            try:
                return _collective(*args)
            finally:
                waits.append(time.perf_counter() - start)

        setattr(evaluator_module, name, timed)
    model = bundle.model
    if ctx.rank == slow_rank:
        encode_image = model.encode_image

        def slow_encode_image(images, **kwargs):
            time.sleep(delay_s)
            return encode_image(images, **kwargs)

        model.encode_image = slow_encode_image
    evaluator = Evaluator(build_tasks(EvalConfig(**specs)), batch_size=batch_size, num_workers=num_workers)
    start = time.perf_counter()
    results = evaluator(model, bundle.tokenizer, bundle.eval_transform)
    return {"results": results, "seconds": time.perf_counter() - start, "longest_wait": max(waits)}
