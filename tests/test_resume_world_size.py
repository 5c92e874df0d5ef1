"""A DeepSpeed job stopped mid-epoch on 2 ranks, resumed on 1, stopped mid-epoch again, resumed on 2: every
sample is used exactly once per epoch (OSR and fine-tuning), as in a run that never changed size."""

import json

import pytest

from tests.helpers.harness import run_ranks
from tests.helpers.jobs import job

CASE = "tests.helpers.dist_cases_trainer:tune_until"


@pytest.mark.slow
def test_two_to_one_to_two_ranks_uses_each_sample_once_per_epoch(shards, tmp_path):
    # 48 samples, a global batch of 8 (4 per rank on 2 ranks): 6 steps per epoch. OSR 1 epoch, fine-tuning 1.
    config = job(shards, tmp_path / "run", run={"backend": "deepspeed", "save_every_steps": 0})
    first = run_ranks(CASE, world_size=2, config=config, stop_at=1)  # inside the OSR epoch
    assert [r["global_step"] for r in first] == [1, 1] and not first[0]["finished"]
    resumed = job(shards, tmp_path / "run", run={"backend": "deepspeed", "save_every_steps": 0, "resume": "latest"})
    # On 1 rank: the 40 OSR samples left take 5 steps (OSR ends at step 6), then 2 fine-tuning steps.
    second = run_ranks(CASE, world_size=1, config=resumed, stop_at=8)
    assert second[0]["global_step"] == 8 and not second[0]["finished"]
    # Back on 2 ranks: the 32 fine-tuning samples left take 4 steps.
    third = run_ranks(CASE, world_size=2, config=resumed)
    assert third[0]["finished"] and third[0]["global_step"] == 12
    assert third[0]["visits"] == [2] * 48, "each sample once in the OSR epoch and once in fine-tuning"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["adam_step"] for r in log if r["event"] == "osr_done"] == [6]
    assert [(r["stage"], r["stage_step"]) for r in log if r["event"] == "resume"] == [("osr", 1), ("finetune", 2)]
