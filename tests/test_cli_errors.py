"""Bad environments and requests end in one `error:` line (exit 2), no traceback: an output folder the OS refuses,
the DeepSpeed backend started without a launcher, a misspelt metric, a resume or a fresh run that would replace a
run's results unasked."""

import errno
import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main

JOB = ["--model", "tiny-vit", "--batch-size", "8", "--epochs", "1", "--osr-epochs", "1",
       "--set", "run.progress=false", "--set", "eval.at_start=false"]


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_out_dir_inside_a_file(shards, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "run"
    assert main(["tune", "--train", str(shards), "--out", str(out), *JOB]) == 2
    assert error_lines(capsys) == [f"error: {out}: Not a directory"]


def test_read_only_out_dir(shards, tmp_path, capsys, monkeypatch):
    out = tmp_path / "mounted_read_only"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):  # what a read-only mount answers (root ignores chmod)
        if self == out:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    assert main(["tune", "--train", str(shards), "--out", str(out), *JOB]) == 2
    assert error_lines(capsys) == [
        f"error: {out}: Read-only file system; the filesystem is read-only; pick another --out"
    ]


@pytest.mark.slow
def test_deepspeed_backend_without_a_launcher(shards, tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert main(["tune", "--train", str(shards), "--out", str(tmp_path / "run"), *JOB,
                 "--set", "run.backend=deepspeed"]) == 2
    [line] = error_lines(capsys)
    assert line.startswith("error: run.backend=deepspeed needs a launcher: run under `deepspeed` or `torchrun`")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_background_checkpoints_on_a_backend_that_saves_synchronously(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["tune", "--train", str(shards), "--out", str(out), *JOB, "--set", "run.async_checkpoint=true"]) == 2
    assert error_lines(capsys) == [(
        "error: run.async_checkpoint: run.backend=single writes checkpoints synchronously; use run.backend=fsdp "
        "for background writes or remove run.async_checkpoint"
    )]
    assert not (out / "checkpoints").exists()


def test_typo_in_best_metric_fails_before_anything_loads(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["tune", "--train", str(shards), "--out", str(out), *JOB, "--set", ("eval.retrieval=[{name: pairs, "
                 "csv: pairs.csv}]"), "--set", "eval.best_metric=pairs/mean_recal@1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: invalid configuration:\n")  # one line per problem
    assert ("  - eval.best_metric 'pairs/mean_recal@1' is not a metric of the eval tasks; use '<task>/<metric>', "
            "one of: pairs/image_retrieval_recall@1, ") in err
    assert not out.exists()


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory):
    """A finished tiny run (OSR 6 steps, fine-tuning 6) with checkpoints every 2 steps (the last two kept)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["tune", "--train", str(shards), "--out", str(out), *JOB, "--save-every", "2"]) == 0
    return out


def files(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".run.")}  # the run lock records who last held it


def test_resuming_a_finished_run_is_refused_unless_overwrite_and_its_cost_counts_once(finished_run, shards, tmp_path,
                                                                                      capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    summary = json.loads((run / "summary.json").read_text())
    final = load_file(run / "final.safetensors")
    step = run / "checkpoints" / "step_00000010"  # fine-tuning step 4 of 6
    before = files(run)
    resume = ["tune", "--train", str(shards), "--out", str(run), *JOB, "--save-every", "2", "--resume", str(step)]
    assert main(resume) == 2
    assert error_lines(capsys) == [
        (f"error: run.out_dir {run} holds a finished run (final.safetensors): --resume {step} would rewrite them; add "
        f"--overwrite to continue it and replace them, or evaluate or export its checkpoints instead (--weights {run}"
        "/checkpoints/step_<N>); nothing was changed")]
    assert files(run) == before

    assert main([*resume, "--overwrite"]) == 0
    again = load_file(run / "final.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)  # the same last 2 steps, redone exactly
    cost = json.loads((run / "summary.json").read_text())["cost"]
    first = summary["cost"]["finetune"]["launches"]
    assert [(e["world_size"], e["steps"], e["num_samples"]) for e in first] == [(1, 6, 48)]
    launches = cost["finetune"]["launches"]  # the first launch's part up to step_10 once, then the redone steps
    assert [(e["world_size"], e["steps"], e["num_samples"]) for e in launches] == [(1, 4, 32), (1, 2, 16)]
    assert launches[0]["seconds"] < first[0]["seconds"]
    assert (cost["finetune"]["steps"], cost["finetune"]["num_samples"]) == (6, 48)
    assert cost["finetune"]["seconds"] == pytest.approx(sum(e["seconds"] for e in launches), abs=2e-3)
    assert cost["osr"] == summary["cost"]["osr"]


def test_overwrite_replaces_a_failed_runs_folder_and_nothing_else(shards, tmp_path, capsys, caplog):
    """A run that failed after its base evaluation left its log and eval_step0000000.json: a retry is refused,
    --overwrite removes them (saying so) and runs; a folder this engine did not write is never removed."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"event": "start", "config": {}}) + "\n")
    (run / "eval_step0000000.json").write_text("{}")
    job = ["tune", "--train", str(shards), "--out", str(run), *JOB, "--set", "run.max_steps_per_epoch=1"]
    assert main(job) == 2
    assert "holds an earlier run's eval_step*.json" in error_lines(capsys)[0]
    assert main([*job, "--overwrite"]) == 0
    assert f"--overwrite: removed the earlier run in {run}: eval_step0000000.json, log.jsonl" in caplog.text
    assert not (run / "eval_step0000000.json").exists() and (run / "final.safetensors").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["tune", "--train", str(shards), "--out", str(mine), *JOB, "--overwrite"]) == 2
    assert error_lines(capsys) == [
        (f"error: --overwrite: {mine} is not a run folder of this engine (no log.jsonl beginning with a run's start "
        "record); nothing was removed: remove it yourself or pick another --out")]
    assert (mine / "notes.txt").read_text() == "keep"


def test_resume_with_more_epochs_extends_a_finished_run_and_fewer_are_refused(finished_run, shards, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    final = load_file(run / "final.safetensors")
    resume = ["tune", "--train", str(shards), "--out", str(run), *JOB, "--save-every", "2", "--resume", "latest",
              "--overwrite", "--set", "run.log_every=1"]
    assert main([*resume, "--epochs", "2"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    [extended] = [r for r in log if r["event"] == "epochs_extended"]
    assert (extended["from"], extended["to"], extended["stage_step"]) == (1, 2, 6)
    lr = log[0]["config"]["optim"]["lr"]
    assert extended["lr_before"] == 0.0 and extended["lr_after"] == pytest.approx(0.5 * lr)  # cosine over 12 steps
    resumed = log[next(i for i, r in enumerate(log) if r["event"] == "epochs_extended"):]
    assert [r["stage_step"] for r in resumed if r["event"] == "step"] == list(range(7, 13))
    assert not all(torch.equal(a, b) for a, b in zip(final.values(), load_file(run / "final.safetensors").values()))

    capsys.readouterr()
    assert main([*resume, "--epochs", "1"]) == 2
    [line] = [text for text in capsys.readouterr().err.splitlines() if "run.epochs" in text]
    assert line == ("  - config run.epochs: checkpoint has 2, this job 1: a resumed run may add epochs, not remove "
                    "them (to stop earlier, use a checkpoint's weights)")
