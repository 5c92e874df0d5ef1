"""Run one job per shard over many shards: one process per core, with a progress bar."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from tqdm import tqdm
from tqdm.contrib.concurrent import process_map

Job = TypeVar("Job")
Result = TypeVar("Result")


def default_num_workers(num_jobs: int) -> int:
    """Processes for reading `num_jobs` shards: one per CPU core, at most 16, at most one per shard."""
    return max(1, min(num_jobs, os.cpu_count() or 1, 16))


def map_shards(
    fn: Callable[[Job], Result],
    jobs: Sequence[Job],
    *,
    num_workers: int | None = None,
    desc: str,
    progress: bool = False,
) -> list[Result]:
    """`[fn(job) for job in jobs]`, in order; in `num_workers` processes (default: one per core).

    One worker (or one job) runs in this process. `fn` must be picklable (a module-level function).
    """
    workers = default_num_workers(len(jobs)) if num_workers is None else num_workers
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in tqdm(jobs, desc=desc, unit="shard", disable=not progress)]
    # Chunks amortise process round trips over many small shards, yet keep the bar moving.
    chunksize = max(1, min(16, len(jobs) // (8 * workers)))
    return process_map(
        fn, jobs, max_workers=workers, chunksize=chunksize, desc=desc, unit="shard", disable=not progress
    )
