"""One job per run folder: an exclusive lock on `run.out_dir` and the run id every rank checks.

Rank 0 holds `fcntl.flock` on `<out_dir>/.run.lock` for the whole run and writes who holds it
(host, pid, run id, start time) into `<out_dir>/.run.owner.json`, whose mtime a thread renews.
The kernel drops the flock when its process dies, but a flock only guards the file it was taken
on: a deleted lock file, or another machine that file locks do not reach, lets a second flock
succeed under a live job. So a free flock is not enough to call a claim stale; the owner record
must also name a job that has stopped: on this machine (same host, boot and pid namespace) its
pid is gone or belongs to a newer process; elsewhere, where a pid says nothing, its claim has not
been renewed for `LEASE_EXPIRY_S`. A stale claim is reported and taken over. The run id is
broadcast to every rank, which checks the owner file names it: `verify()` catches a job that took
the folder over later before anything is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from engine.distributed import DistContext, broadcast_object
from engine.io import first_link, write_json_atomic

logger = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"
OWNER_FILE = ".run.owner.json"
LEASE_RENEW_S = 10.0  # how often the holder renews its claim (the owner file's mtime)
LEASE_EXPIRY_S = 120.0  # a claim from another machine is stale once unrenewed this long (NFS caches lag <= 60 s)


def _machine() -> str:
    """Where a pid means something: host, boot and pid namespace (containers on one host share a boot)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return "/".join(parts)


def _process(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of process `pid` from /proc; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name before ")" may hold spaces
    return fields[0], fields[19]  # fields 3 and 22


def _process_start(pid: int) -> str | None:
    """When process `pid` started, telling it from a later process given the same pid; None if unknown."""
    info = _process(pid)
    return None if info is None else info[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _still_running(owner: dict | None, owner_mtime: float | None) -> str | None:
    """Why the job `owner` names is still running (its claim is live), or None when it has stopped."""
    if not owner or not owner.get("active"):
        return None
    pid = owner.get("pid")
    if owner.get("machine") == _machine() and isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
        if not _pid_alive(pid):
            return None
        state, started = _process(pid) or ("?", None)
        if state in ("Z", "X"):
            return None  # exited, not yet reaped (containers whose init never reaps keep such pids)
        if started is not None and owner.get("pid_start") not in (None, started):
            return None  # the pid now belongs to a newer process
        return f"its process {pid} is still running"
    age = time.time() - (owner_mtime or 0.0)
    if age < LEASE_EXPIRY_S:
        return (f"it renewed its claim {max(age, 0):.0f} s ago from another machine (a claim is stale after "
                f"{LEASE_EXPIRY_S:.0f} s without renewal)")
    return None


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


def _owner_mtime(out_dir: Path) -> float | None:
    try:
        return (Path(out_dir) / OWNER_FILE).stat().st_mtime
    except OSError:
        return None


class RunLock:
    """The exclusive claim of one job on a run folder; `release()` (or process death) ends it.

    `own_entries`: what the job writes in place inside the folder; a claim is refused (on every rank)
    while any of them, or anything under them, is a symbolic link, before anything is written.
    """

    def __init__(self, out_dir: Path, ctx: DistContext, *, own_entries: tuple[str, ...] = ()):
        self.out_dir = Path(out_dir)
        self.ctx = ctx
        self.own_entries = (LOCK_FILE, OWNER_FILE, *own_entries)
        self._fh = None
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None
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
        link = first_link(self.out_dir, self.own_entries)
        if link is not None:
            raise ValueError(
                f"run.out_dir {self.out_dir}: {link.relative_to(self.out_dir)} is a symbolic link (to "
                f"{os.readlink(link)}); a run never writes through links: replace it with a real folder or file, "
                "or pick another --out (nothing was written)"
            )
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
        running = _still_running(previous, _owner_mtime(self.out_dir))
        if running:  # the flock was free, yet its holder lives: the lock file was removed, or locks don't reach
            fh.close()
            raise ValueError(
                f"run.out_dir {self.out_dir} is in use by {_describe(previous)}: {running}, although its lock "
                f"file {LOCK_FILE} could be taken (removed, or not shared between machines); wait for it to "
                "finish, stop it, or pick another --out"
            )
        if previous and previous.get("active"):
            logger.warning("run.out_dir %s: taking over the stale lock of %s, which is no longer running",
                           self.out_dir, _describe(previous))
        self._fh = fh
        run_id = uuid.uuid4().hex[:12]
        write_json_atomic(self.out_dir / OWNER_FILE, {
            "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "active": True, "machine": _machine(), "pid_start": _process_start(os.getpid()),
        })
        self._renewer = threading.Thread(target=self._renew, name="run-lock-lease", daemon=True)
        self._renewer.start()
        return run_id

    def _renew(self) -> None:
        """Keep the claim fresh for jobs on other machines, which cannot ask whether our pid lives."""
        while not self._stop_renewing.wait(LEASE_RENEW_S):
            with contextlib.suppress(OSError):
                os.utime(self.out_dir / OWNER_FILE)

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
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join()
        owner = read_owner(self.out_dir)
        if owner and owner.get("run_id") == self.run_id:
            with contextlib.suppress(OSError):
                write_json_atomic(self.out_dir / OWNER_FILE, {**owner, "active": False, "ended": time.time()})
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None
