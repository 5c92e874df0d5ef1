"""Distributed GCL/HGCL/MBCL on 2 real CPU ranks equal the single-process computation."""

import pytest
import torch
import torch.nn.functional as F

from engine.objectives.contrastive import GlobalContrastiveLoss, MiniBatchContrastiveLoss, SurrogateSpec
from tests.helpers.dist_cases import LOCAL_BATCH, toy_problem
from tests.helpers.harness import run_ranks

WORLD = 2


def single_process(kind):
    spec = SurrogateSpec(kind=kind, margin=0.1, tau=0.05, eps=1e-10, chunk_size=0)
    enc_img, enc_txt, x, z, log_u_x, log_u_z, seen = toy_problem(WORLD)
    f = F.normalize(enc_img(x), dim=1)
    g = F.normalize(enc_txt(z), dim=1)
    f.retain_grad()
    g.retain_grad()
    out = GlobalContrastiveLoss(spec)(
        f, g, log_u_x=log_u_x, log_u_z=log_u_z, seen=seen, gamma=0.7, output_dict=True)
    out["loss"].backward()
    params = {f"img.{n}": p.grad for n, p in enc_img.named_parameters()}
    params.update({f"txt.{n}": p.grad for n, p in enc_txt.named_parameters()})
    return {"grad_f": f.grad, "grad_g": g.grad, "params": params, **out}


CASES = [(kind, chunk) for kind in ("gcl", "hgcl") for chunk in (1, 5, 0)]  # one sample, odd, whole batch


@pytest.fixture(scope="module")
def ranks_results():
    return run_ranks("tests.helpers.dist_cases:global_loss_ranks", world_size=WORLD, cases=CASES)


@pytest.mark.slow
@pytest.mark.parametrize("kind,chunk_size", CASES)
def test_distributed_global_loss_equals_single_process(ranks_results, kind, chunk_size):
    ref = single_process(kind)
    for rank, per_rank in enumerate(ranks_results):
        res = per_rank[f"{kind}-{chunk_size}"]
        lo, hi = rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH
        # Feature grads carry the world-size factor that the ranks' gradient averaging removes.
        torch.testing.assert_close(res["grad_f"] / WORLD, ref["grad_f"][lo:hi], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res["grad_g"] / WORLD, ref["grad_g"][lo:hi], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res["log_u_x"], ref["log_u_x"][lo:hi].to(res["log_u_x"].dtype))
        torch.testing.assert_close(res["loss_value"], ref["loss_value"])
        torch.testing.assert_close(res["batch_loss_value"], ref["batch_loss_value"])
        for name, grad in ref["params"].items():
            torch.testing.assert_close(res["params"][name], grad, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_distributed_mbcl_equals_single_process():
    ranks = run_ranks("tests.helpers.dist_cases:mbcl_ranks", world_size=WORLD)
    enc_img, enc_txt, x, z, *_ = toy_problem(WORLD)
    f, g = F.normalize(enc_img(x), dim=1), F.normalize(enc_txt(z), dim=1)
    loss = MiniBatchContrastiveLoss(tau=0.05)(f, g)
    loss.backward()
    ref = {f"img.{n}": p.grad for n, p in enc_img.named_parameters()}
    ref.update({f"txt.{n}": p.grad for n, p in enc_txt.named_parameters()})
    for res in ranks:
        torch.testing.assert_close(res["loss_value"].double(), loss.detach().double(), rtol=1e-6, atol=1e-9)
        for name, grad in ref.items():
            torch.testing.assert_close(res["params"][name].double(), grad.double(), rtol=1e-5, atol=1e-9)
