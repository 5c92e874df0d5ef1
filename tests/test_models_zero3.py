"""ZeRO-3 construction: the model is partitioned while it is built and loaded slice by slice (2 CPU ranks)."""

import pytest
import torch

from models import build_model, export_weights, register_shipped_configs
from tests.helpers.harness import run_ranks


@pytest.mark.slow
def test_zero3_build_holds_a_partition_per_rank_and_loads_the_file_exactly(tmp_path):
    register_shipped_configs()
    weights, wrong = tmp_path / "tiny.safetensors", tmp_path / "wrong.safetensors"
    trained = build_model("tiny-vit", seed=3).model
    with torch.no_grad():  # values no random init gives: a copy of the init would also pass
        for p in trained.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    export_weights(trained, weights)
    export_weights(torch.nn.Linear(2, 2), wrong)  # another architecture
    wrapped = tmp_path / "wrapped.pt"  # a DeepSpeed/DDP-style checkpoint: "state_dict", "module." keys
    torch.save({"state_dict": {"module." + k: v for k, v in trained.state_dict().items()}}, wrapped)
    results = run_ranks("tests.helpers.dist_cases_zero3:build_partitioned", world_size=2, weights=str(weights),
                        wrong_weights=str(wrong), wrapped_pt=str(wrapped))
    total = sum(p.numel() for p in trained.parameters())
    for res in results:
        assert "do not match the model architecture" in res["wrong_weights_error"]
        for label in ("", "pt_"):
            assert res[label + "unequal"] == [] and res[label + "buffers_unequal"] == []
            assert res[label + "num_total"] == total
            assert res[label + "num_local"] <= total / 2 + 2 * len(list(trained.parameters()))  # 1/W plus padding
            assert res[label + "data_numel_outside_gather"] == 0  # nothing whole outside GatheredParameters
