"""The training loop: stage `osr` (paper Algorithm 1) and stage `finetune` (Algorithm 2 / baselines).

Both stages share `train_step`: encode, loss (MBCL, or GCL/HGCL with the u table), backward,
AdamW step. OSR is the same step at learning rate 0 (weights stay bit-identical, AdamW's
moments and step counter accumulate G at w0, u accumulates Phi at w0); fine-tuning then
continues from those moments with the step counter carried on, so bias correction is not
restarted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from engine.backends.single import SingleProcessBackend
from engine.config import METHOD_RUNS_OSR, JobConfig
from engine.data import Batch, ShardLoader
from engine.distributed import (
    all_reduce_sum,
    barrier,
    cleanup_shm_buffers,
    context_from_env,
    default_device,
    gather_no_grad,
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
        )
        self.table = self._open_table()
        self.evaluator = self._build_evaluator()
        self.log = JsonlLogger(self.out_dir / "log.jsonl", enabled=self.ctx.is_main)
        self.history = History()
        self.global_step = 0  # optimizer steps of this job, OSR and fine-tuning together
        self.u_epochs = 0  # epochs the u estimates have been updated for (drives gamma_t)
        self.data_epoch = 0  # passes over the data (each has its own shuffle)
        self.osr_steps = 0
        self.best = (-math.inf, None)
        self.log.write({"event": "start", "config": cfg.to_dict(), "config_digest": cfg.digest(),
                        "tau": self.tau, "num_samples": self.manifest.num_samples,
                        "world_size": self.ctx.world_size})

    # ----- construction helpers -----
    def _open_table(self) -> UTable:
        """Rank 0 creates the table if needed; every rank then maps it and touches only its rows."""
        directory = self.out_dir / "u_table"
        fingerprint = self.manifest.fingerprint()
        if self.ctx.is_main and not (directory / "u_table.json").exists():
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
        """Forward, loss, backward and one AdamW step at `lr` (0 = OSR); returns scalar metrics."""
        images = batch.images.to(self.device, dtype=self.backend.input_dtype, non_blocking=True)
        texts = batch.texts.to(self.device, non_blocking=True)
        with self._autocast():
            image_features, text_features = encode_pair(self.backend.model, images, texts)
        rows = batch.sample_ids
        if isinstance(loss_fn, GlobalContrastiveLoss):
            log_u_x, log_u_z, seen = self.table.read(rows, device=self.device)
            out = loss_fn(image_features, text_features, log_u_x=log_u_x, log_u_z=log_u_z, seen=seen,
                          gamma=gamma, offset=self.ctx.rank * self.local_batch, output_dict=True)
        else:
            out = loss_fn(image_features, text_features, output_dict=True)
        self.backend.backward(out["loss"])
        if not torch.isfinite(out["loss"]).item():
            self.backend.zero_grad()
            raise FloatingPointError(f"non-finite loss at step {self.global_step}; batch keys {batch.keys[:8]}")
        grad_norm = self.backend.step(lr=lr, grad_clip=grad_clip)
        if "log_u_x" in out:
            self.table.write(rows, out["log_u_x"], out["log_u_z"])
        self.global_step += 1
        return {"loss": float(out["loss_value"]), "batch_loss": float(out["batch_loss_value"]),
                "grad_norm": grad_norm, "lr": lr, "gamma": gamma}

    # ----- stages -----
    def _steps_per_epoch(self) -> int:
        n = self.loader.num_batches()
        cap = self.cfg.run.max_steps_per_epoch
        return min(n, cap) if cap > 0 else n

    def run_stage(self, stage: str, *, epochs: int, surrogate: str) -> None:
        """Run `epochs` epochs of `stage` ('osr' keeps lr = 0; 'finetune' follows the cosine schedule)."""
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
        ocfg = self.cfg.optim
        eval_every = self.cfg.eval.every_steps
        logger.info("%s: %d epochs x %d steps, surrogate %s, tau %.4g", stage, epochs, steps_per_epoch,
                    surrogate, self.tau)
        stage_step = 0
        bar = tqdm(total=total, desc=stage, unit="step", dynamic_ncols=True,
                   disable=not (self.cfg.run.progress and self.ctx.is_main))
        for epoch in range(epochs):
            gamma = gamma_at_epoch(self.u_epochs, gamma_min=self.cfg.loss.gamma_min,
                                   decay_epochs=self.cfg.loss.gamma_decay_epochs)
            started, num_samples = time.perf_counter(), 0
            for i, batch in enumerate(self.loader.epoch(self.data_epoch)):
                if i >= steps_per_epoch:
                    break
                if stage == "osr":
                    lr, clip = 0.0, 0.0
                else:
                    lr = cosine_lr(stage_step, base_lr=ocfg.lr, total_steps=total, warmup_steps=ocfg.warmup_steps)
                    clip = ocfg.grad_clip
                metrics = self.train_step(batch, loss_fn=loss_fn, gamma=gamma, lr=lr, grad_clip=clip)
                stage_step += 1
                num_samples += len(batch.keys) * self.ctx.world_size
                rate = num_samples / max(1e-9, time.perf_counter() - started)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{rate:.0f}")
                if stage_step % self.cfg.run.log_every == 0 or stage_step == total:
                    self.log.write({"event": "step", "stage": stage, "epoch": epoch, "step": self.global_step,
                                    "samples_per_s": rate, **metrics})
                if stage == "finetune" and eval_every and stage_step % eval_every == 0 and stage_step != total:
                    self.evaluate(stage=stage)
            self.data_epoch += 1
            self.u_epochs += 1
            self.log.write({"event": "epoch_end", "stage": stage, "epoch": epoch, "step": self.global_step,
                            "skipped": dict(self.loader.skipped)})
            if stage == "finetune" and epoch == epochs - 1:
                self.evaluate(stage=stage)
        bar.close()
        self.table.flush()

    def osr(self) -> None:
        """Stage I: recover AdamW moments and u at frozen w0 (paper Algorithm 1)."""
        before = self.backend.weights_digest()
        start = self.global_step
        self.run_stage("osr", epochs=self.cfg.osr.epochs, surrogate=self.cfg.osr_surrogate)
        self.osr_steps = self.global_step - start
        assert self.backend.weights_digest() == before, "OSR changed the weights"
        self.table.set_provenance({"surrogate": self.cfg.osr_surrogate, "margin": self.cfg.loss.margin,
                                   "tau": self.tau, "eps": self.cfg.loss.eps, "osr_epochs": self.cfg.osr.epochs,
                                   "osr_steps": self.backend.optimizer_step_count()})
        self.log.write({"event": "osr_done", "step": self.global_step,
                        "adam_step": self.backend.optimizer_step_count(), "u_seen": self.table.num_seen()})
        if not self.cfg.osr.seed_moments:
            self.backend.reset_optimizer_state()
        if not self.cfg.osr.seed_u:
            self.table.reset()
            self.u_epochs = 0

    def finetune(self) -> None:
        """Stage II: fine-tune with the method's loss from the current moments and u."""
        self.run_stage("finetune", epochs=self.cfg.run.epochs, surrogate=self.cfg.surrogate)

    def tune(self) -> History:
        """The whole method: evaluate w0, OSR if the method uses it, fine-tune, export."""
        if self.cfg.eval.at_start:
            self.evaluate(stage="start")
        if METHOD_RUNS_OSR[self.cfg.method] and self.cfg.osr.epochs > 0:
            self.osr()
        self.finetune()
        self.export(self.out_dir / "final.safetensors")
        return self.history

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


def encode_pair(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor):
    """Normalised image and text features through the model's own forward.

    The top-level forward (not encode_image / encode_text) is what ZeRO-3's hooks gather the
    parameters for, including the text projection owned by the top module.
    """
    out = model(images, texts)
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
