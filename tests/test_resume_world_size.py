"""A DeepSpeed (or FSDP2) job stopped mid-epoch on 2 ranks, resumed on 1, stopped mid-epoch again, resumed on 2: every
sample is used exactly once per epoch (OSR and fine-tuning), as in a run that never changed size, and the summary's
cost is the sum of the three launches. The DeepSpeed job trains in bf16 from weights whose frozen temperature bf16
cannot represent; the resumes build without them: the fp32 temperature reaches final.safetensors through the
checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file

from models import build_model, export_weights
from tests.helpers.harness import run_ranks
from tests.helpers.jobs import job

CASE = "tests.helpers.dist_cases_trainer:tune_until"
LOGIT_SCALE = 2.9  # not open_clip's initial log(1/0.07), and rounded by bf16


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory):
    model = build_model("tiny-vit", seed=5).model
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
    path = tmp_path_factory.mktemp("start_weights") / "start.safetensors"
    export_weights(model, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "fsdp"])
def test_two_to_one_to_two_ranks_uses_each_sample_once_per_epoch(shards, start_weights, tmp_path, backend):
    # 48 samples, a global batch of 8 (4 per rank on 2 ranks): 6 steps per epoch. OSR 1 epoch, fine-tuning 1.
    run = {"backend": backend, "save_every_steps": 0}
    model = {"name": "tiny-vit"}
    if backend == "deepspeed":
        run["zero_config"] = "zero2_bf16"
        model.update(precision="bf16", weights=str(start_weights))
    config = job(shards, tmp_path / "run", run=run, model=model)
    first = run_ranks(CASE, world_size=2, config=config, stop_at=1)  # inside the OSR epoch
    assert [r["global_step"] for r in first] == [1, 1] and not first[0]["finished"]
    resumed = job(shards, tmp_path / "run", run={**run, "resume": "latest"}, model={**model, "weights": None})
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
    # The cost adds up every launch, the stopped ones included: (ranks, steps, samples) of each.
    cost = json.loads((tmp_path / "run" / "summary.json").read_text())["cost"]
    parts = {stage: [(e["world_size"], e["steps"], e["num_samples"]) for e in cost[stage]["launches"]]
             for stage in ("osr", "finetune")}
    assert parts == {"osr": [(2, 1, 8), (1, 5, 40)], "finetune": [(1, 2, 16), (2, 4, 32)]}
    for stage in ("osr", "finetune"):
        launches = cost[stage]["launches"]
        assert (cost[stage]["steps"], cost[stage]["num_samples"]) == (6, 48)
        assert all(e["seconds"] > 0 for e in launches)
        assert cost[stage]["seconds"] == pytest.approx(sum(e["seconds"] for e in launches), abs=2e-3)
        assert cost[stage]["device_hours"] == pytest.approx(
            sum(e["seconds"] * e["world_size"] for e in launches) / 3600, abs=1e-6)
    if backend == "deepspeed":
        final = load_file(tmp_path / "run" / "final.safetensors")["logit_scale"]
        assert torch.equal(final, load_file(start_weights)["logit_scale"]), final.item()
