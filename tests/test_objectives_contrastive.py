"""Losses against naive autograd implementations of the paper's equations, and against LibAUC."""

import math

import pytest
import torch
import torch.nn.functional as F

from engine.objectives.contrastive import (
    GlobalContrastiveLoss,
    MiniBatchContrastiveLoss,
    SurrogateSpec,
    anchor_log_phi,
    feature_gradients,
    pairwise_surrogate,
    update_log_estimate,
)


def _features(batch, dim, *, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=1)
    g = F.normalize(f + 0.8 * torch.randn(batch, dim, generator=gen, dtype=dtype), dim=1)
    return f, g


def naive_sogclr(f, g, u_x_prev, u_z_prev, seen, gamma, *, kind, margin, tau, eps):
    """Paper eqs. 3, 4, 8 written literally in float64 (u in linear space, exp formed)."""
    f = f.detach().double().requires_grad_(True)
    g = g.detach().double().requires_grad_(True)
    batch = f.shape[0]
    s = f @ g.T
    pos = torch.diagonal(s)
    off = ~torch.eye(batch, dtype=torch.bool)
    l_img = pairwise_surrogate(s - pos[:, None], kind=kind, margin=margin)  # l(s_ij - s_ii)
    l_txt = pairwise_surrogate(s.T - pos[:, None], kind=kind, margin=margin)  # l(s_ji - s_ii)
    phi1 = (torch.exp(l_img / tau) * off).sum(dim=1) / batch
    phi2 = (torch.exp(l_txt / tau) * off).sum(dim=1) / batch
    u_x = torch.where(seen, (1 - gamma) * u_x_prev + gamma * phi1.detach(), phi1.detach())
    u_z = torch.where(seen, (1 - gamma) * u_z_prev + gamma * phi2.detach(), phi2.detach())
    surrogate = tau / batch * (phi1 / (eps + u_x) + phi2 / (eps + u_z)).sum()
    surrogate.backward()
    value = tau / batch * (torch.log(eps + u_x) + torch.log(eps + u_z)).sum()
    return {"grad_f": f.grad, "grad_g": g.grad, "u_x": u_x, "u_z": u_z, "value": value, "phi1": phi1}


@pytest.mark.parametrize("kind", ["gcl", "hgcl"])
@pytest.mark.parametrize("chunk_size", [0, 1, 3])
@pytest.mark.parametrize("tau", [0.01, 0.07])
def test_sogclr_matches_naive_equations(kind, chunk_size, tau):
    batch, dim, gamma, eps = 9, 16, 0.8, 1e-8
    f, g = _features(batch, dim, seed=0)
    seen = torch.tensor([True, False] * 4 + [True])
    gen = torch.Generator().manual_seed(1)
    u_x_prev = torch.rand(batch, generator=gen, dtype=torch.float64) * 3 + 0.5
    u_z_prev = torch.rand(batch, generator=gen, dtype=torch.float64) * 3 + 0.5
    ref = naive_sogclr(f, g, u_x_prev, u_z_prev, seen, gamma, kind=kind, margin=0.1, tau=tau, eps=eps)

    spec = SurrogateSpec(kind=kind, margin=0.1, tau=tau, eps=eps, chunk_size=chunk_size)
    f32 = f.float().requires_grad_(True)
    g32 = g.float().requires_grad_(True)
    out = GlobalContrastiveLoss(spec)(
        f32, g32, log_u_x=u_x_prev.log().float(), log_u_z=u_z_prev.log().float(), seen=seen,
        gamma=gamma, output_dict=True,
    )
    out["loss"].backward()
    torch.testing.assert_close(out["log_u_x"].double(), ref["u_x"].log(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["log_u_z"].double(), ref["u_z"].log(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"].double(), ref["value"], rtol=1e-5, atol=1e-6)
    scale = ref["grad_f"].abs().max()
    torch.testing.assert_close(f32.grad.double() / scale, ref["grad_f"] / scale, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g32.grad.double() / scale, ref["grad_g"] / scale, rtol=1e-4, atol=1e-5)


def test_parameter_gradient_through_encoder_matches_naive():
    """The objective's gradient reaches encoder weights exactly as the naive surrogate's does."""
    torch.manual_seed(0)
    batch, dim = 6, 8
    enc_img = torch.nn.Linear(12, dim, dtype=torch.float64)
    enc_txt = torch.nn.Linear(12, dim, dtype=torch.float64)
    x, z = torch.randn(batch, 12, dtype=torch.float64), torch.randn(batch, 12, dtype=torch.float64)
    seen = torch.zeros(batch, dtype=torch.bool)
    zeros = torch.zeros(batch, dtype=torch.float64)
    spec = SurrogateSpec(kind="hgcl", margin=0.2, tau=0.05, eps=1e-10, chunk_size=4)

    f, g = F.normalize(enc_img(x), dim=1), F.normalize(enc_txt(z), dim=1)
    GlobalContrastiveLoss(spec)(f, g, log_u_x=zeros, log_u_z=zeros, seen=seen, gamma=0.5).backward()
    ours = [p.grad.clone() for p in (*enc_img.parameters(), *enc_txt.parameters())]
    for p in (*enc_img.parameters(), *enc_txt.parameters()):
        p.grad = None

    f, g = F.normalize(enc_img(x), dim=1), F.normalize(enc_txt(z), dim=1)
    s = f @ g.T
    pos = torch.diagonal(s)
    off = ~torch.eye(batch, dtype=torch.bool)
    phi1 = (torch.exp(pairwise_surrogate(s - pos[:, None], kind="hgcl", margin=0.2) / 0.05) * off).sum(1) / batch
    phi2 = (torch.exp(pairwise_surrogate(s.T - pos[:, None], kind="hgcl", margin=0.2) / 0.05) * off).sum(1) / batch
    (0.05 / batch * (phi1 / (1e-10 + phi1.detach()) + phi2 / (1e-10 + phi2.detach())).sum()).backward()
    naive = [p.grad for p in (*enc_img.parameters(), *enc_txt.parameters())]
    for a, b in zip(ours, naive):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gcl", "hgcl"])
def test_no_overflow_for_adversarial_similarities(dtype, kind):
    """tau = 0.01 with d = s_ij - s_ii near +2 (exp(l/tau) ~ e^441) and near -2 stays finite."""
    dim = 4
    e = torch.eye(dim)
    # Positives anti-aligned (s_ii = -1), half the negatives aligned (s_ij = +1): d = +2 and 0.
    f = torch.stack([e[0], -e[0], e[0], -e[0]])
    g = -f
    # A second case: perfect positives, half the negatives opposite (d = -2 and 0).
    f2 = torch.stack([e[0], -e[0], e[0], -e[0]])
    g2 = f2.clone()
    spec = SurrogateSpec(kind=kind, margin=0.1, tau=0.01, eps=1e-14, chunk_size=3)
    for ff, gg in ((f, g), (f2, g2)):
        ff = ff.to(dtype).requires_grad_(True)
        gg = gg.to(dtype).requires_grad_(True)
        zeros = torch.zeros(4)
        out = GlobalContrastiveLoss(spec)(
            ff, gg, log_u_x=zeros, log_u_z=zeros, seen=torch.zeros(4, dtype=torch.bool), gamma=1.0,
            output_dict=True,
        )
        out["loss"].backward()
        for t in (out["loss"], out["log_u_x"], out["batch_loss_value"], ff.grad, gg.grad):
            assert torch.isfinite(t.float()).all()
    # And the log-space normaliser matches the float64 value where float64 can still form it.
    log_phi_x, _ = anchor_log_phi(f, g, f, g, offset=0, spec=spec)
    big = pairwise_surrogate(torch.tensor(2.0, dtype=torch.float64), kind=kind, margin=0.1).item() / 0.01
    zero = pairwise_surrogate(torch.tensor(0.0, dtype=torch.float64), kind=kind, margin=0.1).item() / 0.01
    expected = math.log((2 * math.exp(big) + math.exp(zero)) / 4)
    assert log_phi_x[0].item() == pytest.approx(expected, rel=1e-6)


def test_hgcl_gradient_vanishes_when_positive_beats_negatives_by_margin():
    """s_ii > s_ij + m for every pair: HGCL's gradient is exactly zero; GCL's is not."""
    dim = 4
    f = torch.eye(dim)[:3].clone().requires_grad_(True)  # s_ii = 1, s_ij = 0: gap 1 > m
    g = torch.eye(dim)[:3].clone().requires_grad_(True)
    zeros = torch.zeros(3)
    seen = torch.zeros(3, dtype=torch.bool)
    GlobalContrastiveLoss(SurrogateSpec(kind="hgcl", margin=0.5, tau=0.01))(
        f, g, log_u_x=zeros, log_u_z=zeros, seen=seen, gamma=1.0
    ).backward()
    assert torch.count_nonzero(f.grad) == 0 and torch.count_nonzero(g.grad) == 0
    f.grad = g.grad = None
    GlobalContrastiveLoss(SurrogateSpec(kind="gcl", tau=0.01))(
        f, g, log_u_x=zeros, log_u_z=zeros, seen=seen, gamma=1.0
    ).backward()
    assert f.grad.abs().sum() > 0
    # With margin larger than the gap, pairs inside the margin get a gradient again.
    f.grad = g.grad = None
    GlobalContrastiveLoss(SurrogateSpec(kind="hgcl", margin=1.5, tau=0.01))(
        f, g, log_u_x=zeros, log_u_z=zeros, seen=seen, gamma=1.0
    ).backward()
    assert f.grad.abs().sum() > 0


def _gather_from(*global_tensors, rows):
    """All-gather stand-in for the rank holding `rows`: the global tensor whose rows those are."""
    def gather(local):
        return next(full for full in global_tensors if torch.equal(full[rows], local))
    return gather


@pytest.mark.parametrize("kind", ["gcl", "hgcl"])
@pytest.mark.parametrize("chunk_size", [0, 2, 4, 9])
def test_one_process_blocks_equal_the_per_rank_blocks(kind, chunk_size):
    """One process computes each chunk's similarity block once for both anchor directions (s_gf = s_fg^T)
    and keeps a one-chunk batch's terms for the gradients; ranks (local rows against the gathered batch)
    compute a block per direction. Same log Phi and feature gradients in float64, kept blocks or not."""
    batch, dim, ranks = 9, 16, (slice(0, 4), slice(4, 9))
    f, g = _features(batch, dim, seed=5)
    gen = torch.Generator().manual_seed(6)
    log_wx, log_wz = (torch.randn(batch, generator=gen, dtype=torch.float64) for _ in range(2))
    spec = SurrogateSpec(kind=kind, margin=0.1, tau=0.05, eps=1e-8, chunk_size=chunk_size)

    whole = GlobalContrastiveLoss(spec).batch_estimates(f, g)
    kept_grads = feature_gradients(f, g, f, g, log_wx, log_wz, offset=0, spec=spec, kept=whole.kept)
    recomputed = feature_gradients(f, g, f, g, log_wx, log_wz, offset=0, spec=spec, kept=whole.kept)  # taken once
    per_rank = []
    for rows in ranks:
        loss = GlobalContrastiveLoss(spec, gather=_gather_from(f, g, rows=rows), world_size=len(ranks))
        part = loss.batch_estimates(f[rows], g[rows], offset=rows.start)
        grads = feature_gradients(f[rows], g[rows], f, g, log_wx, log_wz, offset=rows.start, spec=spec,
                                  kept=part.kept)
        per_rank.append((part.log_phi_x, part.log_phi_z, *grads))
    rank_results = [torch.cat(parts) for parts in zip(*per_rank)]
    for ours in ((whole.log_phi_x, whole.log_phi_z, *kept_grads), (whole.log_phi_x, whole.log_phi_z, *recomputed)):
        for a, b in zip(ours, rank_results):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * b.abs().max().item())


def test_update_log_estimate_matches_linear_moving_average():
    gen = torch.Generator().manual_seed(3)
    u_prev = torch.rand(7, generator=gen, dtype=torch.float64) + 0.1
    phi = torch.rand(7, generator=gen, dtype=torch.float64) + 0.1
    seen = torch.tensor([True, True, False, True, False, True, True])
    for gamma in (0.9, 0.3, 1.0):
        out = update_log_estimate(u_prev.log(), seen, phi.log(), gamma)
        expected = torch.where(seen, (1 - gamma) * u_prev + gamma * phi, phi)
        torch.testing.assert_close(out.double(), expected.log(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        update_log_estimate(u_prev.log(), seen, phi.log(), 0.0)


def test_gcl_gradient_equals_libauc_up_to_constant():
    """LibAUC GCLoss(mode='bimodal') gradient = (B-1)/2 x ours.

    LibAUC divides its u by B-1 (ours by B: cancels in Phi/u), averages the two anchor losses
    (factor 1/2) and uses p = exp(d/tau) / ((1/(B-1)) sum exp) without the 1/B of Phi, which
    multiplies its per-anchor weights by B-1 relative to tau * grad Phi / (B u).
    """
    pytest.importorskip("sklearn")
    from libauc.losses import GCLoss

    batch, dim, tau = 8, 16, 0.1
    libauc_loss = GCLoss(mode="bimodal", N=64, tau=tau, gamma=0.9)
    spec = SurrogateSpec(kind="gcl", tau=tau, eps=1e-30)
    index = torch.arange(10, 10 + batch)
    log_u_x = torch.zeros(batch)
    log_u_z = torch.zeros(batch)
    seen = torch.zeros(batch, dtype=torch.bool)
    for step, gamma in enumerate((1.0, 0.9)):
        if step == 1:
            libauc_loss.adjust_gamma(1)  # constant schedule: gamma_min from epoch 1
        f, g = _features(batch, dim, seed=10 + step, dtype=torch.float32)
        fa, ga = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
        libauc_loss(fa, ga, index)[0].backward()
        fo, go = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
        out = GlobalContrastiveLoss(spec)(
            fo, go, log_u_x=log_u_x, log_u_z=log_u_z, seen=seen, gamma=gamma, output_dict=True
        )
        out["loss"].backward()
        factor = (batch - 1) / 2
        torch.testing.assert_close(fa.grad, factor * fo.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ga.grad, factor * go.grad, rtol=1e-4, atol=1e-6)
        log_u_x, log_u_z = out["log_u_x"], out["log_u_z"]
        seen = torch.ones(batch, dtype=torch.bool)


def test_mbcl_equals_open_clip_clip_loss():
    from open_clip.loss import ClipLoss

    f, g = _features(8, 16, seed=4, dtype=torch.float32)
    fa, ga = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
    ref = ClipLoss()(fa, ga, torch.tensor(1 / 0.07))
    ref.backward()
    fo, go = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
    ours = MiniBatchContrastiveLoss(tau=0.07)(fo, go)
    ours.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(fo.grad, fa.grad)
    torch.testing.assert_close(go.grad, ga.grad)
    # And the formula itself (paper eq. 1).
    s = f @ g.T / 0.07
    labels = torch.arange(8)
    naive = (F.cross_entropy(s, labels) + F.cross_entropy(s.T, labels)) / 2
    torch.testing.assert_close(ours, naive)


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="margin"):
        SurrogateSpec(margin=-0.1)
    with pytest.raises(ValueError, match="surrogate kind"):
        SurrogateSpec(kind="infonce")
    with pytest.raises(ValueError, match="tau"):
        SurrogateSpec(tau=0.0)
