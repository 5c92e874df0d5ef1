"""Runs that survive: SIGKILL a tuning job, corrupt its checkpoints, resume it, compare with a straight run.

Target: every fault run completes through `python run.py tune ... --resume latest` (a corrupted newest
checkpoint is either skipped for the previous complete one or refused with the CLI's `error:` line, not
a traceback), loses at most `--save-every` steps per kill (2 x that when the newest checkpoint is
corrupted), visits every sample exactly as often as the uninterrupted run, and ends bit for bit in the
uninterrupted run's final state: weights in final.safetensors, u table rows and visit counts, AdamW
moments and step counter in the last checkpoint's backend/optim.pt (loaded with weights_only=True).
Exit status 1 when any of it is missed.

Job: 64 synthetic image-caption pairs (engine.synthetic) in 4 shards, batch 8, tiny-vit, TuneCLIP with
OSR 1 epoch (8 steps at lr 0) then fine-tuning 2 epochs (16 steps), a checkpoint every 2 steps, one
step event per step in log.jsonl. Every launch is the real CLI in its own process group (one torch
thread), killed with SIGKILL (no handler runs, nothing is flushed by the job). Scenarios, each its own
run directory next to one straight reference run:

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

Steps lost per kill = the last step logged before the kill minus the step the next launch resumed
from (log.jsonl `step` / `resume` events). Samples lost = u table rows whose visit count differs from
the straight run's (lost or repeated). The straight run and the fault runs use the same command, so
any difference is the engine's. Process start-up dominates (each of the ~23 launches imports torch
and open_clip): 1.7 minutes on 2 CPU cores at load average 3, 5.3 minutes at load average 12 (other
jobs on the machine); `--quick` makes fewer kills (17 launches, 1.5 minutes at load average 3).

    python benchmarks/faults.py            # full run
    python benchmarks/faults.py --quick    # fewer kills
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
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

from engine.checkpoint import COMPLETE, LATEST, is_complete
from engine.objectives.table import UTable
from engine.data.build import build_shards
from engine.synthetic import render_pairs

NUM_SAMPLES = 64
BATCH_SIZE = 8
SAVE_EVERY = 2
OSR_STEPS = NUM_SAMPLES // BATCH_SIZE  # 1 OSR epoch
TOTAL_STEPS = OSR_STEPS * 3  # + 2 fine-tuning epochs
LAUNCH_TIMEOUT_S = 240.0
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

    def __init__(self, delay: float):
        self.delay = delay
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
    """As soon as a log record with these field values appears."""

    spin = False

    def __init__(self, label: str, **match):
        self.label, self.match = label, match

    def poll(self, out: Path, records: list[dict]) -> bool:
        return any(all(r.get(k) == v for k, v in self.match.items()) for r in records)


class InSave:
    """Inside the save of step `step`, as soon as `phase` shows in its staging folder.

    Phases: staging (folder created), backend (optim.pt being written), marker (COMPLETE being
    written), replace (the old step_N folder being deleted; only when `second`: the second save of
    the same step at the end of OSR or of the run, armed by what the job does between the two).
    """

    def __init__(self, step: int, phase: str, *, second: bool = False):
        self.step, self.phase, self.second = step, phase, second
        self.spin = False  # armed: the runner polls without sleeping
        self.seen_staging = False
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
        return self.seen_staging or any(r["event"] == "step" and r["step"] > self.step for r in records)


@dataclass
class Launch:
    """One process of the job: how it ended and what it logged."""

    argv: list[str]
    records: list[dict]
    returncode: int
    killed: bool
    stderr: str
    trigger: str = ""
    inside_save: bool | None = None
    handled: bool = False  # a failure the scenario has judged already

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
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def launch(self, *, resume: str | None = None, trigger=None) -> Launch:
        argv = job_argv(self.shards, self.out, resume=resume)
        err_path = self.logs / f"{self.out.name}_{len(self.launches):02d}.err"
        records: list[dict] = []
        killed, polls = False, 0
        started = time.perf_counter()
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
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        killed = True
                        break
                    if time.perf_counter() - started > LAUNCH_TIMEOUT_S:
                        raise TimeoutError(f"{' '.join(argv)} ran longer than {LAUNCH_TIMEOUT_S:.0f} s")
                    if not spinning:
                        time.sleep(0.002)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        records += self.tail.read()
        launch = Launch(argv, records, proc.returncode, killed, err_path.read_text(),
                        trigger=getattr(trigger, "label", ""))
        if killed and isinstance(trigger, InSave):
            launch.inside_save = staging_dir(self.out, trigger.step).exists()
        self.launches.append(launch)
        return launch

    def finished(self) -> bool:
        done = bool(self.launches) and self.launches[-1].returncode == 0
        return done and (self.out / "final.safetensors").exists()


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
    optim = torch.load(latest / "backend" / "optim.pt", weights_only=True)["optimizer"]
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
    optim, ref_optim = state["optim"]["state"], reference["optim"]["state"]
    if optim.keys() != ref_optim.keys() or not all(
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
    num_faults: int = 0
    num_resumed: int = 0
    steps_lost: list[int] = field(default_factory=list)
    samples_lost: int | None = None
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
        if not launch.killed:
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
        outcome.notes.append("step at each kill -> step resumed from: " + ", ".join(positions))
    if outcome.steps_lost and max(outcome.steps_lost) > outcome.max_lost_allowed:
        outcome.failures.append(f"lost {max(outcome.steps_lost)} steps in one kill (at most "
                                f"{outcome.max_lost_allowed} expected)")
    if not runner.finished():
        outcome.failures.append("the job did not complete")
        return outcome
    state = final_state(runner.out)
    outcome.samples_lost = int((state["visits"] != reference["visits"]).sum())
    outcome.diffs = differences(state, reference)
    return outcome


# ----- scenarios -----
def random_kills(runner: Runner, rng: random.Random, *, num_kills: int) -> Outcome:
    outcome = Outcome("random kills")
    triggers = [AfterDelay(rng.uniform(0.1, 0.8)) for _ in range(num_kills)]
    run_with_kills(runner, outcome, triggers)
    outcome.notes.append("kills " + ", ".join(x.trigger.split()[0] for x in runner.launches if x.killed)
                         + " s after a launch's first step")
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


def format_table(outcomes: list[Outcome]) -> str:
    header = ("scenario", "faults", "resumed", "steps lost/kill", "samples lost", "equal to straight", "ok")
    rows = []
    for o in outcomes:
        equal = "yes" if o.equal else ("no: " + ", ".join(o.diffs) if o.diffs else "n/a")
        lost = ",".join(map(str, o.steps_lost)) or "-"
        samples = "n/a" if o.samples_lost is None else str(o.samples_lost)
        ok = "yes" if o.ok else "NO"
        rows.append((o.name, str(o.num_faults), str(o.num_resumed), lost, samples, equal, ok))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
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
        outcomes = []
        scenarios = [
            ("random", lambda r: random_kills(r, rng, num_kills=2 if args.quick else 4)),
            ("save", lambda r: kills_in_save(r, rng, quick=args.quick)),
            ("osr", lambda r: osr_boundary(r, quick=args.quick)),
            ("nomarker", lambda r: corrupt_newest(r, rng, damage="no COMPLETE")),
            ("truncated", lambda r: corrupt_newest(r, rng, damage="optim.pt cut")),
            ("early", kill_before_checkpoint),
        ]
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
    max_lost = max((n for o in outcomes for n in o.steps_lost), default=0)
    samples_lost = sum(o.samples_lost or 0 for o in outcomes)
    num_equal = sum(o.equal for o in outcomes)
    resumed = (f"all {num_runs} fault runs resumed" if not failed_resume
               else f"{len(failed_resume)} of {num_runs} fault runs failed to resume by --resume latest")
    equal = "yes" if num_equal == num_runs else f"no ({num_equal} of {num_runs})"
    print(f"{resumed}; max steps lost per fault {max_lost}; samples lost {samples_lost}; "
          f"final state equal to uninterrupted run: {equal}")
    return 0 if all(o.ok for o in outcomes) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer kills (2 random, 2 in saves, 2 around OSR)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays and targeted steps")
    parser.add_argument("--keep-stderr", type=Path, default=None, help="copy every launch's stderr here")
    args = parser.parse_args()
    sys.exit(run(args))


if __name__ == "__main__":
    main()
