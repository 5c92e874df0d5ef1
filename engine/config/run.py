"""The `run` section: where outputs go, how long to train, checkpoints, logging and the backend."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.backends import backend_names
from engine.config.choices import CompileMode, WandbMode
from engine.config.fields import choice_errors, setting


@dataclass
class RunConfig:
    """Where outputs go, how long to train, logging and the backend."""

    out_dir: str = setting("runs/tuneclip", "the run folder: log, checkpoints, weights, summary",
                           resume="may_change")
    epochs: int = setting(5, "fine-tuning epochs", resume="may_grow")
    max_steps_per_epoch: int = setting(0, "0 = the whole epoch (useful for smoke runs)")
    seed: int = setting(0, "seeds the data order, augmentation and random initialisation", osr=True)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N", resume="may_change")
    log_every: int = setting(10, "steps between log lines", resume="may_change")
    backend: str = setting("single", "any name in the backend registry (engine.backends): single | deepspeed | fsdp")
    zero_config: str | None = setting(None, "DeepSpeed config (zero_configs/*.json) for run.backend=deepspeed")
    progress: bool = setting(True, "progress bars (rank 0)", resume="may_change")
    save_every_steps: int = setting(0, "steps between periodic checkpoints; 0 = none", resume="may_change")
    save_every_epochs: int = setting(0, "also a checkpoint at every N-th epoch end of each stage; 0 = none",
                                     resume="may_change")
    keep_last_n: int = setting(2, "complete checkpoints kept; older ones are removed, except the u table's base "
                               "and deltas a kept checkpoint applies on, trimmed to the u table's files",
                               resume="may_change")
    u_table_full_every: int = setting(
        8, "the u table's checkpoints: a full copy every this many saves, in between only the pages written since "
        "the previous save (a delta on it); 1: a full copy every time", resume="may_change")
    async_checkpoint: bool = setting(
        False, "write checkpoints in the background (run.backend=fsdp): training goes on while the shards are "
        "written; a checkpoint counts (latest, resume) only once every rank's write has finished", resume="may_change")
    resume: str | None = setting(None, "latest or a checkpoint folder to continue from", resume="may_change")
    max_bad_steps: int = setting(5, "consecutive non-finite steps skipped before the run aborts", resume="schedule")
    collective_timeout_s: int = setting(600, "a rank waiting this long (seconds) in a collective fails the job "
                                        "(dead or frozen rank)", resume="may_change")
    node_local_dir: str | None = setting(
        None, "several nodes: a folder on each node's local disk for that node's replica of the u table (default: "
        "one folder per node under out_dir, each opened by its node only)", resume="may_change")
    below_base_tolerance: float = setting(0.005, "an evaluation more than this under the base (metric units) is "
                                          "warned about", resume="may_change")
    stop_below_base: int = setting(0, "stop fine-tuning after this many consecutive evaluations below the base; "
                                   "0 = never", resume="may_change")
    tensorboard: bool = setting(False, "also log scalars to <out_dir>/tensorboard (per step and per evaluation)",
                                resume="may_change")
    wandb_project: str | None = setting(None, "also log to Weights & Biases (optional package wandb)",
                                        resume="may_change")
    wandb_mode: WandbMode = setting("offline", "offline: files under <out_dir>/wandb (wandb sync later); online",
                                    resume="may_change")
    interpolate: str | None = setting(
        None, "weight-space interpolation at the end of fine-tuning (as run.py interpolate --alphas): a grid of a "
        "(START:STOP:STEP and/or a comma list, each in [0, 1]) evaluated on the eval tasks in one process after "
        "final.safetensors and summary.json are written; interpolate.json in out_dir; empty = off",
        resume="may_change")
    interpolate_select: str | None = setting(
        None, "with run.interpolate: TASK/METRIC of a task held out as validation; the best a on it is exported "
        "to out_dir/interpolated.safetensors (never chosen on the test tasks: empty = nothing exported)",
        resume="may_change")
    compile: CompileMode = setting(
        "none", "torch.compile: none | blocks (each transformer block of both towers: every backend but ZeRO-3) | "
        "model (the whole forward, both towers in one graph: single and ZeRO-1/2) | step (model's, blocks' on "
        "FSDP2, and GCL/HGCL's elementwise work per similarity block, fused); weights, checkpoints and resume "
        "unchanged", resume="may_change")
    compile_backend: str = setting("inductor", "torch.compile backend for run.compile (inductor; aot_eager or "
                                   "eager to debug a compile problem)", resume="may_change")
    plugins: list[str] = setting([], "modules the trainer imports (on every rank) before it builds the job: the loss "
                                 "terms and normalisers they register can be named in loss.terms / loss.normaliser",
                                 resume="may_change")

    @property
    def saves_periodically(self) -> bool:
        """Whether checkpoints are written during the run (every N steps or epochs), not only when stopped."""
        return self.save_every_steps > 0 or self.save_every_epochs > 0

    def errors(self) -> list[str]:
        out = choice_errors(self, "run")
        if self.epochs < 0:
            out.append(f"run.epochs must be >= 0, got {self.epochs}")
        if self.backend not in backend_names():
            out.append(f"run.backend must be one of {backend_names()}, got {self.backend!r}")
        if self.log_every < 1:
            out.append(f"run.log_every must be >= 1, got {self.log_every}")
        if self.save_every_steps < 0:
            out.append(f"run.save_every_steps must be >= 0 (0 = off), got {self.save_every_steps}")
        if self.save_every_epochs < 0:
            out.append(f"run.save_every_epochs must be >= 0 (0 = off), got {self.save_every_epochs}")
        if self.keep_last_n < 1:
            out.append(f"run.keep_last_n must be >= 1, got {self.keep_last_n}")
        if self.u_table_full_every < 1:
            out.append(f"run.u_table_full_every must be >= 1 (1: every save a full copy), got {self.u_table_full_every}")
        if self.collective_timeout_s < 1:
            out.append(f"run.collective_timeout_s must be >= 1 (seconds), got {self.collective_timeout_s}")
        if self.max_bad_steps < 1:
            out.append(f"run.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.below_base_tolerance < 0:
            out.append(f"run.below_base_tolerance must be >= 0 (metric units), got {self.below_base_tolerance}")
        if self.stop_below_base < 0:
            out.append(f"run.stop_below_base must be >= 0 (0 = never stop), got {self.stop_below_base}")
        if self.interpolate:
            from engine.results.interpolate import parse_alphas

            try:
                parse_alphas(self.interpolate, name="run.interpolate")
            except ValueError as exc:
                out.append(str(exc))
        elif self.interpolate_select:
            out.append(f"run.interpolate_select {self.interpolate_select!r} needs run.interpolate (the grid of a to "
                       "choose from), e.g. run.interpolate=0:1:0.25")
        if self.resume not in (None, "latest") and not Path(self.resume).is_dir():
            out.append(f"run.resume: {self.resume} is not a checkpoint folder; give 'latest' or a "
                       "<run>/checkpoints/step_N folder")
        if self.zero_config is not None or self.backend == "deepspeed":
            from engine.backends.zero_configs import resolve_zero_config

            try:
                resolve_zero_config(self.zero_config)
            except FileNotFoundError as exc:
                out.append(str(exc))
        return out
