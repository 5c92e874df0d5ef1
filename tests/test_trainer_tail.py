"""The trainer and the tail rule: padding slots are no samples, update no u row, and a batch of padding only is
no step (48 samples, global batch 10: four full batches and one of 8 samples + 2 padding slots)."""

import json

import torch

from engine.config import load_config
from engine.trainer import Trainer
from tests.helpers.jobs import job


def test_padding_slots_update_no_u_row_are_not_counted_and_padding_only_takes_no_step(shards, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(load_config(base=job(shards, out, data={"batch_size": 10}, osr={"epochs": 1},
                                           run={"log_every": 1})))
    try:
        trainer.osr()
        rows = torch.arange(trainer.manifest.num_samples)
        # One u update per sample in the epoch (unmasked, the 2 padding copies would update rows twice).
        assert trainer.normaliser.table.visits(rows).tolist() == [1] * 48
        steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == "step"]
        assert [r["samples"] for r in steps] == [10, 10, 10, 10, 8]
        assert trainer.cost.totals()["osr"]["num_samples"] == 48 and trainer.osr_steps == 5

        # A global batch of padding only (skips emptied a rank's tail): no optimizer step, no u update.
        batch = next(iter(trainer.loader.epoch(1)))
        batch.num_padding = len(batch)
        digest, adam_steps = trainer.backend.weights_digest(), trainer.backend.optimizer_step_count()
        metrics = trainer.train_step(batch, lr=1e-2, grad_clip=0.0)
        assert metrics["skipped"] and metrics["samples"] == 0
        assert trainer.backend.optimizer_step_count() == adam_steps and trainer.backend.weights_digest() == digest
        trainer.objective.after_step()  # nothing was staged: still one update per sample
        assert trainer.normaliser.table.visits(rows).tolist() == [1] * 48
    finally:
        trainer.close()
