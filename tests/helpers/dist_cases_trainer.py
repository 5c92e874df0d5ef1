"""Trainer jobs run on N real ranks (see harness.py): stopped at a chosen step, resumed on another world size."""

from __future__ import annotations

import torch

from engine.config import load_config
from engine.objectives.table import DATA_FILE, UTable
from engine.run.preemption import Preempted
from engine.trainer import Trainer
from tests.helpers.jobs import stop_after


def tune_until(config: dict, stop_at: int | None = None) -> dict:
    """`run.py tune` of `config` (resumed when run.resume is set), stopped as by SIGTERM after global step
    `stop_at`: the ranks agree, checkpoint and raise Preempted. Returns the step reached and, once the job
    is complete, every row's u-table visit count; and this rank's live u table (folder, and its bytes right after
    the trainer was built: a resumed launch's table as the checkpoint restored it, before any step)."""
    trainer = Trainer(load_config(base=config))
    live_dir = getattr(trainer.normaliser, "live_dir", None)  # None: a normaliser without a u table
    at_start = (live_dir / DATA_FILE).read_bytes() if live_dir is not None else None
    stop_after(trainer, stop_at)
    finished = True
    try:
        trainer.tune()
    except Preempted:
        finished = False
    finally:
        trainer.close()
    result = {"global_step": trainer.global_step, "finished": finished, "table_dir": live_dir and str(live_dir),
              "table_at_start": at_start}
    if finished and trainer.ctx.is_main:
        table = UTable.open(trainer.out_dir / "u_table")
        result["visits"] = table.visits(torch.arange(table.num_rows)).tolist()
    return result
