"""One job per run folder: the lock, stale locks of dead jobs, a folder taken over mid-run, a removed lock file."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from engine.config import load_config
from engine.distributed import DistContext
from engine.run import lock as runlock
from engine.run.lock import LEASE_EXPIRY_S, LOCK_FILE, OWNER_FILE, RunLock, read_owner
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
    unrenewed = time.time() - LEASE_EXPIRY_S - 1  # another machine: only an expired lease says it stopped
    os.utime(folder / OWNER_FILE, (unrenewed, unrenewed))
    with caplog.at_level(logging.WARNING, logger="engine.run.lock"):
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
    (tmp_path / "run" / LOCK_FILE).unlink()
    with pytest.raises(ValueError, match="is in use by job .*is still running"):
        Trainer(load_config(base=base))
    first.close()
    Trainer(load_config(base=base)).close()  # free again once the first job ended


def _claim(folder, **fields) -> None:
    """An owner record left `active` by some job (a crashed one, or one whose lock file was removed)."""
    folder.mkdir(exist_ok=True)
    owner = {"run_id": "other0000000", "host": socket.gethostname(), "pid": os.getpid(), "started": 0,
             "active": True, "machine": runlock._machine(), "pid_start": runlock._process_start(os.getpid())}
    (folder / OWNER_FILE).write_text(json.dumps({**owner, **fields}))


def test_removed_lock_file_under_a_live_job_does_not_let_a_second_job_start(tmp_path):
    first = RunLock(tmp_path / "run", DistContext())
    (tmp_path / "run" / LOCK_FILE).unlink()  # the flock now guards a file nobody else can open
    with pytest.raises(ValueError, match=rf"in use by job {first.run_id} .*its process {os.getpid()} is still "
                                         r"running.*could be taken"):
        RunLock(tmp_path / "run", DistContext())
    assert read_owner(tmp_path / "run")["run_id"] == first.run_id  # nothing overwritten
    first.release()
    RunLock(tmp_path / "run", DistContext()).release()  # free once its job released it


def test_claim_of_a_dead_pid_on_this_machine_is_stale_at_once(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _claim(tmp_path / "run", pid=gone.pid, pid_start="1")  # renewed just now: the pid decides, not the lease
    lock = RunLock(tmp_path / "run", DistContext())
    assert read_owner(tmp_path / "run")["run_id"] == lock.run_id
    lock.release()


def test_claim_of_a_reused_pid_is_stale(tmp_path):
    _claim(tmp_path / "run", pid_start="-1")  # our pid, but not the process that wrote the claim
    RunLock(tmp_path / "run", DistContext()).release()
    _claim(tmp_path / "run")  # our pid and our start time: live
    with pytest.raises(ValueError, match="is still running"):
        RunLock(tmp_path / "run", DistContext())


def test_claim_of_an_exited_unreaped_process_is_stale(tmp_path):
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 10
        while runlock._process(zombie.pid)[0] != "Z" and time.time() < deadline:
            time.sleep(0.01)
        assert runlock._process(zombie.pid)[0] == "Z"  # exited, not waited for: its pid still answers kill(0)
        _claim(tmp_path / "run", pid=zombie.pid, pid_start=runlock._process_start(zombie.pid))
        RunLock(tmp_path / "run", DistContext()).release()
    finally:
        zombie.wait()


def test_claim_from_another_machine_is_live_until_its_lease_expires(tmp_path):
    _claim(tmp_path / "run", host="node-7", machine="node-7/boot/1", pid=999999)
    with pytest.raises(ValueError, match=r"host node-7, pid 999999.*renewed its claim \d+ s ago from another "
                                         "machine"):
        RunLock(tmp_path / "run", DistContext())
    expired = time.time() - LEASE_EXPIRY_S - 1
    os.utime(tmp_path / "run" / OWNER_FILE, (expired, expired))
    RunLock(tmp_path / "run", DistContext()).release()


def test_the_holder_renews_its_claim(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "LEASE_RENEW_S", 0.01)
    lock = RunLock(tmp_path / "run", DistContext())
    os.utime(tmp_path / "run" / OWNER_FILE, (0, 0))
    deadline = time.time() + 5
    while (tmp_path / "run" / OWNER_FILE).stat().st_mtime == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert (tmp_path / "run" / OWNER_FILE).stat().st_mtime > time.time() - 5
    lock.release()
