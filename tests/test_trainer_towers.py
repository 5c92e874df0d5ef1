"""model.lock_image / model.lock_text and optim.layer_decay_* through the trainer (single backend): locked
weights stay bit-identical and hold no optimizer state, OSR's moments cover exactly the trained ones, every
step gives each parameter lr * decay^(L - depth), and bad values end in one error line."""

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main
from engine.config import load_config
from engine.schedules import cosine_lr
from engine.trainer import Trainer
from tests.helpers.jobs import job, merge

# tiny-vit's image lock groups: [embeddings + ln_pre], block 0, [block 1 + ln_post], proj.
IMAGE_LOCKED = ("visual.conv1.", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.",
                "visual.transformer.resblocks.0.")


def make_trainer(shards, tmp_path, **sections):
    base = job(shards, tmp_path / "run", data={"batch_size": 16}, osr={"epochs": 1})
    return Trainer(load_config(base=merge(base, **sections)))


def test_locked_image_groups_stay_bit_identical_and_hold_no_optimizer_state(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path, model={"name": "tiny-vit", "lock_image": True,
                                                    "lock_image_unlocked_groups": 2})
    model = trainer.backend.model
    w0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    locked = {name for name in w0 if name.startswith(IMAGE_LOCKED)}
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == set(w0) - locked - {"logit_scale"}
    osr_moments = {}
    osr = trainer.osr

    def osr_then_read_moments():
        osr()
        osr_moments.update(trainer.backend.full_moments())

    trainer.osr = osr_then_read_moments
    trainer.tune()

    assert set(osr_moments) == trained  # OSR seeded exactly the trained parameters
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(p)] for p in trainer.backend.optimizer.state} == trained
    assert {names[id(p)] for g in trainer.backend.optimizer.param_groups for p in g["params"]} == trained
    final = load_file(trainer.out_dir / "final.safetensors")
    assert set(final) == set(model.state_dict())  # complete: frozen parameters exported too
    for name in locked:
        value = dict(model.named_parameters())[name].detach()
        assert value.numpy().tobytes() == w0[name].numpy().tobytes(), name
        assert final[name].numpy().tobytes() == w0[name].numpy().tobytes(), name
    for name in ("visual.proj", "visual.ln_post.weight", "visual.transformer.resblocks.1.attn.in_proj_weight",
                 "token_embedding.weight", "text_projection"):
        assert not torch.equal(final[name], w0[name]), f"{name} is trainable but did not change"
    trainer.close()


def test_locked_text_tower_is_whole_and_image_trains(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path, method="fastclip", model={"name": "tiny-vit", "lock_text": True})
    model = trainer.backend.model
    w0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.tune()
    for name, value in model.named_parameters():
        changed = not torch.equal(value.detach(), w0[name])
        assert changed == name.startswith("visual."), name
    trainer.close()


# tiny-vit, 2 blocks per tower, optim.layer_decay_image=0.5, optim.layer_decay_text=0.8: decay^(2 - depth).
LR_TABLE = {"visual.conv1.weight": 0.25, "visual.class_embedding": 0.25, "visual.positional_embedding": 0.25,
            "visual.ln_pre.bias": 0.25, "visual.transformer.resblocks.0.mlp.c_fc.weight": 0.5,
            "visual.transformer.resblocks.1.attn.in_proj_weight": 1.0, "visual.ln_post.weight": 1.0,
            "visual.proj": 1.0, "token_embedding.weight": 0.64, "positional_embedding": 0.64,
            "transformer.resblocks.0.ln_1.weight": 0.8, "transformer.resblocks.1.mlp.c_proj.bias": 1.0,
            "ln_final.weight": 1.0, "text_projection": 1.0}


def test_layer_decay_gives_each_parameter_its_table_lr_at_every_step(shards, tmp_path):
    """OSR's steps at lr 0, warm-up and cosine steps: each parameter's group lr is the schedule's lr times its
    table factor, and the first fine-tuning update is AdamW's at that lr."""
    trainer = make_trainer(shards, tmp_path, optim={"lr": 1e-3, "warmup_steps": 2, "layer_decay_image": 0.5,
                                                    "layer_decay_text": 0.8})
    backend, model = trainer.backend, trainer.backend.model
    params = dict(model.named_parameters())
    names = {id(p): name for name, p in params.items()}
    seen = []  # (schedule lr, {name: group lr}, {name: grad}, {name: weight before}, {name: moments before})
    step = backend.step

    def recording_step(*, lr, grad_clip=0.0):
        grads = {name: params[name].grad.clone() for name in LR_TABLE}
        before = {name: params[name].detach().clone() for name in LR_TABLE}
        moments = {names[id(p)]: (s["exp_avg"].clone(), s["exp_avg_sq"].clone(), int(s["step"]))
                   for p, s in backend.optimizer.state.items() if names[id(p)] in LR_TABLE}
        norm = step(lr=lr, grad_clip=grad_clip)
        group_lrs = {names[id(p)]: g["lr"] for g in backend.optimizer.param_groups for p in g["params"]}
        seen.append((lr, group_lrs, grads, before, moments))
        return norm

    backend.step = recording_step
    trainer.tune()
    osr_steps = trainer.osr_steps
    assert osr_steps > 0 and len(seen) > osr_steps + 2
    per_epoch = len(seen) - osr_steps
    for index, (lr, group_lrs, *_) in enumerate(seen):
        ft_step = index - osr_steps
        expected_lr = 0.0 if ft_step < 0 else cosine_lr(ft_step, base_lr=1e-3, total_steps=per_epoch,
                                                         warmup_steps=2)
        assert lr == pytest.approx(expected_lr, rel=1e-12)
        assert "logit_scale" not in group_lrs  # frozen: in no group
        for name, factor in LR_TABLE.items():
            assert group_lrs[name] == pytest.approx(lr * factor, rel=1e-12, abs=0.0), (index, name)
    assert {lr for lr, *_ in seen[osr_steps:osr_steps + 3]} != {seen[osr_steps][0]}  # warm-up: lr changes

    lr, _, grads, before, moments = seen[osr_steps]  # first fine-tuning step, from the seeded moments
    beta1, beta2 = trainer.cfg.optim.betas
    eps, wd = trainer.cfg.optim.eps, trainer.cfg.optim.weight_decay
    after = seen[osr_steps + 1][3]
    for name, factor in LR_TABLE.items():
        m_star, v_star, t_osr = moments[name]
        t, g, lr_p = t_osr + 1, grads[name], lr * factor
        m = beta1 * m_star + (1 - beta1) * g
        v = beta2 * v_star + (1 - beta2) * g * g
        decay = 0.0 if params[name].ndim < 2 or "ln" in name or "bias" in name else wd
        expected = before[name] * (1 - lr_p * decay) - lr_p * (m / (1 - beta1**t)) / (
            torch.sqrt(v / (1 - beta2**t)) + eps)
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-9)
    trainer.close()


@pytest.mark.parametrize(("flags", "message"), [
    (["--set", "model.lock_image_unlocked_groups=1"],
     "model.lock_image_unlocked_groups=1 needs model.lock_image=true"),
    (["--set", "model.lock_text=true", "--set", "model.lock_text_unlocked_layers=-1"],
     "model.lock_text_unlocked_layers must be >= 0"),
    (["--set", "optim.layer_decay_text=1.5"], "optim.layer_decay_text must be in (0, 1]"),
    (["--lock-image", "--lock-image-unlocked-groups", "9"],  # open_clip_train's spellings
     "model.lock_image_unlocked_groups=9: the image tower of CLIP has 4 lock groups"),
])
def test_bad_lock_and_decay_values_are_one_error_line(shards, tmp_path, capsys, flags, message):
    args = ["tune", "--train", str(shards), "--out", str(tmp_path / "run"), "--model", "tiny-vit", "--batch-size",
            "8", "--epochs", "1", "--osr-epochs", "1", "--set", "run.progress=false", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1 and message in err, err
