"""Bad environments, requests and tampered inputs end in one `error:` line (exit 2), no traceback, nothing
written: an output folder the OS refuses, the DeepSpeed backend started without a launcher, a symlinked run
sub-folder, a demo folder that is not the demo's, bad YAML, damaged checkpoint metadata, a checkpoint folder
trimmed to the u table chain, an endless CSV field, a folder named like a DeepSpeed shared-memory buffer, a
misspelt metric, a resume or a fresh run that would replace a run's results unasked, an unknown option or an
open_clip_train value without an equivalent."""

import contextlib
import errno
import json
import os
import pathlib
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main
from tests.helpers.images import png_bytes

JOB = ["--model", "tiny-vit", "--batch-size", "8", "--epochs", "1", "--osr-epochs", "1",
       "--set", "run.progress=false", "--set", "eval.at_start=false"]


@pytest.fixture(scope="module")
def osr_run(shards, tmp_path_factory):
    """A finished `run.py osr` folder (margin auto, one complete checkpoint); tests tamper with copies."""
    out = tmp_path_factory.mktemp("osr") / "run"
    assert main(["osr", "--train", str(shards), "--out", str(out), *JOB, "--margin", "auto"]) == 0
    return out


def copy_run(osr_run, tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(osr_run, tmp_path / "run", symlinks=True))


def tamper_state(step: pathlib.Path, change) -> None:
    """Rewrite `step`'s state.json through `change(state)` and fix its size in COMPLETE, as a forger would."""
    state = json.loads((step / "state.json").read_text())
    change(state)
    (step / "state.json").write_text(json.dumps(state))
    complete = json.loads((step / "COMPLETE").read_text())
    complete["files"]["state.json"] = (step / "state.json").stat().st_size
    (step / "COMPLETE").write_text(json.dumps(complete))


def tree(folder: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


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


def test_demo_overwrite_refuses_a_folder_no_demo_wrote(tmp_path, capsys):
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["demo", "--quick", "--out", str(mine), "--overwrite"]) == 2
    assert error_lines(capsys) == [(
        f"error: --out {mine} holds no .tuneclip-demo file, so no demo wrote it; --overwrite replaces only a "
        "demo's folder: nothing was deleted; pick another --out"
    )]
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]  # nothing deleted, no lock file written


def test_demo_overwrite_takes_the_run_lock_first(tmp_path, capsys, monkeypatch):
    import engine.demo.experiment
    from engine.distributed import DistContext
    from engine.run.lock import RunLock

    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / ".tuneclip-demo").write_text("{}")
    (demo / "summary.json").write_text("{}")
    (demo / "runs").mkdir()
    holder = RunLock(demo, DistContext())  # a demo still running in this folder
    assert main(["demo", "--quick", "--out", str(demo), "--overwrite"]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"error: run.out_dir {demo} is in use by job {holder.run_id} ")
    assert (demo / "summary.json").exists() and (demo / "runs").is_dir()
    holder.release()
    ran = []
    monkeypatch.setattr(engine.demo.experiment, "_run", lambda root, sizes, **_: ran.append(root) or {})
    assert main(["demo", "--quick", "--out", str(demo), "--overwrite"]) == 0
    assert ran == [demo] and not (demo / "summary.json").exists() and not (demo / "runs").exists()
    assert (demo / ".tuneclip-demo").is_file()


def test_symlinked_run_sub_folder_is_refused_at_start(shards, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    (out / "u_table").symlink_to(elsewhere)
    assert main(["tune", "--train", str(shards), "--out", str(out), *JOB]) == 2
    assert error_lines(capsys) == [(
        f"error: run.out_dir {out}: u_table is a symbolic link (to {elsewhere}); a run never writes through links: "
        "replace it with a real folder or file, or pick another --out (nothing was written)"
    )]
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["u_table"]


def test_symlinked_u_table_is_refused_on_resume_and_never_written_through(osr_run, shards, tmp_path, capsys):
    run = copy_run(osr_run, tmp_path)
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "u_table").rename(elsewhere / "u_table")
    (run / "u_table").symlink_to(elsewhere / "u_table")
    before = {p.name: p.read_bytes() for p in (elsewhere / "u_table").iterdir()}
    log = (run / "log.jsonl").read_bytes()
    assert main(["tune", "--train", str(shards), "--out", str(run), *JOB, "--margin", "auto",
                 "--resume", "latest"]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"error: run.out_dir {run}: u_table is a symbolic link (to {elsewhere / 'u_table'})")
    assert {p.name: p.read_bytes() for p in (elsewhere / "u_table").iterdir()} == before
    assert (run / "log.jsonl").read_bytes() == log


def test_symlink_inside_the_checkpoints_is_refused_on_resume(osr_run, shards, tmp_path, capsys):
    run = copy_run(osr_run, tmp_path)
    capsys.readouterr()
    step = next((run / "checkpoints").glob("step_*"))
    (step / "normaliser" / "u_table.bin").rename(tmp_path / "u_table.bin")
    (step / "normaliser" / "u_table.bin").symlink_to(tmp_path / "u_table.bin")
    assert main(["tune", "--train", str(shards), "--out", str(run), *JOB, "--margin", "auto",
                 "--resume", "latest"]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"error: run.out_dir {run}: checkpoints/{step.name}/normaliser/u_table.bin is a "
                           "symbolic link")


def test_config_file_with_bad_yaml(shards, tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("run:\n  epochs: [1, 2\n")
    out = tmp_path / "run"
    assert main(["tune", "--config", str(config), "--train", str(shards), "--out", str(out)]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"error: config file {config} is not valid YAML (") and line.endswith("; fix the file")
    assert "line 3, column 1" in line and not out.exists()


def test_eval_tasks_file_with_bad_yaml(tmp_path, capsys):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("zeroshot:\n  - {name: x, csv: a.csv\n")
    assert main(["eval", "--model", "tiny-vit", "--tasks", str(tasks), "--out", str(tmp_path / "out")]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"error: --tasks {tasks} is not valid YAML (") and line.endswith("; fix the file")
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_train_state(osr_run, shards, tmp_path, capsys):
    run = copy_run(osr_run, tmp_path)
    step = next((run / "checkpoints").glob("step_*"))
    tamper_state(step, lambda state: state.pop("train_state"))
    capsys.readouterr()
    before = tree(run)
    expected = (f"error: {step / 'state.json'} holds no train_state part naming its model: not a checkpoint this "
                "engine wrote; use another step_* folder")
    assert main(["tune", "--train", str(shards), "--out", str(run), *JOB, "--margin", "auto",
                 "--resume", str(step)]) == 2
    assert error_lines(capsys) == [expected]
    (tmp_path / "a.png").write_bytes(png_bytes((200, 30, 30)))
    (tmp_path / "pairs.csv").write_text("filepath,caption\na.png,a red square\n")
    assert main(["eval", "--model", "tiny-vit", "--weights", str(step), "--set",
                 f"eval.retrieval=[{{name: r, csv: {tmp_path / 'pairs.csv'}}}]"]) == 2
    assert error_lines(capsys) == [expected]
    def kept(files):  # the run's log and its lock (taken, then released, by the resume) may change
        return {k: v for k, v in files.items() if k != "log.jsonl" and not k.startswith(".run.")}

    assert kept(tree(run)) == kept(before)


def test_complete_marker_holding_a_list(osr_run, shards, tmp_path, capsys):
    run = copy_run(osr_run, tmp_path)
    step = next((run / "checkpoints").glob("step_*"))
    (step / "COMPLETE").write_text('{"files": []}')
    capsys.readouterr()
    assert main(["tune", "--train", str(shards), "--out", str(run), *JOB, "--margin", "auto",
                 "--resume", str(step)]) == 2
    assert error_lines(capsys) == [(
        f"error: {step} is not a usable checkpoint (unreadable COMPLETE marker (not a mapping of the folder's file "
        "names to sizes)); resume from `latest` or an earlier step_* folder"
    )]
    assert step.is_dir() and (step / "COMPLETE").read_text() == '{"files": []}'


def test_non_numeric_margin_in_the_statistics_of_osr_from(osr_run, shards, tmp_path, capsys):
    run = copy_run(osr_run, tmp_path)
    step = next((run / "checkpoints").glob("step_*"))
    tamper_state(step, lambda state: state["objective"]["contrastive"].update(margin="wide"))
    capsys.readouterr()
    before = tree(run)
    out = tmp_path / "finetune"
    assert main(["finetune", "--train", str(shards), "--out", str(out), *JOB, "--margin", "auto",
                 "--osr-from", str(step)]) == 2
    assert error_lines(capsys) == [(
        f"error: {step / 'state.json'}: objective.contrastive.margin is 'wide', not a number >= 0 or null: not a "
        "checkpoint this engine wrote; use another step_* folder"
    )]
    assert tree(run) == before and not (out / "checkpoints").exists()


def test_csv_field_over_the_csv_modules_limit(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(png_bytes((200, 30, 30)))
    source = tmp_path / "pairs.csv"
    source.write_text('filepath,caption\na.png,"a caption whose quote is never closed\n' + "x" * 131_073 + "\n")
    assert main(["shards", "build", str(source), str(tmp_path / "shards")]) == 2
    assert error_lines(capsys) == [(
        f"error: {source}:2: a field longer than 131072 characters, usually a quote that is never closed; close "
        "the quote (or shorten the field)"
    )]
    assert not list(tmp_path.glob("shards/*"))
    retrieval = tmp_path / "retrieval.csv"
    retrieval.write_text("filepath,caption\na.png,ok\na.png,\"" + "y" * 131_073 + "\n")
    assert main(["eval", "--model", "tiny-vit", "--set", f"eval.retrieval=[{{name: r, csv: {retrieval}}}]"]) == 2
    assert error_lines(capsys) == [(
        f"error: eval.retrieval[0] 'r': {retrieval}:3: a field longer than 131072 characters, usually a quote that is never closed; "
        "close the quote (or shorten the field)"
    )]


def test_stale_shm_cleanup_removes_only_regular_files(monkeypatch):
    from engine.backends.deepspeed import shm as ds_shm

    prefix = f"{ds_shm.SHM_PREFIX}tuneclip-test-{uuid.uuid4().hex}-"  # named like buffers; only ours match
    monkeypatch.setattr(ds_shm, "SHM_PREFIX", prefix)
    folder, stale = f"{prefix}dir_29500_0", f"{prefix}file_29500_1"
    os.mkdir(folder)
    try:
        with open(stale, "wb") as fh:
            fh.write(b"\0" * 16)
        old = time.time() - 3600
        for path in (folder, stale):
            os.utime(path, (old, old))
        assert ds_shm.remove_stale_shm_buffers() == [stale]
        assert os.path.isdir(folder) and not os.path.exists(stale)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)


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
    """A finished tiny run (OSR 6 steps, fine-tuning 6) with checkpoints every 2 steps (the last two kept), run
    as `run.py tune --out 0123` from its parent folder."""
    parent, cwd = tmp_path_factory.mktemp("finished"), os.getcwd()
    os.chdir(parent)
    try:
        assert main(["tune", "--train", str(shards), "--out", "0123", *JOB, "--save-every", "2"]) == 0
    finally:
        os.chdir(cwd)
    return parent / "0123"


def test_out_written_as_digits_is_the_folder_as_typed(finished_run):
    assert sorted(p.name for p in finished_run.parent.iterdir()) == ["0123"]  # not 83, YAML's octal reading
    assert (finished_run / "final.safetensors").is_file()
    records = [json.loads(line) for line in (finished_run / "log.jsonl").read_text().splitlines()]
    assert next(r for r in records if r["event"] == "start")["config"]["run"]["out_dir"] == "0123"


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
        (f"error: run.out_dir {run} holds a finished run (final.safetensors, summary.json): --resume {step} would rewrite them; add "
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


def test_resume_latest_of_a_finished_run_has_nothing_to_do(finished_run, shards, tmp_path, capsys):
    """A job killed after it wrote its results, relaunched as it was (`--resume latest`): exit 0, nothing changed."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = files(run)
    relaunch = ["tune", "--train", str(shards), "--out", str(run), *JOB, "--save-every", "2", "--resume", "latest"]
    assert main(relaunch) == 0
    assert f"{run} holds a finished run (summary.json): --resume latest has nothing left to do" in capsys.readouterr().out
    assert files(run) == before
    assert main([*relaunch, "--epochs", "3"]) == 2  # more epochs is a change of the finished run: refused as before
    assert "holds a finished run (final.safetensors, summary.json)" in capsys.readouterr().err
    assert files(run) == before


def test_a_folder_trimmed_to_the_u_table_chain_is_refused_as_a_checkpoint(finished_run, shards, tmp_path, capsys):
    """Steps 6 (end of OSR, the u table's base) and 8 are kept only for the deltas of step 10: trimmed to normaliser/,
    they are refused by every command that reads a checkpoint, in one line naming the whole ones."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "summary.json").unlink()  # not finished: the resume reaches the checkpoint
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in (ckpts / "step_00000008").iterdir()) == ["COMPLETE", "normaliser"]
    before = files(run)

    def expected(step):
        return (f"error: {ckpts / step} was trimmed to the u table chain (it keeps only normaliser/, which later "
                "checkpoints' deltas apply on): it cannot be resumed, evaluated, exported or reused; use a whole "
                "checkpoint of that run instead (step_00000010, step_00000012; the newest is `latest`), or for OSR "
                "statistics the last checkpoint of a `run.py osr` run")

    capsys.readouterr()
    step8 = str(ckpts / "step_00000008")
    assert main(["tune", "--train", str(shards), "--out", str(run), *JOB, "--save-every", "2", "--resume", step8]) == 2
    assert error_lines(capsys) == [expected("step_00000008")]
    assert main(["export", "--model", "tiny-vit", "--weights", step8, "--out", str(tmp_path / "w.safetensors")]) == 2
    assert error_lines(capsys) == [expected("step_00000008")]
    (tmp_path / "a.png").write_bytes(png_bytes((200, 30, 30)))
    (tmp_path / "pairs.csv").write_text("filepath,caption\na.png,a red square\n")
    assert main(["eval", "--model", "tiny-vit", "--weights", step8, "--set",
                 f"eval.retrieval=[{{name: r, csv: {tmp_path / 'pairs.csv'}}}]"]) == 2
    assert error_lines(capsys) == [expected("step_00000008")]
    assert main(["finetune", "--train", str(shards), "--out", str(tmp_path / "reuse"), *JOB,
                 "--osr-from", str(ckpts / "step_00000006")]) == 2
    assert error_lines(capsys) == [expected("step_00000006")]
    assert {k: v for k, v in files(run).items() if k.name != "log.jsonl"} == {
        k: v for k, v in before.items() if k.name != "log.jsonl"}
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "reuse" / "checkpoints").exists()


def test_a_run_stopped_inside_its_last_save_resumes_without_overwrite(finished_run, shards, tmp_path):
    """final.safetensors is written before the last checkpoint and summary.json after it: a kill in between
    leaves final.safetensors without summary.json, an unfinished run that --resume latest completes."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    final = load_file(run / "final.safetensors")
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step_00000012")  # the last save never completed
    resume = ["tune", "--train", str(shards), "--out", str(run), *JOB, "--save-every", "2", "--resume", "latest"]
    assert main(resume) == 0
    again = load_file(run / "final.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert json.loads((run / "summary.json").read_text())["cost"]["finetune"]["steps"] == 6


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


def test_unknown_options_and_open_clip_train_values_without_an_equivalent_are_one_error_line(tmp_path, capsys):
    cases = {
        ("tune", "--distill-model", "x", "--train", "x"): "error: unknown option --distill-model; any config field can "
                                                          "be set with --set section.key=value (see run.py tune --help)",
        ("finetune", "--accum-freq=2"): "error: unknown option --accum-freq; any config field can be set with --set "
                                        "section.key=value (see run.py finetune --help)",
        ("export", "--model", "tiny-vit", "--out", "x.safetensors", "--torchcompile"):
            "error: unknown option --torchcompile for run.py export (see run.py export --help)",
        ("tune", "--precision", "amp", "--train", str(tmp_path)):
            "error: --precision amp: 'amp' has no one-to-one equivalent in model.precision; accepted: amp_bf16, "
            "amp_bfloat16, fp32 (or --set the field, see run.py tune --help)",
    }
    for argv, line in cases.items():
        assert main(list(argv)) == 2
        assert capsys.readouterr().err.splitlines() == [line]
    assert not (tmp_path / "x.safetensors").exists()
