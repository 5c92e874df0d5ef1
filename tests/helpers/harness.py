"""Run a function on N real processes (CPU, gloo), as the launchers do, and collect what each returns.

`run_ranks("tests.helpers.dist_cases:loss_equivalence", world_size=2, chunk=3)` starts
`python -m tests.helpers.dist_worker` N times with RANK / WORLD_SIZE / MASTER_PORT set, calls the target
with keyword arguments on every rank, and returns the list of per-rank results (torch.save'd).
Each run uses its own port and removes exactly its own DeepSpeed shared-memory buffers.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(target: str, *, world_size: int = 2, timeout: float = 300, env: dict | None = None,
              **kwargs) -> list:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ranks_") as tmp:
        procs = []
        for rank in range(world_size):
            proc_env = {
                **os.environ,
                "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                **(env or {}),
            }
            out = Path(tmp) / f"rank{rank}.pt"
            cmd = [sys.executable, "-m", "tests.helpers.dist_worker", target, str(out), json.dumps(kwargs)]
            log = open(Path(tmp) / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below)
            procs.append((subprocess.Popen(cmd, env=proc_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), log))
        try:
            failures = []
            for rank, (proc, log) in enumerate(procs):
                try:
                    code = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    code = "timeout"
                log.close()
                if code != 0:
                    failures.append((rank, code, (Path(tmp) / f"rank{rank}.log").read_text()[-4000:]))
            if failures:
                text = "\n".join(f"--- rank {r} exited {c}:\n{t}" for r, c, t in failures)
                raise AssertionError(f"{target} failed on {len(failures)} rank(s):\n{text}")
            return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer*_{port}_*"):
                os.remove(path)


def kill_job(pid: int) -> None:
    """SIGKILL a launched job at once: the process group of `pid` and every process below it in any session
    (torchrun starts each worker in a session of its own, so killing torchrun's group alone leaves the
    ranks running: they would see their launcher die and stop cleanly with a checkpoint instead)."""
    import signal

    from engine.run.preemption import parent_pid

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = parent_pid(int(entry))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    for target in tree:  # stop all first (no one reacts to another's death), then kill
        try:
            os.kill(target, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for target in tree:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass
