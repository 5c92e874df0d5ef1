"""One job per run folder: an exclusive lock on `run.out_dir` and the run id every rank checks.

Rank 0 holds `fcntl.flock` on `<out_dir>/.run.lock` for the whole run and writes who holds it
(host, pid, run id, start time) into that file. The kernel drops the lock when its process dies,
so a lock file whose lock can be taken is stale: it is reported (host, pid of the dead job) and
taken over. The run id is broadcast to every rank, which checks the lock file names it: a second
job on the same folder (even from another machine, where file locks may not reach) stops at
start, and `verify()` catches one that took the folder over later before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from engine.distributed import DistContext, broadcast_object
from engine.io import write_json_atomic

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
OWNER_FILE = ".run.owner.json"


def _describe(owner: dict | None) -> str:
    if not owner:
        return "an unknown job"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"job {owner.get('run_id', '?')} (host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, started {started})"


def read_owner(out_dir: Path) -> dict | None:
    """Who holds (or last held) the lock of `out_dir`, as written by `RunLock`; None if unknown."""
    try:
        owner = json.loads((Path(out_dir) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


class RunLock:
    """The exclusive claim of one job on a run folder; `release()` (or process death) ends it."""

    def __init__(self, out_dir: Path, ctx: DistContext):
        self.out_dir = Path(out_dir)
        self.ctx = ctx
        self._fh = None
        claim = None
        if ctx.is_main:
            try:
                claim = ("ok", self._acquire())
            except ValueError as exc:
                claim = ("refused", str(exc))
        status, value = broadcast_object(claim)  # every rank stops together when the folder is taken
        if status != "ok":
            raise ValueError(value)
        self.run_id = value
        self.verify()

    def _acquire(self) -> str:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.out_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the whole run)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise ValueError(
                f"run.out_dir {self.out_dir} is in use by {_describe(read_owner(self.out_dir))}; wait for it to "
                "finish, stop it, or pick another --out"
            ) from None
        previous = read_owner(self.out_dir)
        if previous and previous.get("active"):
            logger.warning("run.out_dir %s: taking over the stale lock of %s, which is no longer running",
                           self.out_dir, _describe(previous))
        self._fh = fh
        run_id = uuid.uuid4().hex[:12]
        write_json_atomic(self.out_dir / OWNER_FILE, {
            "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "active": True,
        })
        return run_id

    def verify(self) -> None:
        """Raise ValueError if the folder's owner file names another job than this one (every rank)."""
        owner = read_owner(self.out_dir)
        if owner is None or owner.get("run_id") != self.run_id:
            raise ValueError(
                f"run.out_dir {self.out_dir} is now owned by {_describe(owner)}, not by this job "
                f"({self.run_id}): two jobs are using one folder; stop one of them"
            )

    def release(self) -> None:
        """Mark the folder free and drop the lock (rank 0; no-op elsewhere or when already released)."""
        if self._fh is None:
            return
        owner = read_owner(self.out_dir)
        if owner and owner.get("run_id") == self.run_id:
            with contextlib.suppress(OSError):
                write_json_atomic(self.out_dir / OWNER_FILE, {**owner, "active": False, "ended": time.time()})
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None
