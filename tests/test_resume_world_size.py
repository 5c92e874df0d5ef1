"""A DeepSpeed (or FSDP2) job stopped mid-epoch on 2 ranks, resumed on 1, stopped mid-epoch again, resumed on 2: every
sample is used exactly once per epoch (OSR and fine-tuning), as in a run that never changed size, and the summary's
cost is the sum of the three launches. The DeepSpeed job trains in bf16 from weights whose frozen temperature bf16
cannot represent; the resumes build without them: the fp32 temperature reaches final.safetensors through the
checkpoints. Each resume reads the u table from a full base and deltas (run.u_table_full_every) and restores exactly
the bytes the stopped launch had; the DeepSpeed job's 2-rank launches are two "nodes", each with its replica in
run.node_local_dir, reseeded from base + deltas."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import required_folders
from engine.objectives.table import DATA_FILE
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


def tables_at_end(ranks: list[dict]) -> list[bytes]:
    """The live u table of each rank of a finished launch (a stopped one: as its last checkpoint holds it)."""
    return [(Path(r["table_dir"]) / DATA_FILE).read_bytes() for r in ranks]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["deepspeed", "fsdp"])
def test_two_to_one_to_two_ranks_uses_each_sample_once_per_epoch_and_restores_the_u_table_exactly(
        shards, start_weights, tmp_path, backend):
    # 48 samples, a global batch of 8 (4 per rank on 2 ranks): 6 steps per epoch. OSR 1 epoch, fine-tuning 1.
    # A checkpoint every 2 steps of a stage, the u table's a full base every 3 saves, deltas between; the stops
    # fall between periodic saves (a step saved twice is saved as a base), so each stop's checkpoint is a delta.
    run = {"backend": backend, "save_every_steps": 2, "u_table_full_every": 3}
    model = {"name": "tiny-vit"}
    nodes = {}
    if backend == "deepspeed":
        run.update(zero_config="zero2_bf16", node_local_dir=str(tmp_path / "local"))
        model.update(precision="bf16", weights=str(start_weights))
        nodes = {"LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # each rank a node of its own: a replica each
    config = job(shards, tmp_path / "run", run=run, model=model)
    first = run_ranks(CASE, world_size=2, config=config, stop_at=5, env=nodes)  # inside the OSR epoch
    assert [r["global_step"] for r in first] == [5, 5] and not first[0]["finished"]
    checkpoints = tmp_path / "run" / "checkpoints"
    # Step 5 is a delta on the delta of step 4 on the base of step 2.
    assert sorted(required_folders(checkpoints / "step_00000005")) == ["step_00000002", "step_00000004"]
    stopped = tables_at_end(first)
    assert stopped[0] == stopped[1] and stopped[0].count(0) < len(stopped[0])
    if backend == "deepspeed":
        assert [Path(r["table_dir"]).parent for r in first] == [tmp_path / "local"] * 2
    resumed = job(shards, tmp_path / "run", run={**run, "resume": "latest"}, model={**model, "weights": None})
    # On 1 rank: the 8 OSR samples left take 1 step (OSR ends at step 6), then 3 fine-tuning steps.
    second = run_ranks(CASE, world_size=1, config=resumed, stop_at=9)
    assert second[0]["global_step"] == 9 and not second[0]["finished"]
    assert second[0]["table_at_start"] == stopped[0], "2 -> 1 ranks: the table restored from base + deltas"
    # Step 9 is a delta on the delta of step 8 (fine-tuning's second step) on the base of step 6 (OSR's end).
    assert sorted(required_folders(checkpoints / "step_00000009")) == ["step_00000006", "step_00000008"]
    stopped = tables_at_end(second)
    # Back on 2 ranks: the 24 fine-tuning samples left take 3 steps.
    third = run_ranks(CASE, world_size=2, config=resumed, env=nodes)
    assert [r["table_at_start"] for r in third] == stopped * 2, "1 -> 2 ranks (and each node's replica)"
    assert third[0]["finished"] and third[0]["global_step"] == 12
    assert third[0]["visits"] == [2] * 48, "each sample once in the OSR epoch and once in fine-tuning"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["adam_step"] for r in log if r["event"] == "osr_done"] == [6]
    assert [(r["stage"], r["stage_step"]) for r in log if r["event"] == "resume"] == [("osr", 5), ("finetune", 3)]
    # The cost adds up every launch, the stopped ones included: (ranks, steps, samples) of each.
    cost = json.loads((tmp_path / "run" / "summary.json").read_text())["cost"]
    parts = {stage: [(e["world_size"], e["steps"], e["num_samples"]) for e in cost[stage]["launches"]]
             for stage in ("osr", "finetune")}
    assert parts == {"osr": [(2, 5, 40), (1, 1, 8)], "finetune": [(1, 3, 24), (2, 3, 24)]}
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
