"""`run.py interpolate`: a = 0 and a = 1 reproduce the run's base and final evaluations exactly, a = 0.5 is the naive
per-tensor mean, --select exports the chosen a's weights, and bad input is one error line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main
from engine.demo.synthetic import render_retrieval_task
from engine.results.interpolate import interpolate_into, parse_alphas
from models import build_model, export_weights
from tests.helpers.harness import free_port

ROOT = Path(__file__).resolve().parents[1]


def finetune_args(shards, folder: Path, *settings: str) -> tuple[list[str], Path, Path]:
    """The command line of a tiny fastclip run (2 steps) fine-tuned from saved weights into `folder/run`, evaluated on
    two retrieval tasks at its start and end: `val` (held out to choose with) and `test`; `settings` are more --set
    overrides. Returns (arguments, run folder, base weights)."""
    base = folder / "base.safetensors"
    export_weights(build_model("tiny-vit", seed=5).model, base)
    tasks = {name: render_retrieval_task(folder / name, num_images=6, seed=seed)
             for name, seed in (("val", 1), ("test", 2))}
    out = folder / "run"
    args = ["finetune", "--method", "fastclip", "--model", "tiny-vit", "--weights", str(base),
            "--train", str(shards), "--out", str(out), "--batch-size", "8", "--epochs", "1", "--lr", "1e-3",
            "--set", "run.max_steps_per_epoch=2", "--set", "run.progress=false",
            "--set", "eval.retrieval=[" + ", ".join(f"{{name: {n}, csv: {p}}}" for n, p in tasks.items()) + "]",
            *(arg for setting in settings for arg in ("--set", setting))]
    return args, out, base


def fine_tune(shards, folder: Path, *settings: str) -> tuple[Path, Path]:
    """`finetune_args`' run, in this process."""
    args, out, base = finetune_args(shards, folder, *settings)
    assert main(args) == 0
    return out, base


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory):
    """`fine_tune` without interpolation."""
    return fine_tune(shards, tmp_path_factory.mktemp("interpolate"))


def evals(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "eval"]


def test_endpoints_reproduce_the_runs_evaluations_and_select_exports_the_chosen_mix(finished_run, capsys):
    run, base = finished_run
    assert main(["interpolate", str(run), "--alphas", "0,0.5,1", "--select", "val/mean_recall@1"]) == 0
    out = capsys.readouterr().out
    written = json.loads((run / "interpolate.json").read_text())
    rows = {row["alpha"]: row["results"] for row in written["evaluations"]}
    assert sorted(rows) == [0.0, 0.5, 1.0]
    start, final = evals(run)[0], evals(run)[-1]
    assert start["stage"] == "start" and final["stage"] == "finetune"
    assert rows[0.0] == start["results"]  # exactly: the base model's evaluation at step 0
    assert rows[1.0] == final["results"]  # exactly: the final model's evaluation
    assert rows[0.0] != rows[1.0]  # the two ends differ, so the checks above can fail
    # The choice: the first a with the best validation score, its weights exported as stock open_clip safetensors.
    scores = [rows[a]["val"]["mean_recall@1"] for a in (0.0, 0.5, 1.0)]
    chosen = (0.0, 0.5, 1.0)[scores.index(max(scores))]
    assert written["chosen_alpha"] == chosen and f"chose a = {chosen:g}" in out
    assert out.splitlines()[0].split()[:3] == ["a", "val/image_retrieval_recall@1", "val/text_retrieval_recall@1"]
    exported = load_file(run / "interpolated.safetensors")
    ends = load_file(base), load_file(run / "final.safetensors")
    assert exported.keys() == ends[1].keys()
    for name, tensor in exported.items():
        assert torch.equal(tensor, (1 - chosen) * ends[0][name] + chosen * ends[1][name]), name


def test_half_way_weights_are_the_naive_mean_of_both_ends(finished_run):
    run, base = finished_run
    base_state = build_model("tiny-vit", weights=base).model.state_dict()
    model = build_model("tiny-vit", weights=run / "final.safetensors").model
    final_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    interpolate_into(model, base_state, final_state, 0.5)
    changed = 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, (base_state[name] + final_state[name]) / 2), name
        changed += not torch.equal(base_state[name], final_state[name])
    assert changed > 10  # fine-tuning moved the weights
    interpolate_into(model, base_state, final_state, 0.0)
    assert all(torch.equal(t, base_state[n]) for n, t in model.state_dict().items())


def test_without_select_nothing_is_exported(finished_run, tmp_path, capsys):
    run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("interpolate*", "checkpoints"))
    assert main(["interpolate", str(copy), "--alphas", "1"]) == 0
    out = capsys.readouterr().out
    assert "nothing exported" in out and not (copy / "interpolated.safetensors").exists()
    assert json.loads((copy / "interpolate.json").read_text())["chosen_alpha"] is None


def test_a_random_init_run_has_no_base_one_error_line(finished_run, tmp_path, capsys):
    run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("interpolate*", "checkpoints"))
    records = [json.loads(line) for line in (copy / "log.jsonl").read_text().splitlines()]
    for record in records:
        if record["event"] == "start":
            record["config"]["model"]["weights"] = None
    (copy / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["interpolate", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {copy}: the run started from a random init")
    assert not (copy / "interpolate.json").exists()


@pytest.mark.parametrize(("alphas", "problem"), [("0,1.5", "1.5 is outside [0, 1]"), ("", "'' is not a number"),
                                                 ("0:1", "range '0:1' must be START:STOP:STEP"),
                                                 ("1:0:0.5", "range '1:0:0.5' needs STEP > 0 and STOP >= START")])
def test_bad_alphas_are_one_error_line_before_torch_loads(alphas, problem):
    proc = subprocess.run([sys.executable, "-X", "importtime", "run.py", "interpolate", "no-such-run", "--alphas",
                           alphas], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: --alphas {alphas!r}: {problem}"), lines
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "open_clip"}


def test_alpha_grammar():
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("0:1:0.1")[3] == 0.3 and len(parse_alphas("0:1:0.1")) == 11
    assert parse_alphas("1, 0.5,0:0.5:0.5") == [0.0, 0.5, 1.0]


def test_help_loads_no_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", "run.py", "interpolate", "--help"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert "--select TASK/METRIC" in proc.stdout and not imported & {"torch", "deepspeed", "open_clip"}


@pytest.mark.parametrize(("select", "problem"), [("nope/acc1", "not a task of the run's evaluation"),
                                                 ("val/acc1", "headline metric 'val/acc1' not found")])
def test_select_naming_no_metric_of_the_tasks_is_one_error_line(finished_run, tmp_path, capsys, select, problem):
    run, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("interpolate*", "checkpoints"))
    assert main(["interpolate", str(copy), "--alphas", "0", "--select", select]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --select {select}: ") and problem in err[0], err
    assert not (copy / "interpolated.safetensors").exists() and not (copy / "interpolate.json").exists()


def test_out_without_select_or_suffix_is_refused_before_evaluating(finished_run, capsys):
    run, _ = finished_run
    assert main(["interpolate", str(run), "--out", str(run / "mix.safetensors")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out {run / 'mix.safetensors'}: only --select exports")
    assert main(["interpolate", str(run), "--select", "val/mean_recall@1", "--out", str(run / "mix.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_run_interpolate_in_a_tune_job_reproduces_both_ends_and_exports_the_validation_choice(shards, tmp_path,
                                                                                             capsys):
    run, _ = fine_tune(shards, tmp_path, "run.interpolate=0:1:0.5", "run.interpolate_select=val/mean_recall@1")
    out = capsys.readouterr().out
    written = json.loads((run / "interpolate.json").read_text())
    rows = {row["alpha"]: row["results"] for row in written["evaluations"]}
    assert sorted(rows) == [0.0, 0.5, 1.0]
    start, final = evals(run)[0], evals(run)[-1]
    assert rows[0.0] == start["results"] and rows[1.0] == final["results"]  # exactly the job's own evaluations
    assert rows[0.0] != rows[1.0]
    # Training results were on disk first; the choice is made on the validation task only.
    assert (run / "final.safetensors").exists() and (run / "summary.json").exists()
    scores = [rows[a]["val"]["mean_recall@1"] for a in (0.0, 0.5, 1.0)]
    chosen = (0.0, 0.5, 1.0)[scores.index(max(scores))]
    assert written["select"] == "val/mean_recall@1" and written["chosen_alpha"] == chosen
    assert f"chose a = {chosen:g}" in out and (run / "interpolated.safetensors").exists()


def test_run_interpolate_in_a_two_rank_fsdp_job_runs_on_rank_0_alone_and_reproduces_both_ends(shards, tmp_path):
    args, run, _ = finetune_args(shards, tmp_path, "run.backend=fsdp", "run.interpolate=0,1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "run.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["alpha"]: row["results"] for row in json.loads((run / "interpolate.json").read_text())["evaluations"]}
    start, final = evals(run)[0], evals(run)[-1]
    assert rows[0.0] == start["results"] and rows[1.0] == final["results"] and rows[0.0] != rows[1.0]
    assert proc.stdout.count("wrote " + str(run / "interpolate.json")) == 1  # rank 0 only


@pytest.mark.parametrize(("settings", "problem"), [
    (["run.interpolate=0:1"], "run.interpolate '0:1': range '0:1' must be START:STOP:STEP"),
    (["run.interpolate_select=val/acc1"], "run.interpolate_select 'val/acc1' needs run.interpolate"),
    (["run.interpolate=0,1", "run.interpolate_select=nope/acc1"],
     "run.interpolate_select 'nope/acc1': not an evaluation task; use TASK/METRIC with TASK one of val"),
    (["run.interpolate=0,1", "model.weights=null"], "run.interpolate needs base weights (model.weights)"),
    (["run.interpolate=0,1", "eval.retrieval=[]"], "run.interpolate needs evaluation tasks"),
])
def test_run_interpolate_settings_are_checked_with_the_config(tmp_path, settings, problem):
    from engine.config import load_config

    base = tmp_path / "base.safetensors"
    export_weights(build_model("tiny-vit", seed=5).model, base)
    job = {"model": {"name": "tiny-vit", "weights": str(base)},
           "eval": {"retrieval": [{"name": "val", "csv": str(render_retrieval_task(tmp_path, num_images=2, seed=1))}]}}
    with pytest.raises(ValueError, match="invalid configuration") as caught:
        load_config(base=job, overrides=settings, training=False)
    assert problem in str(caught.value)
