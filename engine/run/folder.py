"""What makes a folder a run folder of this engine, and `--overwrite`'s removal of one (never of anything else)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from engine.run.lock import LOCK_FILE, OWNER_FILE

LOG_FILE = "log.jsonl"
# Written only when fine-tuning has finished, summary.json last (after the final checkpoint is on disk): a folder
# holding both holds a finished run, which a resume would rewrite. final.safetensors alone is a run stopped inside
# its last checkpoint's save: resuming it redoes the same steps and writes the same weights.
FINISHED_OUTPUTS = ("final.safetensors", "summary.json")


def finished_outputs(folder: Path) -> list[str]:
    """The results of a finished run in `folder` (empty unless every one of FINISHED_OUTPUTS is there)."""
    present = [name for name in FINISHED_OUTPUTS if (Path(folder) / name).exists()]
    return present if len(present) == len(FINISHED_OUTPUTS) else []


def nothing_left_to_do(folder: Path, *, resume: str | None, epochs: int) -> bool:
    """Whether `--resume latest` into `folder` asks for nothing: the run there finished (its results written, the
    newest checkpoint its end) with at least `epochs` fine-tuning epochs. A scheduler relaunching a job killed after
    it wrote its results gets exit 0 instead of a refusal; nothing is read beyond the checkpoint's state."""
    if resume != "latest" or not finished_outputs(folder):
        return False
    from engine.checkpoint import TRAIN_STATE, latest_checkpoint, read_state

    latest = latest_checkpoint(Path(folder) / "checkpoints")
    if latest is None:
        return True  # a run without checkpoints that finished: there is nothing to resume either
    state = read_state(latest)[TRAIN_STATE]
    return state.get("stage") == "done" and epochs <= state["config"]["run"]["epochs"]


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds a run of this engine: its log.jsonl begins with the run's start record."""
    try:
        with open(Path(folder) / LOG_FILE, encoding="utf-8") as fh:
            first = json.loads(fh.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and first.get("event") == "start" and "config" in first


def clear_run_folder(folder: Path) -> list[str]:
    """Remove everything in run folder `folder` but its run lock (held by the caller); returns the names
    removed (folders with a trailing '/'). Raises ValueError, removing nothing, for any other folder."""
    folder = Path(folder)
    entries = sorted(p for p in folder.iterdir() if p.name not in (LOCK_FILE, OWNER_FILE)) if folder.is_dir() else []
    if not entries:
        return []
    if not is_run_folder(folder):
        raise ValueError(f"--overwrite: {folder} is not a run folder of this engine (no {LOG_FILE} beginning with "
                         "a run's start record); nothing was removed: remove it yourself or pick another --out")
    removed = []
    for path in entries:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(path.name + "/")
        else:
            path.unlink()
            removed.append(path.name)
    return removed
