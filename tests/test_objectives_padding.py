"""A padded global batch (an epoch's tail) equals the unpadded batch of its real samples, for every objective.

Ranks are simulated by threads sharing gather / reduce_sum (the objectives' injected collectives), so one
process checks 1, 2 and 3 ranks: the loss value, the parameter gradients (averaged over ranks as backends do),
the feature gradients (zero on padding slots) and the u rows (float64; padding slots' rows untouched).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from engine.objectives import build_objective
from engine.objectives.normaliser import update_log_estimate
from engine.objectives.padding import BatchMask
from engine.objectives.terms import (
    ModelAccess,
    ObjectiveTerms,
    StepOutputs,
    TermContext,
    build_terms,
    total_loss,
)

IN_DIM, DIM, LOCAL = 6, 5, 4
NUM_ROWS = 64
PAD_ROW = 40  # padding slots carry rows PAD_ROW.. (samples of the epoch that are not in this batch)


class Float64Table:
    """The u table's rule (SogCLR moving average, first visit takes Phi) over float64 rows, staged until commit."""

    placement = "sharded"

    def __init__(self, log_u: torch.Tensor, seen: torch.Tensor, gamma: float = 0.6):
        self.log_u, self.seen, self.gamma = log_u.clone(), seen.clone(), gamma
        self.staged = []

    def estimate(self, rows, log_phi_x, log_phi_z, *, image_features, text_features, surrogate, gather):
        log_u_x = update_log_estimate(self.log_u[rows, 0], self.seen[rows], log_phi_x, self.gamma)
        log_u_z = update_log_estimate(self.log_u[rows, 1], self.seen[rows], log_phi_z, self.gamma)
        self.staged.append((rows, log_u_x, log_u_z))
        return log_u_x, log_u_z

    def commit(self):
        for rows, log_u_x, log_u_z in self.staged:
            self.log_u[rows, 0], self.log_u[rows, 1] = log_u_x.double(), log_u_z.double()
            self.seen[rows] = True
        self.staged = []

    def discard(self):
        self.staged = []

    def metrics(self):
        return {}


class Collectives:
    """gather / reduce_sum among `world` threads (each rank's call waits for every rank's)."""

    def __init__(self, world: int):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def _exchange(self, rank, x, combine):
        self.slots[rank] = x.detach().clone()
        self.barrier.wait()
        out = combine(list(self.slots))
        self.barrier.wait()
        return out

    def gather(self, rank):
        return lambda x: self._exchange(rank, x, lambda parts: torch.cat(parts))

    def reduce_sum(self, rank):
        return lambda x: self._exchange(rank, x, lambda parts: sum(parts[1:], parts[0]))


def run_threads(world, fn):
    results, errors = [None] * world, []

    def target(rank):
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)
            collectives.barrier.abort()

    collectives = fn.collectives
    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def problem(valid: list[list[bool]], seed: int = 0):
    """Encoders, per-rank inputs and rows (padding slots: other inputs, rows PAD_ROW..), the table's start."""
    torch.manual_seed(seed)
    enc_img = torch.nn.Linear(IN_DIM, DIM, dtype=torch.float64)
    enc_txt = torch.nn.Linear(IN_DIM, DIM, dtype=torch.float64)
    bias = torch.nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
    ranks, next_real, next_pad = [], 0, PAD_ROW
    for mask in valid:
        x = torch.randn(LOCAL, IN_DIM, dtype=torch.float64)
        z = x + 0.5 * torch.randn(LOCAL, IN_DIM, dtype=torch.float64)
        rows = []
        for ok in mask:
            rows.append(next_real if ok else next_pad)
            next_real, next_pad = next_real + ok, next_pad + (not ok)
        ranks.append((x, z, torch.tensor(rows), torch.tensor(mask)))
    log_u = torch.randn(NUM_ROWS, 2, dtype=torch.float64)
    seen = torch.arange(NUM_ROWS) % 3 != 0
    return enc_img, enc_txt, bias, ranks, log_u, seen


def step(kind, enc_img, enc_txt, bias, x, z, rows, *, table, rank, world, local, gather, reduce_sum, mask):
    """One rank's objective and backward; (value, param grads, feature grads)."""
    objective = build_objective(kind, tau=0.07, margin=0.2, eps=1e-10, chunk_size=0, normaliser=table, rank=rank,
                                world_size=world, local_batch=local, gather=gather, reduce_sum=reduce_sum)
    f, g = F.normalize(enc_img(x), dim=1), F.normalize(enc_txt(z), dim=1)
    f.retain_grad()
    g.retain_grad()
    out = objective(f, g, rows=rows, logit_bias=bias if kind == "siglip" else None, mask=mask)
    term = out["sigmoid_loss" if kind == "siglip" else "contrastive_loss"]
    term.backward()
    objective.after_step()
    params = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
              for p in [*enc_img.parameters(), *enc_txt.parameters(), bias]]
    return float(term.detach()), params, f.grad, g.grad


def reference(kind, valid):
    """One process, the real samples only (in rank order), no mask."""
    enc_img, enc_txt, bias, ranks, log_u, seen = problem(valid)
    keep = [mask for *_, mask in ranks]
    x = torch.cat([r[0][m] for r, m in zip(ranks, keep)])
    z = torch.cat([r[1][m] for r, m in zip(ranks, keep)])
    rows = torch.cat([r[2][m] for r, m in zip(ranks, keep)])
    table = Float64Table(log_u, seen)
    value, params, grad_f, grad_g = step(kind, enc_img, enc_txt, bias, x, z, rows, table=table, rank=0, world=1,
                                         local=len(rows), gather=lambda t: t.detach(), reduce_sum=lambda t: t,
                                         mask=None)
    return value, params, grad_f, grad_g, table


def padded(kind, valid):
    """The padded batch on len(valid) thread ranks (one table, each rank writing its own rows)."""
    world = len(valid)
    enc_img, enc_txt, bias, ranks, log_u, seen = problem(valid)
    table = Float64Table(log_u, seen)
    collectives = Collectives(world)

    def rank_step(rank):
        x, z, rows, mask = ranks[rank]
        gather = collectives.gather(rank)
        batch_mask = BatchMask.of(mask, num_local=LOCAL, rank=rank, gather=gather)
        models = copy.deepcopy((enc_img, enc_txt, bias))
        # Each rank stages its own rows; they are written after every rank's step (as the real table does).
        own = Float64Table(table.log_u, table.seen)
        result = step(kind, *models, x, z, rows, table=own, rank=rank, world=world, local=LOCAL, gather=gather,
                      reduce_sum=collectives.reduce_sum(rank), mask=batch_mask)
        return (*result, own)

    rank_step.collectives = collectives
    results = run_threads(world, rank_step)
    for *_, own in results:  # rows of different ranks are disjoint
        changed = (own.log_u != log_u).any(dim=1) | (own.seen != seen)
        table.log_u[changed], table.seen[changed] = own.log_u[changed], own.seen[changed]
    return results, table, log_u, seen


MASKS = {
    "1 rank": [[True, True, True, False]],
    "2 ranks": [[True, True, True, True], [True, False, False, False]],
    "3 ranks, one all padding": [[True, True, True, True], [True, True, False, False], [False] * 4],
}


@pytest.mark.parametrize("kind", ["gcl", "hgcl", "mbcl", "siglip"])
@pytest.mark.parametrize("layout", list(MASKS))
def test_padded_batch_equals_the_batch_of_its_real_samples(kind, layout):
    valid = MASKS[layout]
    world = len(valid)
    ref_value, ref_params, ref_f, ref_g, ref_table = reference(kind, valid)
    results, table, log_u, seen = padded(kind, valid)
    # MBCL and SigLIP run in float32 (open_clip's losses); GCL / HGCL in the features' float64.
    tol = {"rtol": 1e-9, "atol": 1e-12} if kind in ("gcl", "hgcl") else {"rtol": 1e-5, "atol": 1e-6}
    for value, *_ in results:
        assert value == pytest.approx(ref_value, rel=1e-9 if kind in ("gcl", "hgcl") else 1e-6)
    # Parameter gradients, averaged over ranks (as backends do), are the real batch's.
    for i, ref in enumerate(ref_params):
        averaged = sum(r[1][i] for r in results) / world
        torch.testing.assert_close(averaged, ref, **tol)
    # Feature gradients: the real slots carry world x the real batch's; padding slots none.
    start = 0
    for (_, _, grad_f, grad_g, _), mask in zip(results, valid):
        mask = torch.tensor(mask)
        n = int(mask.sum())
        torch.testing.assert_close(grad_f[mask] / world, ref_f[start:start + n], **tol)
        torch.testing.assert_close(grad_g[mask] / world, ref_g[start:start + n], **tol)
        assert not grad_f[~mask].any() and not grad_g[~mask].any()
        start += n
    # u rows: the real samples' are the real batch's (float64); the padding slots' rows are untouched.
    torch.testing.assert_close(table.log_u, ref_table.log_u, rtol=1e-12, atol=1e-12)
    assert torch.equal(table.seen, ref_table.seen)
    assert torch.equal(table.log_u[PAD_ROW:], log_u[PAD_ROW:]) and torch.equal(table.seen[PAD_ROW:], seen[PAD_ROW:])


def test_the_terms_report_real_samples_and_call_no_term_for_a_batch_of_padding_only():
    calls = []

    class Recorder:
        name = "recorder"

        def __call__(self, batch, outputs):
            calls.append(outputs.mask)
            return {"recorder_loss": outputs.image_features.sum()}

    class Tail:
        def __init__(self, num_padding):
            self.valid = torch.arange(4) < 4 - num_padding

    terms = ObjectiveTerms({"recorder": (Recorder(), 1.0)})
    features = torch.randn(4, 3)
    out = terms(Tail(3), StepOutputs(features, features, None, None))
    assert out["samples"] == 1 and calls[0].num_real == 1 and calls[0].local.tolist() == [True, False, False, False]
    out = terms(Tail(4), StepOutputs(features, features, None, None))
    assert out == {"samples": 0} and len(calls) == 1


def job_terms(ctx_args: dict):
    """`contrastive` (HGCL) + `wma_teacher` for one (thread) rank; the teacher's forward returns the batch's
    `images` / `texts` as its features."""
    cfg = SimpleNamespace(
        loss=SimpleNamespace(margin=0.2, eps=1e-10, chunk_size=0), osr_surrogate="hgcl", surrogate="hgcl",
        teacher=SimpleNamespace(kind="wma", beta=2.0, ema_momentum=0.99, every_steps=1))
    model = ModelAccess(parameter_shards=lambda: {"w": torch.zeros(2)}, parameter_spans=lambda: {"w": (0, 2, (2,))},
                        shards_replaced=lambda values: contextlib.nullcontext(),
                        forward_no_grad=lambda images, texts: StepOutputs(images, texts, None, None))
    ctx = TermContext(cfg=cfg, tau=0.07, log_event=lambda record: None, model=model, **ctx_args)
    return build_terms({"contrastive": 1.0, "wma_teacher": 0.5}, ctx)


def term_step(stage, terms, f, g, tf, tg, rows, valid):
    terms.begin_stage(stage, num_steps=4)
    f, g = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
    batch = SimpleNamespace(rows=rows, images=tf, texts=tg, **({} if valid is None else {"valid": valid}))
    out = terms(batch, StepOutputs(f, g, None, None))
    total_loss(out).backward()
    values = {key: float(value.detach() if torch.is_tensor(value) else value) for key, value in out.items()}
    return values, f.grad, g.grad


@pytest.mark.parametrize("stage", ["osr", "finetune"])
def test_loss_terms_and_osr_diagnostics_ignore_padding_slots(stage):
    valid = MASKS["3 ranks, one all padding"]
    world = len(valid)
    torch.manual_seed(3)
    f, g, tf, tg = (F.normalize(torch.randn(world * LOCAL, DIM, dtype=torch.float64), dim=1) for _ in range(4))
    rows = torch.arange(world * LOCAL)
    keep = torch.tensor(valid).reshape(-1)
    _, _, _, _, log_u, seen = problem(valid)
    one = job_terms({"normaliser": Float64Table(log_u, seen), "rank": 0, "world_size": 1, "local_batch": int(keep.sum()),
                     "gather": lambda t: t.detach(), "reduce_sum": lambda t: t})
    ref, ref_f, ref_g = term_step(stage, one, f[keep], g[keep], tf[keep], tg[keep], rows[keep], None)
    collectives = Collectives(world)

    def rank_step(rank):
        part = slice(rank * LOCAL, (rank + 1) * LOCAL)
        terms = job_terms({"normaliser": Float64Table(log_u, seen), "rank": rank, "world_size": world,
                           "local_batch": LOCAL, "gather": collectives.gather(rank),
                           "reduce_sum": collectives.reduce_sum(rank)})
        return term_step(stage, terms, f[part], g[part], tf[part], tg[part], rows[part], torch.tensor(valid[rank]))

    rank_step.collectives = collectives
    results = run_threads(world, rank_step)
    if stage == "osr":
        assert "d_q50" in ref and "inside_hinge" in ref  # where d sits against the hinge: real pairs only
    else:
        assert ref["wma_teacher_loss"] > 0
    for values, _, _ in results:
        assert values.keys() == ref.keys() and values["samples"] == int(keep.sum())
        for key, value in ref.items():
            assert values[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    grad_f = torch.cat([gf for _, gf, _ in results]) / world
    grad_g = torch.cat([gg for _, _, gg in results]) / world
    torch.testing.assert_close(grad_f[keep], ref_f, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_g[keep], ref_g, rtol=1e-9, atol=1e-12)
    assert not grad_f[~keep].any() and not grad_g[~keep].any()


def test_node_replicas_commit_ranks_with_different_numbers_of_real_rows(tmp_path, monkeypatch):
    """Several nodes: each step's rows of every rank are gathered (equal shapes) and written to every replica; a
    padded batch's ranks stage different numbers of real rows (here 1, the other rank 3)."""
    import engine.objectives.normaliser as normaliser_module
    from engine.distributed import DistContext
    from engine.objectives.normaliser import TableNormaliser

    other = torch.tensor([[5.0, 0.5, 0.25], [6.0, 0.75, 1.5], [7.0, -1.0, 2.0]], dtype=torch.float64)

    def two_ranks(x):  # this rank and a rank that staged `other`; refuses unequal shapes as all_gather does
        if x.dtype == torch.int64:
            return torch.cat([x, torch.tensor([len(other)])])
        assert x.shape == other.shape, "all_gather needs equal shapes on every rank"
        return torch.cat([x, other])

    monkeypatch.setattr(normaliser_module, "gather_no_grad", two_ranks)
    table = TableNormaliser(tmp_path / "u", num_rows=10, dataset_fingerprint="f", ctx=DistContext(), gamma_min=0.5,
                            gamma_decay_epochs=1, fresh=True, replicated=True, node_leader=True)
    try:
        table.stage(torch.tensor([2]), torch.tensor([0.125]), torch.tensor([-0.5]))
        table.commit()
        log_u_x, log_u_z, seen = table.table.read(torch.arange(10))
        assert seen.tolist() == [i in (2, 5, 6, 7) for i in range(10)]
        assert log_u_x[[2, 5, 6, 7]].tolist() == [0.125, 0.5, 0.75, -1.0]
        assert log_u_z[[2, 5, 6, 7]].tolist() == [-0.5, 0.25, 1.5, 2.0]
    finally:
        table.close()


def test_auto_margin_reads_the_real_pairs_of_padded_probe_batches():
    from engine.objectives.contrastive_term import ContrastiveTerm

    torch.manual_seed(5)
    f, g = (F.normalize(torch.randn(8, DIM, dtype=torch.float64), dim=1) for _ in range(2))
    f[5:], g[5:] = f[:3], g[:3]  # 5 real samples, 3 padding slots holding copies of the first ones
    valid = torch.arange(8) < 5
    cfg = SimpleNamespace(loss=SimpleNamespace(margin="auto", eps=1e-10, chunk_size=0, margin_probe_batches=1,
                                               margin_inside_share=0.75), osr_surrogate="hgcl", surrogate="hgcl")

    def margin(features, batch):
        ctx = TermContext(cfg=cfg, tau=0.07, normaliser=None, rank=0, world_size=1, local_batch=len(features[0]),
                          gather=lambda t: t.detach(), reduce_sum=lambda t: t, log_event=lambda record: None)
        return ContrastiveTerm(ctx).choose_margin(lambda n: iter([(batch, StepOutputs(*features, None, None))]))

    padded = margin((f, g), SimpleNamespace(valid=valid))
    assert padded == margin((f[:5], g[:5]), SimpleNamespace()) and padded > 0


@pytest.mark.parametrize("kind", ["gcl", "hgcl"])
def test_neural_normaliser_on_a_padded_batch_learns_from_the_real_samples_only(kind):
    """The learned normaliser (replicated, it all-gathers the global batch): on 3 thread ranks with unequal
    numbers of real samples (one rank all padding) every rank's network, loss and gradients equal those of one
    process on the real samples (an equal-shape all-gather of the padded rows would train it on padding)."""
    from engine.objectives.neural_normaliser import NeuralNormaliser

    valid = MASKS["3 ranks, one all padding"]
    world = len(valid)

    def network():
        return NeuralNormaliser(num_prototypes=8, restart_every=10, updates=2, lr=0.5)

    enc_img, enc_txt, bias, ranks, _, _ = problem(valid)
    x = torch.cat([r[0][torch.tensor(m)] for r, m in zip(ranks, valid)])
    z = torch.cat([r[1][torch.tensor(m)] for r, m in zip(ranks, valid)])
    rows = torch.cat([r[2][torch.tensor(m)] for r, m in zip(ranks, valid)])
    ref_net = network()
    ref_value, ref_params, *_ = step(kind, enc_img, enc_txt, bias, x, z, rows, table=ref_net, rank=0, world=1,
                                     local=len(rows), gather=lambda t: t.detach(), reduce_sum=lambda t: t, mask=None)
    collectives = Collectives(world)

    def rank_step(rank):
        xr, zr, rows_r, mask = ranks[rank]
        gather = collectives.gather(rank)
        batch_mask = BatchMask.of(mask, num_local=LOCAL, rank=rank, gather=gather)
        net = network()
        result = step(kind, *copy.deepcopy((enc_img, enc_txt, bias)), xr, zr, rows_r, table=net, rank=rank,
                      world=world, local=LOCAL, gather=gather, reduce_sum=collectives.reduce_sum(rank),
                      mask=batch_mask)
        return (*result, net)

    rank_step.collectives = collectives
    results = run_threads(world, rank_step)
    for value, *_, net in results:
        assert value == pytest.approx(ref_value, rel=1e-9)
        assert net.state.keys() == ref_net.state.keys() and net.steps == ref_net.steps == 1
        for key, tensor in ref_net.state.items():
            torch.testing.assert_close(net.state[key], tensor, rtol=1e-10, atol=1e-12)
    for i, ref in enumerate(ref_params):
        torch.testing.assert_close(sum(r[1][i] for r in results) / world, ref, rtol=1e-9, atol=1e-12)
