"""Launching as users do: the deepspeed launcher (1 node x 2 ranks, 2 nodes x 1 rank) and torchrun (DeepSpeed, FSDP2)."""

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from engine.data.build import build_shards
from engine.demo.synthetic import render_pairs
from engine.objectives.table import UTable
from engine.run.preemption import parent_pid
from models import build_model, export_weights, register_shipped_configs
from tests.helpers.harness import free_port, kill_job

ROOT = Path(__file__).resolve().parents[1]
JOB = ["--batch-size", "8", "--epochs", "1", "--osr-epochs", "1", "--lr", "1e-3", "--set", "run.backend=deepspeed",
       "--set", "run.progress=false", "--set", "eval.at_start=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch_data")
    csv = render_pairs(root / "raw", num_samples=48, seed=0, split_name="train")
    build_shards(csv, root / "shards", samples_per_shard=12)
    return root / "shards"


def launch(commands: list[list[str]], port: int, timeout: float = 300) -> list[str]:
    """Run `commands` (one launcher each) to the end; their combined stdout and stderr."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
        for proc, out in zip(procs, outputs):
            assert proc.returncode == 0, out[-4000:]
        # The engine removes its own DeepSpeed shared-memory buffers at shutdown.
        assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer*_{port}_*") == []
        return outputs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer*_{port}_*"):
            os.remove(path)


def check_run(out: Path, *, world_size: int, osr_steps: int) -> None:
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == world_size
    done = [r for r in log if r["event"] == "osr_done"]
    assert [r["adam_step"] for r in done] == ([osr_steps] if osr_steps else [])
    steps = [r for r in log if r["event"] == "step"]
    assert steps and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    register_shipped_configs()
    model, _, _ = open_clip.create_model_and_transforms("tiny-vit", pretrained=str(out / "final.safetensors"))
    initial = open_clip.create_model("tiny-vit")  # only for shapes: weights differ from any trained run
    assert model.state_dict().keys() == initial.state_dict().keys()
    table = UTable.open(out / "u_table")
    visits = table.visits(torch.arange(table.num_rows))
    # Every sample was used once per epoch (OSR + fine-tuning) across both ranks.
    assert visits.min().item() >= 1 and visits.sum().item() == 48 * (1 + (1 if osr_steps else 0))


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory):
    """tiny-vit weights whose temperature, log(1/0.07) as open_clip initialises it, bf16 cannot represent."""
    model = build_model("tiny-vit", seed=5).model
    assert model.logit_scale.item() != model.logit_scale.bfloat16().item()
    path = tmp_path_factory.mktemp("start_weights") / "start.safetensors"
    export_weights(model, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_bf16_final_and_best_are_the_fp32_masters(shards, start_weights, tmp_path, zero):
    """A bf16 run on 2 ranks: final.safetensors and best.safetensors hold the fp32 masters, bit for bit what the
    last checkpoint (saved after the export) gives read in one process by zero_to_fp32, not their bf16 rounding;
    the frozen temperature, which DeepSpeed holds in bf16 only, is the start weights' fp32 value in all three."""
    port = free_port()
    csv = next((shards.parent / "raw").rglob("*.csv"))  # the training pairs, as a retrieval task
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "run.py", "tune", "--train", str(shards),
           "--out", str(tmp_path), *JOB, "--set", f"run.zero_config=zero_configs/{zero}_bf16.json",
           "--set", "model.precision=bf16", "--save-every", "6", "--weights", str(start_weights),
           "--set", f"eval.retrieval=[{{name: pairs, csv: {csv}}}]", "--set", "eval.batch_size=16"]
    launch([cmd], port)
    check_run(tmp_path, world_size=2, osr_steps=6)
    from engine.cli import main

    last = max((tmp_path / "checkpoints").glob("step_*"))
    assert main(["export", "--model", "tiny-vit", "--weights", str(last), "--out", str(tmp_path / "ck.safetensors")]) == 0
    masters = load_file(tmp_path / "ck.safetensors")
    start = load_file(start_weights)["logit_scale"]
    assert torch.equal(masters["logit_scale"], start)
    first = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert first["tau"] == torch.exp(-start).item()  # the objective's temperature: the file's, unrounded
    for name in ("final", "best"):  # one evaluation, at the end: the best is the final model
        weights = load_file(tmp_path / f"{name}.safetensors")
        assert weights.keys() == masters.keys() and all(torch.equal(weights[k], masters[k]) for k in weights), name
        trained = [k for k in weights if k != "logit_scale"]
        assert not all(torch.equal(weights[k], weights[k].bfloat16().float()) for k in trained), name
        assert torch.equal(weights["logit_scale"], start), name


@pytest.mark.slow
def test_two_nodes_on_one_machine(shards, tmp_path):
    port = free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    commands = [["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n), "--num_nodes", "2",
                 "--num_gpus", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "run.py", "tune",
                 "--train", str(shards), "--out", str(tmp_path / "run"), *JOB] for n in (0, 1)]
    launch(commands, port)
    check_run(tmp_path / "run", world_size=2, osr_steps=6)


@pytest.mark.slow
def test_torchrun_with_deepspeed_backend(shards, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "run.py", "finetune", "--method", "fastclip", "--train", str(shards), "--out", str(tmp_path), *JOB]
    launch([cmd], port)
    check_run(tmp_path, world_size=2, osr_steps=0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny-vit checkpoint with a temperature of its own (FSDP2 builds on the meta device from it)."""
    model = build_model("tiny-vit", seed=5).model
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    export_weights(model, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero2", "fsdp"])
def test_sigkill_on_two_ranks_then_resume_matches_straight_run(shards, weights, tmp_path, backend, caplog):
    """Kill a 2-rank job (the whole launcher process group: `deepspeed`, or `torchrun` for FSDP2) started from
    a checkpoint mid-run, resume, compare. The killed FSDP2 job writes its checkpoints in the background
    (run.async_checkpoint), the straight one does not: the same weights either way. Each job and the export of a
    checkpoint name the weights they loaded once, and open_clip's "initialized randomly" never shows."""
    def cmd(out, port, *extra):
        if backend == "fsdp":
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(port), "run.py"]
            settings = ["--set", "run.backend=fsdp"]
        else:
            launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "run.py"]
            settings = ["--set", f"run.zero_config=zero_configs/{backend}.json"]
        return [*launcher, "tune", "--train", str(shards), "--out", str(out), *JOB, *settings, "--save-every", "2",
                "--weights", str(weights), *extra]

    straight_port = free_port()
    [output] = launch([cmd(tmp_path / "straight", straight_port)], straight_port)
    assert "No pretrained weights loaded" not in output
    loaded = [line for line in output.splitlines() if "loaded weights" in line]
    assert len(loaded) == 1 and f"loaded weights {weights} into " in loaded[0], output[-3000:]
    check_run(tmp_path / "straight", world_size=2, osr_steps=6)
    start = json.loads((tmp_path / "straight" / "log.jsonl").read_text().splitlines()[0])
    assert start["tau"] == pytest.approx(torch.exp(torch.tensor(-3.0)).item(), rel=1e-6)  # the file's, not the init's

    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    background = ["--set", "run.async_checkpoint=true"] if backend == "fsdp" else []
    proc = subprocess.Popen(cmd(tmp_path / "killed", port, *background), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if latest.exists() and latest.read_text().strip() >= "step_00000008":
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the job ended before it could be killed"
        kill_job(proc.pid)  # the ranks too: torchrun starts them in sessions of their own
        proc.wait()
    finally:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer*_{port}_*"):
            os.remove(path)
    assert not (tmp_path / "killed" / "final.safetensors").exists()
    resume_port = free_port()
    launch([cmd(tmp_path / "killed", resume_port, "--resume", "latest", *background)], resume_port)

    a = load_file(tmp_path / "straight" / "final.safetensors")
    b = load_file(tmp_path / "killed" / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The last checkpoint (saved after the export) exported in one process, no launcher: the same weights.
    last = max((tmp_path / "killed" / "checkpoints").glob("step_*"))
    before = {p: p.stat().st_mtime_ns for p in last.rglob("*")}
    from engine.cli import main

    caplog.clear()
    assert main(["export", "--model", "tiny-vit", "--weights", str(last), "--out", str(tmp_path / "ck.safetensors")]) == 0
    assert "No pretrained weights loaded" not in caplog.text and f"loaded weights {last} into tiny-vit" in caplog.text
    c = load_file(tmp_path / "ck.safetensors")
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert {p: p.stat().st_mtime_ns for p in last.rglob("*")} == before, "nothing written into the checkpoint"
    ta, tb = UTable.open(tmp_path / "straight" / "u_table"), UTable.open(tmp_path / "killed" / "u_table")
    rows = torch.arange(ta.num_rows)
    for x, y in zip((*ta.read(rows), ta.visits(rows)), (*tb.read(rows), tb.visits(rows))):
        assert torch.equal(x, y)


def _descendant_with_rank(root_pid: int, rank: int) -> int | None:
    """The process below `root_pid` whose environment has RANK=`rank` (a launcher's worker)."""
    children = {}
    for entry in os.listdir("/proc"):
        ppid = parent_pid(int(entry)) if entry.isdigit() else None
        if ppid is not None:
            children.setdefault(ppid, []).append(int(entry))
    todo = list(children.get(root_pid, []))
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
        todo.extend(children.get(pid, []))
    return None


@pytest.mark.slow
def test_frozen_rank_fails_the_job_within_the_collective_timeout_naming_it(shards, tmp_path):
    port = free_port()
    out = tmp_path / "frozen"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "run.py", "tune", "--train", str(shards),
           "--out", str(out), *JOB, "--epochs", "20", "--set", "run.zero_config=zero_configs/zero2.json",
           "--set", "run.collective_timeout_s=8", "--set", "run.log_every=1"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    frozen = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            log = out / "log.jsonl"
            if log.exists() and '"event": "step"' in log.read_text():
                frozen = _descendant_with_rank(proc.pid, 1)
                break
            time.sleep(0.05)
        assert frozen is not None, "the job never reached its first step"
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.time()
        lines = []
        watchdog = threading.Timer(180, kill_job, args=(proc.pid,))  # a hung job ends the read below
        watchdog.start()
        try:
            for line in proc.stdout:  # until rank 0 names the frozen rank (or the job ends)
                lines.append(line)
                if "error: rank 0: a collective waited" in line:
                    break
        finally:
            watchdog.cancel()
        waited = time.time() - stopped_at
        # The launcher would give the stopped rank DeepSpeed's 30 s to react to SIGTERM: end it now.
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGKILL)
        output = "".join(lines) + proc.communicate(timeout=180)[0]
    finally:
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer*_{port}_*"):
            os.remove(path)
    assert proc.returncode != 0
    assert waited < 8 + 60, f"the job took {waited:.0f} s to notice a frozen rank"
    lines = [line for line in output.splitlines() if "error: rank 0: a collective waited more than 8 s" in line]
    assert lines and "not responding: rank 1 (host" in lines[0], output[-3000:]
