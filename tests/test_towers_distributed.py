"""model.lock_image and optim.layer_decay_* on 2 FSDP2 / ZeRO-3 ranks: locked weights exported bit-identical to
the start, the others trained, OSR seeds exactly the trained parameters, every group steps at lr times its factor."""

import pytest
import torch
from safetensors.torch import load_file

from models import build_model, export_weights
from tests.helpers.harness import run_ranks
from tests.helpers.jobs import job
from tests.test_trainer_towers import IMAGE_LOCKED

CASE = "tests.helpers.dist_cases_towers:tune_locked"
LOCK_AND_DECAY = {"lock_image": True, "lock_image_unlocked_groups": 2}


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("towers") / "start.safetensors"
    export_weights(build_model("tiny-vit", seed=7).model, path)
    return path


def locked_job(shards, out, start_weights, *, precision, **run):
    return job(shards, out, model={"name": "tiny-vit", "weights": str(start_weights), "precision": precision,
                                   **LOCK_AND_DECAY},
               optim={"lr": 1e-3, "warmup_steps": 2, "layer_decay_text": 0.5}, run={"save_every_steps": 0, **run})


@pytest.mark.slow
# ZeRO-3 in bf16 rounds its partitions of the frozen weights: the export must still hold the file's fp32 values.
@pytest.mark.parametrize("run", [{"backend": "fsdp", "precision": "fp32"},
                                 {"backend": "deepspeed", "zero_config": "zero3_bf16", "precision": "bf16"}],
                         ids=["fsdp", "zero3_bf16"])
def test_two_ranks_lock_and_step_each_group_at_its_lr(shards, start_weights, tmp_path, run):
    config = locked_job(shards, tmp_path / "run", start_weights, **run)
    result = run_ranks(CASE, world_size=2, config=config)[0]
    trained = set(result["trained"])
    assert trained and not any(name.startswith(IMAGE_LOCKED) for name in trained)
    assert set(result["seeded"]) == trained  # OSR's moments: exactly the trained parameters
    scales = set()
    for lr, groups in result["steps"]:
        for group_lr, scale in groups:
            assert group_lr == pytest.approx(lr * scale, rel=1e-12, abs=0.0)
            scales.add(scale)
    assert scales == {1.0, 0.5, 0.25}  # text decay 0.5 over 2 blocks
    final, start = load_file(tmp_path / "run" / "final.safetensors"), load_file(start_weights)
    assert set(final) == set(start)
    for name, value in final.items():
        if name.startswith(IMAGE_LOCKED) or name == "logit_scale":
            assert value.reshape(start[name].shape).numpy().tobytes() == start[name].numpy().tobytes(), name
        else:
            assert not torch.equal(value, start[name]), name
