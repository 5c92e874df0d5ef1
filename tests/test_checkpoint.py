"""CheckpointManager: exact round trip of every kind of part, complete-only resume, purge, refusals."""

import copy
import json
import os

import pytest

from engine.checkpoint import (
    COMPLETE,
    LATEST,
    OSR_DEFINING_KEYS,
    RESUME_FREE_KEYS,
    STATE,
    CheckpointManager,
    CheckpointWriteError,
    checkpoint_problems,
    has_checkpoints,
    resume_conflicts,
    schedule_changes,
)
from engine.config import JobConfig
from engine.distributed import DistContext

# ----- toy parts -----

class JsonPart:
    """Only state_dict / load_state_dict: kept in state.json."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"value": copy.deepcopy(self.value)}

    def load_state_dict(self, state):
        self.value = copy.deepcopy(state["value"])


class FolderPart:
    """Only save(directory) / load(directory, reshard=): its own folder."""

    def __init__(self, payload: bytes, *, fail_on_save=False):
        self.payload = payload
        self.fail_on_save = fail_on_save
        self.loads = []  # the reshard flag of every load

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "blob.bin").write_bytes(self.payload)
        if self.fail_on_save:
            raise RuntimeError("crash while saving")

    def load(self, directory, *, reshard=False):
        self.payload = (directory / "blob.bin").read_bytes()
        self.loads.append(reshard)


class BothPart(JsonPart):
    """Both interfaces (like the normaliser): a folder and a state.json entry."""

    def __init__(self, value, rows):
        super().__init__(value)
        self.rows = rows
        self.loads = []

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rows.json").write_text(json.dumps(self.rows))

    def load(self, directory, *, reshard=False):
        self.rows = json.loads((directory / "rows.json").read_text())
        self.loads.append(reshard)


class TrainState(JsonPart):
    """The part that describes the job: its state_dict is the job description itself."""

    def state_dict(self):
        return copy.deepcopy(self.value)

    def load_state_dict(self, state):
        self.value = copy.deepcopy(state)


def job(**changes):
    """A train_state value; `changes` override top-level keys or, as "section.key", config fields."""
    config = JobConfig().to_dict()
    config["data"]["train"] = "/data/shards"
    state = {"manifest_fingerprint": "manifest-1", "model": "tiny-vit", "world_size": 1, "config": config,
             "stage": "finetune", "stage_step": 7, "osr_surrogate": "hgcl", "global_step": 12, "data_epoch": 1,
             "osr_steps": 5, "num_bad_steps": 0, "best_score": None, "best_step": None, "margin": 0.1}
    for key, value in changes.items():
        if "." in key:
            section, field = key.split(".")
            state["config"][section][field] = value
        else:
            state[key] = value
    return state


def make_parts(seed: int, *, state=None, fail_on_save=False):
    """A full set of parts whose values all depend on `seed`."""
    parts = {
        "train_state": TrainState(state if state is not None else job()),
        "schedule": JsonPart({"epoch": seed, "lr": 0.1 * seed, "history": [seed, seed + 1]}),
        "backend": FolderPart(bytes([seed % 256]) * (100 + seed), fail_on_save=fail_on_save),
        "normaliser": BothPart({"epochs": seed}, {"row": [seed, -seed]}),
    }
    rank_parts = {"data": JsonPart({"position": 1000 + seed, "skipped": [seed]})}
    return parts, rank_parts


def manager(root, parts, rank_parts, *, ctx=None, keep_last_n=2):
    return CheckpointManager(root, ctx or DistContext(), parts=parts, rank_parts=rank_parts, keep_last_n=keep_last_n)


def snapshot(parts, rank_parts):
    """Every value held by the parts (to check that nothing changed)."""
    return {
        "train_state": parts["train_state"].value, "schedule": parts["schedule"].value,
        "backend": parts["backend"].payload, "backend_loads": list(parts["backend"].loads),
        "normaliser": (parts["normaliser"].value, parts["normaliser"].rows, list(parts["normaliser"].loads)),
        "data": rank_parts["data"].value,
    }


def step_folders(root):
    return sorted(p.name for p in root.iterdir() if p.name != LATEST)


# ----- round trip -----

def test_save_then_load_restores_every_part_exactly(tmp_path):
    root = tmp_path / "checkpoints"
    parts, rank_parts = make_parts(5)
    assert not has_checkpoints(root)
    folder = manager(root, parts, rank_parts).save(42)
    assert folder == root / "step_00000042"
    assert has_checkpoints(root) and checkpoint_problems(folder) == []
    assert (root / LATEST).read_text().strip() == "step_00000042"
    assert (folder / "backend" / "blob.bin").exists() and (folder / "normaliser" / "rows.json").exists()
    assert (folder / "ranks" / "data" / "rank_00000.json").exists()
    state = json.loads((folder / STATE).read_text())
    assert set(state) == {"train_state", "schedule", "normaliser", "step"}  # folder-only parts are not in it

    fresh, fresh_ranks = make_parts(9)
    assert snapshot(fresh, fresh_ranks) != snapshot(parts, rank_parts)
    loader = manager(root, fresh, fresh_ranks)
    assert loader.has_checkpoints()
    saved = loader.load("latest")
    assert saved["step"] == 42 and saved["path"] == str(folder)
    assert saved["schedule"] == parts["schedule"].state_dict()
    assert fresh["schedule"].value == {"epoch": 5, "lr": 0.5, "history": [5, 6]}
    assert fresh["backend"].payload == bytes([5]) * 105 and fresh["backend"].loads == [False]
    assert fresh["normaliser"].value == {"epochs": 5} and fresh["normaliser"].rows == {"row": [5, -5]}
    assert fresh["normaliser"].loads == [False]
    assert fresh_ranks["data"].value == {"position": 1005, "skipped": [5]}
    assert fresh["train_state"].value == parts["train_state"].value

    # Loading a folder by path works the same way.
    other, other_ranks = make_parts(11)
    manager(tmp_path / "elsewhere", other, other_ranks).load(str(folder))
    assert other["schedule"].value == parts["schedule"].value and other_ranks["data"].value["position"] == 1005


# ----- only complete checkpoints are found -----

def test_incomplete_or_damaged_folders_are_skipped_by_latest(tmp_path):
    root = tmp_path / "ck"
    saves = {}
    for step in (1, 2, 3, 4):
        parts, rank_parts = make_parts(step)
        saves[step] = manager(root, parts, rank_parts, keep_last_n=10).save(step)
    probe_parts, probe_ranks = make_parts(0)
    probe = manager(root, probe_parts, probe_ranks)
    assert probe.find("latest") == saves[4]

    # Step 4 lost its marker (interrupted before it was written): skipped.
    (saves[4] / COMPLETE).unlink()
    assert checkpoint_problems(saves[4]) == ["no COMPLETE marker (interrupted while saving)"]
    assert probe.find("latest") == saves[3]
    # Step 3 has a truncated file: skipped too.
    blob = saves[3] / "backend" / "blob.bin"
    size = blob.stat().st_size
    blob.write_bytes(blob.read_bytes()[: size // 2])
    assert checkpoint_problems(saves[3]) == [f"backend/blob.bin has {size // 2} bytes, {size} were written"]
    assert probe.find("latest") == saves[2]
    # Step 2 misses a file.
    (saves[2] / "ranks" / "data" / "rank_00000.json").unlink()
    assert checkpoint_problems(saves[2]) == ["ranks/data/rank_00000.json is missing"]
    assert probe.find("latest") == saves[1]

    saved = probe.load("latest")
    assert saved["step"] == 1 and probe_parts["schedule"].value["epoch"] == 1
    assert probe_parts["backend"].payload == bytes([1]) * 101 and probe_ranks["data"].value["position"] == 1001
    # Asking for a damaged folder by name is refused with the way out.
    with pytest.raises(FileNotFoundError, match="not a usable checkpoint"):
        probe.load(str(saves[3]))
    (saves[1] / COMPLETE).write_text("{not json")
    assert checkpoint_problems(saves[1]) == ["unreadable COMPLETE marker"]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        probe.find("latest")
    assert not has_checkpoints(root)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ck"
    parts, rank_parts = make_parts(1)
    manager(root, parts, rank_parts).save(1)
    crashing, crashing_ranks = make_parts(2, fail_on_save=True)
    with pytest.raises(RuntimeError, match="crash while saving"):
        manager(root, crashing, crashing_ranks).save(2)
    assert step_folders(root) == [".partial-step_00000002", "step_00000001"]
    assert (root / LATEST).read_text().strip() == "step_00000001"
    probe, probe_ranks = make_parts(0)
    m = manager(root, probe, probe_ranks)
    assert m.find("latest") == root / "step_00000001"
    assert m.load("latest")["step"] == 1 and probe["schedule"].value["epoch"] == 1
    # The next successful save clears the leftover staging folder.
    parts, rank_parts = make_parts(3)
    manager(root, parts, rank_parts).save(3)
    assert step_folders(root) == ["step_00000001", "step_00000003"]


def test_keep_last_n_purges_older_checkpoints(tmp_path):
    root = tmp_path / "ck"
    for step in range(1, 6):
        parts, rank_parts = make_parts(step)
        manager(root, parts, rank_parts, keep_last_n=2).save(step * 10)
        assert len(step_folders(root)) == min(step, 2)
    assert step_folders(root) == ["step_00000040", "step_00000050"]
    assert (root / LATEST).read_text().strip() == "step_00000050"
    parts, rank_parts = make_parts(6)
    manager(root, parts, rank_parts, keep_last_n=1).save(60)
    assert step_folders(root) == ["step_00000060"]


def test_saving_the_same_step_again_keeps_one_folder_with_the_new_state(tmp_path):
    root = tmp_path / "ck"
    parts, rank_parts = make_parts(1)
    m = manager(root, parts, rank_parts, keep_last_n=5)
    m.save(7)
    parts["schedule"].value = {"epoch": 99}
    parts["backend"].payload = b"second"
    rank_parts["data"].value = {"position": 2}
    m.save(7)
    assert step_folders(root) == ["step_00000007"]
    assert checkpoint_problems(root / "step_00000007") == []
    probe, probe_ranks = make_parts(0)
    manager(root, probe, probe_ranks).load("latest")
    assert probe["schedule"].value == {"epoch": 99}
    assert probe["backend"].payload == b"second" and probe_ranks["data"].value == {"position": 2}


# ----- what may be resumed -----

def save_job(root, state, *, seed=1, ctx=None):
    parts, rank_parts = make_parts(seed, state=state)
    return manager(root, parts, rank_parts, ctx=ctx).save(5)


def test_each_rank_reads_its_own_rank_file(tmp_path):
    root = tmp_path / "ck"
    folder = save_job(root, job(world_size=2), seed=1, ctx=DistContext(rank=0, world_size=2))
    # Rank 1's file, as rank 1 would have written it (this test runs one process).
    (folder / "ranks" / "data" / "rank_00001.json").write_text(json.dumps({"value": {"position": 77}}))
    for rank, position in ((1, 77), (0, 1001)):
        live, live_ranks = make_parts(9, state=job(world_size=2))
        manager(root, live, live_ranks, ctx=DistContext(rank=rank, world_size=2)).load("latest")
        assert live_ranks["data"].value["position"] == position
        assert live["schedule"].value["epoch"] == 1 and live["backend"].loads == [False]


def test_resume_refuses_another_job_listing_every_conflict_and_changes_nothing(tmp_path):
    root = tmp_path / "ck"
    save_job(root, job())
    live, live_ranks = make_parts(2, state=job(model="ViT-B-32", manifest_fingerprint="manifest-2",
                                                **{"loss.margin": 0.3, "optim.weight_decay": 0.05}))
    before = snapshot(live, live_ranks)
    with pytest.raises(ValueError) as info:
        manager(root, live, live_ranks).load("latest")
    text = str(info.value)
    assert text.startswith("cannot resume from")
    for expected in ("model 'ViT-B-32' != checkpoint's 'tiny-vit'", "manifest fingerprint",
                     "config loss.margin: checkpoint has 0.1, this job 0.3",
                     "config optim.weight_decay: checkpoint has 0.02, this job 0.05"):
        assert expected in text
    assert text.count("\n  - ") == 4
    assert snapshot(live, live_ranks) == before


@pytest.mark.parametrize("change", [{"model": "ViT-B-32"}, {"manifest_fingerprint": "other"},
                                    {"loss.surrogate": "gcl"}, {"run.seed": 1}, {"data.batch_size": 32}])
def test_resume_refuses_each_single_change(tmp_path, change):
    root = tmp_path / "ck"
    save_job(root, job())
    live, live_ranks = make_parts(2, state=job(**change))
    before = snapshot(live, live_ranks)
    with pytest.raises(ValueError, match="cannot resume from") as info:
        manager(root, live, live_ranks).load("latest")
    assert str(info.value).count("\n  - ") == 1
    assert snapshot(live, live_ranks) == before


def test_resume_accepts_changes_of_resume_free_keys(tmp_path):
    root = tmp_path / "ck"
    save_job(root, job())
    free = {"run.log_every": 99, "run.keep_last_n": 7, "run.resume": "latest", "run.out_dir": "/moved",
            "data.train": "/moved/shards", "eval.every_steps": 500, "run.progress": False}
    assert all(key.startswith(RESUME_FREE_KEYS) for key in free)
    live, live_ranks = make_parts(2, state=job(**free))
    saved = manager(root, live, live_ranks).load("latest")
    assert saved["step"] == 5
    assert live["schedule"].value["epoch"] == 1 and live_ranks["data"].value["position"] == 1001
    # train_state is a JSON part too: it takes the checkpoint's values.
    assert live["train_state"].value == job()


def test_other_world_size_needs_a_resharding_backend(tmp_path):
    root = tmp_path / "ck"
    # Saved by a 2-rank job (this process plays rank 0).
    save_job(root, job(world_size=2), seed=3, ctx=DistContext(rank=0, world_size=2))
    live, live_ranks = make_parts(8, state=job(world_size=1))
    before = snapshot(live, live_ranks)
    with pytest.raises(ValueError, match="world size 1 != checkpoint's 2") as info:
        manager(root, live, live_ranks).load("latest")
    assert "cannot reshard" in str(info.value)
    assert snapshot(live, live_ranks) == before

    manager(root, live, live_ranks).load("latest", can_reshard=True)
    assert live["backend"].loads == [True] and live["normaliser"].loads == [True]
    assert live["backend"].payload == bytes([3]) * 103 and live["normaliser"].rows == {"row": [3, -3]}
    assert live["schedule"].value["epoch"] == 3 and live["normaliser"].value == {"epochs": 3}
    assert live_ranks["data"].value == before["data"]  # data positions are per rank: not loaded

    # Same world size with a resharding backend: no resharding, rank parts restored.
    same, same_ranks = make_parts(8, state=job(world_size=1))
    save_job(tmp_path / "ck1", job(world_size=1), seed=4)
    manager(tmp_path / "ck1", same, same_ranks).load("latest", can_reshard=True)
    assert same["backend"].loads == [False] and same_ranks["data"].value["position"] == 1004


# ----- reuse of OSR statistics -----

def test_osr_reuse_loads_only_folder_parts_of_an_end_of_osr_checkpoint(tmp_path):
    root = tmp_path / "ck"
    save_job(root, job(stage="finetune", stage_step=0), seed=4)
    # Another fine-tuning schedule is fine for reusing statistics.
    live, live_ranks = make_parts(6, state=job(stage="osr", stage_step=0, **{"run.epochs": 9, "optim.lr": 1e-4}))
    before = snapshot(live, live_ranks)
    saved = manager(root, live, live_ranks).load("latest", purpose="osr")
    assert live["backend"].payload == bytes([4]) * 104 and live["backend"].loads == [False]
    assert live["normaliser"].rows == {"row": [4, -4]} and live["normaliser"].loads == [False]
    # JSON parts and rank parts keep the live values; the caller gets the saved states.
    assert live["schedule"].value == before["schedule"] and live["normaliser"].value == {"epochs": 6}
    assert live["train_state"].value == before["train_state"]
    assert live_ranks["data"].value == before["data"]
    assert saved["normaliser"] == {"value": {"epochs": 4}} and saved["step"] == 5


@pytest.mark.parametrize("stage,stage_step", [("osr", 3), ("finetune", 5), ("osr", 0)])
def test_osr_reuse_refuses_a_checkpoint_not_at_the_end_of_osr(tmp_path, stage, stage_step):
    root = tmp_path / "ck"
    save_job(root, job(stage=stage, stage_step=stage_step))
    live, live_ranks = make_parts(6)
    before = snapshot(live, live_ranks)
    with pytest.raises(ValueError, match="cannot reuse OSR statistics from") as info:
        manager(root, live, live_ranks).load("latest", purpose="osr")
    assert f"not an end-of-OSR checkpoint (stage {stage}, step {stage_step})" in str(info.value)
    assert snapshot(live, live_ranks) == before


def test_osr_reuse_refuses_changed_osr_defining_settings(tmp_path):
    root = tmp_path / "ck"
    save_job(root, job(stage="finetune", stage_step=0))
    live, live_ranks = make_parts(6, state=job(osr_surrogate="gcl", **{"loss.margin": 0.2, "osr.epochs": 1,
                                                                        "data.batch_size": 32}))
    before = snapshot(live, live_ranks)
    with pytest.raises(ValueError) as info:
        manager(root, live, live_ranks).load("latest", purpose="osr")
    text = str(info.value)
    for expected in ("loss.margin: statistics computed with 0.1, this job has 0.2", "osr.epochs",
                     "data.batch_size", "OSR loss 'hgcl' != this job's 'gcl'"):
        assert expected in text
    assert text.count("\n  - ") == 4
    assert snapshot(live, live_ranks) == before


def test_statistics_recovered_with_augmentation_are_not_reused_without_it(tmp_path):
    root = tmp_path / "ck"
    save_job(root, job(stage="finetune", stage_step=0))  # recovered with the default data.train_transform=augment
    live, live_ranks = make_parts(6, state=job(**{"data.train_transform": "eval"}))
    before = snapshot(live, live_ranks)
    with pytest.raises(ValueError, match="cannot reuse OSR statistics from") as info:
        manager(root, live, live_ranks).load("latest", purpose="osr")
    assert "data.train_transform: statistics computed with 'augment', this job has 'eval'" in str(info.value)
    assert str(info.value).count("\n  - ") == 1
    assert snapshot(live, live_ranks) == before
    # The same job with augmentation reuses them.
    manager(root, *make_parts(6, state=job())).load("latest", purpose="osr")


def test_resume_and_osr_rules_are_read_from_the_config_fields(monkeypatch):
    from engine import config

    rules = {key: f.metadata for key, f in config.config_fields().items()}
    assert set(OSR_DEFINING_KEYS) == {key for key, meta in rules.items() if meta["osr"] is True}
    assert "data.train_transform" in OSR_DEFINING_KEYS and "run.seed" in OSR_DEFINING_KEYS
    assert set(RESUME_FREE_KEYS) == {key for key, meta in rules.items() if meta["resume"] != "must_match"}
    assert "run.epochs" in RESUME_FREE_KEYS and "optim.weight_decay" not in RESUME_FREE_KEYS
    # A key inside a mapping field takes that field's rule; a key of no field must match.
    monkeypatch.setitem(config._field_metadata(), "loss.parts", {"resume": "may_change", "osr": True, "doc": "x"})
    assert config.field_rule("loss.parts.teacher.weight", "resume") == "may_change"
    assert config.field_rule("loss.parts.teacher", "osr") is True
    assert config.field_rule("gone.field", "resume") == "must_match" and config.field_rule("gone", "osr") is False
    live = job(**{"run.epochs": 9, "optim.lr": 2e-6, "eval.num_workers": 0, "optim.weight_decay": 0.1})
    assert resume_conflicts(job(), live, can_reshard=False) == [
        "config optim.weight_decay: checkpoint has 0.02, this job 0.1"]


def test_osr_reuse_refuses_other_data_or_world_size(tmp_path):
    root = tmp_path / "ck"
    save_job(root, job(stage="finetune", stage_step=0))
    live, live_ranks = make_parts(6, state=job(manifest_fingerprint="manifest-9", world_size=2))
    before = snapshot(live, live_ranks)
    with pytest.raises(ValueError) as info:
        manager(root, live, live_ranks, ctx=DistContext(rank=0, world_size=2)).load(
            "latest", purpose="osr", can_reshard=True)
    text = str(info.value)
    assert "manifest fingerprint" in text and "world size 2 != 1 of the OSR run" in text
    assert snapshot(live, live_ranks) == before


def test_loading_a_checkpoint_folder_that_fails_names_the_way_out(tmp_path):
    root = tmp_path / "ck"
    folder = save_job(root, job())
    # A folder part whose files are gone but whose marker was rewritten to match (a broken copy).
    (folder / "backend" / "blob.bin").unlink()
    marker = json.loads((folder / COMPLETE).read_text())
    del marker["files"]["backend/blob.bin"]
    (folder / COMPLETE).write_text(json.dumps(marker))
    live, live_ranks = make_parts(2)
    with pytest.raises(ValueError, match=r"could not be loaded \(backend: FileNotFoundError") as info:
        manager(root, live, live_ranks).load("latest")
    assert f"--resume {root}/step_<N>" in str(info.value)
    assert os.path.isdir(folder)


def test_step_folders_sort_by_number_past_their_padding(tmp_path):
    manager = CheckpointManager(tmp_path / "ck", DistContext(), parts={}, keep_last_n=1)
    manager.save(99_999_999)
    manager.save(100_000_000)
    assert [p.name for p in (tmp_path / "ck").glob("step_*")] == ["step_100000000"]
    assert manager.find("latest").name == "step_100000000"


def test_schedule_only_settings_may_change_on_resume_and_are_reported(tmp_path):
    root = tmp_path / "ck"
    save_job(root, job())
    changed = job(**{"optim.lr": 2e-6, "run.max_bad_steps": 9})
    live, live_ranks = make_parts(2, state=changed)
    manager(root, live, live_ranks).load("latest")  # accepted
    assert schedule_changes(job(), changed) == ["optim.lr: 1e-05 -> 2e-06", "run.max_bad_steps: 5 -> 9"]


# ----- background (async) saves -----

class AsyncFolderPart(FolderPart):
    """A folder part written in the background: `save_async` snapshots the payload and returns a future that
    the test settles with `finish()` (write the files) or `fail(exc)`, as DCP's writer thread would."""

    supports_async_save = True

    def __init__(self, payload: bytes):
        super().__init__(payload)
        self.writes = []  # (directory, snapshot, future) not yet settled

    def save_async(self, directory):
        from concurrent.futures import Future

        directory.mkdir(parents=True, exist_ok=True)
        future = Future()
        self.writes.append((directory, bytes(self.payload), future))
        return future

    def finish(self):
        directory, snapshot, future = self.writes.pop(0)
        (directory / "blob.bin").write_bytes(snapshot)
        future.set_result(None)

    def fail(self, exc):
        _, _, future = self.writes.pop(0)
        future.set_exception(exc)


def async_parts(seed: int):
    parts, rank_parts = make_parts(seed)
    parts["backend"] = AsyncFolderPart(bytes([seed]) * 10)
    return parts, rank_parts


def test_background_save_counts_only_once_written_and_a_crash_falls_back(tmp_path):
    root = tmp_path / "ck"
    parts, rank_parts = async_parts(1)
    m = CheckpointManager(root, DistContext(), parts=parts, rank_parts=rank_parts, keep_last_n=1, async_save=True)
    m.save(1)
    assert m.pending_step == 1 and not (root / LATEST).exists()
    assert step_folders(root) == [".partial-step_00000001"]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        m.find("latest")
    parts["backend"].payload = b"changed by the next steps"  # training goes on during the write
    parts["schedule"].value = {"epoch": 99}
    m.poll()
    assert not (root / LATEST).exists(), "not written yet: must not count"
    parts["backend"].finish()
    m.poll()
    assert (root / LATEST).read_text().strip() == "step_00000001" and checkpoint_problems(root / "step_00000001") == []

    m.save(2)  # in flight; the previous checkpoint stays (keep_last_n=1 purges only once step 2 counts)
    assert step_folders(root) == [".partial-step_00000002", "step_00000001"]
    # The job dies here: a new job (no wait) resumes from step 1, with the state it had at its save.
    probe, probe_ranks = make_parts(0)
    restarted = manager(root, probe, probe_ranks)
    assert restarted.find("latest") == root / "step_00000001"
    saved = restarted.load("latest")
    assert saved["step"] == 1 and probe["schedule"].value["epoch"] == 1
    assert probe["backend"].payload == bytes([1]) * 10
    # The live job finishing the write instead: step 2 counts, step 1 is purged, the payload is step 2's.
    parts["backend"].finish()
    assert m.wait() == root / "step_00000002" and m.pending_step is None
    assert step_folders(root) == ["step_00000002"]
    assert (root / "step_00000002" / "backend" / "blob.bin").read_bytes() == b"changed by the next steps"
    assert m.wait() is None  # nothing pending


def test_failed_background_write_is_reported_by_wait_and_keeps_the_previous(tmp_path):
    root = tmp_path / "ck"
    parts, rank_parts = async_parts(1)
    m = CheckpointManager(root, DistContext(), parts=parts, rank_parts=rank_parts, async_save=True)
    m.save(1)
    parts["backend"].finish()
    m.save(2)  # waits for step 1 first
    assert (root / LATEST).read_text().strip() == "step_00000001"
    parts["backend"].fail(OSError(28, "No space left on device", str(root / ".partial-step_00000002" / "x")))
    m.poll()  # a failure is left to wait(), where every rank reports it
    with pytest.raises(CheckpointWriteError, match=r"checkpoint of step 2 could not be written \(rank 0: .*No space "
                       r"left on device\).*previous checkpoint .*step_00000001 is intact"):
        m.wait()
    assert step_folders(root) == ["step_00000001"] and (root / LATEST).read_text().strip() == "step_00000001"


def test_background_saves_need_a_part_that_writes_in_the_background(tmp_path):
    parts, rank_parts = make_parts(3)  # FolderPart has no save_async: written at once
    m = CheckpointManager(tmp_path, DistContext(), parts=parts, rank_parts=rank_parts, async_save=True)
    m.save(3)
    assert m.pending_step is None and (tmp_path / LATEST).read_text().strip() == "step_00000003"
