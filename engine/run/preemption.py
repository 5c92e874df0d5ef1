"""Preemption: SIGTERM / SIGUSR1 (what schedulers send before a kill) stop the job at a step boundary.

Each rank records a stop request when it receives one of the signals, or when the launcher that
started it goes away (the `deepspeed` runner does not forward SIGTERM to the ranks). At every step
boundary the ranks agree (one all-reduce of a flag) so they all stop after the same step; the
trainer then writes a checkpoint and raises `Preempted`; the CLI exits with `EXIT_PREEMPTED`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; `--resume latest` continues
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_WORDS = ("deepspeed", "torchrun", "torch.distributed.run", "torch.distributed.launch")


class Preempted(Exception):
    """The job stopped on request after a checkpoint."""

    def __init__(self, reason: str, *, step: int, checkpoint: str):
        super().__init__(f"stopped by {reason} after step {step}; checkpoint {checkpoint}; continue with "
                         "--resume latest")
        self.reason, self.step, self.checkpoint = reason, step, checkpoint


def proc_stat(pid: int) -> list[str] | None:
    """The fields of `/proc/<pid>/stat` after the command name (state first, ppid second, start
    time 20th), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def parent_pid(pid: int) -> int | None:
    """The parent of process `pid`, or None when it is gone."""
    fields = proc_stat(pid)
    return int(fields[1]) if fields else None


def _start_time(pid: int) -> str | None:
    fields = proc_stat(pid)
    return fields[19] if fields else None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def launcher_ancestors(pid: int | None = None) -> list[tuple[int, str]]:
    """(pid, start time) of the launcher processes above `pid` (this process): the nearest
    ancestors whose command line names a launcher, up to the first that does not."""
    out = []
    parent = parent_pid(pid or os.getpid())
    while parent and parent > 1 and any(word in _cmdline(parent) for word in LAUNCHER_WORDS):
        out.append((parent, _start_time(parent)))
        parent = parent_pid(parent)
    return out


class StopRequests:
    """Collects stop requests (signals, a vanished launcher) while installed; `agreed()` at step ends."""

    def __init__(self, *, device: torch.device, poll_s: float = 1.0):
        self.device = device  # where the agreement flag lives (NCCL reduces device tensors only)
        self.reason: str | None = None
        self._previous: dict[int, object] = {}
        self._done = threading.Event()
        self._watch = launcher_ancestors()
        self._poll_s = poll_s
        self._thread: threading.Thread | None = None

    def install(self) -> StopRequests:
        """Handle the stop signals (main thread only) and watch the launcher; returns self."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if self._watch:
            self._thread = threading.Thread(target=self._watch_launcher, name="launcher-watch", daemon=True)
            self._thread.start()
        return self

    def _on_signal(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Ask the job to stop at the next step boundary."""
        if self.reason is None:
            self.reason = reason
            logger.warning("%s received: stopping after this step with a checkpoint", reason)

    def _watch_launcher(self) -> None:
        while not self._done.wait(self._poll_s):
            for pid, started in self._watch:
                if _start_time(pid) != started:  # gone (or its pid reused)
                    self.request(f"the end of the launcher (pid {pid})")
                    return

    def agreed(self) -> str | None:
        """The reason to stop now if any rank was asked to (collective: call at every step end)."""
        import torch  # here, not at the top: the CLI imports this module before it has checked the config

        from engine.distributed import all_reduce_sum

        flag = all_reduce_sum(torch.tensor([1.0 if self.reason else 0.0], device=self.device))
        if flag.item() > 0:
            return self.reason or "a stop request on another rank"
        return None

    def uninstall(self) -> None:
        """Give the signals back to their previous handlers and stop watching."""
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
