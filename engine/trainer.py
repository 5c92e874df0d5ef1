"""The training loop: stage `osr` (paper Algorithm 1) and stage `finetune` (Algorithm 2 / baselines).

Both stages share `train_step`: encode, loss (MBCL, or GCL/HGCL with the u table), backward,
AdamW step. OSR is the same step at learning rate 0 (weights stay bit-identical, AdamW's
moments and step counter accumulate G at w0, u accumulates Phi at w0); fine-tuning then
continues from those moments with the step counter carried on, so bias correction is not
restarted.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from engine import __version__
from engine.backends.single import SingleProcessBackend
from engine.checkpoint import CheckpointManager, read_state
from engine.config import METHOD_RUNS_OSR, JobConfig, load_config
from engine.data import Batch, ShardLoader
from engine.distributed import (
    all_reduce_sum,
    barrier,
    cleanup_shm_buffers,
    context_from_env,
    default_device,
    gather_no_grad,
    gather_objects,
    init_process_group,
)
from engine.evaluate import Evaluator, RetrievalTask, ZeroShotTask, headline_metric, write_results
from engine.losses import GlobalContrastiveLoss, MiniBatchContrastiveLoss, SurrogateSpec
from engine.manifest import Manifest
from engine.metrics import JsonlLogger
from engine.table import UTable, gamma_at_epoch
from models import build_model, export_weights, temperature

logger = logging.getLogger(__name__)

DEFAULT_ZERO_CONFIG = str(Path(__file__).resolve().parents[1] / "zero_configs" / "zero2.json")


def cosine_lr(step: int, *, base_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up then cosine decay to 0 over `total_steps` (step counts from 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


@dataclass
class History:
    """Evaluation results over the run: (stage, global step, metrics) records."""

    records: list[dict] = field(default_factory=list)


class Trainer:
    """Owns model, data, u table, loss and backend for one job; `tune()` runs OSR then fine-tuning.

    Works as one process or as one rank of a `deepspeed` / `torchrun` job: ranks read their share
    of every global batch, the losses see the global batch, rank 0 writes logs and exports.
    """

    def __init__(self, cfg: JobConfig, *, local_rank: int | None = None):
        self.cfg = cfg.validate()
        self.ctx = context_from_env(local_rank)
        if self.ctx.distributed and cfg.run.backend == "single":
            raise ValueError(
                f"run.backend=single cannot run {self.ctx.world_size} ranks; use run.backend=deepspeed "
                "with a zero_configs/*.json (run.zero_config)"
            )
        if cfg.data.batch_size % self.ctx.world_size:
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size} (global) is not divisible by the {self.ctx.world_size} "
                "ranks; pick a multiple of the world size"
            )
        self.local_batch = cfg.data.batch_size // self.ctx.world_size
        init_process_group(self.ctx, use_deepspeed=cfg.run.backend == "deepspeed")
        self.out_dir = Path(cfg.run.out_dir)
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", self.ctx, keep_last_n=cfg.run.keep_last_n)
        fresh = not (cfg.run.resume or cfg.osr.load_from)
        if fresh and self.checkpoints.has_checkpoints():
            raise ValueError(
                f"run.out_dir {self.out_dir} holds checkpoints of an earlier run: continue it with "
                "--resume latest, or start a new run in another --out (nothing was overwritten)"
            )
        torch.manual_seed(cfg.run.seed)
        self.device = default_device(self.ctx, cfg.run.device)

        self.manifest = Manifest.load(_manifest_path(cfg.data.train))
        if self.ctx.is_main:
            self.manifest.verify(checksums=cfg.data.verify_checksums)

        self.bundle = build_model(cfg.model.name, weights=cfg.model.weights, preset=cfg.model.preset,
                                  seed=cfg.run.seed)
        model = self.bundle.model
        self.tau = temperature(model)
        # The temperature stays fixed at the checkpoint's value (TuneCLIP never learns it).
        for name, param in model.named_parameters():
            if "logit_scale" in name or "logit_bias" in name:
                param.requires_grad_(False)
        if cfg.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.backend = build_backend(cfg, model, device=self.device, micro_batch_size=self.local_batch)
        self.loader = ShardLoader(
            self.manifest, batch_size=self.local_batch, image_transform=self.bundle.train_transform,
            tokenizer=self.bundle.tokenizer, rank=self.ctx.rank, world_size=self.ctx.world_size,
            num_workers=cfg.data.num_workers, seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer,
            resampled=cfg.data.resampled, samples_per_epoch=cfg.data.samples_per_epoch,
        )
        self.table = self._open_table(fresh=fresh)
        self.evaluator = self._build_evaluator()
        self.log = JsonlLogger(self.out_dir / "log.jsonl", enabled=self.ctx.is_main)
        self.history = History()
        self.global_step = 0  # optimizer steps of this job, OSR and fine-tuning together
        self.u_epochs = 0  # epochs the u estimates have been updated for (drives gamma_t)
        self.data_epoch = 0  # passes over the data (each has its own shuffle)
        self.osr_steps = 0
        self.stage, self.stage_step = "start", 0  # position: stage and batches done in it
        self.num_bad_steps = 0  # consecutive non-finite steps skipped
        self.best = (-math.inf, None)
        self.log.write({"event": "start", "config": cfg.to_dict(), "config_digest": cfg.digest(),
                        "tau": self.tau, "num_samples": self.manifest.num_samples,
                        "world_size": self.ctx.world_size})
        if cfg.run.resume:
            self.resume(cfg.run.resume)
        elif cfg.osr.load_from:
            self.load_osr(cfg.osr.load_from)

    # ----- construction helpers -----
    def _open_table(self, *, fresh: bool) -> UTable:
        """Rank 0 creates the table (a fresh run always starts from an empty one, even over the
        leftovers of a run killed before its first checkpoint); every rank then maps it."""
        directory = self.out_dir / "u_table"
        fingerprint = self.manifest.fingerprint()
        if self.ctx.is_main and (fresh or not (directory / "u_table.json").exists()):
            UTable.create(directory, num_rows=self.manifest.num_samples, dataset_fingerprint=fingerprint).close()
        barrier()
        return UTable.open(directory, dataset_fingerprint=fingerprint)

    def _build_evaluator(self) -> Evaluator | None:
        ecfg = self.cfg.eval
        tasks = [ZeroShotTask.from_csv(t["csv"], t["classnames"], t.get("templates"), name=t["name"])
                 for t in ecfg.zeroshot]
        tasks += [RetrievalTask.from_csv(t["csv"], name=t["name"]) for t in ecfg.retrieval]
        if not tasks:
            return None
        return Evaluator(tasks, batch_size=ecfg.batch_size, device=self.device)

    def _loss_fn(self, surrogate: str):
        world = self.ctx.world_size
        if surrogate == "mbcl":
            return MiniBatchContrastiveLoss(tau=self.tau, rank=self.ctx.rank, world_size=world,
                                            reduce_sum=all_reduce_sum)
        lcfg = self.cfg.loss
        spec = SurrogateSpec(kind=surrogate, margin=lcfg.margin, tau=self.tau, eps=lcfg.eps,
                             chunk_size=lcfg.chunk_size)
        return GlobalContrastiveLoss(spec, gather=gather_no_grad, reduce_sum=all_reduce_sum, world_size=world)

    def _autocast(self):
        if self.cfg.model.precision == "bf16" and self.cfg.run.backend == "single":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()  # DeepSpeed's bf16 mode holds bf16 weights itself

    # ----- the step shared by both stages -----
    def train_step(self, batch: Batch, *, loss_fn, gamma: float, lr: float, grad_clip: float) -> dict:
        """Forward, loss, backward and one AdamW step at `lr` (0 = OSR); returns scalar metrics.

        A non-finite loss (or feature, or u row) on any rank skips the step on every rank (no
        optimizer update, u rows untouched) and is logged with the batch's sample keys; after
        `run.max_bad_steps` consecutive ones the run stops.
        """
        images = batch.images.to(self.device, dtype=self.backend.input_dtype, non_blocking=True)
        texts = batch.texts.to(self.device, non_blocking=True)
        with self._autocast():
            image_features, text_features = features_of(self.backend.forward(images, texts))
        rows = batch.sample_ids
        if isinstance(loss_fn, GlobalContrastiveLoss):
            log_u_x, log_u_z, seen = self.table.read(rows, device=self.device)
            out = loss_fn(image_features, text_features, log_u_x=log_u_x, log_u_z=log_u_z, seen=seen,
                          gamma=gamma, offset=self.ctx.rank * self.local_batch, output_dict=True)
        else:
            out = loss_fn(image_features, text_features, output_dict=True)
        # loss_value is already summed over ranks, and a non-finite feature or u row on any rank
        # makes it non-finite: every rank takes the same decision without another collective.
        if not torch.isfinite(out["loss_value"]).item():
            return self._skip_step(batch)
        self.backend.backward(out["loss"])
        grad_norm = self.backend.step(lr=lr, grad_clip=grad_clip)
        if "log_u_x" in out:
            self.table.write(rows, out["log_u_x"], out["log_u_z"])
        self.global_step += 1
        self.num_bad_steps = 0
        return {"loss": float(out["loss_value"]), "batch_loss": float(out["batch_loss_value"]),
                "grad_norm": grad_norm, "lr": lr, "gamma": gamma}

    def _skip_step(self, batch: Batch) -> dict:
        self.num_bad_steps += 1
        self.backend.zero_grad()
        logger.warning("non-finite loss/features at step %d: step skipped (%d in a row); batch keys %s",
                       self.global_step, self.num_bad_steps, batch.keys[:16])
        self.log.write({"event": "bad_step", "step": self.global_step, "keys": batch.keys,
                        "consecutive": self.num_bad_steps})
        if self.num_bad_steps >= self.cfg.run.max_bad_steps:
            raise FloatingPointError(
                f"{self.num_bad_steps} consecutive non-finite steps (last at step {self.global_step}): "
                "lower optim.lr, check the data for broken samples (keys in log.jsonl), or use fp32"
            )
        return {"loss": float("nan"), "batch_loss": float("nan"), "grad_norm": float("nan"), "lr": 0.0,
                "gamma": 0.0, "skipped": True}

    # ----- stages -----
    def _steps_per_epoch(self) -> int:
        n = self.loader.num_batches()
        cap = self.cfg.run.max_steps_per_epoch
        return min(n, cap) if cap > 0 else n

    def run_stage(self, stage: str, *, epochs: int, surrogate: str) -> None:
        """Run (or continue, after a resume) `epochs` epochs of `stage`.

        'osr' keeps lr = 0; 'finetune' follows the cosine schedule. `self.stage_step` batches of
        this stage are already done when resuming mid-stage.
        """
        if self.stage != stage:
            self._enter(stage)
        if epochs == 0:
            return
        loss_fn = self._loss_fn(surrogate)
        steps_per_epoch = self._steps_per_epoch()
        if steps_per_epoch == 0:
            raise ValueError(
                f"data.batch_size={self.cfg.data.batch_size} is larger than the {self.manifest.num_samples} "
                "training samples: lower the batch size or add data"
            )
        total = epochs * steps_per_epoch
        ocfg, rcfg = self.cfg.optim, self.cfg.run
        eval_every = self.cfg.eval.every_steps
        logger.info("%s: %d epochs x %d steps, surrogate %s, tau %.4g%s", stage, epochs, steps_per_epoch,
                    surrogate, self.tau, f", resuming at step {self.stage_step}" if self.stage_step else "")
        bar = tqdm(total=total, initial=self.stage_step, desc=stage, unit="step", dynamic_ncols=True,
                   disable=not (rcfg.progress and self.ctx.is_main))
        while self.stage_step < total:
            epoch, start_batch = divmod(self.stage_step, steps_per_epoch)
            gamma = gamma_at_epoch(self.u_epochs, gamma_min=self.cfg.loss.gamma_min,
                                   decay_epochs=self.cfg.loss.gamma_decay_epochs)
            started, num_samples = time.perf_counter(), 0
            batches = self.loader.epoch(self.data_epoch, start_batch=start_batch)
            for batch in itertools.islice(batches, steps_per_epoch - start_batch):
                if stage == "osr":
                    lr, clip = 0.0, 0.0
                else:
                    lr = cosine_lr(self.stage_step, base_lr=ocfg.lr, total_steps=total,
                                   warmup_steps=ocfg.warmup_steps)
                    clip = ocfg.grad_clip
                metrics = self.train_step(batch, loss_fn=loss_fn, gamma=gamma, lr=lr, grad_clip=clip)
                self.stage_step += 1
                num_samples += len(batch.keys) * self.ctx.world_size
                rate = num_samples / max(1e-9, time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{rate:.0f}")
                if self.stage_step % rcfg.log_every == 0 or self.stage_step == total or metrics.get("skipped"):
                    self.log.write({"event": "step", "stage": stage, "epoch": epoch, "step": self.global_step,
                                    "stage_step": self.stage_step, "samples_per_s": rate, **metrics})
                done_epoch = self.stage_step % steps_per_epoch == 0
                if done_epoch:
                    self._end_epoch(stage, epoch)
                if stage == "finetune" and (
                    (eval_every and self.stage_step % eval_every == 0) or self.stage_step == total
                ):
                    self.evaluate(stage=stage)
                if rcfg.save_every_steps and self.stage_step % rcfg.save_every_steps == 0:
                    self.save_checkpoint()
        bar.close()
        self.table.flush()

    def _end_epoch(self, stage: str, epoch: int) -> None:
        self.data_epoch += 1
        self.u_epochs += 1
        skipped = {shard: dict(reasons) for shard, reasons in self.loader.skipped.items()}
        self.log.write({"event": "epoch_end", "stage": stage, "epoch": epoch, "step": self.global_step,
                        "skipped": skipped, "num_skipped": self.loader.num_skipped})
        if skipped:
            logger.warning("epoch %d: skipped %d bad samples so far: %s", epoch, self.loader.num_skipped, skipped)

    def osr(self) -> None:
        """Stage I: recover AdamW moments and u at frozen w0 (paper Algorithm 1)."""
        before = self.backend.weights_digest()
        self.run_stage("osr", epochs=self.cfg.osr.epochs, surrogate=self.cfg.osr_surrogate)
        assert self.backend.weights_digest() == before, "OSR changed the weights"
        self.osr_steps = self.backend.optimizer_step_count()
        self.table.set_provenance({"surrogate": self.cfg.osr_surrogate, "margin": self.cfg.loss.margin,
                                   "tau": self.tau, "eps": self.cfg.loss.eps, "osr_epochs": self.cfg.osr.epochs,
                                   "osr_steps": self.osr_steps}, write=self.ctx.is_main)
        self.log.write({"event": "osr_done", "step": self.global_step, "adam_step": self.osr_steps,
                        "u_seen": self.table.num_seen()})
        if not self.cfg.osr.seed_moments:
            self.backend.reset_optimizer_state()
        if not self.cfg.osr.seed_u:
            barrier()
            if self.ctx.is_main:  # the file is shared: one rank empties it, the others see zeros
                self.table.reset()
            barrier()
            self.u_epochs = 0

    def finetune(self) -> None:
        """Stage II: fine-tune with the method's loss from the current moments and u."""
        self.run_stage("finetune", epochs=self.cfg.run.epochs, surrogate=self.cfg.surrogate)

    def tune(self, *, osr: bool = True, finetune: bool = True) -> History:
        """The whole method: evaluate w0, OSR if the method uses it, fine-tune, export.

        After `resume`, stages already finished are skipped and the current one continues.
        `finetune=False` stops after OSR with a checkpoint of the recovered statistics (reusable
        by several fine-tuning runs through `load_osr`).
        """
        if self.stage == "start":
            if self.cfg.eval.at_start:
                self.evaluate(stage="start")
            run_osr = osr and METHOD_RUNS_OSR[self.cfg.method] and self.cfg.osr.epochs > 0
            self._enter("osr" if run_osr else "finetune")
        if self.stage == "osr":
            self.osr()
            self._enter("finetune")
            if self.cfg.run.save_every_steps or not finetune:
                self.save_checkpoint()  # the recovered statistics, ready for stage II (or reuse)
        if self.stage == "finetune" and finetune:
            self.finetune()
            self._enter("done")
            self.export(self.out_dir / "final.safetensors")
            if self.cfg.run.save_every_steps:
                self.save_checkpoint()
        return self.history

    def _enter(self, stage: str) -> None:
        self.stage, self.stage_step = stage, 0

    def load_osr(self, path: str | Path) -> None:
        """Start stage II from recovered statistics saved by an OSR run (e.g. for an lr sweep).

        Refused when they were computed for another model, weights, data, loss, margin or eps.
        """
        path = Path(path)
        state = read_state(path)
        if state["stage"] != "finetune" or state["stage_step"] != 0:
            raise ValueError(f"{path} is not an end-of-OSR checkpoint (stage {state['stage']}, "
                             f"step {state['stage_step']}); use the one `run.py osr` wrote")
        old, new = _flatten(state["config"]), _flatten(self.cfg.to_dict())
        problems = [f"{key}: statistics computed with {old.get(key)!r}, this job has {new.get(key)!r}"
                    for key in OSR_DEFINING_KEYS if old.get(key) != new.get(key)]
        old_cfg = load_config(base=state["config"])
        if old_cfg.osr_surrogate != self.cfg.osr_surrogate:
            problems.append(f"OSR loss {old_cfg.osr_surrogate!r} != this job's {self.cfg.osr_surrogate!r}")
        if state["manifest_fingerprint"] != self.manifest.fingerprint():
            problems.append("the training data (manifest fingerprint) differs")
        if state["world_size"] != self.ctx.world_size:
            problems.append(f"world size {self.ctx.world_size} != {state['world_size']} of the OSR run")
        if problems:
            raise ValueError(f"cannot reuse OSR statistics from {path}:\n  - " + "\n  - ".join(problems))
        self.backend.load(path / "backend")
        self.table.close()
        self.checkpoints.restore_table(path, self.out_dir / "u_table", dataset_fingerprint=self.manifest.fingerprint())
        self.table = UTable.open(self.out_dir / "u_table", dataset_fingerprint=self.manifest.fingerprint())
        self.u_epochs, self.osr_steps = state["u_epochs"], state["osr_steps"]
        self.data_epoch = state["data_epoch"]
        self._enter("finetune")
        self.log.write({"event": "osr_loaded", "from": str(path), "adam_step": self.backend.optimizer_step_count()})

    # ----- checkpoints -----
    def trainer_state(self) -> dict:
        """Everything besides backend and u table that a resumed run needs."""
        return {
            "stage": self.stage, "stage_step": self.stage_step, "global_step": self.global_step,
            "data_epoch": self.data_epoch, "u_epochs": self.u_epochs, "osr_steps": self.osr_steps,
            "best_score": self.best[0] if math.isfinite(self.best[0]) else None, "best_step": self.best[1],
            "num_bad_steps": self.num_bad_steps, "world_size": self.ctx.world_size,
            "num_workers": self.cfg.data.num_workers, "manifest_fingerprint": self.manifest.fingerprint(),
            "model": self.bundle.model_name, "config": self.cfg.to_dict(), "config_digest": self.cfg.digest(),
            "version": __version__,
        }

    def save_checkpoint(self) -> Path:
        """Atomic checkpoint of backend, u table and position, with every rank's loader position (collective)."""
        batches_in_epoch = self.stage_step % self._steps_per_epoch() if self.stage in ("osr", "finetune") else 0
        loader_states = gather_objects(self.loader.state(self.data_epoch, batches_in_epoch))
        return self.checkpoints.save(self.global_step, backend=self.backend, table=self.table,
                                     state={**self.trainer_state(), "loader_states": loader_states})

    def _load_backend(self, path: Path, state: dict) -> None:
        """Backend state from checkpoint `path`, converted first when the world size changed."""
        if state["world_size"] != self.ctx.world_size:
            # Weights, moments, step and u rows carry over exactly; the data order of the rest of
            # the epoch is the new world size's (same global batch count, different composition).
            logger.warning("resuming a %d-rank checkpoint on %d ranks: converting it (DeepSpeed universal "
                           "checkpoint); the rest of this epoch is dealt to the new ranks in a new order",
                           state["world_size"], self.ctx.world_size)
            self.backend.load(path / "backend", reshard=True)
        else:
            self.backend.load(path / "backend")

    def resume(self, spec: str = "latest") -> dict:
        """Restore backend, u table and position from a checkpoint (`latest` or a folder)."""
        path = self.checkpoints.find(spec)
        state = read_state(path)
        problems = _resume_conflicts(state, self)
        if problems:
            raise ValueError(f"cannot resume from {path}:\n  - " + "\n  - ".join(problems))
        try:
            self._load_backend(path, state)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(
                f"checkpoint {path} could not be loaded ({type(exc).__name__}: {str(exc)[:200]}); resume from "
                f"an earlier one: --resume {self.checkpoints.root}/step_<N>"
            ) from exc
        self.table.close()
        self.checkpoints.restore_table(path, self.out_dir / "u_table", dataset_fingerprint=self.manifest.fingerprint())
        self.table = UTable.open(self.out_dir / "u_table", dataset_fingerprint=self.manifest.fingerprint())
        self.stage, self.stage_step = state["stage"], state["stage_step"]
        self.global_step, self.data_epoch, self.u_epochs = state["global_step"], state["data_epoch"], state["u_epochs"]
        self.osr_steps, self.num_bad_steps = state["osr_steps"], state["num_bad_steps"]
        self.best = (state["best_score"] if state["best_score"] is not None else -math.inf, state["best_step"])
        if state["world_size"] == self.ctx.world_size:  # exact position, skip counts included
            self.loader.load_state(state["loader_states"][self.ctx.rank])
        self.log.write({"event": "resume", "from": str(path), "step": self.global_step, "stage": self.stage,
                        "stage_step": self.stage_step})
        logger.info("resumed from %s: stage %s, step %d", path, self.stage, self.global_step)
        return state

    # ----- evaluation, export -----
    def evaluate(self, *, stage: str) -> dict:
        """Run every eval task, log it, keep the best weights by `eval.best_metric`."""
        if self.evaluator is None:
            return {}
        with self.backend.full_weights():  # ZeRO-3 gathers the partitions for evaluation
            results = self.evaluator(self.backend.model, self.bundle.tokenizer, self.bundle.eval_transform)
        record = {"event": "eval", "stage": stage, "step": self.global_step, "results": results}
        self.history.records.append(record)
        self.log.write(record)
        if self.ctx.is_main:
            write_results(self.out_dir / f"eval_step{self.global_step:07d}.json", results,
                          model_name=self.bundle.model_name, pretrained=self.cfg.model.weights or "")
        key = self.cfg.eval.best_metric or _default_metric(results)
        score = headline_metric(results, key)
        if stage != "start" and score > self.best[0]:
            self.best = (score, self.global_step)
            self.export(self.out_dir / "best.safetensors")
        logger.info("eval at step %d (%s): %s = %.4f", self.global_step, stage, key, score)
        return results

    def export(self, path: Path) -> Path:
        """Write the current weights as a stock open_clip safetensors file (rank 0; collective)."""
        state = self.backend.full_state_dict()
        if self.ctx.is_main:
            export_weights(state, path)
        barrier()
        return path

    def close(self) -> None:
        self.table.close()
        self.log.close()
        self.backend.close()
        cleanup_shm_buffers(self.ctx)


def features_of(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(image_features, text_features) from an open_clip forward's dict or tuple output."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"]
    return out[0], out[1]


def build_backend(cfg: JobConfig, model: torch.nn.Module, *, device: torch.device, micro_batch_size: int):
    """The backend named by run.backend, with AdamW settings from the optim section."""
    ocfg = cfg.optim
    if cfg.run.backend == "deepspeed":
        from engine.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(
            model, device=device, zero_config=cfg.run.zero_config or DEFAULT_ZERO_CONFIG,
            micro_batch_size=micro_batch_size, betas=tuple(ocfg.betas), weight_decay=ocfg.weight_decay,
            eps=ocfg.eps, grad_clip=ocfg.grad_clip, precision=cfg.model.precision,
        )
    return SingleProcessBackend(model, device=device, betas=tuple(ocfg.betas), weight_decay=ocfg.weight_decay,
                                eps=ocfg.eps)


# Settings that define recovered OSR statistics: reusing them needs the same values.
OSR_DEFINING_KEYS = ("model.name", "model.weights", "model.preset", "model.precision", "loss.margin", "loss.eps",
                     "loss.gamma_min", "loss.gamma_decay_epochs", "osr.epochs", "optim.betas",
                     "data.batch_size", "run.seed")

# Settings that may change between a run and its resumption (they do not change the math).
RESUME_FREE_KEYS = ("run.progress", "run.log_every", "run.save_every_steps", "run.keep_last_n",
                    "run.resume", "eval.every_steps", "eval.at_start", "eval.batch_size", "run.device",
                    "osr.load_from", "run.out_dir", "data.train", "model.weights")  # moved folders / files


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resume_conflicts(state: dict, trainer: Trainer) -> list[str]:
    """What differs between a checkpoint and the job trying to resume it (empty = compatible)."""
    problems = []
    if state["manifest_fingerprint"] != trainer.manifest.fingerprint():
        problems.append("the training data (manifest fingerprint) differs from the checkpoint's")
    if state["model"] != trainer.bundle.model_name:
        problems.append(f"model {trainer.bundle.model_name!r} != checkpoint's {state['model']!r}")
    if state["world_size"] != trainer.ctx.world_size and trainer.cfg.run.backend != "deepspeed":
        problems.append(f"world size {trainer.ctx.world_size} != checkpoint's {state['world_size']}: resuming "
                        "on another number of ranks needs run.backend=deepspeed (universal checkpoint)")
    old, new = _flatten(state["config"]), _flatten(trainer.cfg.to_dict())
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUME_FREE_KEYS) or old.get(key) == new.get(key):
            continue
        problems.append(f"config {key}: checkpoint has {old.get(key)!r}, this job {new.get(key)!r}")
    return problems


def _default_metric(results: dict) -> str:
    for task, metrics in results.items():
        if "acc1" in metrics:
            return f"{task}/acc1"
    task, metrics = next(iter(results.items()))
    return f"{task}/{next(iter(metrics))}"


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
