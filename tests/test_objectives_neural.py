"""NeuCLIP's normaliser network (`loss.normaliser: neural`): eqs. 10-12 against a naive float64 implementation,
Algorithm 1's schedule (restarts, T_u updates, skipped steps), OSR warming it at frozen weights, and exact resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine.checkpoint import is_complete
from engine.config import LossConfig, load_config
from engine.objectives import GlobalContrastiveObjective
from engine.objectives.contrastive import SurrogateSpec
from engine.objectives.neural_normaliser import STATE_FILE, NeuralNormaliser, restart_indices
from engine.objectives.normaliser import build_normaliser
from engine.trainer import Trainer
from tests.helpers.jobs import crash_after, job

B, D, M = 6, 5, 7


def naive_phi(f, g, spec):
    """Phi1_i, Phi2_i = 1/B sum_{j != i} exp(l(s_ij - s_ii) / tau), exp(l(s_ji - s_ii) / tau), one pair at a time."""
    n = f.shape[0]
    phi1, phi2 = [], []
    for i in range(n):
        a = b = 0.0
        for j in range(n):
            if j != i:
                a = a + torch.exp(naive_l(f[i] @ g[j] - f[i] @ g[i], spec) / spec.tau)
                b = b + torch.exp(naive_l(f[j] @ g[i] - f[i] @ g[i], spec) / spec.tau)
        phi1.append(a / n)
        phi2.append(b / n)
    return torch.stack(phi1), torch.stack(phi2)


def naive_l(d, spec):
    return d if spec.kind == "gcl" else torch.clamp(d + spec.margin, min=0.0) ** 2


def naive_alpha(e, pos, w, spec):
    """Eq. (10)/(11): alpha_i = log(eps + 1/m sum_j exp(l(cos(e_i, W_j) - s_ii) / tau)), plain exp in float64."""
    out = []
    for i in range(e.shape[0]):
        total = 0.0
        for j in range(w.shape[0]):
            cos = (e[i] @ w[j]) / (e[i].norm() * w[j].norm())
            total = total + torch.exp(naive_l(cos - pos[i], spec) / spec.tau)
        out.append(torch.log(spec.eps + total / w.shape[0]))
    return torch.stack(out)


def unit(*shape, seed):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                                                     dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("kind", ["gcl", "hgcl"])
def test_network_estimate_update_and_clip_gradient_equal_naive_eqs_10_to_12(kind):
    spec = SurrogateSpec(kind=kind, margin=0.3, tau=0.1, eps=1e-3)
    f, g = unit(B, D, seed=1).requires_grad_(True), unit(B, D, seed=2).requires_grad_(True)
    w1, w2 = torch.randn(M, D, dtype=torch.float64), torch.randn(M, D, dtype=torch.float64)
    sums = torch.rand(M, D, dtype=torch.float64), torch.rand(M, D, dtype=torch.float64)  # AdaGrad mid-way
    lr = 0.3
    norm = NeuralNormaliser(num_prototypes=M, restart_every=100, updates=1, lr=lr)
    norm.state = {"w1": w1, "w2": w2, "sum1": sums[0], "sum2": sums[1], "counts": torch.ones(M, dtype=torch.float64)}
    norm.steps = 1  # no restart at step 1
    objective = GlobalContrastiveObjective(spec, norm, offset=0, gather=lambda x: x, reduce_sum=lambda x: x,
                                           world_size=1)
    out = objective(f, g, rows=torch.arange(B))

    # Eq. (12)'s part in (W1, W2) on this batch, its gradient by autograd, one AdaGrad step.
    fd, gd = f.detach(), g.detach()
    pos = (fd * gd).sum(1)
    phi1, phi2 = naive_phi(fd, gd, spec)
    v1, v2 = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
    a1, a2 = naive_alpha(fd, pos, v1, spec), naive_alpha(gd, pos, v2, spec)
    eq12 = spec.tau * ((torch.exp(-a1) * (spec.eps + phi1) + a1).mean() + (torch.exp(-a2) * (spec.eps + phi2) + a2).mean())
    grad1, grad2 = torch.autograd.grad(eq12, (v1, v2))
    new1 = w1 - lr * grad1 / ((sums[0] + grad1**2).sqrt() + 1e-10)
    new2 = w2 - lr * grad2 / ((sums[1] + grad2**2).sqrt() + 1e-10)
    norm.commit()
    torch.testing.assert_close(norm.state["w1"], new1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norm.state["w2"], new2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norm.state["sum1"], sums[0] + grad1**2, rtol=1e-10, atol=1e-14)

    # The CLIP step divides by the updated network's eps + u = exp(alpha): value tau/B sum(alpha), gradient G.
    fg, gg = f.detach().clone().requires_grad_(True), g.detach().clone().requires_grad_(True)
    alpha1, alpha2 = naive_alpha(fd, pos, new1, spec), naive_alpha(gd, pos, new2, spec)
    p1, p2 = naive_phi(fg, gg, spec)
    surrogate = spec.tau / B * ((p1 / alpha1.exp()).sum() + (p2 / alpha2.exp()).sum())
    naive_grads = torch.autograd.grad(surrogate, (fg, gg))
    torch.testing.assert_close(out["contrastive_loss"].detach(), spec.tau / B * (alpha1 + alpha2).sum(), rtol=1e-10,
                               atol=1e-12)
    grads = torch.autograd.grad(out["contrastive_loss"], (f, g))
    for got, want in zip(grads, naive_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_restarts_every_t_r_steps_t_u_updates_each_and_skipped_steps_change_nothing(monkeypatch):
    spec = SurrogateSpec(kind="hgcl", margin=0.1, tau=0.05)
    norm = NeuralNormaliser(num_prototypes=10, restart_every=3, updates=2, lr=0.5)  # 10 > B: each pair used twice
    first_inputs, calls = [], {"n": 0}
    update = norm._update

    def counting_update(w, grad_sum, *args, **kwargs):
        calls["n"] += 1
        first_inputs.append({"w1": w[0].clone(), "w2": w[1].clone(), "sum1": grad_sum[0].clone(),
                             "sum2": grad_sum[1].clone()})
        return update(w, grad_sum, *args, **kwargs)

    monkeypatch.setattr(norm, "_update", counting_update)
    restarted = []
    for step in range(8):
        f, g = unit(B, D, seed=10 + step).float(), unit(B, D, seed=50 + step).float()
        before = None if norm.state is None else {k: v.clone() for k, v in norm.state.items()}
        first_inputs.clear()
        calls["n"] = 0
        norm.estimate(torch.arange(B), torch.zeros(B), torch.zeros(B), image_features=f, text_features=g,
                      surrogate=spec)
        assert calls["n"] == 2  # T_u updates on this batch
        start = first_inputs[0]
        index, _ = restart_indices(B, 10, step=norm.steps)
        is_restart = torch.equal(start["w1"], g[index]) and torch.equal(start["w2"], f[index])
        if is_restart:
            assert not start["sum1"].any() and not start["sum2"].any()  # AdaGrad restarts with the weights
        else:
            assert all(torch.equal(start[k], before[k]) for k in start)  # continues from the last step
        restarted.append(is_restart)
        if step == 4:  # a skipped step: nothing kept, the step number does not advance
            norm.discard()
            assert all(torch.equal(norm.state[k], before[k]) for k in before)
        else:
            norm.commit()
    # steps taken 0..6 (the 5th batch was skipped): restarts at taken steps 0, 3, 6
    assert restarted == [True, False, False, True, False, False, False, True]
    assert norm.steps == 7 and norm.summary() == {"neural_steps": 7, "neural_restarts": 3}
    index, counts = restart_indices(4, 10, step=0)  # a batch of 4 fills 10 columns: every pair 2 or 3 times
    assert sorted(index.tolist()) == [0, 1, 2, 3] and counts.tolist() == [3, 3, 2, 2]
    index, counts = restart_indices(12, 10, step=0)
    assert len(set(index.tolist())) == 10 and counts.tolist() == [1] * 10


@pytest.mark.parametrize("kind", ["gcl", "hgcl"])
def test_a_batch_smaller_than_m_gives_the_m_column_network_exactly(kind):
    """B < m: each distinct prototype held once with its multiplicity equals the network of m explicit columns."""
    spec = SurrogateSpec(kind=kind, margin=0.2, tau=0.05, eps=1e-6)
    f, g = unit(4, D, seed=7), unit(4, D, seed=8)
    phi = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    merged = NeuralNormaliser(num_prototypes=10, restart_every=100, updates=3, lr=0.5)
    got = merged.estimate(torch.arange(4), *phi, image_features=f, text_features=g, surrogate=spec)
    merged.commit()
    index, counts = restart_indices(4, 10, step=0)
    rows = index.repeat_interleave(counts)  # the 10 explicit columns
    explicit = NeuralNormaliser(num_prototypes=10, restart_every=100, updates=3, lr=0.5)
    explicit.state = {"w1": g[rows], "w2": f[rows], "sum1": torch.zeros(10, D, dtype=torch.float64),
                      "sum2": torch.zeros(10, D, dtype=torch.float64), "counts": torch.ones(10, dtype=torch.float64)}
    explicit.steps = 1  # no restart: it starts from the explicit columns
    want = explicit.estimate(torch.arange(4), *phi, image_features=f, text_features=g, surrogate=spec)
    explicit.commit()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    expand = torch.arange(4).repeat_interleave(counts)  # the merged row of each explicit column
    for key in ("w1", "w2", "sum1", "sum2"):
        torch.testing.assert_close(merged.state[key][expand], explicit.state[key], rtol=1e-12, atol=1e-15)


def test_a_prediction_far_below_the_batch_estimate_moves_up():
    """exp(log(eps + Phi) - alpha) is capped in value and gradient alike: past the cap the step still raises alpha."""
    spec = SurrogateSpec(kind="hgcl", margin=0.1, tau=0.05)
    norm = NeuralNormaliser(num_prototypes=B, restart_every=100, updates=1, lr=1e-3)
    f, g = unit(B, D, seed=5), unit(B, D, seed=6)
    far = torch.full((B,), 200.0, dtype=torch.float64)  # log Phi e^200 above any prediction
    before = norm.estimate(torch.arange(B), far, far, image_features=f, text_features=g, surrogate=spec)
    norm.commit()
    after = norm.estimate(torch.arange(B), far, far, image_features=f, text_features=g, surrogate=spec)
    assert after[0].mean() > before[0].mean() and after[1].mean() > before[1].mean()


def test_estimates_carry_no_gradient_to_the_encoders_and_reset_forgets_the_network():
    spec = SurrogateSpec(kind="gcl", tau=0.05)
    norm = NeuralNormaliser(num_prototypes=4, restart_every=100, updates=3, lr=1.0)
    f, g = unit(B, D, seed=3).float().requires_grad_(True), unit(B, D, seed=4).float().requires_grad_(True)
    log_u_x, log_u_z = norm.estimate(torch.arange(B), torch.zeros(B), torch.zeros(B), image_features=f,
                                     text_features=g, surrogate=spec)
    assert not log_u_x.requires_grad and not log_u_z.requires_grad and f.grad is None
    norm.commit()
    assert norm.state is not None and norm.steps == 1
    norm.reset()
    assert norm.state is None and norm.steps == 0


def test_built_from_the_loss_section_and_bad_settings_are_named():
    cfg = LossConfig(normaliser="neural", neural_prototypes=32, neural_restart_every=7, neural_updates=3,
                     neural_lr=0.25)
    norm = build_normaliser(cfg, out_dir="unused", num_rows=10, dataset_fingerprint="x", ctx=None, fresh=True)
    assert (norm.num_prototypes, norm.restart_every, norm.updates, norm.lr, norm.placement) == (32, 7, 3, 0.25,
                                                                                                 "replicated")
    errors = LossConfig(neural_prototypes=0, neural_updates=0, neural_lr=0.0).errors()
    assert any("loss.neural_prototypes" in e for e in errors) and any("loss.neural_updates" in e for e in errors)
    assert any("loss.neural_lr" in e for e in errors)


# ----- in the trainer: OSR warms the network at frozen w0, kill + resume is bitwise exact -----

NEURAL = {"normaliser": "neural", "neural_prototypes": 16, "neural_restart_every": 4, "neural_updates": 2}


def neural_job(shards, out, **run):
    return job(shards, out, loss=NEURAL, run={"epochs": 1, "save_every_steps": 2, "keep_last_n": 2, **run})


def end_state(trainer) -> dict:
    latest = max(p for p in (trainer.out_dir / "checkpoints").glob("step_*") if is_complete(p))
    return {"weights": load_file(trainer.out_dir / "final.safetensors"),
            "network": load_file(latest / "normaliser" / STATE_FILE),
            "optim": torch.load(latest / "backend" / "optim.pt", weights_only=True)["optimizer"]["state"],
            "steps": trainer.normaliser.state_dict()}


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """A straight run (6 OSR steps, 6 fine-tuning steps), with the weights' digest and the network before and after
    OSR."""
    trainer = Trainer(load_config(base=neural_job(shards, tmp_path_factory.mktemp("neural_straight"))))
    seen = {"w0": trainer.backend.weights_digest()}
    finetune = trainer.finetune

    def record_then_finetune():
        seen["after_osr"] = trainer.backend.weights_digest()
        seen["network_after_osr"] = {k: v.clone() for k, v in trainer.normaliser.state.items()}
        seen["steps_after_osr"] = trainer.normaliser.steps
        finetune()

    trainer.finetune = record_then_finetune
    trainer.tune()
    trainer.close()
    return {**seen, **end_state(trainer)}


def test_osr_trains_the_network_on_its_batches_and_leaves_the_clip_weights_identical(straight):
    assert straight["after_osr"] == straight["w0"]
    assert straight["steps_after_osr"] == 6  # one network step per OSR batch (restarts at 0 and 4)
    net = straight["network_after_osr"]
    assert net["sum1"].abs().sum() > 0 and net["sum2"].abs().sum() > 0  # AdaGrad steps were taken in OSR
    assert straight["steps"]["steps"] == 12 and straight["steps"]["restarts"] == 3


class Crash(RuntimeError):
    pass


def test_killed_run_resumes_bitwise_equal_to_the_straight_run(shards, tmp_path, straight):
    trainer = Trainer(load_config(base=neural_job(shards, tmp_path)))
    crash_after(trainer, 11, Crash("simulated failure"))  # in fine-tuning; resumes at step 10, between restarts
    with pytest.raises(Crash):
        trainer.tune()
    trainer.close()
    resumed = Trainer(load_config(base=neural_job(shards, tmp_path, resume="latest")))
    assert resumed.global_step == 10 and resumed.normaliser.steps == 10
    resumed.tune()
    resumed.close()
    state = end_state(resumed)
    for part in ("weights", "network"):
        assert state[part].keys() == straight[part].keys()
        for key in state[part]:
            assert torch.equal(state[part][key], straight[part][key]), (part, key)
    for pid, moments in state["optim"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments[name], straight["optim"][pid][name]), (pid, name)
    assert state["steps"] == straight["steps"]


# ----- 2 ranks: the same network as one process, replicas identical, stop + resume exact under ZeRO-2 and FSDP2 -----

@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_bitwise_under_zero2_and_fsdp2(shards, tmp_path):
    from tests.helpers.dist_cases_neural import objective_steps
    from tests.helpers.harness import run_ranks

    jobs = {}
    for backend, run in (("deepspeed", {"backend": "deepspeed", "zero_config": "zero2"}), ("fsdp", {"backend": "fsdp"})):
        runs = [neural_job(shards, tmp_path / f"{backend}_{name}", **run, **extra)
                for name, extra in (("straight", {}), ("stopped", {}))]
        jobs[backend] = (*runs, neural_job(shards, tmp_path / f"{backend}_stopped", **run, resume="latest"))
    ranks = run_ranks("tests.helpers.dist_cases_neural:neural_on_ranks", world_size=2, jobs=jobs, stop_at=10)

    # The network on fixed global batches: every rank holds the same bits, equal to one process's network.
    one = objective_steps()
    for rank in ranks:
        for key, value in one["network"].items():
            assert torch.equal(rank["objective"]["network"][key], ranks[0]["objective"]["network"][key]), key
            torch.testing.assert_close(rank["objective"]["network"][key], value, rtol=1e-9, atol=1e-12)
        assert rank["objective"]["summary"] == one["summary"] == {"neural_steps": 4, "neural_restarts": 2}
        torch.testing.assert_close(torch.stack(rank["objective"]["loss"]), torch.stack(one["loss"]), rtol=1e-9,
                                   atol=1e-12)
    for step, want in enumerate(one["grads"]):  # rows: image features, then text features
        local = [r["objective"]["grads"][step].chunk(2) for r in ranks]
        got = torch.cat([f for f, _ in local] + [g for _, g in local])
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    # Trainer jobs: stopped at step 10 (between restarts), resumed: the same network and weights, bit for bit.
    for backend in ("deepspeed", "fsdp"):
        straight, stopped = (ranks[0][backend][k] for k in ("straight", "stopped"))
        assert stopped["global_step"] == 10 and not stopped["finished"]
        for rank in ranks:
            resumed = rank[backend]["resumed"]
            assert resumed["finished"] and resumed["state"] == straight["state"]
            for key, value in straight["network"].items():
                assert torch.equal(resumed["network"][key], value), (backend, key)
                assert torch.equal(rank[backend]["straight"]["network"][key], value), (backend, key)  # replicas
        for key, value in straight["weights"].items():
            assert torch.equal(ranks[0][backend]["resumed"]["weights"][key], value), (backend, key)
