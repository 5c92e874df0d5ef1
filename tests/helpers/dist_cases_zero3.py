"""Functions run on every rank by tests.helpers.harness.run_ranks for ZeRO-3 construction (2 CPU ranks)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.backends.deepspeed import DeepSpeedBackend, build_deepspeed_config
from engine.distributed import context_from_env
from models.weights import read_state_dict
from models.zero3 import build_model_zero3

ROOT = Path(__file__).resolve().parents[2]


def build_partitioned(*, weights: str, wrong_weights: str, wrapped_pt: str, model: str = "tiny-vit") -> dict:
    """Build `model` under zero.Init with `weights`; compare the gathered parameters with the file. Also from
    `wrapped_pt` (the same weights as a torch.save'd {"state_dict": {"module." + name: tensor}})."""
    from deepspeed import zero

    ctx = context_from_env()
    DeepSpeedBackend.init_distributed(ctx)
    config = build_deepspeed_config(json.loads((ROOT / "zero_configs" / "zero3.json").read_text()),
                                    micro_batch_size=1, world_size=ctx.world_size, betas=(0.9, 0.98),
                                    weight_decay=0.1, eps=1e-6, grad_clip=0.0)
    out = {}
    try:
        build_model_zero3(model, ds_config=config, weights=wrong_weights)
    except ValueError as err:
        out["wrong_weights_error"] = str(err)
    expected = read_state_dict(weights)
    for label, path in (("", weights), ("pt_", wrapped_pt)):
        model_ = build_model_zero3(model, ds_config=config, weights=path).model
        params = list(model_.named_parameters())
        out[label + "num_local"] = sum(p.ds_tensor.numel() for _, p in params)
        out[label + "num_total"] = sum(p.ds_numel for _, p in params)
        out[label + "data_numel_outside_gather"] = sum(p.data.numel() for _, p in params)
        with zero.GatheredParameters([p for _, p in params]):
            out[label + "unequal"] = [n for n, p in params
                                      if not torch.equal(p.detach().reshape(expected[n].shape), expected[n])]
        out[label + "buffers_unequal"] = [n for n, b in model_.named_buffers()
                                          if n in expected and not torch.equal(b, expected[n])]
    return out
