"""Runs that survive: SIGKILL, preempt or double-start a tuning job, corrupt its checkpoints, resume it.

Target: every fault run completes through `python run.py tune ... --resume latest` (a corrupted newest
checkpoint is either skipped for the previous complete one or refused with the CLI's `error:` line, not
a traceback), loses at most `--save-every` steps per kill (2 x that when the newest checkpoint is
corrupted) and 0 steps per SIGTERM / SIGUSR1 stop, visits every sample exactly as often as the
uninterrupted run, and ends bit for bit in the uninterrupted run's final state: weights in
final.safetensors, u table rows and visit counts, AdamW moments and step counter in the last
checkpoint's backend/optim.pt (loaded with weights_only=True). Besides: a launch after a SIGKILL reports
and takes over the dead job's stale run lock; a stop request ends the job with exit 75 and a `preempted`
record and checkpoint of its last logged step; a second job on a folder in use exits 2 with one `is in
use by job` line naming the first job's pid and writes nothing. Exit status 1 when any of it is missed.

Job: 64 synthetic image-caption pairs (engine.demo.synthetic) in 4 shards, batch 8, tiny-vit, TuneCLIP with
OSR 1 epoch (8 steps at lr 0) then fine-tuning 2 epochs (16 steps), a checkpoint every 2 steps, one
step event per step in log.jsonl. Every launch is the real CLI in its own process group (one torch
thread), killed with SIGKILL (no handler runs, nothing is flushed by the job) unless a scenario says
otherwise. Scenarios, each its own run directory next to one straight reference run:

  random kills      several kills at seeded random delays after the launch's first step (once a
                    checkpoint exists); resume with `--resume latest` after each.
  kill in save      kills aimed at checkpoint writes: the harness watches `<out>/checkpoints` from
                    the step whose save it targets and kills as soon as a stage of that save shows
                    (staging folder `.partial-step_N` created, `backend/optim.pt` being written, the
                    COMPLETE marker being written, or the old `step_N` folder being deleted when the
                    same step is saved twice: end of OSR and end of the run). A kill counts as inside
                    the save when `.partial-step_N` is still there after the process is dead.
  OSR boundary      kills in the middle of OSR (stage I), between the end of OSR and its boundary
                    checkpoint, and right after the first fine-tuning step.
  corrupt newest    a kill, then the newest complete checkpoint is damaged: its COMPLETE marker
                    deleted, or its backend/optim.pt truncated to half. Reported: did `--resume
                    latest` fall back to the previous checkpoint, stop with a clear `error:`, or
                    crash? After an error the job is resumed from the previous folder by path.
  kill before ckpt  a kill after the first step, before any checkpoint exists: `--resume latest`
                    must refuse, and the documented way on is to start again without --resume.
  SIGTERM           preemption: SIGTERM (to the process group, as a scheduler sends it) at seeded
                    random moments: an OSR step (+0-50 ms), inside an OSR checkpoint save and inside
                    the end-of-OSR boundary save (a random stage of each, as in kill in save), a
                    fine-tuning step (+0-100 ms) and a fine-tuning save; then one SIGUSR1 at a
                    fine-tuning step (`--quick`: the OSR step, the fine-tuning save, SIGUSR1). The
                    harness waits for the job to stop by itself (60 s at most). Per stop: exit 75
                    (EXIT_PREEMPTED), a `preempted` record whose reason is the signal and whose step
                    is the launch's last logged step, `checkpoints/latest` and the newest complete
                    checkpoint are that step, the owner file says the lock was released; then
                    `--resume latest` resumes from exactly that step (0 steps lost) and reports no
                    stale lock.
  two jobs          the job runs; when a seeded step is logged the harness pauses it (SIGSTOP to its
                    group, so it surely still holds the folder however slow the machine), runs the
                    same command on the same --out, then that command with `--resume latest`, and
                    lets the first job go on (SIGCONT). Each second job must exit 2 within the start-up
                    time (the straight run's, to its lock) + 10 s of its start (a lock that waited
                    would hang: the first job is paused)
                    with one stderr line, `error: run.out_dir <out> is in use by job <run id> (host H,
                    pid <first job's pid>, started T); ...`. Nothing of theirs may be written: no file
                    under the folder changes while they run (size, mtime), and after the first job ends
                    its log.jsonl has one `start`, no `resume` and steps 1..24 once each, the owner file
                    names the first job (released), the folder holds the same files as the straight
                    run's, and the final state equals it. faults = second jobs started.
  stale lock        folded into random kills: every launch after a SIGKILL that left the owner file
                    `active` must log the takeover warning naming the killed pid (`taking over the
                    stale lock of job ...`) and go on. (A kill can land after the job released its
                    lock, at the very end: then no warning is due, and the note counts such kills.)
  world size        the job on DeepSpeed through its launcher (`deepspeed --num_gpus N`, CPU ranks):
                    2 ranks, SIGTERM inside OSR; a pickle payload (code that creates a marker file when
                    unpickled) planted in that checkpoint's `backend/universal/` folder; `--resume
                    latest` on 1 rank (the universal conversion runs), SIGTERM inside fine-tuning;
                    `--resume latest` on 2 ranks to the end. The global batch stays 8, so every epoch is
                    8 steps on any rank count. Reported: the u table's visit counts against the
                    uninterrupted run's (every row once per epoch: used once / never / more than once in
                    total), whether the payload ran, and the steps lost per stop. Weights are not
                    compared: another rank count deals the rest of an epoch into other batches. The
                    `deepspeed` runner exits at once on SIGTERM (its status is its own) while its
                    per-node launcher gives the ranks 30 s to stop: the harness waits for the whole
                    process group. `--only worldsize`: 4 minutes at load average 12.

  async save        the job on FSDP2 through `torchrun` (2 CPU ranks) with run.async_checkpoint=true,
                    next to its own uninterrupted FSDP2 run: SIGKILL while a checkpoint is being written
                    in the background (its staging folder holds DCP shard files, no COMPLETE marker:
                    training has gone on meanwhile), once in OSR and once in fine-tuning; `--resume
                    latest` must fall back to the previous checkpoint and the run must end equal to the
                    uninterrupted one (weights, u rows, visits; AdamW state is in DCP files and is not
                    compared apart from what the weights show). Up to 2 x --save-every steps may be lost
                    per kill (the steps run during the write). `--only asyncsave`.

Steps lost per kill (or stop) = the last step logged before it minus the step the next launch resumed
from (log.jsonl `step` / `resume` events). Samples lost = u table rows whose visit count differs from
the straight run's (lost or repeated). The straight run and the fault runs use the same command, so
any difference is the engine's. Process start-up dominates (each of the ~32 launches imports torch
and open_clip): 2.6 minutes on 2 CPU cores at load average 2, 3.7 minutes at load average 5 (other
jobs on the machine); `--quick` makes fewer faults (~24 launches, 2.2 minutes at load average 2.3).

    python benchmarks/faults.py                         # full run
    python benchmarks/faults.py --quick                 # fewer faults
    python benchmarks/faults.py --only sigterm twojobs  # some of the scenarios (names: --help)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import Column, Table
from engine.checkpoint import COMPLETE, LATEST, is_complete
from engine.data.build import build_shards
from engine.demo.synthetic import render_pairs
from engine.objectives.table import UTable
from engine.run.lock import read_owner
from engine.run.preemption import EXIT_PREEMPTED, proc_stat
from tests.helpers.harness import kill_job
from tests.helpers.planted import Planted

NUM_SAMPLES = 64
BATCH_SIZE = 8
SAVE_EVERY = 2
OSR_STEPS = NUM_SAMPLES // BATCH_SIZE  # 1 OSR epoch
TOTAL_STEPS = OSR_STEPS * 3  # + 2 fine-tuning epochs
LAUNCH_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0  # a SIGTERM / SIGUSR1 must end the job (one step and a checkpoint) within this
# A second job on a held folder must be refused within the start-up time (what the straight run took to
# reach its lock: imports, config, data check; 6-17 s here depending on the load) plus this.
REFUSAL_MARGIN_S = 10.0
EXIT_USER_ERROR = 2  # the CLI's `error:` exit status
SAVE_PHASES = ("staging", "backend", "marker")
# Failure notes that mean "did not resume" (the headline counts them apart from lost steps or samples).
RESUME_FAILURES = ("--resume latest", "the job did not complete", "scenario stopped")


def job_argv(shards: Path, out: Path, *, resume: str | None = None) -> list[str]:
    """The CLI command of the job (the same for the straight run and every fault run)."""
    argv = [
        sys.executable, "run.py", "tune", "--train", str(shards), "--out", str(out), "--model", "tiny-vit",
        "--batch-size", str(BATCH_SIZE), "--lr", "1e-3", "--osr-epochs", "1", "--epochs", "2",
        "--save-every", str(SAVE_EVERY), "--set", "eval.at_start=false", "--set", "data.shuffle_buffer=8",
        "--set", "run.progress=false", "--set", "run.log_every=1", "--set", "run.keep_last_n=2",
    ]
    return argv + (["--resume", resume] if resume else [])


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def staging_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f".partial-step_{step:08d}"


class LogTail:
    """New complete records of a growing log.jsonl since the last call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.pending = ""

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(self.offset)
            text = fh.read()
            self.offset = fh.tell()
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()  # a line still being written
        return [json.loads(line) for line in lines if line.strip()]


# ----- kill triggers: poll(out, new_records) is True when the job should die now -----
class AfterDelay:
    """`delay` seconds after the launch's first step, once a checkpoint exists."""

    spin = False

    def __init__(self, delay: float, *, sig: signal.Signals = signal.SIGKILL):
        self.delay, self.sig = delay, sig
        self.seen_step = False
        self.armed_at: float | None = None
        self.label = f"{delay:.2f} s after a launch's first step"

    def poll(self, out: Path, records: list[dict]) -> bool:
        if self.armed_at is None:
            self.seen_step = self.seen_step or any(r["event"] == "step" for r in records)
            if self.seen_step and (out / "checkpoints" / LATEST).exists():
                self.armed_at = time.perf_counter()
            return False
        return time.perf_counter() - self.armed_at >= self.delay


class OnRecord:
    """As soon as a log record with these field values appears (then `delay` seconds later)."""

    spin = False

    def __init__(self, label: str, *, sig: signal.Signals = signal.SIGKILL, delay: float = 0.0, **match):
        self.label, self.sig, self.delay, self.match = label, sig, delay, match
        self.seen_at: float | None = None

    def poll(self, out: Path, records: list[dict]) -> bool:
        if self.seen_at is None and any(all(r.get(k) == v for k, v in self.match.items()) for r in records):
            self.seen_at = time.perf_counter()
        return self.seen_at is not None and time.perf_counter() - self.seen_at >= self.delay


class InSave:
    """Inside the save of step `step`, as soon as `phase` shows in its staging folder.

    Phases: staging (folder created), backend (optim.pt being written), marker (COMPLETE being
    written), replace (the old step_N folder being deleted; only when `second`: the second save of
    the same step at the end of OSR or of the run, armed by what the job does between the two).
    """

    def __init__(self, step: int, phase: str, *, second: bool = False, sig: signal.Signals = signal.SIGKILL):
        self.step, self.phase, self.second, self.sig = step, phase, second, sig
        self.spin = False  # armed: the runner polls without sleeping
        self.seen_staging = False
        self.missed = False
        self.label = f"save of step {step}{' (2nd)' if second else ''}, {phase}"

    def _armed_by(self, out: Path, records: list[dict]) -> bool:
        if not self.second:
            return any(r["event"] == "step" and r["step"] == self.step for r in records)
        if self.step == OSR_STEPS:
            return any(r["event"] == "osr_done" for r in records)
        return (out / "final.safetensors").exists()  # exported between the two saves of the last step

    def poll(self, out: Path, records: list[dict]) -> bool:
        if not self.spin:
            self.spin = self._armed_by(out, records)
            return False
        staging = staging_dir(out, self.step)
        if staging.exists():
            self.seen_staging = True
            if self.phase == "staging":
                return True
            if self.phase == "backend":
                return (staging / "backend" / "optim.pt").exists()
            if self.phase == "marker":
                return any(staging.glob(f".{COMPLETE}.*")) or (staging / COMPLETE).exists()
            return (staging / COMPLETE).exists() and not (step_dir(out, self.step) / "normaliser").exists()
        # Staging renamed already, or the job moved on: the moment was missed; kill now anyway.
        moved_on = any(r["event"] == "step" and r["step"] > self.step for r in records)
        self.missed = self.seen_staging or moved_on
        return self.missed


class InBackgroundWrite:
    """While the checkpoint of step `step` is written in the background (run.async_checkpoint): its staging
    folder holds DCP shard files and no COMPLETE marker. The kill is inside the write when the staging
    folder is still there, unmarked, after the job is dead."""

    def __init__(self, step: int):
        self.step = step
        self.spin = False
        self.seen_staging = False
        self.missed = False
        self.label = f"background write of step {step}"

    def poll(self, out: Path, records: list[dict]) -> bool:
        if not self.spin:
            self.spin = any(r["event"] == "step" and r["step"] == self.step for r in records)
            return False
        staging = staging_dir(out, self.step)
        if staging.exists():
            self.seen_staging = True
            return any((staging / "backend").glob("*.distcp")) and not (staging / COMPLETE).exists()
        moved_on = any(r["event"] == "step" and r["step"] > self.step + SAVE_EVERY for r in records)
        self.missed = self.seen_staging or moved_on
        return self.missed


@dataclass
class Launch:
    """One process of the job: how it ended and what it logged."""

    argv: list[str]
    records: list[dict]
    returncode: int
    killed: bool  # SIGKILLed by the harness
    stderr: str
    trigger: str = ""
    inside_save: bool | None = None
    handled: bool = False  # a failure the scenario has judged already
    pid: int = 0
    stopped_by: str | None = None  # SIGTERM / SIGUSR1 sent by the harness (the job was left to stop)
    step_at_signal: int | None = None  # the last step the harness had seen logged when it sent it
    lock_after_s: float | None = None  # from the process start to taking the run lock (owner file's time)
    left_lock_active: bool = False  # the owner file still named this process as running when it ended

    @property
    def faulted(self) -> bool:
        return self.killed or self.stopped_by is not None

    @property
    def preempted(self) -> dict | None:
        return next((r for r in self.records if r["event"] == "preempted"), None)

    @property
    def resumed_from(self) -> dict | None:
        return next((r for r in self.records if r["event"] == "resume"), None)

    @property
    def last_step(self) -> int:
        """Optimizer steps done when the process ended (logged steps, else the resume point)."""
        steps = [r["step"] for r in self.records if r["event"] == "step"]
        if steps:
            return max(steps)
        resumed = self.resumed_from
        return resumed["step"] if resumed else 0

    @property
    def error(self) -> str:
        """How a failed launch said why: the CLI's `error:` lines, or the exception's last line."""
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        for i, line in enumerate(lines):
            if line.startswith("error: "):
                return "clear error: " + " ".join([line[len("error: "):], *lines[i + 1:i + 3]])
        return f"traceback: {(lines[-1] if lines else 'no output')[:200]}"


class Runner:
    """Launches the job in `out`, kills it when a trigger fires, keeps every launch."""

    def __init__(self, shards: Path, out: Path, logs: Path):
        self.shards, self.out, self.logs = shards, out, logs
        self.tail = LogTail(out / "log.jsonl")
        self.launches: list[Launch] = []
        # One torch thread: the job and the watching harness each get a core.
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        self.ranks: int | None = None  # launch through `deepspeed --num_gpus ranks` (DeepSpeed backend)
        self.fsdp_ranks: int | None = None  # launch through `torchrun` (FSDP2, background checkpoints)
        self.ports: list[int] = []

    def argv(self, resume: str | None) -> list[str]:
        argv = job_argv(self.shards, self.out, resume=resume)
        if self.ranks is None and self.fsdp_ranks is None:
            return argv
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.ports.append(port)
        if self.fsdp_ranks is not None:
            return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.fsdp_ranks),
                    "--master_port", str(port), *argv[1:], "--set", "run.backend=fsdp",
                    "--set", "run.async_checkpoint=true"]
        return ["deepspeed", "--num_gpus", str(self.ranks), "--master_port", str(port), *argv[1:],
                "--set", "run.backend=deepspeed"]

    def remove_shm_buffers(self) -> None:
        """DeepSpeed's CPU all-reduce buffers of this runner's launches (killed ranks leave them)."""
        for port in self.ports:
            for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer*_{port}_*"):
                path.unlink(missing_ok=True)

    def launch(self, *, resume: str | None = None, trigger=None) -> Launch:
        """Run the job once; when `trigger` fires: SIGKILL it (its `sig`), or send SIGTERM / SIGUSR1 and
        wait for it to stop by itself, or (a trigger with `act`) let the trigger act on the live job."""
        argv = self.argv(resume)
        err_path = self.logs / f"{self.out.name}_{len(self.launches):02d}.err"
        records: list[dict] = []
        killed, polls = False, 0
        stopped_by, step_at_signal, inside_save, deadline = None, None, None, LAUNCH_TIMEOUT_S
        label = getattr(trigger, "label", "")
        started, started_wall = time.perf_counter(), time.time()
        with open(err_path, "w") as err:
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            try:
                while proc.poll() is None:
                    spinning = trigger is not None and trigger.spin
                    polls += 1
                    new = self.tail.read() if not spinning or polls % 64 == 0 else []
                    records += new
                    if trigger is not None and trigger.poll(self.out, new):
                        sig = getattr(trigger, "sig", signal.SIGKILL)
                        if hasattr(trigger, "act"):
                            trigger.act(self, proc)
                        elif sig == signal.SIGKILL:
                            kill_job(proc.pid)  # every rank, whatever its session (torchrun's are their own)
                            proc.wait()
                            killed = True
                            break
                        else:  # a stop request: the job finishes its step, checkpoints and exits by itself
                            os.killpg(proc.pid, sig)
                            stopped_by = sig.name
                            records += self.tail.read()
                            logged = [r["step"] for r in records if r["event"] == "step"]
                            step_at_signal = max(logged, default=None)
                            if isinstance(trigger, InSave):
                                inside_save = not trigger.missed
                            deadline = time.perf_counter() - started + STOP_TIMEOUT_S
                        trigger = None
                    if time.perf_counter() - started > deadline:
                        what = f"{stopped_by} was sent" if stopped_by else "it started"
                        raise TimeoutError(f"{' '.join(argv)} still ran {deadline:.0f} s after {what}")
                    if not spinning:
                        time.sleep(0.002)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                if self.ranks is not None or self.fsdp_ranks is not None:
                    # The `deepspeed` runner dies at once on SIGTERM; its per-node launcher gives the ranks
                    # 30 s to stop (they finish the step and checkpoint): wait for the whole group.
                    wait_for_group(proc.pid, STOP_TIMEOUT_S)
        records += self.tail.read()
        launch = Launch(argv, records, proc.returncode, killed, err_path.read_text(), trigger=label,
                        pid=proc.pid, stopped_by=stopped_by, step_at_signal=step_at_signal,
                        inside_save=inside_save)
        if killed and isinstance(trigger, InSave):
            launch.inside_save = staging_dir(self.out, trigger.step).exists()
        if killed and isinstance(trigger, InBackgroundWrite):
            staging = staging_dir(self.out, trigger.step)
            launch.inside_save = staging.exists() and not (staging / COMPLETE).exists()
        owner = read_owner(self.out) or {}
        if owner.get("pid") == proc.pid:
            launch.lock_after_s = owner.get("started", started_wall) - started_wall
            launch.left_lock_active = owner.get("active") is True
        self.launches.append(launch)
        return launch

    def finished(self) -> bool:
        done = bool(self.launches) and self.launches[-1].returncode == 0
        return done and (self.out / "final.safetensors").exists()


def wait_for_group(pgid: int, timeout_s: float) -> None:
    """Wait until no process of group `pgid` is left (SIGKILL them after `timeout_s`)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.perf_counter() > deadline:
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.05)


def complete_checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in (out / "checkpoints").glob("step_*") if is_complete(p))


def previous_checkpoint(out: Path) -> Path:
    """The newest complete checkpoint other than the one `latest` names."""
    newest = (out / "checkpoints" / LATEST).read_text().strip()
    return [p for p in complete_checkpoints(out) if p.name != newest][-1]


def final_state(out: Path) -> dict:
    """Weights, u table rows + visits, AdamW state of the newest complete checkpoint."""
    table = UTable.open(out / "u_table", readonly=True)
    rows = torch.arange(table.num_rows)
    log_u_x, log_u_z, _ = table.read(rows)
    visits = table.visits(rows)
    table.close()
    latest = complete_checkpoints(out)[-1]
    optim_file = latest / "backend" / "optim.pt"  # the single backend's; FSDP2 keeps DCP files (not compared)
    optim = torch.load(optim_file, weights_only=True)["optimizer"] if optim_file.exists() else None
    return {"weights": load_file(out / "final.safetensors"), "log_u": (log_u_x, log_u_z), "visits": visits,
            "optim": optim, "checkpoint": latest.name}


def differences(state: dict, reference: dict) -> list[str]:
    """Parts of `state` not bitwise equal to `reference` (empty = equal)."""
    diffs = []
    weights, ref_weights = state["weights"], reference["weights"]
    same_weights = weights.keys() == ref_weights.keys() and all(
        torch.equal(weights[k], ref_weights[k]) for k in weights
    )
    if not same_weights:
        diffs.append("weights")
    if not all(torch.equal(a, b) for a, b in zip(state["log_u"], reference["log_u"])):
        diffs.append("u rows")
    if not torch.equal(state["visits"], reference["visits"]):
        diffs.append("visits")
    if state["optim"] is None or reference["optim"] is None:
        if (state["optim"] is None) != (reference["optim"] is None):
            diffs.append("adam (one side has none)")
    elif (optim := state["optim"]["state"]).keys() != (ref_optim := reference["optim"]["state"]).keys() or not all(
        torch.equal(optim[p][name], ref_optim[p][name])
        for p in optim
        for name in ("exp_avg", "exp_avg_sq", "step")
    ):
        diffs.append("adam")
    if state["checkpoint"] != reference["checkpoint"]:
        diffs.append(f"last checkpoint {state['checkpoint']}")
    return diffs


@dataclass
class Outcome:
    """One scenario's row and notes."""

    name: str
    max_lost_allowed: int = SAVE_EVERY
    fault_word: str = "kill"
    num_faults: int = 0
    num_resumed: int = 0
    steps_lost: list[int] = field(default_factory=list)
    samples_lost: int | None = None
    compare_state: bool = True  # the final state must equal the straight run's (else only visits count)
    reference: dict | None = None  # the scenario's own uninterrupted run (another backend), else the straight one
    diffs: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return self.diffs == []

    @property
    def ok(self) -> bool:
        return not self.failures and self.samples_lost == 0 and self.equal


def resume_latest(runner: Runner, outcome: Outcome, *, trigger=None, clear_error_ok: bool = False) -> Launch:
    """`--resume latest`; if it fails, note how, then resume from the previous checkpoint by path."""
    launch = runner.launch(resume="latest", trigger=trigger)
    if launch.killed or launch.returncode == 0:
        return launch
    launch.handled = True
    outcome.notes.append(f"--resume latest: {launch.error}")
    if not (clear_error_ok and launch.error.startswith("clear error")):
        outcome.failures.append("--resume latest failed: " + launch.error.split(":")[0])
    previous = previous_checkpoint(runner.out)
    outcome.notes.append(f"then resumed by path from {previous.name}")
    return runner.launch(resume=str(previous), trigger=trigger)


def run_with_kills(runner: Runner, outcome: Outcome, triggers: list) -> None:
    """Start the job, kill it at each trigger in turn (resuming in between), then let it finish."""
    launch = runner.launch(trigger=triggers[0])
    for trigger in triggers[1:]:
        if not launch.killed:
            break
        launch = resume_latest(runner, outcome, trigger=trigger)
    if launch.killed:
        resume_latest(runner, outcome)
    missed = len(triggers) - sum(x.killed for x in runner.launches)
    if missed:
        outcome.notes.append(f"{missed} planned kill(s) not made: the job had finished")


def settle(outcome: Outcome, runner: Runner, reference: dict) -> Outcome:
    """Fill steps lost, resumes, samples lost and equality from the scenario's launches."""
    launches, positions = runner.launches, []
    for i, launch in enumerate(launches):
        outcome.num_resumed += launch.resumed_from is not None
        if not launch.killed and launch.returncode != 0 and not launch.handled:
            outcome.failures.append(f"a launch exited with status {launch.returncode}: {launch.error}")
        if not launch.faulted:
            continue
        outcome.num_faults += 1
        # The next launch that got going (a refused resume logs neither a resume nor a step).
        after = [x for x in launches[i + 1:]
                 if x.resumed_from or any(r["event"] == "step" for r in x.records)]
        if after:
            resumed = after[0].resumed_from
            outcome.steps_lost.append(launch.last_step - (resumed["step"] if resumed else 0))
            positions.append(f"{launch.last_step}->{resumed['step'] if resumed else 0}")
    if positions:
        outcome.notes.append(f"step at each {outcome.fault_word} -> step resumed from: "
                             + ", ".join(positions))
    if outcome.steps_lost and max(outcome.steps_lost) > outcome.max_lost_allowed:
        outcome.failures.append(f"lost {max(outcome.steps_lost)} steps in one {outcome.fault_word} (at most "
                                f"{outcome.max_lost_allowed} expected)")
    if not runner.finished():
        outcome.failures.append("the job did not complete")
        return outcome
    if not outcome.compare_state:
        table = UTable.open(runner.out / "u_table", readonly=True)
        visits = table.visits(torch.arange(table.num_rows))
        table.close()
        outcome.samples_lost = int((visits != reference["visits"]).sum())
        expected = int(reference["visits"][0])
        outcome.notes.append(f"u table visits over the {expected} epochs: {int((visits == expected).sum())} rows "
                             f"used once per epoch, {int((visits < expected).sum())} fewer times (never in an "
                             f"epoch), {int((visits > expected).sum())} more (twice in an epoch)")
        outcome.diffs = []
        return outcome
    state = final_state(runner.out)
    reference = outcome.reference or reference
    outcome.samples_lost = int((state["visits"] != reference["visits"]).sum())
    outcome.diffs = differences(state, reference)
    return outcome


# ----- scenarios -----
def stale_lock_takeovers(runner: Runner, outcome: Outcome) -> None:
    """Every launch after a SIGKILL that left the lock held (the owner file still said `active`: the
    job died before releasing it) must report the lock as stale, naming the dead pid, and go on."""
    pairs = [(dead, after) for dead, after in zip(runner.launches, runner.launches[1:])
             if dead.killed and dead.left_lock_active]
    taken = [after for dead, after in pairs
             if "taking over the stale lock of job" in after.stderr and f"pid {dead.pid}," in after.stderr]
    went_on = [after for after in taken if after.resumed_from or after.returncode == 0]
    released = sum(x.killed and not x.left_lock_active for x in runner.launches)
    outcome.notes.append(f"stale lock: {len(taken)}/{len(pairs)} launches after a kill reported taking over "
                         f"the dead job's lock (its pid named), {len(went_on)} went on"
                         + (f"; {released} kill(s) after the job had released it" if released else ""))
    if len(went_on) < len(pairs):
        outcome.failures.append("a launch after a SIGKILL did not report and take over the stale lock")


def random_kills(runner: Runner, rng: random.Random, *, num_kills: int) -> Outcome:
    outcome = Outcome("random kills")
    triggers = [AfterDelay(rng.uniform(0.1, 0.8)) for _ in range(num_kills)]
    run_with_kills(runner, outcome, triggers)
    outcome.notes.append("kills " + ", ".join(x.trigger.split()[0] for x in runner.launches if x.killed)
                         + " s after a launch's first step")
    stale_lock_takeovers(runner, outcome)
    return outcome


def kills_in_save(runner: Runner, rng: random.Random, *, quick: bool) -> Outcome:
    outcome = Outcome("kill in save")
    mid_osr = rng.choice(range(SAVE_EVERY, OSR_STEPS, SAVE_EVERY))
    mid_finetune = rng.choice(range(OSR_STEPS + SAVE_EVERY, TOTAL_STEPS, SAVE_EVERY))
    triggers = [InSave(mid_finetune, "backend"), InSave(TOTAL_STEPS, "replace", second=True)]
    if not quick:
        triggers = [InSave(mid_osr, "staging"), InSave(OSR_STEPS, "backend", second=True),
                    InSave(mid_finetune, "marker"), InSave(TOTAL_STEPS, "replace", second=True)]
    run_with_kills(runner, outcome, triggers)
    aimed = [x for x in runner.launches if x.inside_save is not None]
    landed = "; ".join(f"{x.trigger}: {'inside' if x.inside_save else 'after it'}" for x in aimed)
    inside = sum(bool(x.inside_save) for x in aimed)
    outcome.notes.insert(0, f"{inside}/{len(aimed)} kills landed inside a save ({landed})")
    return outcome


def osr_boundary(runner: Runner, *, quick: bool) -> Outcome:
    outcome = Outcome("OSR boundary")
    triggers = [OnRecord("OSR step 3", event="step", stage="osr", stage_step=3),
                OnRecord("end of OSR before its checkpoint", event="osr_done"),
                OnRecord("first fine-tuning step", event="step", stage="finetune", stage_step=1)]
    if quick:
        del triggers[1]
    run_with_kills(runner, outcome, triggers)
    resumes = [x.resumed_from for x in runner.launches if x.resumed_from]
    outcome.notes.append("kills at " + ", ".join(t.label for t in triggers) + "; resumed at "
                         + ", ".join(f"{r['stage']} step {r['stage_step']}" for r in resumes))
    return outcome


def corrupt_newest(runner: Runner, rng: random.Random, *, damage: str) -> Outcome:
    outcome = Outcome(f"corrupt: {damage}", max_lost_allowed=2 * SAVE_EVERY)
    target = rng.choice(range(OSR_STEPS + 2, TOTAL_STEPS - 2))
    runner.launch(trigger=OnRecord(f"step {target}", event="step", step=target))
    checkpoints = runner.out / "checkpoints"
    newest = checkpoints / (checkpoints / LATEST).read_text().strip()
    previous = previous_checkpoint(runner.out)
    if damage == "no COMPLETE":
        (newest / COMPLETE).unlink()
    else:
        optim = newest / "backend" / "optim.pt"
        os.truncate(optim, optim.stat().st_size // 2)
    outcome.num_faults += 1  # the damage; the kill is counted in settle()
    resume_latest(runner, outcome, clear_error_ok=True)
    resumed = runner.launches[1].resumed_from
    if resumed:
        source = Path(resumed["from"]).name
        how = "fell back to the previous complete checkpoint" if source == previous.name else "resumed from"
        outcome.notes.append(f"killed at step {target}, {newest.name} damaged; --resume latest {how} "
                             f"{source}")
        if source == newest.name:
            outcome.failures.append(f"resumed from the damaged {newest.name}")
    else:
        outcome.notes.insert(0, f"killed at step {target}, {newest.name} damaged")
    return outcome


def kill_before_checkpoint(runner: Runner) -> Outcome:
    outcome = Outcome("kill before 1st ckpt")
    runner.launch(trigger=OnRecord("step 1", event="step", step=1))
    refusal = runner.launch(resume="latest")
    refusal.handled = True
    answer = refusal.error if refusal.returncode else "resumed"
    outcome.notes.append(f"killed after step 1; --resume latest: {answer}")
    if refusal.returncode == 0 or not refusal.error.startswith("clear error"):
        outcome.failures.append("--resume latest without any checkpoint did not stop with a clear error")
    runner.launch()  # what the error says to do: start without --resume (same out dir)
    outcome.notes.append("then started again without --resume in the same out dir")
    return outcome


def check_stop(runner: Runner, launch: Launch, outcome: Outcome) -> None:
    """A SIGTERM / SIGUSR1 stop: exit 75, a `preempted` record of the last logged step, the newest
    complete checkpoint of exactly that step, the run lock released."""
    launch.handled = True
    record, step = launch.preempted, launch.last_step
    problems = []
    # Through the `deepspeed` runner the ranks exit 75 but the runner's status is its own (killed by the signal).
    if runner.ranks is None and launch.returncode != EXIT_PREEMPTED:
        problems.append(f"exit status {launch.returncode} (not {EXIT_PREEMPTED}): {launch.error}")
    if record is None:
        problems.append("no preempted record in log.jsonl")
    else:
        if record.get("reason") != launch.stopped_by:
            problems.append(f"preempted reason {record.get('reason')!r}")
        if record.get("step") != step:
            problems.append(f"preempted step {record.get('step')} but last logged step {step}")
        if Path(record.get("checkpoint", "")).name != step_dir(runner.out, step).name:
            problems.append(f"preempted checkpoint {record.get('checkpoint')}")
    newest = complete_checkpoints(runner.out)
    latest = (runner.out / "checkpoints" / LATEST).read_text().strip()
    if not newest or newest[-1].name != step_dir(runner.out, step).name or latest != newest[-1].name:
        problems.append(f"newest checkpoint {latest} (complete: {newest[-1].name if newest else None}), "
                        f"last step {step}")
    owner = read_owner(runner.out) or {}
    # Through a launcher, rank 0 (a child of the launched process) holds the lock.
    if (runner.ranks is None and owner.get("pid") != launch.pid) or owner.get("active") is not False:
        problems.append(f"run lock not released: {owner}")
    where = " (inside a save)" if launch.inside_save else ""
    after = "?" if launch.step_at_signal is None else f"{launch.step_at_signal}"
    outcome.notes.append(f"{launch.stopped_by} at {launch.trigger}{where}: step {after} logged when sent, "
                         f"stopped after step {step}, exit {launch.returncode}, preempted step "
                         f"{record.get('step') if record else None}, newest checkpoint {latest}")
    for problem in problems:
        outcome.failures.append(f"{launch.stopped_by} at {launch.trigger}: {problem}")


def preemption(runner: Runner, rng: random.Random, *, quick: bool) -> Outcome:
    """SIGTERMs at seeded random moments (mid-OSR, inside saves, the OSR boundary checkpoint,
    fine-tuning) and one SIGUSR1, each followed by `--resume latest`; 0 steps may be lost."""
    outcome = Outcome("SIGTERM", max_lost_allowed=0, fault_word="stop")
    term, usr1 = signal.SIGTERM, signal.SIGUSR1

    def osr_step(pos: int):
        k = rng.randint(1, 2)
        return OnRecord(f"OSR step {k} +{1000 * (d := rng.uniform(0, 0.05)):.0f} ms", sig=term, delay=d,
                        event="step", stage="osr", stage_step=k)

    def osr_save(pos: int):
        return InSave(rng.choice([s for s in range(SAVE_EVERY, OSR_STEPS, SAVE_EVERY) if s > pos]),
                      rng.choice(SAVE_PHASES), sig=term)

    def osr_boundary_save(pos: int):
        return InSave(OSR_STEPS, rng.choice(SAVE_PHASES), second=True, sig=term)

    def finetune_step(pos: int, sig=term, last: int = TOTAL_STEPS - 2):
        t = rng.randint(max(pos, OSR_STEPS) + 1, min(max(pos, OSR_STEPS) + 4, last))
        return OnRecord(f"step {t} +{1000 * (d := rng.uniform(0, 0.1)):.0f} ms", sig=sig, delay=d,
                        event="step", step=t)

    def finetune_save(pos: int):
        first = max(pos, OSR_STEPS) + 1
        return InSave(rng.choice(range(first + first % SAVE_EVERY, TOTAL_STEPS - 2, SAVE_EVERY)),
                      rng.choice(SAVE_PHASES), sig=term)

    def sigusr1(pos: int):
        return finetune_step(pos, sig=usr1)

    plan = ([osr_step, finetune_save, sigusr1] if quick
            else [osr_step, osr_save, osr_boundary_save, finetune_step, finetune_save, sigusr1])
    launch, pos = None, 0
    for make in plan:
        launch = runner.launch(resume="latest" if launch else None, trigger=make(pos))
        if launch.stopped_by is None:
            outcome.notes.append(f"a planned stop ({launch.trigger}) not made: the job had finished")
            break
        check_stop(runner, launch, outcome)
        pos = launch.last_step
    if launch is not None and launch.stopped_by is not None:
        runner.launch(resume="latest")
    stale = [x for x in runner.launches if "stale lock" in x.stderr]
    if stale:
        outcome.failures.append(f"{len(stale)} launch(es) after a clean stop reported a stale lock")
    return outcome


def file_states(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under `out`: relative path -> (size, mtime in ns)."""
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(out.rglob("*")) if p.is_file()}


class SecondJobs:
    """When step `step` is logged: pause the job (SIGSTOP to its group, so that it surely holds the
    folder however slow the machine), run the same command on the same --out (then once more with
    `--resume latest`), note what they answered and whether any file changed, let the job go on."""

    spin = False

    def __init__(self, step: int):
        self.step = step
        self.label = f"step {step}"
        self.results: list[dict] = []
        self.owner: dict | None = None
        self.changed: list[str] = []

    def poll(self, out: Path, records: list[dict]) -> bool:
        return any(r["event"] == "step" and r["step"] == self.step for r in records)

    def act(self, runner: Runner, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGSTOP)
        try:
            paused_by = time.perf_counter() + 5.0
            while _proc_state(proc.pid) not in ("T", "t", "Z", None) and time.perf_counter() < paused_by:
                time.sleep(0.001)
            before = file_states(runner.out)
            self.owner = read_owner(runner.out)
            for resume in (None, "latest"):
                argv = job_argv(runner.shards, runner.out, resume=resume)
                started = time.perf_counter()
                second = subprocess.Popen(argv, cwd=REPO_ROOT, env=runner.env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, start_new_session=True)
                try:
                    stdout, stderr = second.communicate(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(second.pid, signal.SIGKILL)
                    stdout, stderr = second.communicate()
                self.results.append({"resume": resume, "returncode": second.returncode, "stderr": stderr,
                                     "stdout": stdout, "seconds": time.perf_counter() - started})
            after = file_states(runner.out)
            self.changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        finally:
            os.killpg(proc.pid, signal.SIGCONT)


def _proc_state(pid: int) -> str | None:
    fields = proc_stat(pid)
    return fields[0] if fields else None


def two_jobs(runner: Runner, rng: random.Random, *, reference_files: set[str],
             lock_after_s: float | None) -> Outcome:
    outcome = Outcome("two jobs, one folder", max_lost_allowed=0)
    trigger = SecondJobs(rng.randint(SAVE_EVERY + 1, TOTAL_STEPS - 3))
    first = runner.launch(trigger=trigger)
    owner = trigger.owner or {}
    for result in trigger.results:
        outcome.num_faults += 1
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        command = "same command" + (" + --resume latest" if result["resume"] else "")
        outcome.notes.append(f"{command} while the first job (pid {first.pid}) held the folder: exit "
                             f"{result['returncode']} {result['seconds']:.1f} s after its start: "
                             + (" | ".join(lines)[:300] or "no stderr"))
        expected = (f"error: run.out_dir {runner.out} is in use by job {owner.get('run_id')} (host "
                    f"{owner.get('host')}, pid {first.pid}, started ")
        if result["returncode"] != EXIT_USER_ERROR:
            outcome.failures.append(f"{command}: exit {result['returncode']}, not {EXIT_USER_ERROR}")
        if len(lines) != 1 or not lines[0].startswith(expected):
            outcome.failures.append(f"{command}: stderr is not the one `is in use by job` line naming pid "
                                    f"{first.pid} and run {owner.get('run_id')}")
        limit = (lock_after_s or 10.0) + REFUSAL_MARGIN_S
        if result["seconds"] > limit:
            outcome.failures.append(f"{command}: refused {result['seconds']:.1f} s after its start "
                                    f"(> {limit:.0f}: start-up + {REFUSAL_MARGIN_S:.0f})")
    if lock_after_s is not None:
        outcome.notes.append(f"(start-up: the straight run took its lock {lock_after_s:.1f} s after its "
                             "start)")
    if len(trigger.results) != 2:
        outcome.failures.append("the second jobs were not started (the first job ended before step "
                                f"{trigger.step})")
    if trigger.changed:
        outcome.failures.append("files changed while the first job was paused: "
                                + ", ".join(trigger.changed[:5]))
    events = [r["event"] for r in first.records]
    steps = [r["step"] for r in first.records if r["event"] == "step"]
    final_owner = read_owner(runner.out) or {}
    files = set(file_states(runner.out))
    outcome.notes.append(
        f"first job paused after step {trigger.step} while they ran; {len(trigger.changed)} files changed "
        f"meanwhile; it exited {first.returncode}; its log: {events.count('start')} start, "
        f"{events.count('resume')} resume, "
        f"{len(steps)} step records ({len(set(steps))} distinct); owner file at the end: pid "
        f"{final_owner.get('pid')}, active {final_owner.get('active')}; files as the straight run: "
        f"{'yes' if files == reference_files else 'no'}")
    if events.count("start") != 1 or "resume" in events or steps != list(range(1, TOTAL_STEPS + 1)):
        outcome.failures.append("the first job's log.jsonl holds records of another job")
    if (final_owner.get("run_id") != owner.get("run_id") or final_owner.get("pid") != first.pid
            or final_owner.get("active") is not False):
        outcome.failures.append("owner file at the end does not name the first job as released: "
                                f"{final_owner}")
    if files != reference_files:
        extra, missing = sorted(files - reference_files), sorted(reference_files - files)
        outcome.failures.append(f"files differ from the straight run's: extra {extra[:5]}, "
                                f"missing {missing[:5]}")
    return outcome


def world_size_change(runner: Runner, rng: random.Random) -> Outcome:
    """2 ranks -> SIGTERM in OSR -> payload planted in backend/universal -> 1 rank -> SIGTERM in
    fine-tuning -> 2 ranks to the end (DeepSpeed launcher, CPU ranks)."""
    outcome = Outcome("world size 2->1->2", max_lost_allowed=0, fault_word="stop", compare_state=False)
    marker = runner.out.parent / f"{runner.out.name}-payload-ran"
    osr_step = rng.randint(2, OSR_STEPS - 2)
    finetune_step = rng.randint(OSR_STEPS + 2, TOTAL_STEPS - 3)
    try:
        runner.ranks = 2
        first = runner.launch(trigger=OnRecord(f"OSR step {osr_step}", sig=signal.SIGTERM, event="step",
                                               stage="osr", stage_step=osr_step))
        if first.stopped_by is None:
            outcome.failures.append(f"scenario stopped: the 2-rank job ended before OSR step {osr_step}")
            return outcome
        check_stop(runner, first, outcome)
        latest = runner.out / "checkpoints" / (runner.out / "checkpoints" / LATEST).read_text().strip()
        universal = latest / "backend" / "universal"
        (universal / "zero" / "visual.proj").mkdir(parents=True, exist_ok=True)
        torch.save({"param": Planted(marker)}, universal / "zero" / "visual.proj" / "fp32.pt")
        torch.save({"module": Planted(marker)}, universal / "mp_rank_00_model_states.pt")
        outcome.num_faults += 1
        runner.ranks = 1
        second = runner.launch(resume="latest", trigger=OnRecord(
            f"step {finetune_step}", sig=signal.SIGTERM, event="step", step=finetune_step))
        if second.stopped_by is None:
            outcome.failures.append(f"scenario stopped: the 1-rank job did not stop at step {finetune_step}: "
                                    f"{second.error if second.returncode else 'it finished'}")
            return outcome
        check_stop(runner, second, outcome)
        runner.ranks = 2
        runner.launch(resume="latest")
    finally:
        runner.remove_shm_buffers()
    ran = marker.exists()
    outcome.notes.append(f"payload in {universal.relative_to(runner.out)}: {'RAN' if ran else 'never ran'}")
    if ran:
        outcome.failures.append("code planted in backend/universal ran")
        marker.unlink()
    sizes = [f"{x.argv[2]} rank(s): {x.resumed_from['stage']} step {x.resumed_from['stage_step']}"
             for x in runner.launches if x.resumed_from]
    outcome.notes.append("resumed on " + "; ".join(sizes))
    return outcome


def background_saves(runner: Runner, rng: random.Random) -> Outcome:
    """FSDP2 on 2 ranks with background checkpoints: kills while a checkpoint is being written (one in
    OSR, one in fine-tuning), compared with an uninterrupted FSDP2 run of the same command."""
    outcome = Outcome("kill in async save", max_lost_allowed=2 * SAVE_EVERY)
    straight = Runner(runner.shards, runner.out.with_name(runner.out.name + "-straight"), runner.logs)
    straight.fsdp_ranks = runner.fsdp_ranks = 2
    try:
        straight.launch()
        if not straight.finished():
            outcome.failures.append(f"scenario stopped: the uninterrupted FSDP2 run failed: "
                                    f"{straight.launches[-1].error}")
            return outcome
        outcome.reference = final_state(straight.out)
        mid_osr = rng.choice(range(SAVE_EVERY, OSR_STEPS, SAVE_EVERY))
        mid_finetune = rng.choice(range(OSR_STEPS + SAVE_EVERY, TOTAL_STEPS - SAVE_EVERY, SAVE_EVERY))
        run_with_kills(runner, outcome, [InBackgroundWrite(mid_osr), InBackgroundWrite(mid_finetune)])
    finally:
        shutil.rmtree(straight.out, ignore_errors=True)
    aimed = [x for x in runner.launches if x.killed]
    inside = [x for x in aimed if x.inside_save]
    outcome.notes.insert(0, f"{len(inside)}/{len(aimed)} kills landed inside a background write ("
                         + "; ".join(f"{x.trigger}: {'inside' if x.inside_save else 'after it'}" for x in aimed)
                         + ")")
    return outcome


def format_table(outcomes: list[Outcome]) -> str:
    table = Table(*(Column(name, align="<") for name in ("scenario", "faults", "resumed", "steps lost/kill",
                                                          "samples lost", "equal to straight", "ok")), sep="  ")
    rows = []
    for o in outcomes:
        equal = "yes" if o.equal else ("no: " + ", ".join(o.diffs) if o.diffs else "n/a")
        if not o.compare_state:
            equal = "n/a (visits)"
        lost = ",".join(map(str, o.steps_lost)) or "-"
        samples = "n/a" if o.samples_lost is None else str(o.samples_lost)
        ok = "yes" if o.ok else "NO"
        rows.append((o.name, str(o.num_faults), str(o.num_resumed), lost, samples, equal, ok))
    lines = [table.format(rows)]
    for o in outcomes:
        for note in o.notes:
            lines.append(f"  {o.name}: {note}")
        for failure in o.failures:
            lines.append(f"  {o.name}: FAILED: {failure}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="faults-bench-") as tmp:
        tmp = Path(tmp)
        csv_path = render_pairs(tmp / "raw", num_samples=NUM_SAMPLES, seed=0, split_name="train")
        build_shards(csv_path, tmp / "shards", samples_per_shard=NUM_SAMPLES // 4)
        logs = tmp / "stderr"
        logs.mkdir()

        def runner(name: str) -> Runner:
            return Runner(tmp / "shards", tmp / name, logs)

        straight = runner("straight")
        straight.launch()
        if not straight.finished():
            print(f"the straight run failed: {straight.launches[-1].error}")
            return 1
        reference = final_state(straight.out)
        reference_files = set(file_states(straight.out))
        outcomes = []
        scenarios = [
            ("random", lambda r: random_kills(r, rng, num_kills=2 if args.quick else 4)),
            ("save", lambda r: kills_in_save(r, rng, quick=args.quick)),
            ("osr", lambda r: osr_boundary(r, quick=args.quick)),
            ("nomarker", lambda r: corrupt_newest(r, rng, damage="no COMPLETE")),
            ("truncated", lambda r: corrupt_newest(r, rng, damage="optim.pt cut")),
            ("early", kill_before_checkpoint),
            ("sigterm", lambda r: preemption(r, rng, quick=args.quick)),
            ("twojobs", lambda r: two_jobs(r, rng, reference_files=reference_files,
                                             lock_after_s=straight.launches[0].lock_after_s)),
            ("worldsize", lambda r: world_size_change(r, rng)),
            ("asyncsave", lambda r: background_saves(r, rng)),
        ]
        if args.only:
            unknown = set(args.only) - {name for name, _ in scenarios}
            if unknown:
                known = ", ".join(name for name, _ in scenarios)
                print(f"unknown scenario(s) {sorted(unknown)}; known: {known}")
                return 2
            scenarios = [(name, scenario) for name, scenario in scenarios if name in args.only]
        for name, scenario in scenarios:
            fault_runner = runner(name)
            try:
                outcome = scenario(fault_runner)
            # A state the harness cannot go on from (e.g. no checkpoint to fall back to): a failed row.
            except (OSError, IndexError, ValueError, TimeoutError) as exc:
                outcome = Outcome(name)
                outcome.failures.append(f"scenario stopped: {type(exc).__name__}: {exc}")
            outcomes.append(settle(outcome, fault_runner, reference))
            shutil.rmtree(fault_runner.out, ignore_errors=True)
        if args.keep_stderr:
            shutil.copytree(logs, args.keep_stderr, dirs_exist_ok=True)

    print(f"{NUM_SAMPLES} samples, batch {BATCH_SIZE}, tiny-vit, OSR 1 epoch + fine-tuning 2 epochs "
          f"({TOTAL_STEPS} steps), checkpoint every {SAVE_EVERY} steps; {os.cpu_count()} CPU cores, "
          f"{time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.1f}; seed {args.seed}")
    print(format_table(outcomes))
    num_runs = len(outcomes)
    failed_resume = [o for o in outcomes if any(f.startswith(RESUME_FAILURES) for f in o.failures)]
    max_lost = max((n for o in outcomes if o.fault_word == "kill" for n in o.steps_lost), default=0)
    stops = [n for o in outcomes if o.fault_word == "stop" for n in o.steps_lost]
    second = [o for o in outcomes if o.name == "two jobs, one folder"]
    samples_lost = sum(o.samples_lost or 0 for o in outcomes)
    num_equal = sum(o.equal for o in outcomes)
    resumed = (f"all {num_runs} fault runs resumed" if not failed_resume
               else f"{len(failed_resume)} of {num_runs} fault runs failed to resume by --resume latest")
    equal = "yes" if num_equal == num_runs else f"no ({num_equal} of {num_runs})"
    stop_part = f" (per SIGTERM/SIGUSR1 stop {max(stops)})" if stops else ""
    second_part = ""
    if second:
        second_part = f"; second job on a held folder refused: {'yes' if all(o.ok for o in second) else 'NO'}"
    print(f"{resumed}; max steps lost per kill {max_lost}{stop_part}; samples lost {samples_lost}"
          f"{second_part}; final state equal to uninterrupted run: {equal}")
    return 0 if all(o.ok for o in outcomes) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer faults (2 random kills, 2 in saves, 2 around OSR, 3 stop requests)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays and targeted steps")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="run only these scenarios: random save osr nomarker truncated early sigterm "
                             "twojobs worldsize")
    parser.add_argument("--keep-stderr", type=Path, default=None, help="copy every launch's stderr here")
    args = parser.parse_args()
    sys.exit(run(args))


if __name__ == "__main__":
    main()
