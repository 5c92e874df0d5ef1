"""The loss-term and normaliser seams: a term and a normaliser defined in this file alone, chosen by config
(`loss.terms`, `loss.normaliser`, with this module named in `run.plugins` so launched ranks register them
too), run OSR, fine-tuning, checkpoint and resume bitwise equal to a straight run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.config import load_config
from engine.objectives import ObjectiveTerms, TermBase, register_term, total_loss
from engine.objectives.normaliser import average_gradients, register_normaliser
from engine.run.preemption import Preempted
from engine.trainer import Trainer
from tests.helpers.harness import run_ranks
from tests.helpers.jobs import job, stop_after

PLUGIN = "tests.test_extension_seams"


class OffsetNormaliser:
    """log u = log Phi + c, with one trainable scalar c (replicated on every rank) that its own SGD optimizer
    (momentum) moves toward the global batch's mean of log Phi1 - log Phi2 once each step is taken."""

    placement = "replicated"

    def __init__(self, *, device):
        self.c = torch.zeros((), device=device, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.c], lr=0.5, momentum=0.9)
        self.epochs = 0
        self.provenance: dict = {}
        self._staged = None

    def estimate(self, rows, log_phi_x, log_phi_z, *, image_features, text_features, surrogate, gather):
        self._staged = (log_phi_x.detach(), log_phi_z.detach())
        c = self.c.detach().to(log_phi_x.dtype)
        return log_phi_x + c, log_phi_z + c

    def commit(self):
        if self._staged is None:
            return
        log_phi_x, log_phi_z = self._staged
        self._staged = None
        self.optimizer.zero_grad(set_to_none=True)
        (self.c - (log_phi_x - log_phi_z).float()).square().mean().backward()
        average_gradients([self.c])  # each rank's local mean -> the global batch's
        self.optimizer.step()

    def discard(self):
        self._staged = None

    def metrics(self):
        return {"toy_offset": float(self.c.detach())}

    def end_epoch(self):
        self.epochs += 1

    def reset(self):
        with torch.no_grad():
            self.c.zero_()
        self.optimizer.state.clear()
        self.epochs = 0

    def set_provenance(self, provenance):
        self.provenance = dict(provenance)

    def summary(self):
        return {"toy_offset": float(self.c.detach())}

    def state_dict(self):
        buffer = self.optimizer.state.get(self.c, {}).get("momentum_buffer")
        return {"c": float(self.c.detach()), "momentum": None if buffer is None else float(buffer), "epochs": self.epochs}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.c.fill_(state["c"])
        self.optimizer.state.clear()
        if state["momentum"] is not None:
            self.optimizer.state[self.c]["momentum_buffer"] = torch.tensor(state["momentum"], device=self.c.device)
        self.epochs = state["epochs"]

    def close(self):
        pass


class RowWeightedPull(TermBase):
    """sum_i w_i (s_ii - s0)^2 / B with w_i = 1 + (sample id % 3) read from the batch: pulls each pair's
    similarity toward s0, the mean s_ii at w0 that `prepare` reads from probe batches; counts the samples of
    the steps taken (state)."""

    name = "toy_pull"

    def __init__(self, ctx):
        self.ctx = ctx
        self.s0: float | None = None
        self.num_samples = 0
        self._pending = 0

    def prepare(self, probe):
        sums = torch.zeros(2, dtype=torch.float64)
        for _, outputs in probe(2):
            s = (outputs.image_features * outputs.text_features).sum(dim=1).double()
            sums += self.ctx.reduce_sum(torch.stack([s.sum(), torch.tensor(float(s.numel()), device=s.device,
                                                                           dtype=torch.float64)])).cpu()
        self.s0 = float(sums[0] / sums[1])

    def __call__(self, batch, outputs):
        ctx = self.ctx
        f, g = outputs.image_features, outputs.text_features
        weight = 1.0 + (batch.rows.to(f.device) % 3).to(f.dtype)
        local = (weight * ((f * g).sum(dim=1) - self.s0).square()).sum()
        total = ctx.reduce_sum(local.detach())
        scaled = ctx.world_size * local  # backends average gradients over ranks
        self._pending = len(batch.rows) * ctx.world_size
        return {"toy_pull_loss": (scaled + (total - scaled).detach()) / (ctx.local_batch * ctx.world_size),
                "toy_seen_value": torch.tensor(float(self.num_samples))}

    def after_step(self):
        self.num_samples += self._pending
        self._pending = 0

    def skip_step(self):
        self._pending = 0

    def state_dict(self):
        return {"s0": self.s0, "num_samples": self.num_samples}

    def load_state_dict(self, state, *, origin=None):
        self.s0, self.num_samples = state["s0"], state["num_samples"]


register_normaliser("toy_offset", lambda loss_cfg, *, device, **_: OffsetNormaliser(device=device))
register_term("toy_pull", RowWeightedPull)


def toy_job(shards, out, **run) -> dict:
    return job(shards, out, loss={"normaliser": "toy_offset", "terms": {"contrastive": 1.0, "toy_pull": 0.5}},
               run={"plugins": [PLUGIN], "save_every_steps": 2, "log_every": 1, **run})


def tune(config: dict, stop_at: int | None = None) -> dict:
    """`run.py tune` of `config`, stopped as by SIGTERM after global step `stop_at` (checkpoint, Preempted);
    a finished run returns its weights, AdamW moments and step, and the terms' and normaliser's states."""
    trainer = Trainer(load_config(base=config))
    stop_after(trainer, stop_at)
    try:
        trainer.tune()
    except Preempted:
        trainer.close()
        return {"finished": False, "global_step": trainer.global_step}
    moments = trainer.backend.full_moments()  # collective
    result = {"finished": True, "global_step": trainer.global_step, "moments": moments,
              "adam_step": trainer.backend.optimizer_step_count(),
              "objective": trainer.objective.state_dict(), "normaliser": trainer.normaliser.state_dict(),
              "term_class": type(trainer.objective.term("toy_pull")).__name__,
              "normaliser_class": type(trainer.normaliser).__name__}
    trainer.close()
    out = Path(config["run"]["out_dir"])
    result["weights"] = load_file(out / "final.safetensors") if trainer.ctx.is_main else None
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] if trainer.ctx.is_main else []
    result["steps"] = {r["step"]: (r["loss"], r["contrastive_loss"], r["toy_pull_loss"], r["toy_offset"])
                       for r in log if r["event"] == "step"}
    return result


def tune_straight_then_stopped(straight: dict, stopped: dict, stop_at: int) -> dict:
    """One launch: the straight run, then a run stopped after step `stop_at` (for `tune` to resume)."""
    first = tune(straight)
    second = tune(stopped, stop_at=stop_at)
    assert not second["finished"] and second["global_step"] == stop_at
    return first


def assert_same_run(resumed: dict, straight: dict) -> None:
    assert resumed["finished"] and straight["finished"]
    assert resumed["term_class"] == "RowWeightedPull" and resumed["normaliser_class"] == "OffsetNormaliser"
    assert resumed["global_step"] == straight["global_step"] == 12
    assert resumed["adam_step"] == straight["adam_step"] == 12
    assert resumed["objective"] == straight["objective"]
    assert resumed["objective"]["toy_pull"]["num_samples"] == 96  # 12 steps of 8 samples
    assert -1 <= resumed["objective"]["toy_pull"]["s0"] <= 1
    assert resumed["normaliser"] == straight["normaliser"] and resumed["normaliser"]["c"] != 0.0
    assert resumed["normaliser"]["epochs"] == 2 and resumed["normaliser"]["momentum"] is not None
    for name, (exp_avg, exp_avg_sq) in straight["moments"].items():
        assert torch.equal(resumed["moments"][name][0], exp_avg), name
        assert torch.equal(resumed["moments"][name][1], exp_avg_sq), name
    if straight["weights"] is not None:
        assert straight["weights"].keys() == resumed["weights"].keys()
        for key, value in straight["weights"].items():
            assert torch.equal(resumed["weights"][key], value), key
        # The steps after the resume logged what the straight run logged, every term under its own name.
        later = {s: v for s, v in straight["steps"].items() if s in resumed["steps"]}
        assert len(later) >= 6 and all(resumed["steps"][s] == v for s, v in later.items())
        loss, contrastive, pull, _ = straight["steps"][12]
        assert loss == pytest.approx(contrastive + pull) and pull > 0


def test_terms_and_normaliser_by_config_resume_bitwise(shards, tmp_path):
    # 48 samples, batch 8: 6 OSR steps then 6 fine-tuning steps; stopped inside OSR, resumed to the end.
    straight = tune(toy_job(shards, tmp_path / "a"))
    assert not (tmp_path / "a" / "u_table").exists()  # the table was never built: the toy holds the estimates
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    osr_done = next(r for r in log if r["event"] == "osr_done")
    assert osr_done["toy_offset"] != 0.0 and osr_done["margin"] == 0.1  # each part's summary
    assert tune(toy_job(shards, tmp_path / "b"), stop_at=4)["global_step"] == 4
    resumed = tune(toy_job(shards, tmp_path / "b", resume="latest"))
    assert_same_run(resumed, straight)


def test_unknown_term_and_normaliser_name_the_field(shards, tmp_path):
    with pytest.raises(ValueError, match=r"loss.terms: unknown term 'nope'; use any of .*toy_pull"):
        Trainer(load_config(base=job(shards, tmp_path / "a", loss={"terms": {"nope": 1.0}})))
    with pytest.raises(ValueError, match=r"loss.normaliser: unknown normaliser 'nope'; use one of neural, table"):
        Trainer(load_config(base=job(shards, tmp_path / "b", loss={"normaliser": "nope"})))
    with pytest.raises(ValueError, match=r"run.plugins: cannot import 'no_such_module'"):
        Trainer(load_config(base=job(shards, tmp_path / "c", run={"plugins": ["no_such_module"]})))


class Constant(TermBase):
    def __init__(self, name, value):
        self.name, self.value, self.calls = name, value, []

    def __call__(self, batch, outputs):
        return {f"{self.name}_loss": torch.tensor(self.value, requires_grad=True), f"{self.name}_seen_value": 3.0}

    def after_step(self):
        self.calls.append("after")

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state, *, origin=None):
        self.value = state["value"]


def test_weighted_terms_are_summed_logged_by_name_and_keep_their_state():
    a, b = Constant("a", 2.0), Constant("b", 3.0)
    objective = ObjectiveTerms({"a": (a, 1.0), "b": (b, 0.25)})
    out = objective(None, None)
    assert out["a_loss"].item() == 2.0 and out["b_loss"].item() == 0.75 and out["b_seen_value"] == 3.0
    assert total_loss(out).item() == 2.75 and objective.describe() == "a + 0.25 b"
    objective.after_step()
    assert a.calls == b.calls == ["after"]
    state = objective.state_dict()
    a.value = b.value = 0.0
    objective.load_state_dict(json.loads(json.dumps(state)))
    assert (a.value, b.value) == (2.0, 3.0)


def test_loss_terms_must_map_names_to_weights(shards, tmp_path):
    with pytest.raises(ValueError, match=r"loss.terms.contrastive must be a number, got 'heavy'"):
        load_config(base=job(shards, tmp_path, loss={"terms": {"contrastive": "heavy"}}))
    with pytest.raises(ValueError, match=r"loss.terms must map term names to finite weights"):
        load_config(base=job(shards, tmp_path, loss={"terms": {"contrastive": float("inf")}}))
    with pytest.raises(ValueError, match=r"loss.terms must map term names to finite weights"):
        load_config(base=job(shards, tmp_path, loss={"terms": {}}))


@pytest.mark.slow
# One sharding backend: the terms' and normaliser's states are checkpoint parts of their own, saved and read the
# same way under every backend (ZeRO-2/3 resume of a term's tensors: tests/test_objectives_teacher.py).
@pytest.mark.parametrize("backend", ["fsdp"])
def test_terms_and_normaliser_resume_bitwise_on_two_ranks(shards, tmp_path, backend):
    straight = toy_job(shards, tmp_path / "a", backend=backend)
    stopped = toy_job(shards, tmp_path / "b", backend=backend)
    first = run_ranks(f"{PLUGIN}:tune_straight_then_stopped", world_size=2, straight=straight, stopped=stopped,
                      stop_at=8)  # inside fine-tuning
    resumed = run_ranks(f"{PLUGIN}:tune", world_size=2,
                        config=toy_job(shards, tmp_path / "b", backend=backend, resume="latest"))
    for rank in range(2):
        assert_same_run(resumed[rank], first[rank])
