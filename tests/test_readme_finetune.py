"""The README's "Fine-tuning your checkpoint" section, run as written from a folder outside the repository.

Every line of the section's fenced `sh` blocks runs, in order, in a fresh temporary folder. What is substituted,
and only that:
- your files: `captions.csv` (+ images), `eval/in1k.csv`, `eval/classnames.txt`, `eval/flickr_test.csv` are tiny
  synthetic sets made by the test at those names; `/ckpt/dfn5b.safetensors` is a tiny-vit checkpoint;
- the section's `job.yaml` is its YAML block with the model (`tiny-vit`, no pretrained tag, fp32: a CPU), the
  sizes (global batch 8, no data workers, 1 OSR and 1 fine-tuning epoch) and the weights path replaced;
- `run.py` is the repository's (`python <repo>/run.py`), `deepspeed` gets a free `--master_port` (tests run side
  by side), and the environment has `DS_ACCELERATOR=cpu` (no GPU) and one thread per rank;
- a launch followed by a `--resume latest` of the same `--out` is stopped with SIGTERM as soon as it has started
  (it stops after its first step with a checkpoint), as a scheduler would stop it.
"""

import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.demo.synthetic import render_pairs, render_retrieval_task, render_zeroshot_task
from models import build_model, export_weights
from tests.helpers.harness import free_port, kill_job

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Fine-tuning your checkpoint"
# The section's job.yaml, scaled to a CPU test (everything else as written).
JOB_CHANGES = {"model": {"name": "tiny-vit", "precision": "fp32"},
               "data": {"batch_size": 8, "num_workers": 0},
               "osr": {"epochs": 1}, "run": {"epochs": 1}}
NUM_SAMPLES = 32  # 4 steps per epoch at a global batch of 8


def section_blocks(language: str) -> list[str]:
    """The fenced `language` blocks of the README's fine-tuning section, dedented, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    blocks = re.findall(rf"^( *)```{language}\n(.*?)^\1```", text[start:end], flags=re.MULTILINE | re.DOTALL)
    return ["\n".join(line[len(indent):] for line in body.splitlines()) for indent, body in blocks]


def section_commands() -> list[list[str]]:
    return [shlex.split(line) for block in section_blocks("sh") for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def make_user_files(work: Path, job_yaml: str) -> None:
    """The files the section's commands name, made tiny."""
    render_pairs(work, num_samples=NUM_SAMPLES, seed=0, split_name=".")  # captions.csv + images/
    eval_dir = work / "eval"
    zeroshot_csv, _, _ = render_zeroshot_task(eval_dir, num_per_class=1, seed=1)  # + eval/classnames.txt
    zeroshot_csv.rename(eval_dir / "in1k.csv")
    render_retrieval_task(eval_dir, num_images=8, seed=2).rename(eval_dir / "flickr_test.csv")
    job = yaml.safe_load(job_yaml)
    weights = work / "ckpt" / Path(job["model"]["weights"]).name
    weights.parent.mkdir()
    export_weights(build_model("tiny-vit", seed=5).model, weights)
    job["model"].pop("pretrained_tag", None)  # dfn5b's QuickGELU config is ViT-H's, not tiny-vit's
    for section, values in JOB_CHANGES.items():
        job[section].update(values)
    job["model"]["weights"] = str(weights)
    (work / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")


def out_of(command: list[str], job: dict) -> Path:
    return Path(command[command.index("--out") + 1]) if "--out" in command else Path(job["run"]["out_dir"])


def runnable(command: list[str], port: int) -> list[str]:
    """`command` with the repository's run.py, and a free port for the deepspeed launcher."""
    command = [str(ROOT / "run.py") if word == "run.py" else word for word in command]
    if command[0] == "python":
        command[0] = sys.executable
    if command[0] == "deepspeed":
        command[1:1] = ["--master_port", str(port)]
    return command


def stop_once_started(proc: subprocess.Popen, log: Path) -> None:
    """SIGTERM the launcher once the run has started (its log's first record is written after the ranks set up
    their stop handlers): the ranks finish their first step, write a checkpoint and exit."""
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and log.read_text().endswith("\n"):
            proc.send_signal(signal.SIGTERM)
            return
        time.sleep(0.05)
    raise AssertionError("the launch ended or stalled before it started training")


def check_finished(out: Path, *, launches: list[tuple[int, int]]) -> dict:
    """A finished run: final weights, evaluations, a summary whose cost is the sum of its `launches` ((ranks, steps)
    of each stage's launches, OSR first)."""
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "final.safetensors").is_file() and (out / "best.safetensors").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["adam_step"] for r in log if r["event"] == "osr_done"] == [NUM_SAMPLES // 8]
    evals = [r for r in log if r["event"] == "eval"]
    assert {"imagenet", "flickr"} <= set(evals[-1]["results"]) and evals[-1]["ft_step"] == NUM_SAMPLES // 8
    cost = summary["cost"]
    for stage in ("osr", "finetune"):
        parts = cost[stage]["launches"]
        assert cost[stage]["steps"] == sum(e["steps"] for e in parts) == NUM_SAMPLES // 8
        assert cost[stage]["num_samples"] == sum(e["num_samples"] for e in parts) == NUM_SAMPLES
        assert cost[stage]["seconds"] == pytest.approx(sum(e["seconds"] for e in parts), abs=2e-3)
        assert cost[stage]["device_hours"] == pytest.approx(
            sum(e["seconds"] * e["world_size"] for e in parts) / 3600, abs=1e-6)
    assert [(e["world_size"], e["steps"]) for e in cost["osr"]["launches"] + cost["finetune"]["launches"]
            if e["steps"]] == launches
    return summary


@pytest.mark.slow
def test_readme_finetuning_section_runs_as_written_outside_the_repository(tmp_path):
    commands = section_commands()
    (job_yaml,) = section_blocks("yaml")
    job = yaml.safe_load(job_yaml)
    tools = {command[0] for command in commands}
    assert {"python", "deepspeed", "torchrun"} <= tools, tools
    work = tmp_path / "user"
    work.mkdir()
    assert not work.resolve().is_relative_to(ROOT)
    make_user_files(work, job_yaml)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    ports = []
    try:
        for i, command in enumerate(commands):
            port = free_port()
            ports.append(port)
            resumed_next = i + 1 < len(commands) and "--resume" in commands[i + 1] and (
                out_of(commands[i + 1], job) == out_of(command, job))
            proc = subprocess.Popen(runnable(command, port), cwd=work, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                if resumed_next:
                    stop_once_started(proc, work / out_of(command, job) / "log.jsonl")
                output = proc.communicate(timeout=500)[0]
            finally:
                if proc.poll() is None:
                    kill_job(proc.pid)
                    proc.wait()
            if resumed_next:  # the launcher reports its stopped ranks (exit 75) as a failure
                log = [json.loads(line) for line in (work / out_of(command, job) / "log.jsonl").read_text()
                       .splitlines()]
                assert [r["step"] for r in log if r["event"] == "preempted"] == [1], output[-4000:]
            else:
                assert proc.returncode == 0, f"{shlex.join(command)}\n{output[-4000:]}"
                assert "Traceback" not in output, output[-4000:]
    finally:
        for port in ports:
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer*_{port}_*"):
                os.remove(path)
    assert (work / "data" / "shards" / "manifest.json").is_file()
    steps = NUM_SAMPLES // 8
    check_finished(work / job["run"]["out_dir"], launches=[(1, steps), (1, steps)])
    ds_out, fsdp_out = (out_of(c, job) for c in commands if c[0] in ("deepspeed", "torchrun") and "--resume" not in c)
    check_finished(work / ds_out, launches=[(2, steps), (2, steps)])
    # Stopped after one OSR step on 2 ranks, resumed on 1: the rest of OSR and all of fine-tuning there.
    check_finished(work / fsdp_out, launches=[(2, 1), (1, steps - 1), (1, steps)])
