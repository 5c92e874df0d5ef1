"""The siglip method's objective: SigLIP's pairwise sigmoid loss at fixed temperature with a learned
bias, against the plain formula and open_clip's SigLipLoss, in one process and on 2 ranks."""

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from engine.objectives import build_objective, trained_scalars
from engine.objectives.sigmoid import SigmoidObjective
from tests.helpers.dist_cases import toy_problem
from tests.helpers.dist_cases_sigmoid import BIAS, TAU
from tests.helpers.harness import run_ranks


def naive_sigmoid_loss(f, g, *, tau, bias):
    """-1/B sum_ij log sigmoid(z_ij (f_i . g_j / tau + b)), z_ij = +1 on the diagonal, -1 elsewhere."""
    labels = 2 * torch.eye(len(f), dtype=f.dtype) - 1
    logits = f @ g.T / tau + bias
    return -F.logsigmoid(labels * logits).sum() / len(f)


def _features(seed=0, num=6, dim=8):
    torch.manual_seed(seed)
    f = F.normalize(torch.randn(num, dim, dtype=torch.float64), dim=1).requires_grad_()
    g = F.normalize(torch.randn(num, dim, dtype=torch.float64), dim=1).requires_grad_()
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    return f, g, bias


def _value_and_grads(loss, *tensors):
    return loss.detach(), torch.autograd.grad(loss, tensors)


def test_sigmoid_objective_equals_plain_formula_and_open_clip():
    f, g, bias = _features()
    ref_value, ref_grads = _value_and_grads(naive_sigmoid_loss(f, g, tau=TAU, bias=bias), f, g, bias)
    objective = SigmoidObjective(tau=TAU, rank=0, world_size=1, reduce_sum=lambda t: t)
    out = objective(f, g, rows=torch.arange(len(f)), logit_bias=bias)
    value, grads = _value_and_grads(out["sigmoid_loss"], f, g, bias)
    open_clip_loss = SigLipLoss()(f.float(), g.float(), torch.tensor(1 / TAU), bias.float())
    torch.testing.assert_close(open_clip_loss.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["batch_loss_value"].double(), ref_value, rtol=1e-5, atol=1e-6)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref, rtol=1e-4, atol=1e-6)
    assert ref_grads[2].abs() > 1e-3  # the bias is learned: its gradient is not zero


def test_siglip_is_registered_and_learns_only_the_bias():
    objective = build_objective("siglip", tau=TAU, margin=0.1, eps=1e-14, chunk_size=0, normaliser=None, rank=0,
                                world_size=1, local_batch=4, gather=lambda t: t, reduce_sum=lambda t: t)
    assert isinstance(objective, SigmoidObjective)
    assert trained_scalars("siglip") == ("logit_bias",)
    assert trained_scalars("hgcl") == ()
    f, g, _ = _features()
    with pytest.raises(ValueError, match="needs a model with logit_bias"):
        objective(f, g, rows=torch.arange(len(f)))


@pytest.mark.slow
def test_sigmoid_objective_on_two_ranks_equals_single_process():
    world = 2
    ranks = run_ranks("tests.helpers.dist_cases_sigmoid:sigmoid_ranks", world_size=world)
    enc_img, enc_txt, x, z, *_ = toy_problem(world)
    bias = torch.nn.Parameter(torch.tensor(BIAS, dtype=torch.float64))
    loss = naive_sigmoid_loss(F.normalize(enc_img(x), dim=1), F.normalize(enc_txt(z), dim=1), tau=TAU, bias=bias)
    loss.backward()
    ref = {f"img.{n}": p.grad for n, p in enc_img.named_parameters()}
    ref.update({f"txt.{n}": p.grad for n, p in enc_txt.named_parameters()}, bias=bias.grad)
    for res in ranks:
        torch.testing.assert_close(res["loss_value"].double(), loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["batch_loss_value"].double(), loss.detach(), rtol=1e-5, atol=1e-6)
        for name, grad in ref.items():
            torch.testing.assert_close(res["params"][name].double(), grad, rtol=1e-4, atol=1e-6)
