"""data.train_transform: training augments by default (open_clip's train transform), 'eval' turns it off."""

import pytest
import torch

from engine.config import DataConfig, load_config
from engine.trainer import Trainer


def test_config_accepts_augment_or_eval_only():
    assert DataConfig().train_transform == "augment"
    assert not [e for e in DataConfig(train_transform="eval").errors() if "train_transform" in e]
    (error,) = [e for e in DataConfig(train_transform="none").errors() if "train_transform" in e]
    assert error == "data.train_transform must be one of ('augment', 'eval'), got 'none'"


@pytest.mark.parametrize("choice", ["augment", "eval"])
def test_trainer_gives_the_loader_the_chosen_transform(shards, tmp_path, choice):
    cfg = load_config(
        base={
            "model": {"name": "tiny-vit"},
            "data": {"train": str(shards), "batch_size": 8, "train_transform": choice},
            "eval": {"at_start": False},
            "run": {"out_dir": str(tmp_path / "run"), "epochs": 1, "progress": False},
        }
    )
    trainer = Trainer(cfg)
    bundle = trainer.bundle
    chosen = trainer.loader.settings.image_transform
    assert chosen is (bundle.train_transform if choice == "augment" else bundle.eval_transform)
    # Across epochs a sample's crop changes only when augmenting.
    by_row = [
        {
            row: batch.images[i]
            for batch in trainer.loader.epoch(epoch)
            for i, row in enumerate(batch.rows.tolist())
        }
        for epoch in (0, 1)
    ]
    rows = sorted(set(by_row[0]) & set(by_row[1]))
    num_same = sum(torch.equal(by_row[0][row], by_row[1][row]) for row in rows)
    assert len(rows) > 20
    assert num_same == len(rows) if choice == "eval" else num_same < len(rows) // 4
