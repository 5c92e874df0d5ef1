"""Objectives and normalisers: the registry, named terms, and the table's stage / commit / discard."""

import pytest
import torch
import torch.nn.functional as F

from engine.distributed import DistContext
from engine.objectives import (
    GlobalContrastiveObjective,
    MiniBatchObjective,
    build_objective,
    total_loss,
)
from engine.objectives.contrastive import GlobalContrastiveLoss, MiniBatchContrastiveLoss, SurrogateSpec
from engine.objectives.normaliser import TableNormaliser
from engine.objectives.table import UTable
from engine.schedules import gamma_at_epoch

TAU, MARGIN, EPS = 0.05, 0.1, 1e-10
NUM_ROWS, BATCH, DIM = 32, 8, 16


def identity(x):
    return x


def features(*, seed, batch=BATCH, dim=DIM, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=1)
    g = F.normalize(f + 0.7 * torch.randn(batch, dim, generator=gen, dtype=dtype), dim=1)
    return f, g


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def make_normaliser(live_dir, *, fingerprint="data-a", gamma_min=0.5, decay_epochs=3, fresh=True):
    return TableNormaliser(live_dir, num_rows=NUM_ROWS, dataset_fingerprint=fingerprint, ctx=DistContext(),
                           gamma_min=gamma_min, gamma_decay_epochs=decay_epochs, fresh=fresh)


def fill_some_rows(normaliser, *, seed):
    """Give half of the rows an estimate (and a visit), so the batch mixes seen and unseen samples."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(NUM_ROWS, generator=gen)[: NUM_ROWS // 2]
    normaliser.table.write(rows, torch.randn(rows.numel(), generator=gen) + 3.0,
                           torch.randn(rows.numel(), generator=gen) + 3.0)
    return rows


def table_rows(normaliser, rows):
    log_u_x, log_u_z, seen = normaliser.table.read(rows)
    return log_u_x.clone(), log_u_z.clone(), seen.clone(), normaliser.table.visits(rows).clone()


def build(kind, normaliser=None, *, local_batch=BATCH, rank=0, world_size=1):
    return build_objective(kind, tau=TAU, margin=MARGIN, eps=EPS, chunk_size=3, normaliser=normaliser, rank=rank,
                           world_size=world_size, local_batch=local_batch, gather=identity, reduce_sum=identity)


# ----- registry and named terms -----

def test_registry_builds_each_kind_and_refuses_unknown(tmp_path):
    normaliser = make_normaliser(tmp_path / "live")
    assert isinstance(build("mbcl"), MiniBatchObjective)
    for kind in ("gcl", "hgcl"):
        objective = build(kind, normaliser, local_batch=5, rank=0)
        assert isinstance(objective, GlobalContrastiveObjective)
        assert objective.loss.spec == SurrogateSpec(kind=kind, margin=MARGIN, tau=TAU, eps=EPS, chunk_size=3)
        assert objective.normaliser is normaliser
    # Offset of a rank = its first index in the global batch.
    assert build("hgcl", normaliser, local_batch=5, rank=3, world_size=4).offset == 15
    with pytest.raises(ValueError) as info:
        build("infonce", normaliser)
    assert "'infonce'" in str(info.value) and "gcl, hgcl, mbcl" in str(info.value)


def test_total_loss_sums_only_terms():
    out = {"contrastive_loss": torch.tensor(1.5), "distill_loss": torch.tensor(0.25),
           "batch_loss_value": torch.tensor(100.0), "loss_scale": torch.tensor(7.0)}
    assert total_loss(out).item() == 1.75
    assert total_loss({"contrastive_loss": torch.tensor(2.0)}).item() == 2.0


@pytest.mark.parametrize("kind", ["mbcl", "gcl", "hgcl"])
def test_objectives_return_named_terms(tmp_path, kind):
    objective = build(kind, make_normaliser(tmp_path / "live"))
    f, g = leaves(*features(seed=1))
    out = objective(f, g, rows=torch.arange(BATCH))
    terms = sorted(k for k in out if k.endswith("_loss"))
    assert terms == ["contrastive_loss"]
    assert set(out) == {"contrastive_loss", "batch_loss_value"}
    assert out["contrastive_loss"].dim() == 0 and out["contrastive_loss"].requires_grad
    assert not out["batch_loss_value"].requires_grad  # diagnostics are detached
    assert torch.equal(total_loss(out), out["contrastive_loss"])
    objective.skip_step()


# ----- MBCL -----

def test_minibatch_objective_equals_minibatch_loss():
    f0, g0 = features(seed=2, dtype=torch.float32)
    f, g = leaves(f0, g0)
    out = MiniBatchObjective(tau=TAU, rank=0, world_size=1, reduce_sum=identity)(f, g, rows=torch.arange(BATCH))
    total_loss(out).backward()
    f_ref, g_ref = leaves(f0, g0)
    ref = MiniBatchContrastiveLoss(tau=TAU)(f_ref, g_ref)
    ref.backward()
    assert torch.equal(out["contrastive_loss"].detach(), ref.detach())
    assert torch.equal(f.grad, f_ref.grad) and torch.equal(g.grad, g_ref.grad)
    assert f.grad.abs().max() > 0
    torch.testing.assert_close(out["batch_loss_value"], ref.detach(), rtol=0, atol=0)
    # A batch whose pairs are swapped has a higher loss: the term depends on the features.
    assert MiniBatchContrastiveLoss(tau=TAU)(f0, g0.roll(1, 0)) > ref


# ----- GCL / HGCL over a real table -----

@pytest.mark.parametrize("kind", ["gcl", "hgcl"])
def test_global_objective_equals_loss_on_the_table_rows(tmp_path, kind):
    normaliser = make_normaliser(tmp_path / "live")
    filled = fill_some_rows(normaliser, seed=3)
    normaliser.end_epoch()  # gamma < 1, so the prior rows enter the update
    gamma = normaliser.gamma()
    assert gamma == gamma_at_epoch(1, gamma_min=0.5, decay_epochs=3) < 1.0
    rows = torch.randperm(NUM_ROWS, generator=torch.Generator().manual_seed(4))[:BATCH]
    assert 0 < torch.isin(rows, filled).sum() < BATCH  # seen and unseen samples
    log_u_x, log_u_z, seen, visits = table_rows(normaliser, rows)

    objective = build(kind, normaliser)
    f0, g0 = features(seed=5)
    f, g = leaves(f0, g0)
    out = objective(f, g, rows=rows)
    total_loss(out).backward()

    spec = SurrogateSpec(kind=kind, margin=MARGIN, tau=TAU, eps=EPS, chunk_size=3)
    f_ref, g_ref = leaves(f0, g0)
    ref = GlobalContrastiveLoss(spec)(f_ref, g_ref, log_u_x=log_u_x, log_u_z=log_u_z, seen=seen, gamma=gamma,
                                      output_dict=True)
    ref["loss"].backward()
    assert out["contrastive_loss"].dtype == torch.float64
    assert torch.equal(out["contrastive_loss"].detach(), ref["loss"].detach())
    assert torch.equal(out["batch_loss_value"], ref["batch_loss_value"])
    assert torch.equal(f.grad, f_ref.grad) and torch.equal(g.grad, g_ref.grad)
    assert f.grad.abs().max() > 0 and g.grad.abs().max() > 0

    # Rows from an empty table would give another value: the table was really read.
    empty = torch.zeros(BATCH)
    other = GlobalContrastiveLoss(spec)(f0, g0, log_u_x=empty, log_u_z=empty, seen=torch.zeros(BATCH, dtype=bool),
                                        gamma=gamma)
    assert not torch.allclose(other, ref["loss"].detach())

    # Not written before the step is taken...
    after_call = table_rows(normaliser, rows)
    for before_t, after_t in zip((log_u_x, log_u_z, seen, visits), after_call):
        assert torch.equal(before_t, after_t)
    # ...written once it is.
    objective.after_step()
    new_log_u_x, new_log_u_z, new_seen, new_visits = table_rows(normaliser, rows)
    assert torch.equal(new_visits, visits + 1)
    assert new_seen.all()
    assert torch.equal(new_log_u_x, ref["log_u_x"].float())
    assert torch.equal(new_log_u_z, ref["log_u_z"].float())
    assert not torch.equal(new_log_u_x, log_u_x)
    # Rows outside the batch are untouched.
    others = torch.tensor([r for r in range(NUM_ROWS) if r not in set(rows.tolist())])
    assert normaliser.table.visits(others).sum().item() == torch.isin(filled, others).sum().item()
    # A second after_step without a new call writes nothing more.
    objective.after_step()
    assert torch.equal(normaliser.table.visits(rows), visits + 1)


def test_skipped_step_leaves_the_table_unwritten(tmp_path):
    normaliser = make_normaliser(tmp_path / "live")
    fill_some_rows(normaliser, seed=6)
    objective = build("hgcl", normaliser)
    rows = torch.arange(BATCH)
    before = table_rows(normaliser, rows)
    f, g = leaves(*features(seed=7))
    objective(f, g, rows=rows)
    objective.skip_step()
    objective.after_step()  # nothing staged any more: still nothing written
    for before_t, after_t in zip(before, table_rows(normaliser, rows)):
        assert torch.equal(before_t, after_t)
    assert normaliser.num_seen() == NUM_ROWS // 2


# ----- TableNormaliser -----

def test_gamma_follows_schedule_over_epochs_and_reset_restarts_it(tmp_path):
    normaliser = make_normaliser(tmp_path / "live", gamma_min=0.2, decay_epochs=4)
    seen_gammas = []
    for _ in range(7):
        seen_gammas.append(normaliser.gamma())
        normaliser.end_epoch()
    assert seen_gammas == [gamma_at_epoch(e, gamma_min=0.2, decay_epochs=4) for e in range(7)]
    assert seen_gammas[0] == 1.0 and seen_gammas[-1] == 0.2
    assert normaliser.state_dict() == {"epochs": 7}

    fill_some_rows(normaliser, seed=8)
    assert normaliser.num_seen() == NUM_ROWS // 2
    normaliser.reset()
    assert normaliser.num_seen() == 0
    log_u_x, log_u_z, seen = normaliser.table.read(torch.arange(NUM_ROWS))
    assert not seen.any() and not log_u_x.any() and not log_u_z.any()
    assert normaliser.gamma() == 1.0 and normaliser.state_dict() == {"epochs": 0}


def test_state_dict_round_trip(tmp_path):
    normaliser = make_normaliser(tmp_path / "a", gamma_min=0.3, decay_epochs=5)
    for _ in range(2):
        normaliser.end_epoch()
    state = normaliser.state_dict()
    other = make_normaliser(tmp_path / "b", gamma_min=0.3, decay_epochs=5)
    assert other.gamma() == 1.0
    other.load_state_dict(state)
    assert other.state_dict() == state == {"epochs": 2}
    assert other.gamma() == normaliser.gamma() == gamma_at_epoch(2, gamma_min=0.3, decay_epochs=5)


def test_save_then_load_into_another_live_table(tmp_path):
    source = make_normaliser(tmp_path / "live_a")
    filled = fill_some_rows(source, seed=9)
    source.table.write(filled[:3], torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0]))  # 2 visits
    source.set_provenance({"surrogate": "hgcl", "margin": MARGIN})
    source.save(tmp_path / "ckpt" / "normaliser")
    all_rows = torch.arange(NUM_ROWS)
    expected = table_rows(source, all_rows)
    assert expected[3].max().item() == 2

    target = make_normaliser(tmp_path / "live_b")
    target.table.write(all_rows, torch.full((NUM_ROWS,), -7.0), torch.full((NUM_ROWS,), -8.0))  # overwritten
    target.load(tmp_path / "ckpt" / "normaliser")
    for want, got in zip(expected, table_rows(target, all_rows)):
        assert torch.equal(want, got)
    assert target.provenance == {"surrogate": "hgcl", "margin": MARGIN}
    assert target.table.directory == tmp_path / "live_b"  # the live table, not the checkpoint's copy
    # Later writes go to the live table; the checkpoint stays as saved.
    target.table.write(torch.tensor([0]), torch.tensor([9.0]), torch.tensor([9.0]))
    target.flush()
    snapshot = UTable.open(tmp_path / "ckpt" / "normaliser", readonly=True)
    assert torch.equal(snapshot.visits(all_rows), expected[3])
    snapshot.close()
    # The source's live table is not affected by either.
    for want, got in zip(expected, table_rows(source, all_rows)):
        assert torch.equal(want, got)


def test_load_refuses_a_table_of_another_dataset(tmp_path):
    source = make_normaliser(tmp_path / "live_a", fingerprint="data-a")
    fill_some_rows(source, seed=10)
    source.save(tmp_path / "ckpt")
    other = make_normaliser(tmp_path / "live_b", fingerprint="data-b")
    with pytest.raises(ValueError, match="another dataset"):
        other.load(tmp_path / "ckpt")
    # The live table of the refusing normaliser is still on disk, empty.
    untouched = UTable.open(tmp_path / "live_b", dataset_fingerprint="data-b", readonly=True)
    assert untouched.num_seen() == 0
    untouched.close()


def test_refused_load_keeps_the_normaliser_usable(tmp_path):
    source = make_normaliser(tmp_path / "live_a", fingerprint="data-a")
    source.save(tmp_path / "ckpt")
    other = make_normaliser(tmp_path / "live_b", fingerprint="data-b")
    other.table.write(torch.tensor([1]), torch.tensor([2.0]), torch.tensor([3.0]))
    with pytest.raises(ValueError, match="another dataset"):
        other.load(tmp_path / "ckpt")
    log_u_x, _, seen = other.prior(torch.tensor([1]), device=torch.device("cpu"))
    assert seen.item() and log_u_x.item() == 2.0
    other.close()


def test_background_save_writes_the_table_as_it_was_at_the_save(tmp_path, monkeypatch):
    """run.async_checkpoint: the rows are read at the save; steps committed while the copy is written do not
    reach it (the writer is held back until they are done)."""
    import threading

    from engine.objectives.table import TableSnapshot

    source = make_normaliser(tmp_path / "live")
    fill_some_rows(source, seed=4)
    all_rows = torch.arange(NUM_ROWS)
    at_save = table_rows(source, all_rows)
    release, write_to = threading.Event(), TableSnapshot.write_to
    monkeypatch.setattr(TableSnapshot, "write_to", lambda self, d: (release.wait(60), write_to(self, d)))
    written = source.save_async(tmp_path / "ckpt" / "normaliser")
    source.stage(all_rows, torch.full((NUM_ROWS,), -5.0), torch.full((NUM_ROWS,), -6.0))
    source.commit()  # the next step, while the copy is not yet written
    source.flush()
    assert not written.done()
    release.set()
    written.result(timeout=60)
    saved = UTable.open(tmp_path / "ckpt" / "normaliser", readonly=True)
    for want, got in zip(at_save, (*saved.read(all_rows), saved.visits(all_rows))):
        assert torch.equal(want, got)
    saved.close()
    assert (table_rows(source, all_rows)[0] == -5.0).all()  # the live table moved on
