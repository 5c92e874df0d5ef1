"""Before a job builds anything: what it may do with run.out_dir's earlier contents (clear, continue, refuse)."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.checkpoint import has_checkpoints
from engine.distributed import DistContext, broadcast_object
from engine.results.summary import earlier_run_outputs
from engine.run.folder import clear_run_folder, finished_outputs

logger = logging.getLogger(__name__)


def guard_run_folder(out_dir: Path, ctx: DistContext, *, resume: str | None, fresh: bool, overwrite: bool) -> None:
    """Make `out_dir` ready for a job (collective): `overwrite` clears an earlier run of this engine for a `fresh`
    job, or lets a `resume` continue a finished one; an earlier run's checkpoints or results are otherwise refused."""
    if overwrite and fresh:
        _clear_earlier_run(out_dir, ctx)
    if resume:
        _check_resume_keeps_results(out_dir, resume=resume, overwrite=overwrite)
    if fresh and has_checkpoints(out_dir / "checkpoints"):
        raise ValueError(
            f"run.out_dir {out_dir} holds checkpoints of an earlier run: continue it with "
            "--resume latest, or start a new run in another --out (nothing was overwritten)"
        )
    earlier = earlier_run_outputs(out_dir) if not resume else []
    if earlier:
        raise ValueError(
            f"run.out_dir {out_dir} holds an earlier run's {', '.join(earlier)}: start a new run in "
            "another --out, or continue a checkpointed run with --resume latest (nothing was overwritten)"
        )


def _clear_earlier_run(out_dir: Path, ctx: DistContext) -> None:
    """--overwrite on a fresh job: empty run.out_dir of an earlier run of this engine (rank 0, holding the run
    lock) and say what was removed; a folder that is not such a run folder is refused, nothing removed."""
    outcome = None
    if ctx.is_main:
        try:
            outcome = ("ok", clear_run_folder(out_dir))
        except ValueError as exc:
            outcome = ("refused", str(exc))
    status, value = broadcast_object(outcome)
    if status != "ok":
        raise ValueError(value)
    if value:
        logger.warning("--overwrite: removed the earlier run in %s: %s", out_dir, ", ".join(value))


def _check_resume_keeps_results(out_dir: Path, *, resume: str, overwrite: bool) -> None:
    """A resume into the folder of a finished run would rewrite its results: refused unless `overwrite`."""
    finished = finished_outputs(out_dir)
    if not finished:
        return
    if not overwrite:
        raise ValueError(
            f"run.out_dir {out_dir} holds a finished run ({', '.join(finished)}): --resume "
            f"{resume} would rewrite them; add --overwrite to continue it and replace them, or "
            f"evaluate or export its checkpoints instead (--weights {out_dir}/checkpoints/step_<N>); "
            "nothing was changed"
        )
    logger.warning("--overwrite: resuming the finished run in %s from %s; its %s and later checkpoints "
                   "will be replaced", out_dir, resume, ", ".join(finished))
