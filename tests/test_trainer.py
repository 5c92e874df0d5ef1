"""Stages: OSR leaves weights bit-identical and seeds AdamW exactly; fine-tuning continues correctly."""

import math

import pytest
import torch

from engine.config import load_config
from engine.objectives.contrastive import pairwise_surrogate
from engine.trainer import Trainer
from tests.helpers.jobs import job, merge


def make_trainer(shards, tmp_path, **sections):
    base = job(shards, tmp_path / "run", data={"batch_size": 16}, osr={"epochs": 2})
    return Trainer(load_config(base=merge(base, **sections)))


def record_steps(trainer):
    """Wrap the backend's step to keep (lr, {name: grad}) of every step."""
    seen = []
    original = trainer.backend.step
    names = {id(p): n for n, p in trainer.backend.model.named_parameters()}

    def step(*, lr, grad_clip=0.0):
        grads = {names[id(p)]: p.grad.detach().clone() for p in trainer.backend.model.parameters()
                 if p.grad is not None}
        seen.append((lr, grads))
        return original(lr=lr, grad_clip=grad_clip)

    trainer.backend.step = step
    return seen


def naive_first_gradient(trainer, batch):
    """G at w0 for a first-visit batch, from the plain formula (linear u, autograd)."""
    model = trainer.backend.model
    model.zero_grad(set_to_none=True)
    f = model.encode_image(batch.images, normalize=True).double()
    g = model.encode_text(batch.texts, normalize=True).double()
    tau, margin, n = trainer.tau, trainer.cfg.loss.margin, f.shape[0]
    s = f @ g.T
    pos = torch.diagonal(s)
    off = ~torch.eye(n, dtype=torch.bool)
    phi1 = (torch.exp(pairwise_surrogate(s - pos[:, None], kind="hgcl", margin=margin) / tau) * off).sum(1) / n
    phi2 = (torch.exp(pairwise_surrogate(s.T - pos[:, None], kind="hgcl", margin=margin) / tau) * off).sum(1) / n
    eps = trainer.cfg.loss.eps
    (tau / n * (phi1 / (eps + phi1.detach()) + phi2 / (eps + phi2.detach())).sum()).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_osr_keeps_weights_and_accumulates_adam_moments(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path)
    model = trainer.backend.model
    trainer.loader.image_transform = trainer.bundle.eval_transform  # deterministic images
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first_batch = next(iter(trainer.loader.epoch(0)))
    expected_g1 = naive_first_gradient(trainer, first_batch)
    steps = record_steps(trainer)
    trainer.osr()

    # Bit-identical weights, every tensor.
    for key, value in model.state_dict().items():
        assert torch.equal(value, w0[key]), key
    num_steps = 2 * trainer.loader.num_batches()
    assert len(steps) == num_steps == trainer.osr_steps
    assert all(lr == 0.0 for lr, _ in steps)
    assert trainer.backend.optimizer_step_count() == num_steps

    # Step 1's gradient is G(w0, B1) of the paper's formula.
    _, g1 = steps[0]
    for name, grad in expected_g1.items():
        torch.testing.assert_close(g1[name].double(), grad.double(), rtol=2e-3, atol=1e-7)

    # m*, v* are Adam's moving averages of the recorded G's (paper Algorithm 1).
    beta1, beta2 = trainer.cfg.optim.betas
    moments = trainer.backend.full_moments()
    for name in ("visual.conv1.weight", "text_projection", "visual.transformer.resblocks.0.attn.in_proj_weight"):
        m = torch.zeros_like(steps[0][1][name])
        v = torch.zeros_like(m)
        for _, grads in steps:
            m = beta1 * m + (1 - beta1) * grads[name]
            v = beta2 * v + (1 - beta2) * grads[name] ** 2
        torch.testing.assert_close(moments[name][0], m, rtol=1e-4, atol=1e-6 * m.abs().max().item())
        torch.testing.assert_close(moments[name][1], v, rtol=1e-4, atol=1e-6 * v.abs().max().item())

    # Every sample was seen once per OSR epoch and carries a finite estimate.
    rows = torch.arange(trainer.manifest.num_samples)
    visits = trainer.normaliser.table.visits(rows)
    assert visits.max().item() == 2 and (visits > 0).sum().item() >= num_steps // 2 * 16
    log_u_x, log_u_z, seen = trainer.normaliser.table.read(rows[visits > 0])
    assert torch.isfinite(log_u_x).all() and torch.isfinite(log_u_z).all() and seen.all()
    assert trainer.normaliser.table.provenance["surrogate"] == "hgcl"
    trainer.close()


def test_first_finetune_update_equals_adamw_with_seeded_moments(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path)
    trainer.osr()
    t_osr = trainer.backend.optimizer_step_count()
    model = trainer.backend.model
    params = dict(model.named_parameters())
    w0 = {k: p.detach().clone() for k, p in params.items()}
    seeded = {k: (m.clone(), v.clone()) for k, (m, v) in trainer.backend.full_moments().items()}
    steps = record_steps(trainer)
    trainer.cfg.run.max_steps_per_epoch = 1
    trainer.finetune()
    assert len(steps) == 1
    lr, grads = steps[0]
    assert lr == pytest.approx(trainer.cfg.optim.lr)  # cosine schedule at step 0
    beta1, beta2 = trainer.cfg.optim.betas
    eps, wd = trainer.cfg.optim.eps, trainer.cfg.optim.weight_decay
    t = t_osr + 1  # the step counter continues from OSR
    assert trainer.backend.optimizer_step_count() == t
    for name in ("visual.conv1.weight", "token_embedding.weight", "ln_final.bias"):
        m_star, v_star = seeded[name]
        g = grads[name]
        m = beta1 * m_star + (1 - beta1) * g
        v = beta2 * v_star + (1 - beta2) * g * g
        decay = 0.0 if name.endswith("bias") else wd
        expected = w0[name] * (1 - lr * decay) - lr * (m / (1 - beta1**t)) / (
            torch.sqrt(v / (1 - beta2**t)) + eps
        )
        torch.testing.assert_close(params[name].detach(), expected, rtol=1e-5, atol=1e-8)
        moved = (params[name].detach() - w0[name]).abs().max().item()
        assert moved > 0
        # A restarted counter (t = 1) would give a visibly different first update.
        restarted = w0[name] * (1 - lr * decay) - lr * (m / (1 - beta1)) / (torch.sqrt(v / (1 - beta2)) + eps)
        assert not torch.allclose(restarted, expected, rtol=1e-3, atol=1e-9)
    trainer.close()


def test_ablation_switches_reset_what_they_name(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path / "a", osr={"epochs": 1, "seed_moments": False})
    trainer.osr()
    assert trainer.backend.optimizer_step_count() == 0
    assert trainer.normaliser.table.num_seen() > 0
    trainer.close()
    trainer = make_trainer(shards, tmp_path / "b", osr={"epochs": 1, "seed_u": False})
    trainer.osr()
    assert trainer.backend.optimizer_step_count() == trainer.loader.num_batches()
    assert trainer.normaliser.table.num_seen() == 0
    trainer.close()


@pytest.mark.parametrize("method,expected", [("openclip", "mbcl"), ("fastclip", "gcl"), ("tuneclip", "hgcl")])
def test_methods_run_their_loss_and_update_weights(shards, tmp_path, method, expected):
    trainer = make_trainer(shards, tmp_path, method=method, osr={"epochs": 1})
    assert trainer.cfg.surrogate == expected
    w0 = trainer.backend.model.visual.conv1.weight.detach().clone()
    trainer.tune()
    assert not torch.equal(trainer.backend.model.visual.conv1.weight, w0)
    assert (trainer.out_dir / "final.safetensors").exists()
    uses_table = expected != "mbcl"
    assert (trainer.normaliser.table.num_seen() > 0) == uses_table
    assert trainer.osr_steps == (trainer.loader.num_batches() if method == "tuneclip" else 0)
    # The temperature stays fixed at the checkpoint's value.
    assert math.isclose(1 / trainer.backend.model.logit_scale.exp().item(), trainer.tau, rel_tol=1e-7)
    trainer.close()


def test_osr_accepts_negative_zeros_of_fp16_checkpoints(shards, tmp_path):
    """OpenAI's fp16 checkpoints hold -0.0; AdamW at lr 0 turns some into +0.0 (same value, other bytes)."""
    from models import build_model, export_weights

    model = build_model("tiny-vit", seed=0).model
    with torch.no_grad():
        weight = model.visual.transformer.resblocks[0].mlp.c_fc.weight
        weight.view(-1)[:256] = -0.0
    export_weights(model, tmp_path / "fp16ish.safetensors")
    trainer = make_trainer(shards, tmp_path, model={"weights": str(tmp_path / "fp16ish.safetensors")})
    before = {n: p.detach().clone() for n, p in trainer.backend.model.named_parameters()}
    trainer.osr()  # used to stop with "OSR changed the weights"
    after = dict(trainer.backend.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # values unchanged
    flipped = (torch.signbit(before["visual.transformer.resblocks.0.mlp.c_fc.weight"])
               != torch.signbit(after["visual.transformer.resblocks.0.mlp.c_fc.weight"].detach())).sum()
    assert flipped > 0  # the case really occurred: some -0.0 became +0.0
    trainer.close()


def test_skipped_samples_go_to_a_skip_file_and_one_line_per_shard(tmp_path, caplog):
    import io
    import json
    import logging

    import numpy as np
    from PIL import Image

    from engine.data.sources import index_shards
    from tests.conftest import write_tar

    rng = np.random.default_rng(0)
    bad = {3, 17, 30}
    (tmp_path / "data").mkdir()
    for shard in range(2):
        members = []
        for i in range(shard * 20, shard * 20 + 20):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
            members += [(f"{i:04d}.png", b"broken" if i in bad else buf.getvalue()), (f"{i:04d}.txt", b"a cat")]
        write_tar(tmp_path / "data" / f"shard-{shard}.tar", members)
    index_shards(str(tmp_path / "data"), read_tars=True, num_workers=1)
    trainer = make_trainer(tmp_path / "data", tmp_path, method="openclip", data={"batch_size": 8},
                           run={"epochs": 2})
    with caplog.at_level(logging.WARNING, logger="engine.trainer"):
        trainer.tune()
    trainer.close()
    lines = [json.loads(line) for line in (tmp_path / "run" / "skipped" / "rank_00000.jsonl").read_text().splitlines()]
    assert sorted((r["epoch"], r["key"]) for r in lines) == sorted((e, f"{i:04d}") for e in (0, 1) for i in bad)
    assert {r["reason"] for r in lines} == {"corrupt image"}
    per_shard = [m for m in caplog.messages if m.startswith("epoch ")]
    assert sorted(per_shard) == sorted(
        f"epoch {e}: shard shard-{s}.tar: skipped {n} corrupt image (each sample in "
        f"{tmp_path / 'run' / 'skipped' / 'rank_00000.jsonl'})" for e in (0, 1) for s, n in ((0, 2), (1, 1)))
