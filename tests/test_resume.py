"""Checkpoints: atomic saves, exact resume (in-process crash and SIGKILL), OSR reuse, bad-step guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import CheckpointWriteError, is_complete, required_folders
from engine.config import load_config
from engine.objectives.table import UTable
from engine.run.log import read_jsonl
from engine.run.preemption import EXIT_PREEMPTED
from engine.trainer import Trainer
from tests.helpers.jobs import crash_after as crash_after_steps
from tests.helpers.jobs import job as base_job
from tests.helpers.planted import Planted

ROOT = Path(__file__).resolve().parents[1]





def job(shards, out, **run):
    return base_job(shards, out, run={"epochs": 2, "save_every_steps": 2, "keep_last_n": 2, **run})


def final_state(out: Path, shards: Path) -> dict:
    """Weights, u table rows and Adam moments/step of a finished run."""
    weights = load_file(out / "final.safetensors")
    table = UTable.open(out / "u_table")
    rows = torch.arange(table.num_rows)
    log_u_x, log_u_z, seen = table.read(rows)
    latest = max(p for p in (out / "checkpoints").glob("step_*") if is_complete(p))
    optim = torch.load(latest / "backend" / "optim.pt", weights_only=True)["optimizer"]
    return {"weights": weights, "u": (log_u_x, log_u_z, seen, table.visits(rows)), "optim": optim}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key
    for x, y in zip(a["u"], b["u"]):
        assert torch.equal(x, y)
    for pid, state in a["optim"]["state"].items():
        other = b["optim"]["state"][pid]
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name], other[name]), (pid, name)


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    trainer = Trainer(load_config(base=job(shards, out)))
    trainer.tune()
    trainer.close()
    return final_state(out, shards)


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("crash_after", [3, 7, 13])  # inside OSR (6 steps), right after its end, in fine-tuning
def test_resume_after_crash_matches_straight_run(shards, tmp_path, straight_run, crash_after):
    """The u table's checkpoints are a full base every 8 saves and deltas between (step 6 is saved twice, the
    second a base, replacing a delta: a compaction): crashed after 3 steps it resumes from a base (step 2), after 7
    from that new base, after 13 from a delta on the deltas of steps 10 and 8 on the base of step 6, which the
    purge (keep_last_n=2) kept trimmed to the u table's files."""
    trainer = Trainer(load_config(base=job(shards, tmp_path)))
    crash_after_steps(trainer, crash_after, Crash("simulated failure"))
    with pytest.raises(Crash):
        trainer.tune()
    trainer.close()
    folders = {f.name: sorted(p.name for p in f.iterdir()) for f in (tmp_path / "checkpoints").glob("step_*")}
    whole = ["COMPLETE", "backend", "normaliser", "ranks", "state.json"]
    assert folders == {3: {"step_00000002": whole}, 7: {
        "step_00000002": ["COMPLETE", "normaliser"], "step_00000004": whole, "step_00000006": whole}, 13: {
        "step_00000006": ["COMPLETE", "normaliser"], "step_00000008": ["COMPLETE", "normaliser"],
        "step_00000010": whole, "step_00000012": whole}}[crash_after]
    resumed = Trainer(load_config(base=job(shards, tmp_path, resume="latest")))
    assert resumed.global_step == (crash_after // 2) * 2  # the last checkpoint before the crash
    chain = sorted(required_folders(tmp_path / "checkpoints" / f"step_{resumed.global_step:08d}"))
    assert chain == ([] if crash_after < 13 else ["step_00000006", "step_00000008", "step_00000010"])
    resumed.tune()
    resumed.close()
    assert_same_state(final_state(tmp_path, shards), straight_run)


def test_a_checkpoint_written_before_terms_policy_and_new_fields_resumes_exactly(shards, tmp_path, straight_run):
    """A checkpoint of an earlier version of the engine: no `objective` / `eval_policy` parts (the margin and the
    best-so-far in the train state) and none of the config fields added since: it resumes, the new fields taking
    the defaults the old run had, and ends as the straight run."""
    trainer = Trainer(load_config(base=job(shards, tmp_path)))
    crash_after_steps(trainer, 9, Crash("simulated failure"))
    with pytest.raises(Crash):
        trainer.tune()
    trainer.close()
    latest = max(p for p in (tmp_path / "checkpoints").glob("step_*") if is_complete(p))
    state = json.loads((latest / "state.json").read_text())
    train = state["train_state"]
    train["margin"] = state.pop("objective")["contrastive"]["margin"]
    train.update(state.pop("eval_policy"))
    for section, key in (("loss", "terms"), ("loss", "normaliser"), ("run", "plugins"), ("run", "save_every_epochs")):
        del train["config"][section][key]
    (latest / "state.json").write_text(json.dumps(state))
    marker = json.loads((latest / "COMPLETE").read_text())  # the sizes of the files as written
    marker["files"]["state.json"] = (latest / "state.json").stat().st_size
    (latest / "COMPLETE").write_text(json.dumps(marker))
    resumed = Trainer(load_config(base=job(shards, tmp_path, resume="latest")))
    assert resumed.global_step == 8  # this very checkpoint
    assert resumed.objective.term("contrastive").margin == train["margin"]
    resumed.tune()
    resumed.close()
    assert_same_state(final_state(tmp_path, shards), straight_run)


def test_crash_during_save_keeps_previous_checkpoint(shards, tmp_path):
    trainer = Trainer(load_config(base=job(shards, tmp_path)))
    trainer.cfg.run.max_steps_per_epoch = 0
    trainer.tune(finetune=False)  # OSR: checkpoints at steps 2, 4, 6 (+ end of OSR)
    before = (tmp_path / "checkpoints" / "latest").read_text()

    def broken_copy(directory):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "u_table.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    trainer.normaliser.table.copy_to = broken_copy
    with pytest.raises(CheckpointWriteError) as info:
        trainer.save_checkpoint()
    trainer.close()
    message = str(info.value)
    for expected in ("No space left on device", "bytes free", f"{before.strip()} is intact", "--resume latest"):
        assert expected in message
    assert (tmp_path / "checkpoints" / "latest").read_text() == before
    assert not list((tmp_path / "checkpoints").glob(".partial-*"))  # the half-written save is gone
    resumed = Trainer(load_config(base=job(shards, tmp_path, resume="latest")))
    assert resumed.stage == "finetune" and resumed.stage_step == 0
    resumed.close()


def test_osr_statistics_reused_by_another_run_and_refused_for_another_margin(shards, tmp_path):
    osr = Trainer(load_config(base=job(shards, tmp_path / "osr")))
    osr.tune(finetune=False)
    osr_ckpt = osr.checkpoints.find("latest")
    moments = osr.backend.full_moments()
    num_seen = osr.normaliser.table.num_seen()
    osr.close()

    sweep = job(shards, tmp_path / "lr_sweep")
    sweep["optim"]["lr"] = 5e-4
    sweep["osr"]["load_from"] = str(osr_ckpt)
    reuse = Trainer(load_config(base=sweep))
    assert reuse.stage == "finetune" and reuse.backend.optimizer_step_count() == 6
    for name, (m, v) in reuse.backend.full_moments().items():
        assert torch.equal(m, moments[name][0]) and torch.equal(v, moments[name][1])
    assert reuse.normaliser.table.num_seen() == num_seen > 0
    reuse.close()

    other = job(shards, tmp_path / "other_margin")
    other["loss"] = {"margin": 0.3}
    other["osr"]["load_from"] = str(osr_ckpt)
    with pytest.raises(ValueError, match="loss.margin"):
        Trainer(load_config(base=other))


def test_resume_refuses_changed_config(shards, tmp_path):
    trainer = Trainer(load_config(base=job(shards, tmp_path)))
    trainer.tune(finetune=False)
    trainer.close()
    changed = job(shards, tmp_path, resume="latest")
    changed["loss"] = {"margin": 0.5}
    with pytest.raises(ValueError, match="loss.margin"):
        Trainer(load_config(base=changed))


def test_non_finite_steps_are_skipped_then_abort(shards, tmp_path):
    trainer = Trainer(load_config(base=job(shards, tmp_path, max_bad_steps=3, save_every_steps=0)))
    model = trainer.backend.model
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.visual.conv1.weight.fill_(float("nan"))
    w0["visual.conv1.weight"] = model.visual.conv1.weight.clone()
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps"):
        trainer.tune()
    assert trainer.global_step == 0 and trainer.backend.optimizer_step_count() == 0
    assert trainer.normaliser.table.num_seen() == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, w0[key]) or torch.isnan(value).all(), key
    trainer.close()


def test_non_finite_gradient_with_finite_loss_is_never_applied_nor_saved_and_resume_may_lower_lr(shards, tmp_path):
    """The loss is finite but the gradient is not (what made weights NaN and got checkpointed before):
    the update is not applied, nothing is saved after it, and the abort's advice (resume with a lower
    lr) is accepted."""
    trainer = Trainer(load_config(base=job(shards, tmp_path, max_bad_steps=2)))
    backend = trainer.backend
    original_backward = backend.backward
    poisoned = {"from_step": 9}  # OSR is 6 steps; poison fine-tuning from its 3rd step on

    def backward(loss):
        original_backward(loss)
        if trainer.global_step + 1 >= poisoned["from_step"]:
            next(p for p in backend.model.parameters() if p.grad is not None).grad.fill_(float("inf"))

    backend.backward = backward
    with pytest.raises(FloatingPointError, match="--resume latest --lr"):
        trainer.tune()
    assert trainer.global_step == 8 and backend.optimizer_step_count() == 8
    assert backend.state_finite()  # never applied: weights and moments stay finite
    trainer.close()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000008"

    lower = job(shards, tmp_path, max_bad_steps=2, resume="latest")
    lower["optim"]["lr"] = 1e-4
    resumed = Trainer(load_config(base=lower))
    assert resumed.global_step == 8
    resumed.tune()
    resumed.close()
    changed = [r for r in read_jsonl(tmp_path / "log.jsonl") if r["event"] == "schedule_changed"]
    assert changed and changed[0]["changes"] == ["optim.lr: 0.001 -> 0.0001"]
    assert torch.isfinite(torch.stack([v.float().sum() for v in load_file(tmp_path / "final.safetensors").values()])).all()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_signal_during_training_then_resume_matches_straight_run(shards, tmp_path, straight_run, stop):
    """A real SIGKILL (no chance to clean up) or SIGTERM (preemption: checkpoint, exit 75) mid-run,
    then `--resume latest` from the CLI."""
    args = [sys.executable, "run.py", "tune", "--train", str(shards), "--out", str(tmp_path), "--batch-size", "8",
            "--lr", "1e-3", "--epochs", "2", "--osr-epochs", "1", "--set", "eval.at_start=false",
            "--set", "data.shuffle_buffer=8", "--set", "run.progress=false", "--save-every", "2",
            "--set", "run.log_every=1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step_00000008":
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, stop)
    proc.wait(timeout=120)
    assert not (tmp_path / "final.safetensors").exists()
    if stop == signal.SIGTERM:  # stopped at a step boundary with a checkpoint of exactly that step
        assert proc.returncode == EXIT_PREEMPTED
        records = read_jsonl(tmp_path / "log.jsonl")
        stopped = [r for r in records if r["event"] == "preempted"]
        last_step = max(r["step"] for r in records if r["event"] == "step")
        assert len(stopped) == 1 and stopped[0]["step"] == last_step and stopped[0]["reason"] == "SIGTERM"
        assert latest.read_text().strip() == f"step_{last_step:08d}"
    subprocess.run(args + ["--resume", "latest"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert_same_state(final_state(tmp_path, shards), straight_run)


def test_fresh_run_refuses_a_folder_with_checkpoints_and_forgets_a_killed_runs_table(shards, tmp_path):
    # Killed before its first checkpoint: the live u table has rows, no checkpoint exists.
    early = Trainer(load_config(base=job(shards, tmp_path / "early", save_every_steps=0)))
    early.cfg.run.max_steps_per_epoch = 1
    early.osr()  # one OSR step, no checkpoint
    assert early.normaliser.table.num_seen() > 0 and not early.checkpoints.has_checkpoints()
    early.close()
    again = Trainer(load_config(base=job(shards, tmp_path / "early")))
    assert again.normaliser.table.num_seen() == 0  # a fresh run starts from an empty table
    again.close()
    # A folder with checkpoints is never silently reused by a fresh run.
    done = Trainer(load_config(base=job(shards, tmp_path / "done")))
    done.tune(finetune=False)
    done.close()
    with pytest.raises(ValueError, match="--resume latest"):
        Trainer(load_config(base=job(shards, tmp_path / "done")))


def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(shards, tmp_path):
    trainer = Trainer(load_config(base=job(shards, tmp_path, keep_last_n=3)))
    trainer.tune(finetune=False)  # checkpoints at steps 2, 4, 6 (6 saved twice: end of OSR)
    trainer.close()
    folders = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert [f.name for f in folders] == ["step_00000002", "step_00000004", "step_00000006"]
    assert not list((tmp_path / "checkpoints").glob(".old-*"))
    optim = folders[-1] / "backend" / "optim.pt"
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    resumed = Trainer(load_config(base=job(shards, tmp_path, resume="latest", keep_last_n=3)))
    assert resumed.global_step == 4 and resumed.stage == "osr"
    resumed.close()
    with pytest.raises(FileNotFoundError, match="optim.pt has"):
        Trainer(load_config(base=job(shards, tmp_path, resume=str(folders[-1]), keep_last_n=3)))


def test_checkpoint_of_another_model_and_indivisible_batch_are_refused(shards, tmp_path, monkeypatch):
    trainer = Trainer(load_config(base=job(shards, tmp_path)))
    trainer.tune(finetune=False)
    trainer.close()
    other = job(shards, tmp_path, resume="latest")
    other["model"] = {"name": "tiny-vit-quickgelu"}
    with pytest.raises(ValueError, match="model 'tiny-vit-quickgelu' != checkpoint's 'tiny-vit'"):
        Trainer(load_config(base=other))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="not divisible by the 3 ranks"):
        Trainer(load_config(base={**job(shards, tmp_path / "three"), "run": {"backend": "deepspeed"}}))


def test_code_planted_in_a_single_process_checkpoint_never_runs(shards, tmp_path):
    trainer = Trainer(load_config(base=job(shards, tmp_path, max_steps_per_epoch=2)))
    trainer.tune(finetune=False)
    trainer.close()
    latest = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "ran"
    optim = latest / "backend" / "optim.pt"
    torch.save({"optimizer": Planted(str(marker))}, optim)
    complete = json.loads((latest / "COMPLETE").read_text())  # same size: only the content is bad
    complete["files"]["backend/optim.pt"] = optim.stat().st_size
    (latest / "COMPLETE").write_text(json.dumps(complete))
    with pytest.raises(ValueError, match="could not be loaded"):
        Trainer(load_config(base=job(shards, tmp_path, max_steps_per_epoch=2, resume="latest")))
    assert not marker.exists()
