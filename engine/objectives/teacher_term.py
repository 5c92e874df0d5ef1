"""The `wma_teacher` term (TRACER): distil the student's similarity distributions towards a moving-average teacher.

Enabled with `--set loss.terms.wma_teacher=LAMBDA` (added to the method's `contrastive`); the teacher follows
the `teacher` config section (`engine.objectives.teacher`). The teacher starts at the student's weights when
fine-tuning begins (after OSR, which moves no weight) and is updated after every `teacher.every_steps` taken
fine-tuning steps (a skipped step updates nothing). Each fine-tuning step runs one extra forward without
gradient at the teacher's weights (in place of the student's shards: `TermContext.model.shards_replaced`) and adds
`engine.objectives.distill.similarity_distillation`, logged as `wma_teacher_loss` (weighted by lambda). During
OSR the teacher is the student (w0), so the term's gradient is zero: nothing is computed and 0 is logged.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from engine.objectives.distill import similarity_distillation
from engine.objectives.padding import BatchMask
from engine.objectives.teacher import MovingAverageTeacher
from engine.objectives.terms import StepOutputs, TermBase, TermContext

logger = logging.getLogger(__name__)


class TeacherTerm(TermBase):
    """Similarity distillation from a WMA (or EMA) teacher of the student's own weights."""

    name = "wma_teacher"
    supports_accumulation = False  # its teacher forward reads the whole batch at once (data.accum_steps=1 only)

    def __init__(self, ctx: TermContext):
        if ctx.model is None:
            raise ValueError("loss.terms.wma_teacher needs the trained model (a trainer's TermContext.model)")
        self.ctx = ctx
        tcfg = ctx.cfg.teacher
        self.every_steps = tcfg.every_steps
        self.teacher = MovingAverageTeacher(kind=tcfg.kind, beta=tcfg.beta, ema_momentum=tcfg.ema_momentum)
        self.stage: str | None = None
        self.num_steps = 0  # taken fine-tuning steps the teacher has seen

    def begin_stage(self, stage: str, *, num_steps: int) -> None:
        self.stage = stage
        if stage != "finetune":
            return
        num_updates = num_steps // self.every_steps  # K
        if not self.teacher.started:
            self.teacher.start(self.ctx.model.parameter_shards(), num_updates=num_updates)
            # What the teacher costs this rank (fp32 shards) against one whole fp32 copy of the trained parameters.
            whole = sum(math.prod(shape) for _, _, shape in self.ctx.model.parameter_spans().values())
            self.ctx.log_event({"event": "teacher_started", "kind": self.teacher.kind, "beta": self.teacher.beta,
                                "every_steps": self.every_steps, "num_updates": num_updates,
                                "bytes_this_rank": sum(t.nbytes for t in self.teacher.shards.values()),
                                "bytes_whole_fp32": 4 * whole})
        elif num_updates != self.teacher.num_updates:  # a resume with more epochs: later weights use the new K
            logger.warning("wma_teacher: %d teacher updates planned instead of %d (run.epochs changed); updates "
                           "from now on are weighted over the new total", num_updates, self.teacher.num_updates)
            self.teacher.num_updates = max(num_updates, self.teacher.update_index)

    def __call__(self, batch, outputs: StepOutputs) -> dict:
        if self.stage != "finetune":
            # OSR: the teacher is w0, the student itself, so the term's gradient is exactly zero and its value is not
            # computed (no forward, no collective; logged as 0); the product keeps a graph when it is the only term.
            return {"wma_teacher_loss": 0.0 * outputs.image_features.sum()}
        ctx = self.ctx
        with ctx.model.shards_replaced(self.teacher.shards):
            teacher = ctx.model.forward_no_grad(batch.images, batch.texts)
        # The real batch only: padding slots are neither the student's nor the teacher's anchors or columns.
        mask = outputs.mask or BatchMask.unpadded(num_local=outputs.image_features.shape[0], rank=ctx.rank,
                                                  world_size=ctx.world_size, gather=ctx.gather)
        loss = similarity_distillation(
            mask.real(outputs.image_features), mask.real(outputs.text_features),
            mask.gather(mask.real(teacher.image_features.detach())),
            mask.gather(mask.real(teacher.text_features.detach())), tau=ctx.tau, offset=mask.offset,
            world_size=ctx.world_size, gather=mask.gather, reduce_sum=ctx.reduce_sum)
        return {"wma_teacher_loss": loss}

    def after_step(self) -> None:
        if self.stage != "finetune":
            return
        self.num_steps += 1
        if self.num_steps % self.every_steps == 0:
            self.teacher.update(self.ctx.model.parameter_shards())

    def summary(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def state_dict(self) -> dict:
        return {**self.teacher.state_dict(), "every_steps": self.every_steps, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict, *, origin: str | None = None) -> None:
        settings = {"kind": self.teacher.kind, "beta": self.teacher.beta, "ema_momentum": self.teacher.ema_momentum,
                    "every_steps": self.every_steps}
        changed = {key: (state.get(key), value) for key, value in settings.items() if state.get(key) != value}
        if changed:
            raise ValueError("objective.wma_teacher: the checkpoint's teacher had "
                             + ", ".join(f"{k} {old!r} (this job: {new!r})" for k, (old, new) in changed.items())
                             + "; resume with the same teacher settings")
        if bool(state.get("started")) != self.teacher.started:
            raise ValueError("objective.wma_teacher: the checkpoint's teacher weights are missing (objective/"
                             "wma_teacher/teacher.safetensors); use another step_* folder")
        self.teacher.load_state_dict(state)
        self.num_steps = int(state["num_steps"])

    def save(self, directory: Path) -> None:
        self.teacher.save(directory, spans=self.ctx.model.parameter_spans(), gather=self.ctx.gather,
                          is_main=self.ctx.rank == 0)

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        # One file of whole parameters, read in this rank's slices: another number of ranks (reshard) reads it alike.
        model = self.ctx.model
        self.teacher.shards = None
        self.teacher.load(directory, spans=model.parameter_spans(), like=model.parameter_shards())
