"""Which rank stopped responding: a heartbeat file per rank, touched by a background thread.

A rank blocked in a collective keeps beating (its thread runs); a dead or frozen (SIGSTOP) rank
does not. When a collective times out (`run.collective_timeout_s`), the ranks still alive read
the heartbeats and name the silent ones in their error line. Some collectives never time out
(DeepSpeed's shared-memory all-reduce on CPU spins; a hung NCCL kernel), so the same thread also
ends this rank, with that line, once a peer has been silent for the timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from engine.distributed import DistContext
from engine.io import write_json_atomic

TIMEOUT_WORDS = ("timed out", "timeout")
EXIT_PEER_LOST = 3  # a rank ended itself because another stopped responding


def is_collective_timeout(exc: BaseException) -> bool:
    """Whether `exc` is a process-group collective giving up on a peer (gloo/NCCL wording)."""
    return isinstance(exc, RuntimeError) and any(word in str(exc).lower() for word in TIMEOUT_WORDS)


class Heartbeat:
    """`<directory>/rank_<r>.json` (host, pid) whose mtime this rank's thread refreshes every `interval_s`."""

    def __init__(self, directory: Path, ctx: DistContext, *, timeout_s: float, interval_s: float = 2.0):
        self.directory = Path(directory)
        self.ctx = ctx
        self.timeout_s = timeout_s
        self.interval_s = interval_s
        self.started = time.time()
        self.path = self.directory / f"rank_{ctx.rank:05d}.json"
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Heartbeat:
        write_json_atomic(self.path, {"rank": self.ctx.rank, "host": socket.gethostname(), "pid": os.getpid()})
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._done.wait(self.interval_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)
            # Give peers the timeout from our own start too (they may start later than us).
            if time.time() - self.started > self.timeout_s:
                lost = self.silent_ranks(older_than_s=self.timeout_s)
                if lost:
                    print(f"error: {self._report(lost, 'no step could finish')}", file=sys.stderr, flush=True)
                    os._exit(EXIT_PEER_LOST)

    def silent_ranks(self, *, older_than_s: float | None = None) -> list[str]:
        """'rank N (host H, pid P, silent for S s)' for every peer silent longer than `older_than_s`
        (default: three beats)."""
        limit = 3 * self.interval_s if older_than_s is None else older_than_s
        now, out = time.time(), []
        for rank in range(self.ctx.world_size):
            if rank == self.ctx.rank:
                continue
            path = self.directory / f"rank_{rank:05d}.json"
            try:
                age = now - path.stat().st_mtime
                who = json.loads(path.read_text())
            except (OSError, ValueError):
                out.append(f"rank {rank} (no heartbeat)")
                continue
            if age > limit:
                out.append(f"rank {rank} (host {who.get('host')}, pid {who.get('pid')}, silent for {age:.0f} s)")
        return out

    def _report(self, silent: list[str], cause: str) -> str:
        who = ", ".join(silent) if silent else "no rank's heartbeat stopped (a slow or hung collective)"
        return (f"rank {self.ctx.rank}: a collective waited more than {self.timeout_s:g} s "
                f"(run.collective_timeout_s) for the other ranks; not responding: {who}. The job stops; "
                f"resume from the last checkpoint once every node is healthy ({cause})")

    def timeout_report(self, exc: BaseException) -> str:
        """The one-line reason for a collective timeout, naming the silent ranks when they are known."""
        return self._report(self.silent_ranks(), str(exc).splitlines()[0][:120])

    def stop(self) -> None:
        self._done.set()
