"""The u table on several nodes: every node keeps its own replica, and all of them equal one node's table.

Two "nodes" on one machine: two `python run.py tune` processes that the environment says are on
different nodes (LOCAL_WORLD_SIZE=1, as torchrun sets it), each with its own `run.node_local_dir`.
"""

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.checkpoint import required_folders
from engine.objectives.table import DATA_FILE, ROW_DTYPE, UTable
from tests.helpers.harness import free_port

ROOT = Path(__file__).resolve().parents[1]
JOB = ["--batch-size", "8", "--epochs", "1", "--osr-epochs", "1", "--lr", "1e-3", "--set", "run.backend=deepspeed",
       "--set", "run.progress=false", "--set", "eval.at_start=false", "--save-every", "2"]


def start(shards: Path, out: Path, *, nodes: int, port: int, extra: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """Two ranks of one job, as one node x 2 ranks or 2 nodes x 1 rank (each node its own local dir)."""
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "LOCAL_RANK": str(rank % (2 // nodes)), "LOCAL_WORLD_SIZE": str(2 // nodes)}
        local = ["--set", f"run.node_local_dir={out.parent / f'{out.name}_local{rank}'}"] if nodes == 2 else []
        cmd = [sys.executable, "run.py", "tune", "--train", str(shards), "--out", str(out), *JOB, *local, *extra]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen], port: int, timeout: float = 300) -> None:
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
        for proc, output in zip(procs, outputs):
            assert proc.returncode == 0, output[-4000:]
    finally:
        kill(procs, port)


def kill(procs: list[subprocess.Popen], port: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer*_{port}_*"):
        os.remove(path)


def num_visits(directory: Path) -> int:
    """Row updates so far in a live table (0 while it does not exist yet)."""
    path = directory / DATA_FILE
    return int(np.fromfile(path, dtype=ROW_DTYPE)["visits"].sum()) if path.exists() else 0


def table_bytes(directory: Path) -> bytes:
    UTable.open(directory)  # a complete table: header and data of the right size
    return (directory / DATA_FILE).read_bytes()


@pytest.mark.slow
def test_two_node_replicas_equal_each_other_and_the_one_node_table_also_after_sigkill_and_resume(shards, tmp_path):
    port = free_port()
    finish(start(shards, tmp_path / "one_node", nodes=1, port=port), port)
    one_node = table_bytes(tmp_path / "one_node" / "u_table")
    assert not (tmp_path / "one_node" / "u_table_nodes").exists()  # one node: no replica, as before
    assert UTable.open(tmp_path / "one_node" / "u_table").num_seen() == 48

    port = free_port()
    finish(start(shards, tmp_path / "two_nodes", nodes=2, port=port), port)
    replicas = [tmp_path / f"two_nodes_local{n}" / f"u_table_node{n}" for n in (0, 1)]
    assert [table_bytes(r) for r in replicas] == [one_node, one_node]
    assert table_bytes(tmp_path / "two_nodes" / "u_table") == one_node  # rank 0's replica, published

    # SIGKILL both "nodes" once each replica holds rows of a step after the latest checkpoint (8 or
    # later): the resume must replace them by the checkpoint's on both nodes.
    port = free_port()
    killed = tmp_path / "killed"
    procs = start(shards, killed, nodes=2, port=port)
    latest = killed / "checkpoints" / "latest"
    replicas = [tmp_path / f"killed_local{n}" / f"u_table_node{n}" for n in (0, 1)]
    try:
        deadline, ahead = time.time() + 240, False
        while time.time() < deadline and all(p.poll() is None for p in procs) and not ahead:
            saved = int(latest.read_text().strip().removeprefix("step_")) if latest.exists() else 0
            ahead = saved >= 8 and all(num_visits(r) > 8 * saved for r in replicas)  # 8 samples a step
            time.sleep(0.005)
        assert ahead and all(p.poll() is None for p in procs), "the job ended before it could be killed"
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        kill(procs, port)
    saved = int(latest.read_text().strip().removeprefix("step_"))
    assert all(num_visits(r) > 8 * saved for r in replicas)  # the replicas ran ahead of the checkpoint
    assert not (killed / "final.safetensors").exists()
    # Saves every 2 steps, a full base every 8 (run.u_table_full_every): OSR's end saves step 6 again as a base,
    # so the checkpoint of step 8 or 10 each replica is reseeded from is a delta on it (and on step 8's).
    assert "step_00000006" in required_folders(killed / "checkpoints" / f"step_{saved:08d}")
    port = free_port()
    finish(start(shards, killed, nodes=2, port=port, extra=("--resume", "latest")), port)
    assert [table_bytes(r) for r in replicas] == [one_node, one_node]
    assert table_bytes(killed / "u_table") == one_node
