"""The tail rule on 2 real ranks (FSDP2, gloo): the epoch's last global batch holds 8 real samples and 2 masked
padding slots (one per rank); every sample's u row is updated once per epoch (OSR and fine-tuning, with the
wma_teacher term), and the logged samples count only real ones."""

import json

import pytest

from tests.helpers.harness import run_ranks
from tests.helpers.jobs import job


@pytest.mark.slow
def test_two_ranks_mask_the_tail_padding(shards, tmp_path):
    # 48 samples, global batch 10 (5 per rank): each rank's share of 24 gives 4 full batches and one of 4 + 1 padding.
    out = tmp_path / "run"
    config = job(shards, out, data={"batch_size": 10}, loss={"terms": {"contrastive": 1.0, "wma_teacher": 0.5}},
                 run={"backend": "fsdp", "save_every_steps": 0, "log_every": 1})
    ranks = run_ranks("tests.helpers.dist_cases_trainer:tune_until", world_size=2, config=config)
    assert all(r["finished"] for r in ranks)
    assert ranks[0]["visits"] == [2] * 48  # one update per epoch (OSR + fine-tuning); unmasked: the copies twice
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == "step"]
    assert [(r["stage"], r["samples"]) for r in steps] == [(stage, n) for stage in ("osr", "finetune")
                                                           for n in (10, 10, 10, 10, 8)]
    assert all(r.get("wma_teacher_loss", 0.0) >= 0.0 and not r.get("skipped") for r in steps)
