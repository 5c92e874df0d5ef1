"""The whole job (`JobConfig`): the method and one section per component, validated together."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from engine.config.choices import METHOD_SURROGATE, Method
from engine.config.data import DataConfig
from engine.config.evaluation import EvalConfig
from engine.config.fields import choice_errors, setting
from engine.config.model import ModelConfig
from engine.config.run import RunConfig
from engine.config.training import LossConfig, OptimConfig, OSRConfig, TeacherConfig


@dataclass
class JobConfig:
    """The whole job: method plus one section per component."""

    method: Method = setting("tuneclip", "what runs (paper Table 9): tuneclip = OSR + HGCL, fastclip = GCL, "
                             "openclip = MBCL, siglip = SigLIP's sigmoid loss", osr="surrogate")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    osr: OSRConfig = field(default_factory=OSRConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def surrogate(self) -> str:
        """The fine-tuning surrogate after resolving `auto` from the method."""
        return METHOD_SURROGATE[self.method] if self.loss.surrogate == "auto" else self.loss.surrogate

    @property
    def osr_surrogate(self) -> str:
        """The OSR surrogate: by default the stage-II loss, so u* and m* match what stage II uses."""
        if self.osr.surrogate != "auto":
            return self.osr.surrogate
        return self.surrogate if self.surrogate not in ("mbcl", "siglip") else "gcl"

    def errors(self, *, training: bool = True) -> list[str]:
        """Every problem of the configuration; `training=False` (evaluation) needs no training data."""
        out = choice_errors(self, "")
        out.extend(self.data.errors(training=training))
        for section in (self.model, self.loss, self.optim, self.osr, self.teacher, self.eval, self.run):
            out.extend(section.errors())
        out.extend(self._interpolate_errors())
        return out

    def _interpolate_errors(self) -> list[str]:
        """run.interpolate needs base weights to mix with and eval tasks to measure on; its select, one of them."""
        if not self.run.interpolate:
            return []
        out = []
        tasks = [str(task["name"]) for section in ("zeroshot", "retrieval") for task in getattr(self.eval, section)
                 if isinstance(task, dict) and "name" in task]
        if not self.model.weights and not self.model.has_own_weights():
            out.append("run.interpolate needs base weights (model.weights) to mix with; a run from a random init "
                       "has none: unset run.interpolate")
        if not tasks:
            out.append("run.interpolate needs evaluation tasks (eval.zeroshot / eval.retrieval) to measure each a on")
        select = self.run.interpolate_select
        if select and tasks and select.rpartition("/")[0] not in tasks:
            out.append(f"run.interpolate_select {select!r}: not an evaluation task; use TASK/METRIC with TASK one of "
                       f"{', '.join(tasks)}")
        return out

    def validate(self, *, training: bool = True) -> JobConfig:
        """Raise one ValueError listing every problem, or return self."""
        problems = self.errors(training=training)
        if problems:
            raise ValueError("invalid configuration:\n  - " + "\n  - ".join(problems))
        return self

    def to_dict(self) -> dict:
        """Plain JSON-compatible dict (tuples as lists), as stored in logs and checkpoints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def digest(self) -> str:
        """Stable hash of the configuration (recorded with logs and checkpoints)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
