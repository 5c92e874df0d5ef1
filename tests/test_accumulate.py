"""data.accum_steps: K micro-batches (feature cache, two passes) give exactly the step on the whole batch."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.accumulate import ForwardBackward, step_outputs
from engine.backends.single import SingleProcessBackend
from engine.data import Batch
from engine.distributed import DistContext
from engine.objectives import ObjectiveTerms, TermContext, total_loss
from engine.objectives.contrastive_term import ContrastiveTerm
from engine.objectives.normaliser import TableNormaliser

NUM_ROWS, BATCH = 40, 12


class TinyClip(nn.Module):
    """Two float64 towers returning L2-normalised features (and a SigLIP bias when asked)."""

    def __init__(self, *, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.Tanh(), nn.Dropout(dropout),
                                    nn.Linear(16, 8)).double()
        self.embed = nn.Embedding(50, 16).double()
        self.text = nn.Sequential(nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 8)).double()
        self.logit_bias = nn.Parameter(torch.tensor([-2.0], dtype=torch.float64)) if bias else None

    def forward(self, images, texts):
        out = {"image_features": F.normalize(self.visual(images.double()), dim=-1),
               "text_features": F.normalize(self.text(self.embed(texts).mean(1)), dim=-1)}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def make_batch(seed: int = 1) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(NUM_ROWS, generator=gen)[:BATCH]
    return Batch(images=torch.randn(BATCH, 3, 4, 4, generator=gen), texts=torch.randint(0, 50, (BATCH, 5), generator=gen),
                 rows=rows, keys=[f"k{int(r)}" for r in rows])


def make_job(tmp_path, kind: str, *, accum_steps: int, dropout: float = 0.0):
    """Backend, objective (the real `contrastive` term over a u table with half its rows seen) and the step."""
    model = TinyClip(dropout=dropout, bias=kind == "siglip")
    backend = SingleProcessBackend(model, device=torch.device("cpu"), betas=(0.9, 0.999), weight_decay=0.1, eps=1e-8)
    normaliser = TableNormaliser(tmp_path / f"u{accum_steps}", num_rows=NUM_ROWS, dataset_fingerprint="d",
                                 ctx=DistContext(), gamma_min=0.5, gamma_decay_epochs=3, fresh=True)
    gen = torch.Generator().manual_seed(7)
    seen = torch.randperm(NUM_ROWS, generator=gen)[: NUM_ROWS // 2]
    normaliser.table.write(seen, torch.randn(len(seen), generator=gen, dtype=torch.float64) + 3.0,
                           torch.randn(len(seen), generator=gen, dtype=torch.float64) + 3.0)
    cfg = SimpleNamespace(loss=SimpleNamespace(margin=0.1, eps=1e-10, chunk_size=5), surrogate=kind,
                          osr_surrogate="gcl")
    term = ContrastiveTerm(TermContext(cfg=cfg, tau=0.05, normaliser=normaliser, rank=0, world_size=1,
                                       local_batch=BATCH, gather=lambda x: x, reduce_sum=lambda x: x,
                                       log_event=lambda record: None))
    term.begin_stage("finetune", num_steps=1)
    objective = ObjectiveTerms({"contrastive": (term, 1.0)})
    return model, backend, normaliser, objective, ForwardBackward(backend, objective, accum_steps=accum_steps)


def one_step(tmp_path, kind: str, accum_steps: int):
    model, _, normaliser, objective, forward_backward = make_job(tmp_path, kind, accum_steps=accum_steps)
    batch = make_batch()
    out, total, backward = forward_backward(batch)
    backward()
    objective.after_step()  # the normaliser keeps this step's estimates
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    log_u_x, log_u_z, seen = normaliser.table.read(torch.arange(NUM_ROWS))
    return float(total), out["batch_loss_value"], grads, (log_u_x.clone(), log_u_z.clone(), seen.clone())


@pytest.mark.parametrize("kind", ["mbcl", "gcl", "hgcl", "siglip"])
def test_micro_batches_give_the_whole_batch_step(tmp_path, kind):
    whole = one_step(tmp_path, kind, 1)
    for accum_steps in (2, 3):
        loss, batch_loss, grads, u_rows = one_step(tmp_path, kind, accum_steps)
        assert loss == pytest.approx(whole[0], rel=1e-12, abs=1e-14)
        assert float(batch_loss) == pytest.approx(float(whole[1]), rel=1e-12)
        assert grads.keys() == whole[2].keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, whole[2][name], rtol=1e-10, atol=1e-13, msg=f"{kind} K={accum_steps} {name}")
        if kind == "siglip":
            assert whole[2]["logit_bias"].abs().item() > 1e-6  # the bias's gradient is checked, not zero
        for mine, theirs in zip(u_rows, whole[3]):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
        if kind in ("gcl", "hgcl"):  # the step did write the batch's rows (once)
            assert bool(u_rows[2][make_batch().rows].all())


def test_dropout_draws_the_same_masks_in_both_passes(tmp_path):
    """K=2 with dropout equals the graph-keeping step over the same two micro-batches (one random stream)."""
    model, _, _, objective, forward_backward = make_job(tmp_path, "hgcl", accum_steps=2, dropout=0.3)
    batch = make_batch()
    torch.manual_seed(123)
    _, total, backward = forward_backward(batch)
    backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    state_after = torch.get_rng_state()
    objective.skip_step()

    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    halves = [step_outputs(model(batch.images[s], batch.texts[s])) for s in (slice(0, 6), slice(6, 12))]
    outputs = halves[0]._replace(image_features=torch.cat([h.image_features for h in halves]),
                                 text_features=torch.cat([h.text_features for h in halves]), raw=None)
    reference = total_loss(objective(batch, outputs))
    reference.backward()
    assert float(total) == pytest.approx(float(reference), rel=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-13, msg=name)
    assert torch.equal(state_after, torch.get_rng_state())  # the stream continues as after one encoding


def test_a_term_without_accumulation_is_refused_in_one_line(shards, tmp_path):
    from engine.config import load_config
    from engine.trainer import Trainer
    from tests.helpers.jobs import job

    cfg = load_config(base=job(shards, tmp_path, data={"train": str(shards), "batch_size": 8, "shuffle_buffer": 8,
                                                       "accum_steps": 2},
                               loss={"terms": {"contrastive": 1.0, "wma_teacher": 0.5}}))
    with pytest.raises(ValueError) as caught:
        Trainer(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert "data.accum_steps=2" in message and "loss.terms.wma_teacher" in message
    assert "contrastive" not in message.split(":")[1]  # only the refused term is named


def test_resume_mid_epoch_with_micro_batches_equals_a_straight_run(shards, tmp_path):
    """K=2 through the trainer: a crash in the middle of the fine-tuning epoch, resumed, ends bitwise equal."""
    from engine.config import load_config
    from engine.trainer import Trainer
    from tests.helpers.jobs import crash_after, job
    from tests.test_resume import assert_same_state, final_state

    def config(out, **run):
        return load_config(base=job(shards, out, method="fastclip", osr={"epochs": 0},
                                    data={"train": str(shards), "batch_size": 8, "shuffle_buffer": 8, "accum_steps": 2},
                                    run={"epochs": 1, "max_steps_per_epoch": 4, "save_every_steps": 2, "keep_last_n": 1,
                                         **run}))

    straight = Trainer(config(tmp_path / "straight"))
    straight.tune()
    straight.close()
    crashed = Trainer(config(tmp_path / "resumed"))
    crash_after(crashed, 2, RuntimeError("simulated failure"))  # at fine-tuning step 3 of 4
    with pytest.raises(RuntimeError):
        crashed.tune()
    crashed.close()
    resumed = Trainer(config(tmp_path / "resumed", resume="latest"))
    assert (resumed.stage, resumed.epoch_step) == ("finetune", 2)
    resumed.tune()
    resumed.close()
    assert_same_state(final_state(tmp_path / "straight", shards), final_state(tmp_path / "resumed", shards))


@pytest.mark.slow
def test_two_ranks_zero2_and_fsdp2_accumulate_exactly():
    """One launch, 2 CPU ranks: ZeRO-2 and FSDP2, an MBCL, a GCL and an HGCL step with K=2 equal those with K=1
    (same global batches): loss, gradient norm (DeepSpeed scales nothing by 1/K, FSDP2 adds the K backwards),
    u rows staged once per step, weights after the AdamW steps."""
    from tests.helpers.harness import run_ranks

    for rank_result in run_ranks("tests.helpers.dist_cases_accumulate:accumulation_ranks", world_size=2):
        for kind in ("zero2", "fsdp"):
            whole, micro = rank_result[f"{kind}_k1"], rank_result[f"{kind}_k2"]
            assert micro["num_estimates"] == whole["num_estimates"] == len(micro["u"]) == 2  # GCL, HGCL: once each
            assert micro["losses"] == pytest.approx(whole["losses"], rel=1e-5)
            assert micro["norms"] == pytest.approx(whole["norms"], rel=1e-4)
            for mine, theirs in zip(micro["u"], whole["u"]):
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
            # AdamW turns float noise in gradients that are zero in exact arithmetic (attention key biases, unused
            # token rows) into moves of up to lr: weights agree to a tenth of one step's lr (1e-3), not to 1e-6.
            for name, value in whole["weights"].items():
                torch.testing.assert_close(micro["weights"][name], value, rtol=0, atol=1e-4)


@pytest.mark.parametrize("accum_steps, expected", [(0, "data.accum_steps must be >= 1"),
                                                   (3, "not divisible by data.accum_steps=3")])
def test_accum_steps_is_checked_with_the_config(shards, tmp_path, accum_steps, expected):
    from engine.config import load_config
    from tests.helpers.jobs import job

    with pytest.raises(ValueError, match=expected):
        load_config(base=job(shards, tmp_path, data={"train": str(shards), "batch_size": 8, "accum_steps": accum_steps}))
