"""One job per run folder: the lock, stale locks of dead jobs, a folder taken over mid-run."""

import json
import logging
import os
import socket

import pytest

from engine.config import load_config
from engine.distributed import DistContext
from engine.runlock import OWNER_FILE, RunLock, read_owner
from engine.trainer import Trainer
from tests.helpers.jobs import job


def test_second_claim_is_refused_naming_the_holder_then_free_after_release(tmp_path):
    first = RunLock(tmp_path / "run", DistContext())
    with pytest.raises(ValueError) as info:
        RunLock(tmp_path / "run", DistContext())
    message = str(info.value)
    assert f"job {first.run_id}" in message and f"pid {os.getpid()}" in message
    assert socket.gethostname() in message and "pick another --out" in message
    first.release()
    assert read_owner(tmp_path / "run")["active"] is False
    again = RunLock(tmp_path / "run", DistContext())
    assert again.run_id != first.run_id
    again.release()


def test_stale_lock_of_a_dead_job_is_reported_and_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    dead = {"run_id": "deadbeef0000", "host": "node-7", "pid": 999999, "started": 0, "active": True}
    (folder / OWNER_FILE).write_text(json.dumps(dead))
    with caplog.at_level(logging.WARNING, logger="engine.runlock"):
        lock = RunLock(folder, DistContext())
    assert "stale lock of job deadbeef0000 (host node-7, pid 999999" in caplog.text
    assert read_owner(folder)["run_id"] == lock.run_id
    lock.release()


def test_folder_taken_over_by_another_job_is_detected(tmp_path):
    lock = RunLock(tmp_path / "run", DistContext())
    owner = read_owner(tmp_path / "run")
    (tmp_path / "run" / OWNER_FILE).write_text(json.dumps({**owner, "run_id": "someoneelse1", "pid": 4242}))
    with pytest.raises(ValueError, match="now owned by job someoneelse1 .*pid 4242.*two jobs"):
        lock.verify()
    lock.release()


def test_two_trainers_on_one_folder(shards, tmp_path):
    base = job(shards, tmp_path / "run")
    first = Trainer(load_config(base=base))
    with pytest.raises(ValueError, match="is in use by job"):
        Trainer(load_config(base=base))
    first.close()
    Trainer(load_config(base=base)).close()  # free again once the first job ended
