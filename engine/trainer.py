"""The training loop: stage `osr` (paper Algorithm 1) and stage `finetune` (Algorithm 2 / baselines).

Both stages share `train_step`: encode, objective (named terms), backward of their sum, AdamW
step. OSR is the same step at learning rate 0 (weights stay bit-identical, AdamW's moments and
step counter accumulate G at w0, the normaliser accumulates Phi at w0); fine-tuning then continues
from those moments with the step counter carried on, so bias correction is not restarted.

The trainer builds the parts and drives them; it does not know which backend, objective or
normaliser it has (registries in `engine.backends` and `engine.objectives` choose them).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path

import torch

from engine import __version__
from engine.accumulate import ForwardBackward, step_outputs
from engine.backends import backend_class, backend_names, select_backend
from engine.backends.base import OptimSettings
from engine.checkpoint import BACKEND_PART, TRAIN_STATE, CheckpointManager, schedule_changes
from engine.compiling import compile_model, loss_kernels
from engine.config import METHOD_RUNS_OSR, JobConfig
from engine.data import Batch, LoaderPlan, Manifest, ShardLoader
from engine.data.samples import read_limits
from engine.distributed import (
    all_reduce_sum,
    barrier,
    context_from_env,
    default_device,
    gather_no_grad,
)
from engine.evaluate import Evaluator, build_tasks, write_results
from engine.evaluate.policy import EvalPolicy
from engine.freezing import freeze_untrained
from engine.objectives import ModelAccess, TermContext, build_terms
from engine.objectives.contrastive_term import terms_state_of_old_checkpoint
from engine.objectives.normaliser import build_normaliser
from engine.plugins import import_plugins
from engine.results.summary import format_rate, run_summary, write_summary
from engine.run.cost import RunCost
from engine.run.folder_guard import guard_run_folder
from engine.run.heartbeat import Heartbeat
from engine.run.live import build_live_sinks
from engine.run.lock import RunLock
from engine.run.log import JsonlLogger
from engine.run.preemption import Preempted, StopRequests
from engine.run.progress import StageProgress
from engine.run.throughput import Throughput
from engine.schedules import cosine_lr
from models import export_model
from models.towers import layer_decay_scales

logger = logging.getLogger(__name__)

# What a run writes in place inside run.out_dir (appends, memory maps, copies), so never through a link;
# single files it writes atomically (final.safetensors, eval_step*.json) replace a link instead.
RUN_ENTRIES = ("checkpoints", "u_table", "u_table_nodes", "log.jsonl", "skipped", "tensorboard", ".heartbeat",
               "final", "best")  # final/, best/: the local-dir: folders beside final/best.safetensors


class Trainer:
    """Owns model, data, normaliser, objective and backend for one job; `tune()` runs OSR then fine-tuning.

    Works as one process or as one rank of a `deepspeed` / `torchrun` job: ranks read their share
    of every global batch, the objective sees the global batch, rank 0 writes logs and exports.
    """

    def __init__(self, cfg: JobConfig, *, local_rank: int | None = None, overwrite: bool = False):
        """`overwrite`: a fresh job may replace an earlier run of this engine in run.out_dir (removed under the
        run lock, each entry named); a resumed one may continue a finished run, rewriting its results."""
        import_plugins(cfg.run.plugins)  # what they register (loss terms, normalisers) can be named below
        self.cfg = cfg.validate()
        self.overwrite = overwrite
        self.ctx = context_from_env(local_rank)
        backend_cls = select_backend(cfg.run.backend, world_size=self.ctx.world_size)
        if cfg.run.async_checkpoint and not backend_cls.supports_async_save:
            able = [name for name in backend_names() if backend_class(name).supports_async_save]
            raise ValueError(f"run.async_checkpoint: run.backend={cfg.run.backend} writes checkpoints synchronously; "
                             f"use run.backend={' or '.join(able)} for background writes or remove run.async_checkpoint")
        if cfg.data.batch_size % (self.ctx.world_size * cfg.data.accum_steps):
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} (global) is not divisible by the {self.ctx.world_size} "
                f"ranks x data.accum_steps={cfg.data.accum_steps}; pick a multiple of their product"
            )
        self.local_batch = cfg.data.batch_size // self.ctx.world_size
        self.micro_batch = self.local_batch // cfg.data.accum_steps  # what the model encodes at once
        backend_cls.init_distributed(self.ctx, timeout_s=cfg.run.collective_timeout_s)
        self.out_dir = Path(cfg.run.out_dir)
        self.lock = RunLock(self.out_dir, self.ctx, own_entries=RUN_ENTRIES)
        self.stop_requests = self.heartbeat = None
        try:
            self._build(backend_cls)
        except BaseException:
            self._release_run()
            raise

    def _build(self, backend_cls) -> None:
        """Every part of the job, then the state to continue from (a checkpoint or OSR statistics)."""
        cfg = self.cfg
        fresh = not (cfg.run.resume or cfg.osr.load_from)
        guard_run_folder(self.out_dir, self.ctx, resume=cfg.run.resume, fresh=fresh, overwrite=self.overwrite)
        torch.manual_seed(cfg.run.seed)
        self.device = default_device(self.ctx, cfg.run.device)

        self.manifest = Manifest.load(_manifest_path(cfg.data.train))
        if self.ctx.is_main:
            self.manifest.verify(checksums=cfg.data.verify_checksums)

        # The backend's way: ZeRO-3 partitions while building, FSDP2 builds on the meta device.
        optim = OptimSettings.from_config(cfg.optim)  # one object: every backend builds AdamW from it
        self.bundle, self.tau = backend_cls.build_bundle(cfg, ctx=self.ctx, micro_batch_size=self.micro_batch,
                                                         optim=optim)
        model = self.bundle.model
        # The temperature stays fixed at the checkpoint's value (TuneCLIP never learns it); a bias only
        # an objective that uses it learns (SigLIP's loss).
        self._freeze(model)
        # Layer decay's lr factors, by name: every backend builds its param groups from them.
        optim = dataclasses.replace(optim, lr_scales=layer_decay_scales(
            model, image=cfg.optim.layer_decay_image, text=cfg.optim.layer_decay_text))
        if cfg.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.backend = backend_cls.from_config(cfg, model, ctx=self.ctx, device=self.device,
                                               micro_batch_size=self.micro_batch, optim=optim)
        compile_model(self.backend, cfg.run)
        self.loader = ShardLoader(
            self.manifest, batch_size=self.local_batch,
            image_transform=(self.bundle.eval_transform if cfg.data.train_transform == "eval"
                             else self.bundle.train_transform),
            tokenizer=self.bundle.tokenizer, rank=self.ctx.rank, world_size=self.ctx.world_size,
            num_workers=cfg.data.num_workers, seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer,
            resampled=cfg.data.resampled, samples_per_epoch=cfg.data.samples_per_epoch,
            max_image_pixels=cfg.data.max_image_pixels, max_member_bytes=cfg.data.max_member_bytes,
        )
        tasks = build_tasks(cfg.eval, limits=read_limits(cfg.data))
        self.evaluator = (Evaluator(tasks, batch_size=cfg.eval.batch_size, device=self.device,
                                    num_workers=cfg.eval.num_workers) if tasks else None)
        self.history: list[dict] = []  # evaluation records: stage, global step, results
        self.global_step = 0  # optimizer steps of this job, OSR and fine-tuning together
        self.data_epoch = 0  # passes over the data (each has its own shuffle)
        self.osr_steps = 0
        self.stage, self.stage_step = "start", 0  # position: stage and batches done in it
        # Epochs of the stage done, batches done in the current one (None: derive them, older checkpoints).
        self.stage_epoch: int | None = 0
        self.epoch_step: int | None = 0
        self.num_bad_steps = 0  # consecutive non-finite steps skipped
        self._more_epochs = False  # resumed with a larger run.epochs: fine-tuning goes on past its old end
        # Best weights (the base model a candidate), below-base warnings, early stop; a checkpoint part.
        self.eval_policy = EvalPolicy(best_metric=cfg.eval.best_metric,
                                      below_base_tolerance=cfg.run.below_base_tolerance,
                                      stop_below_base=cfg.run.stop_below_base)
        self._base_pending = False
        self.normaliser = build_normaliser(cfg.loss, out_dir=self.out_dir, num_rows=self.manifest.num_samples,
                                           dataset_fingerprint=self.manifest.fingerprint(), ctx=self.ctx, fresh=fresh,
                                           node_local_dir=cfg.run.node_local_dir, device=self.device,
                                           u_table_full_every=cfg.run.u_table_full_every)
        # The loss terms of loss.terms (registry in engine.objectives.terms); they keep their own state.
        self.objective = build_terms(cfg.loss.terms, TermContext(
            cfg=cfg, tau=self.tau, normaliser=self.normaliser, rank=self.ctx.rank, world_size=self.ctx.world_size,
            local_batch=self.local_batch, gather=gather_no_grad, reduce_sum=all_reduce_sum,
            log_event=lambda record: self.log.write(record), loss_kernels=loss_kernels(cfg.run),
            model=ModelAccess(parameter_shards=self.backend.parameter_shards,
                              parameter_spans=self.backend.parameter_spans,
                              shards_replaced=self.backend.shards_replaced,
                              forward_no_grad=lambda images, texts: step_outputs(
                                  self.backend.forward_no_grad(images, texts)))))
        self.forward_backward = ForwardBackward(self.backend, self.objective, accum_steps=cfg.data.accum_steps)
        self.throughput: Throughput | None = None  # FLOPs per sample and peak: at the first stage
        self.cost = RunCost(world_size=self.ctx.world_size)  # every launch's share, carried by checkpoints
        self.checkpoints = CheckpointManager(
            self.out_dir / "checkpoints", self.ctx, keep_last_n=cfg.run.keep_last_n,
            async_save=cfg.run.async_checkpoint,
            parts={TRAIN_STATE: self, BACKEND_PART: self.backend, "normaliser": self.normaliser,
                   "objective": self.objective,
                   "data_plan": LoaderPlan(self.loader), "cost": self.cost, "eval_policy": self.eval_policy},
            rank_parts={"loader": self.loader},
        )
        self.log = JsonlLogger(self.out_dir / "log.jsonl", enabled=self.ctx.is_main,
                               sinks=build_live_sinks(cfg, self.out_dir) if self.ctx.is_main else ())
        self.stop_requests = StopRequests(device=self.device).install()
        # Names a dead or frozen rank when a collective times out (one process has no peers).
        if self.ctx.distributed:
            self.heartbeat = Heartbeat(self.out_dir / ".heartbeat", self.ctx,
                                       timeout_s=cfg.run.collective_timeout_s).start()
        self.log.write({"event": "start", "config": cfg.to_dict(), "config_digest": cfg.digest(),
                        "tau": self.tau, "num_samples": self.manifest.num_samples,
                        "world_size": self.ctx.world_size})
        if cfg.run.resume:
            self.resume(cfg.run.resume)
        elif cfg.osr.load_from:
            self.load_osr(cfg.osr.load_from)

    def _freeze(self, model: torch.nn.Module) -> None:
        """Freeze what the job does not train (`engine.freezing`), before the backend builds AdamW."""
        frozen = freeze_untrained(model, self.cfg)
        numel = {name: getattr(p, "ds_numel", p.numel()) for name, p in model.named_parameters()}
        for kind, unlocked in self.cfg.model.locks().items():
            logger.info("locked the %s tower but its last %d group(s): %d parameters (%d values) frozen", kind,
                        unlocked, len(frozen[kind]), sum(numel[name] for name in frozen[kind]))

    # ----- the step shared by both stages -----
    def train_step(self, batch: Batch, *, lr: float, grad_clip: float) -> dict:
        """Forward, objective, backward of its terms' sum and one AdamW step at `lr` (0 = OSR).

        Returns scalar metrics: `loss` (the sum), every term, the objective's diagnostics. A
        non-finite total (any rank's term, feature or estimate) skips the step on every rank (no
        optimizer update, objective state untouched) and is logged with the batch's sample keys;
        after `run.max_bad_steps` consecutive ones the run stops.
        """
        objective = self.objective
        out, total, backward = self.forward_backward(batch)  # in data.accum_steps micro-batches (engine.accumulate)
        if out["samples"] == 0:  # padding on every rank (skips emptied the tail): nothing to learn, no update
            objective.skip_step()
            return {"samples": 0, "lr": lr, "skipped": True}
        # Terms carry global values, so every rank takes the same decision without a collective.
        if not torch.isfinite(total).item():
            objective.skip_step()
            return self._skip_step(batch, reason="non-finite loss/features", samples=out["samples"])
        backward()
        grad_norm = self.backend.step(lr=lr, grad_clip=grad_clip)
        if not math.isfinite(grad_norm):
            objective.skip_step()
            if not self.backend.state_finite():  # the update went in: nothing after the last checkpoint is kept
                raise FloatingPointError(
                    f"step {self.global_step + 1} had a non-finite gradient norm and made the weights or AdamW "
                    "state non-finite; nothing was saved after it. Resume from the last checkpoint with a lower "
                    "learning rate (--resume latest --lr ...) or check the data (batch keys in log.jsonl)"
                )
            return self._skip_step(batch, reason="non-finite gradient norm (update not applied)",
                                   samples=out["samples"])
        objective.after_step()
        self.global_step += 1
        self.num_bad_steps = 0
        values = {key.removesuffix("_value"): float(value.detach() if torch.is_tensor(value) else value)
                  for key, value in out.items()}
        return {"loss": float(total.detach()), **values, "grad_norm": grad_norm, "lr": lr,
                **self.normaliser.metrics()}

    def _skip_step(self, batch: Batch, *, reason: str, samples: float) -> dict:
        self.num_bad_steps += 1
        self.backend.zero_grad()
        logger.warning("%s at step %d: step skipped (%d in a row); batch keys %s",
                       reason, self.global_step, self.num_bad_steps, batch.keys[:16])
        self.log.write({"event": "bad_step", "step": self.global_step, "reason": reason, "keys": batch.keys,
                        "consecutive": self.num_bad_steps})
        if self.num_bad_steps >= self.cfg.run.max_bad_steps:
            raise FloatingPointError(
                f"{self.num_bad_steps} consecutive non-finite steps (last at step {self.global_step}, {reason}); "
                "nothing was saved after them. Resume from the last checkpoint with a lower learning rate "
                "(--resume latest --lr ...), check the data for broken samples (keys in log.jsonl), or use fp32"
            )
        return {"loss": float("nan"), "batch_loss": float("nan"), "grad_norm": float("nan"), "lr": 0.0,
                "gamma": 0.0, "skipped": True, "samples": samples}

    # ----- stages -----
    def _steps_per_epoch(self, epoch: int | None = None) -> int:
        """Steps of data epoch `epoch` (None: of a whole epoch on this world size), capped by
        run.max_steps_per_epoch. An epoch continued from another world size has its own count."""
        n = self.loader.num_batches(epoch)
        cap = self.cfg.run.max_steps_per_epoch
        return min(n, cap) if cap > 0 else n

    def _throughput(self) -> Throughput:
        """FLOPs per sample and the device's peak, counted once per launch and recorded in the log."""
        if self.throughput is None:
            mcfg = self.cfg.model
            self.throughput = Throughput.for_job(mcfg.name, mcfg.build_kwargs(), precision=mcfg.precision,
                                                 device=self.device, world_size=self.ctx.world_size)
            self.log.write({"event": "throughput_model", **self.throughput.describe()})
        return self.throughput

    def run_stage(self, stage: str, *, epochs: int) -> None:
        """Run (or continue, after a resume) `epochs` epochs of `stage` with the job's objective terms.

        'osr' keeps lr = 0; 'finetune' follows the cosine schedule. `self.stage_step` batches of
        this stage are already done when resuming mid-stage.
        """
        if self.stage != stage:
            self._enter(stage)
        if epochs == 0:
            return
        steps_per_epoch = self._steps_per_epoch()
        if steps_per_epoch == 0:
            raise ValueError(
                f"data.batch_size={self.cfg.data.batch_size} is larger than the {self.manifest.num_samples} "
                "training samples: lower the batch size or add data"
            )
        if self.stage_epoch is None or self.epoch_step is None:  # a checkpoint from before they were kept
            self.stage_epoch, self.epoch_step = divmod(self.stage_step, steps_per_epoch)
        # Steps done, the rest of this epoch, whole epochs after it (= epochs x steps_per_epoch unless the
        # current epoch was continued from another world size).
        total = (self.stage_step + max(0, self._steps_per_epoch(self.data_epoch) - self.epoch_step)
                 + max(0, epochs - self.stage_epoch - 1) * steps_per_epoch) if self.stage_epoch < epochs else 0
        self.objective.begin_stage(stage, num_steps=total)
        ocfg, rcfg = self.cfg.optim, self.cfg.run
        eval_every = self.cfg.eval.every_steps
        logger.info("%s: %d epochs x %d steps, objective %s, tau %.4g%s", stage, epochs, steps_per_epoch,
                    self.objective.describe(), self.tau,
                    f", resuming at {stage} step {self.stage_step} (step {self.global_step})" if self.stage_step else "")
        bar = StageProgress(stage, total=total, initial=self.stage_step, enabled=rcfg.progress and self.ctx.is_main,
                            every_steps=rcfg.log_every)
        throughput = self._throughput()
        stage_started = time.perf_counter()
        self.cost.start(stage)
        while self.stage_epoch < epochs and not self.stopped_early:
            epoch, epoch_steps = self.stage_epoch, self._steps_per_epoch(self.data_epoch)
            if self.epoch_step >= epoch_steps:  # a continued epoch whose rest was empty
                self._end_epoch(stage, epoch)
                continue
            started, num_samples = time.perf_counter(), 0
            batches = self.loader.epoch(self.data_epoch, start_batch=self.epoch_step)
            for batch in itertools.islice(batches, epoch_steps - self.epoch_step):
                if stage == "osr":
                    lr, clip = 0.0, 0.0
                else:
                    lr = cosine_lr(self.stage_step, base_lr=ocfg.lr, total_steps=total,
                                   warmup_steps=ocfg.warmup_steps)
                    clip = ocfg.grad_clip
                metrics = self.train_step(batch, lr=lr, grad_clip=clip)
                self.stage_step += 1
                self.epoch_step += 1
                num_real = int(metrics["samples"])  # of the global batch: its padding slots are not samples
                num_samples += num_real
                self.cost.step(stage, num_samples=num_real)
                rate = num_samples / max(1e-9, time.perf_counter() - started)
                speed = throughput.per_device(rate)
                # The batch-only contrastive loss: on one scale for every method (a surrogate's value is not).
                shown = "batch_loss" if "batch_loss" in metrics else "loss"
                bar.update(self.stage_step, {shown: f"{metrics.get(shown, math.nan):.4f}", "samples/s": format_rate(rate),
                                             **({"MFU": f"{100 * speed['mfu']:.1f}%"} if "mfu" in speed else {})})
                if self.stage_step % rcfg.log_every == 0 or self.stage_step == total or metrics.get("skipped"):
                    self.log.write({"event": "step", "stage": stage, "epoch": epoch, "step": self.global_step,
                                    "stage_step": self.stage_step, **self._ft_step(stage),
                                    "samples_per_s": rate, **speed, **metrics})
                epoch_ended = self.epoch_step == epoch_steps
                if epoch_ended:
                    self._end_epoch(stage, epoch)
                if stage == "finetune" and (
                    (self.stage_step % eval_every == 0 if eval_every else epoch_ended) or self.stage_step == total
                ):  # every_steps 0: at each epoch end
                    self.evaluate(stage=stage)
                if self.stopped_early:
                    break
                if (rcfg.save_every_steps and self.stage_step % rcfg.save_every_steps == 0) or (
                        epoch_ended and rcfg.save_every_epochs and self.stage_epoch % rcfg.save_every_epochs == 0):
                    self.save_checkpoint()
                else:
                    self.checkpoints.poll()  # a background write that has finished now counts
                self._stop_if_requested()
        bar.close()
        self.cost.stop()
        self.log.write({"event": "stage_end", "stage": stage, "step": self.global_step, "stage_step": self.stage_step,
                        "seconds": round(time.perf_counter() - stage_started, 3), "world_size": self.ctx.world_size,
                        "cost": self.cost.totals()})

    def _stop_if_requested(self) -> None:
        """Checkpoint and raise `Preempted` if any rank was asked to stop (collective, every step)."""
        reason = self.stop_requests.agreed()
        if reason is None:
            return
        path = self.save_checkpoint()
        self.checkpoints.wait()  # the job ends with its checkpoint complete
        self.cost.stop()
        self.log.write({"event": "preempted", "reason": reason, "step": self.global_step, "checkpoint": str(path),
                        "cost": self.cost.totals()})
        raise Preempted(reason, step=self.global_step, checkpoint=str(path))

    def _end_epoch(self, stage: str, epoch: int) -> None:
        self.data_epoch += 1
        self.stage_epoch += 1
        self.epoch_step = 0
        self.normaliser.end_epoch()
        skipped = {shard: dict(reasons) for shard, reasons in self.loader.skipped.items()}
        num_skipped_all = int(all_reduce_sum(torch.tensor([self.loader.num_skipped], device=self.device)).item())
        self.log.write({"event": "epoch_end", "stage": stage, "epoch": epoch, "step": self.global_step,
                        "skipped": skipped, "num_skipped": self.loader.num_skipped,
                        "num_skipped_all_ranks": num_skipped_all})
        self.loader.skips.report(epoch, self.out_dir / "skipped")  # each sample in skipped/rank_<r>.jsonl

    def osr(self) -> None:
        """Stage I: recover AdamW moments and the normaliser at frozen w0 (paper Algorithm 1)."""
        before = self.backend.weights_digest()
        self.run_stage("osr", epochs=self.cfg.osr.epochs)
        assert self.backend.weights_digest() == before, "OSR changed the weights"
        self.osr_steps = self.backend.optimizer_step_count()
        self.normaliser.set_provenance({
            **self.objective.provenance(), "tau": self.tau,
            "eps": self.cfg.loss.eps, "osr_epochs": self.cfg.osr.epochs, "osr_steps": self.osr_steps,
        })
        self.log.write({"event": "osr_done", "step": self.global_step, "adam_step": self.osr_steps,
                        **self.normaliser.summary(), **self.objective.summary()})
        if not self.cfg.osr.seed_moments:
            self.backend.reset_optimizer_state()
        if not self.cfg.osr.seed_u:
            self.normaliser.reset()

    def finetune(self) -> None:
        """Stage II: fine-tune with the method's objective from the current moments and estimates."""
        self.run_stage("finetune", epochs=self.cfg.run.epochs)

    def tune(self, *, osr: bool = True, finetune: bool = True) -> list[dict]:
        """The whole method: evaluate w0, OSR if the method uses it, fine-tune, export.

        After `resume`, stages already finished are skipped and the current one continues.
        `finetune=False` stops after OSR with a checkpoint of the recovered statistics (reusable
        by several fine-tuning runs through `load_osr`). Returns the evaluation records.
        """
        if self.stage == "start":
            if self.cfg.eval.at_start:
                self.evaluate(stage="start")
            run_osr = osr and METHOD_RUNS_OSR[self.cfg.method] and self.cfg.osr.epochs > 0
            self.objective.prepare(self.probe)  # at w0, before OSR (e.g. HGCL's automatic hinge)
            self._enter("osr" if run_osr else "finetune")
        if self.stage == "osr":
            self.osr()
            self._enter("finetune")
            if self.cfg.run.saves_periodically or not finetune:
                self.save_checkpoint()  # the recovered statistics, for stage II or reuse
        if self.stage == "done" and self._more_epochs:
            self.stage = "finetune"
        if self.stage == "finetune" and finetune:
            if self._base_pending and self.cfg.eval.at_start:
                self.evaluate(stage="start")  # weights are still w0 (OSR moved none)
            self._base_pending = False
            self.finetune()
            self.stage = "done"  # its position stays: a resume with more run.epochs continues from it
            self.export(self.out_dir / "final.safetensors")
            if self.cfg.run.saves_periodically:
                self.save_checkpoint()
        self.checkpoints.wait()  # a background checkpoint counts only once written
        if self.ctx.is_main:
            write_summary(self.out_dir, run_summary(self.out_dir, metric=self.eval_policy.best_metric))
        return self.history

    def probe(self, num_batches: int):
        """The first `num_batches` batches of the current data epoch with the model's outputs at the current
        weights, without gradient or update (what terms read in `prepare`)."""
        for batch in itertools.islice(self.loader.epoch(self.data_epoch), num_batches):
            yield batch, self.forward_backward.encode_no_grad(batch)

    def _enter(self, stage: str) -> None:
        self.stage, self.stage_step = stage, 0
        self.stage_epoch, self.epoch_step = 0, 0

    # ----- checkpoints -----
    def state_dict(self) -> dict:
        """The job's position and identity (what a resumed run needs besides the other parts)."""
        return {
            "stage": self.stage, "stage_step": self.stage_step, "global_step": self.global_step,
            "stage_epoch": self.stage_epoch, "epoch_step": self.epoch_step,
            "data_epoch": self.data_epoch, "osr_steps": self.osr_steps,
            "num_bad_steps": self.num_bad_steps, "world_size": self.ctx.world_size,
            "num_workers": self.cfg.data.num_workers, "manifest_fingerprint": self.manifest.fingerprint(),
            "model": self.bundle.model_name, "config": self.cfg.to_dict(), "config_digest": self.cfg.digest(),
            "osr_surrogate": self.cfg.osr_surrogate, "version": __version__,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()` of a checkpoint."""
        self.stage, self.stage_step = state["stage"], state["stage_step"]
        self.stage_epoch, self.epoch_step = state.get("stage_epoch"), state.get("epoch_step")
        self.global_step, self.data_epoch = state["global_step"], state["data_epoch"]
        self.osr_steps, self.num_bad_steps = state["osr_steps"], state["num_bad_steps"]

    def resume(self, spec: str = "latest") -> dict:
        """Restore every part from a checkpoint (`latest` or a folder)."""
        saved = self.checkpoints.load(spec, purpose="resume", can_reshard=self.backend.supports_reshard)
        if "eval_policy" not in saved:  # written before the policy was a part: its fields are in the train state
            self.eval_policy.load_state_dict(saved[TRAIN_STATE])
        if "objective" not in saved:  # written before loss terms held their state (it was in the train state)
            self.objective.load_state_dict(terms_state_of_old_checkpoint(saved[TRAIN_STATE]))
        changes = schedule_changes(saved[TRAIN_STATE], self.state_dict())
        if changes:
            logger.warning("resuming with changed schedule settings: %s", "; ".join(changes))
            self.log.write({"event": "schedule_changed", "changes": changes})
        old_epochs = saved[TRAIN_STATE]["config"]["run"]["epochs"]
        if self.cfg.run.epochs > old_epochs:
            self._extend_epochs(old_epochs)
        if saved[TRAIN_STATE]["world_size"] != self.ctx.world_size:
            # Weights, moments, step and estimates carry over exactly; the samples of the interrupted epoch no
            # old rank used are dealt to the new ranks, each once (the loader's continuation).
            logger.warning("resumed a %d-rank checkpoint on %d ranks: the %d sample(s) of data epoch %d that no "
                           "old rank used are dealt to the new ranks, each once; later epochs follow %d ranks' plan",
                           saved[TRAIN_STATE]["world_size"], self.ctx.world_size, saved.get("loader_left", 0),
                           self.data_epoch, self.ctx.world_size)
        self.log.write({"event": "resume", "from": saved["path"], "step": self.global_step, "stage": self.stage,
                        "stage_step": self.stage_step})
        logger.info("resumed from %s: step %d (%s step %d)", saved["path"], self.global_step, self.stage,
                    self.stage_step)
        return saved

    def _extend_epochs(self, old_epochs: int) -> None:
        """A resume that raised run.epochs: fine-tuning continues (a finished run too, from its end), and the
        cosine schedule is recomputed over the new total, so lr follows the longer curve from the resumed step."""
        self._more_epochs = self.stage == "done" and self.stage_step > 0  # older "done" checkpoints kept no position
        if self.stage == "done" and not self._more_epochs:
            raise ValueError(f"run.epochs {old_epochs} -> {self.cfg.run.epochs}: {self.cfg.run.resume} is the end "
                             "checkpoint of an older version, without the fine-tuning position; resume from a "
                             "step_N checkpoint written during fine-tuning")
        if self.stage not in ("finetune", "done"):
            return  # OSR or the start: the new total applies from the start of fine-tuning
        per_epoch, ocfg = self._steps_per_epoch(), self.cfg.optim
        old_total, new_total = old_epochs * per_epoch, self.cfg.run.epochs * per_epoch

        def lr(total: int) -> float:
            return cosine_lr(self.stage_step, base_lr=ocfg.lr, total_steps=total, warmup_steps=ocfg.warmup_steps)

        text = (f"run.epochs {old_epochs} -> {self.cfg.run.epochs}: fine-tuning continues from step {self.stage_step} "
                f"to about {new_total}; the cosine schedule is recomputed over the new total (not restarted), so lr "
                f"at step {self.stage_step} is {lr(new_total):.3g} instead of {lr(old_total):.3g}")
        logger.warning("%s", text)
        self.log.write({"event": "epochs_extended", "from": old_epochs, "to": self.cfg.run.epochs,
                        "stage_step": self.stage_step, "lr_before": lr(old_total), "lr_after": lr(new_total),
                        "rule": text})

    def load_osr(self, path: str | Path) -> None:
        """Start stage II from recovered statistics saved by an OSR run (e.g. for an lr sweep).

        Refused when they were computed for another model, weights, data, loss or eps.
        """
        saved = self.checkpoints.load(str(path), purpose="osr")
        self.normaliser.load_state_dict(saved["normaliser"])
        self.osr_steps, self.data_epoch = saved[TRAIN_STATE]["osr_steps"], saved[TRAIN_STATE]["data_epoch"]
        self.global_step = self.osr_steps  # the global step counts OSR steps, as in a run that ran its own OSR
        try:
            self.objective.load_state_dict(saved.get("objective", terms_state_of_old_checkpoint(saved[TRAIN_STATE])),
                                           origin=f"the OSR run of {path}")
        except ValueError as exc:
            raise ValueError(f"{Path(saved['path']) / 'state.json'}: {exc}") from None
        self._enter("finetune")
        self._base_pending = True  # no evaluation ran at w0 in this run yet: tune() does it
        self.log.write({"event": "osr_loaded", "from": str(path), "adam_step": self.backend.optimizer_step_count()})

    # ----- evaluation, export -----
    def evaluate(self, *, stage: str) -> dict:
        """Run every eval task, log it; the evaluation policy decides on best weights, warnings and early stop."""
        if self.evaluator is None:
            return {}
        with self.backend.full_weights():  # ZeRO-3 gathers the partitions for evaluation
            results = self.evaluator(self.backend.model, self.bundle.tokenizer, self.bundle.eval_transform)
        step = 0 if stage == "start" else self.global_step  # the base model is step 0, OSR run here or reused
        record = {"event": "eval", "stage": stage, "step": step, **self._ft_step(stage),
                  "results": results, "seconds": dict(self.evaluator.seconds)}
        self.history.append(record)
        self.log.write(record)
        if self.ctx.is_main:
            write_results(self.out_dir / f"eval_step{step:07d}.json", results,
                          model_name=self.bundle.model_name, pretrained=self.cfg.model.weights or "")
        verdict = self.eval_policy.observe(results, stage=stage, step=step, ft_step=self.stage_step)
        if verdict.is_best:  # the base model is a candidate too: best.safetensors is never worse than the base
            self.export(self.out_dir / "best.safetensors")
        for event in verdict.events:  # below_base, early_stop
            self.log.write(event)
        return results

    @property
    def stopped_early(self) -> str | None:
        """Why the evaluation policy stopped fine-tuning in this launch, else None."""
        return self.eval_policy.stopped_early

    def _ft_step(self, stage: str) -> dict:
        """`ft_step`: fine-tuning steps done (0 at the base model), so curves of methods with and without OSR
        line up; absent in OSR. The global `step` keeps counting OSR steps (checkpoints rely on it)."""
        return {"ft_step": self.stage_step if stage == "finetune" else 0} if stage != "osr" else {}

    def export(self, path: Path) -> Path:
        """Write the current weights as a stock open_clip safetensors file (and, for models stock open_clip
        cannot build by name, a local-dir: folder beside it) (rank 0; collective)."""
        state = self.backend.full_state_dict()
        if self.ctx.is_main:
            export_model(self.bundle, state, path)
        barrier()
        return path

    def save_checkpoint(self) -> Path:
        """Checkpoint every part at the current step (collective), if this job still owns the folder."""
        self.lock.verify()
        return self.checkpoints.save(self.global_step)

    def close(self) -> None:
        self.normaliser.close()
        self.log.close()
        self.loader.skips.close()
        self.backend.close()
        self._release_run()

    def _release_run(self) -> None:
        """Give back the signal handlers, the heartbeat and the folder lock (also after a failed start)."""
        if self.stop_requests is not None:
            self.stop_requests.uninstall()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.lock.release()


def _manifest_path(train: str) -> Path:
    path = Path(train)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"data.train: no manifest at {path}; build shards with `python run.py shards build <csv|dir> <out>` "
            "or index existing ones with `python run.py shards index <dir>`"
        )
    return path
