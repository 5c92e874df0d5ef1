"""The single-process backend: OSR steps keep weights, AdamW formula, bad gradients, save/load, bf16."""

import math

import pytest
import torch

from engine.backends.single import SingleProcessBackend
from models import build_model, features_of

BETAS, EPS, WD = (0.9, 0.98), 1e-6, 0.02


def make_backend(precision="fp32", seed=0):
    model = build_model("tiny-vit", seed=seed).model
    return SingleProcessBackend(model, device=torch.device("cpu"), betas=BETAS, weight_decay=WD, eps=EPS,
                                precision=precision)


def batch(seed=0, n=4):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(1, 400, (n, 32), generator=gen)


def loss_of(backend, seed=0):
    image_features, text_features = features_of(backend.forward(*batch(seed)))
    return (image_features @ text_features.T).diagonal().sum()


def params(backend):
    return {n: p.detach().clone() for n, p in backend.model.named_parameters()}


def test_lr_zero_steps_keep_weights_and_count_then_adamw_formula_with_t_plus_one():
    backend = make_backend()
    w0, grads = params(backend), []
    for seed in range(3):
        backend.backward(loss_of(backend, seed))
        grads.append({n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None})
        backend.step(lr=0.0)
    assert all(torch.equal(w0[n], p) for n, p in backend.model.named_parameters())
    assert backend.optimizer_step_count() == 3
    moments = backend.full_moments()
    name = "visual.conv1.weight"
    m = v = torch.zeros_like(w0[name])
    for g in grads:
        m, v = BETAS[0] * m + (1 - BETAS[0]) * g[name], BETAS[1] * v + (1 - BETAS[1]) * g[name] ** 2
    torch.testing.assert_close(moments[name][0], m, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(moments[name][1], v, rtol=1e-5, atol=1e-10)

    lr = 1e-3
    backend.backward(loss_of(backend, 9))
    g = backend.model.get_parameter(name).grad.clone()
    backend.step(lr=lr)
    m, v = BETAS[0] * m + (1 - BETAS[0]) * g, BETAS[1] * v + (1 - BETAS[1]) * g**2
    t = 4  # the counter carried on from the three lr = 0 steps
    m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
    expected = w0[name] * (1 - lr * WD) - lr * m_hat / (v_hat.sqrt() + EPS)
    torch.testing.assert_close(backend.model.get_parameter(name).detach(), expected, rtol=1e-5, atol=1e-7)


def test_non_finite_gradient_is_not_applied():
    backend = make_backend()
    backend.backward(loss_of(backend))
    backend.step(lr=1e-3)
    before, count = params(backend), backend.optimizer_step_count()
    backend.backward(loss_of(backend, 1))
    backend.model.visual.conv1.weight.grad[0, 0, 0, 0] = float("nan")
    norm = backend.step(lr=1e-3)
    assert math.isnan(norm) and backend.optimizer_step_count() == count
    assert all(torch.equal(before[n], p) for n, p in backend.model.named_parameters())
    assert backend.state_finite() and all(p.grad is None for p in backend.model.parameters())


def test_save_then_load_into_another_model_is_exact(tmp_path):
    backend = make_backend()
    for seed in range(2):
        backend.backward(loss_of(backend, seed))
        backend.step(lr=1e-3)
    backend.save(tmp_path / "ckpt")
    other = make_backend(seed=1)
    other.load(tmp_path / "ckpt")
    assert other.weights_digest() == backend.weights_digest()
    for name, (m, v) in backend.full_moments().items():
        assert torch.equal(m, other.full_moments()[name][0]) and torch.equal(v, other.full_moments()[name][1])
    assert other.optimizer_step_count() == 2
    with pytest.raises(ValueError, match="cannot load a checkpoint written by several ranks"):
        other.load(tmp_path / "ckpt", reshard=True)


def test_bf16_runs_the_forward_under_autocast_with_fp32_weights():
    backend = make_backend("bf16")
    image_features, _ = features_of(backend.forward(*batch()))
    assert image_features.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in backend.model.parameters())
