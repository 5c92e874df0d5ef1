"""Checkpoints: one folder = one consistent state (backend, u table, trainer position), written atomically.

Layout under `<out_dir>/checkpoints/`:
  step_00001234/backend/      the backend's own files (each rank writes its partition)
  step_00001234/u_table/      copy of the u table at that step (so table and model never disagree)
  step_00001234/state.json    trainer position (stage, steps, epochs, batches done), config digest
  step_00001234/COMPLETE      written last: the size of every file in the folder; folders
                              without it, or whose files no longer have those sizes, are skipped
  latest                      name of the newest complete folder (replaced atomically)

A save is staged in a `.partial-*` folder and renamed once every rank has finished, so a crash
during a save leaves the previous checkpoint intact. Re-saving an existing step first renames
the old folder away (`.old-*`), so at every instant some complete checkpoint exists.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from engine.distributed import DistContext, barrier
from engine.table import UTable

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
STATE = "state.json"
LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE}


def checkpoint_problems(path: Path) -> list[str]:
    """Why `path` is not a usable checkpoint (empty list: complete, every file at its written size)."""
    marker = path / COMPLETE
    if not marker.exists():
        return [f"no {COMPLETE} marker (interrupted while saving)"]
    try:
        expected = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return [f"unreadable {COMPLETE} marker"]
    problems = []
    for name, size in expected.items():
        file = path / name
        if not file.exists():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} has {file.stat().st_size} bytes, {size} were written")
    return problems


def is_complete(path: Path) -> bool:
    return not checkpoint_problems(path)


def read_state(path: Path) -> dict:
    """The trainer state of a complete checkpoint folder."""
    problems = checkpoint_problems(path)
    if problems:
        raise FileNotFoundError(
            f"{path} is not a usable checkpoint ({'; '.join(problems[:3])}); resume from `latest` "
            "or an earlier step_* folder"
        )
    return json.loads((path / STATE).read_text())


class CheckpointManager:
    """save(step, ...) / find(spec) / restore_table(...) for one run directory."""

    def __init__(self, root: Path, ctx: DistContext, *, keep_last_n: int = 2):
        self.root = Path(root)
        self.ctx = ctx
        self.keep_last_n = keep_last_n

    def save(self, step: int, *, backend, table: UTable, state: dict) -> Path:
        """Write a checkpoint of `step` on every rank (collective); returns its folder."""
        final = self.root / f"step_{step:08d}"
        staging = self.root / f".partial-step_{step:08d}"
        if self.ctx.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        table.flush()
        barrier()  # every rank's rows are on disk before the copy
        backend.save(staging / "backend", client_state={"step": step})
        if self.ctx.is_main:
            table.copy_to(staging / "u_table")
            (staging / STATE).write_text(json.dumps({**state, "step": step}, indent=2, sort_keys=True))
        barrier()  # every rank's backend partition is written
        if self.ctx.is_main:
            _write_atomic(staging / COMPLETE, json.dumps({"files": _file_sizes(staging)}, indent=1))
            old = self.root / f".old-{final.name}"
            if final.exists():  # the same step saved again: move the old copy away atomically first
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(staging, final)
            _fsync_dir(self.root)
            shutil.rmtree(old, ignore_errors=True)
            _write_atomic(self.root / LATEST, final.name + "\n")
            self._purge()
            logger.info("checkpoint saved: %s", final)
        barrier()
        return final

    def _purge(self) -> None:
        if self.keep_last_n <= 0:
            return
        folders = sorted(p for p in self.root.glob("step_*") if is_complete(p))
        for old in folders[: -self.keep_last_n]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in (*self.root.glob(".partial-*"), *self.root.glob(".old-*")):
            shutil.rmtree(leftover, ignore_errors=True)

    def find(self, spec: str) -> Path:
        """`latest` (newest complete folder) or a path to a checkpoint folder."""
        if spec != "latest":
            path = Path(spec)
            read_state(path)
            return path
        for candidate in sorted(self.root.glob("step_*"), reverse=True):
            problems = checkpoint_problems(candidate)
            if not problems:
                return candidate
            logger.warning("skipping checkpoint %s: %s", candidate, "; ".join(problems[:3]))
        raise FileNotFoundError(f"no complete checkpoint under {self.root}; start without --resume")

    def has_checkpoints(self) -> bool:
        return any(is_complete(p) for p in self.root.glob("step_*"))

    def restore_table(self, checkpoint: Path, live_dir: Path, *, dataset_fingerprint: str) -> None:
        """Replace the live u table by the checkpoint's copy (rank 0 copies; every rank waits)."""
        if self.ctx.is_main:
            snapshot = UTable.open(checkpoint / "u_table", dataset_fingerprint=dataset_fingerprint, readonly=True)
            shutil.rmtree(live_dir, ignore_errors=True)
            snapshot.copy_to(live_dir).close()
            snapshot.close()
        barrier()

