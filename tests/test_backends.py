"""The backend seam: a registry picks the backend; a backend defined here alone runs the whole method."""

import contextlib
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.backends import backend_class, backend_names, register_backend, select_backend
from engine.backends.base import Backend, adamw_param_groups, tensors_digest
from engine.config import load_config
from engine.trainer import Trainer
from tests.helpers.jobs import job

ROOT = Path(__file__).resolve().parents[1]


class ToyBackend(Backend):
    """A backend written from the protocol alone: plain torch AdamW, one file per save, a call log."""

    name = "toy"
    supports_reshard = False
    max_ranks = 1

    def __init__(self, model, *, device, lr_log: list, weight_decay: float):
        self.model = model.to(device)
        self.device = device
        self.optimizer = torch.optim.AdamW(adamw_param_groups(model, weight_decay), lr=0.0)
        self.calls = lr_log

    @classmethod
    def from_config(cls, cfg, model, *, ctx, device, micro_batch_size, optim):
        return cls(model, device=device, lr_log=[], weight_decay=optim.weight_decay)

    @classmethod
    def init_distributed(cls, ctx, *, timeout_s=600):
        pass

    def forward(self, images, texts):
        return self.model(images.to(self.device), texts.to(self.device))

    def backward(self, loss):
        loss.backward()

    def step(self, *, lr, grad_clip=0.0):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.calls.append(("step", lr))
        return 0.0

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def state_finite(self):
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    def reset_optimizer_state(self):
        self.optimizer.state.clear()

    def optimizer_step_count(self):
        return next((int(s["step"]) for s in self.optimizer.state.values()), 0)

    def full_moments(self):
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {names[id(p)]: (s["exp_avg"], s["exp_avg_sq"]) for p, s in self.optimizer.state.items()}

    def save(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, directory / "toy.safetensors")
        torch.save(self.optimizer.state_dict(), directory / "toy_optim.pt")
        self.calls.append(("save", str(directory)))

    def load(self, directory, *, reshard=False):
        self.model.load_state_dict(load_file(directory / "toy.safetensors"))
        self.optimizer.load_state_dict(torch.load(directory / "toy_optim.pt", weights_only=True))
        self.calls.append(("load", str(directory)))

    def weights_digest(self):
        return tensors_digest(self.model.parameters())

    def full_weights(self):
        return contextlib.nullcontext()

    def full_state_dict(self):
        return self.model.state_dict()

    def close(self):
        self.calls.append(("close", None))


register_backend("toy", ToyBackend)


def toy_job(shards, out, **run):
    return load_config(base=job(shards, out, data={"batch_size": 16}, run={"backend": "toy", **run}))


def test_registry_lists_builtins_and_refuses_unknown_names():
    assert {"single", "deepspeed", "toy"} <= set(backend_names())
    assert backend_class("toy") is ToyBackend
    assert backend_class("single").name == "single"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backend_class("nope")
    with pytest.raises(ValueError, match="run.backend=single cannot run 2 ranks"):
        select_backend("single", world_size=2)
    assert select_backend("deepspeed", world_size=64).supports_reshard


def test_trainer_names_no_backend():
    source = (ROOT / "engine" / "trainer.py").read_text()
    assert re.findall(r"\"(deepspeed|single|fsdp)\"", source) == []


def test_toy_backend_runs_osr_finetuning_and_resume_through_the_trainer(shards, tmp_path):
    trainer = Trainer(toy_job(shards, tmp_path / "a", save_every_steps=2))
    backend = trainer.backend
    assert isinstance(backend, ToyBackend)
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    trainer.tune()
    steps = [lr for call, lr in backend.calls if call == "step"]
    osr_steps = trainer.osr_steps
    assert osr_steps == 3 and steps[:osr_steps] == [0.0] * osr_steps and all(lr > 0 for lr in steps[osr_steps:])
    assert backend.optimizer_step_count() == len(steps) == trainer.global_step == 6
    after = backend.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    saves = [Path(where) for call, where in backend.calls if call == "save"]
    assert saves and all(p.name == "backend" for p in saves)
    latest = trainer.checkpoints.find("latest")
    assert (latest / "backend" / "toy.safetensors").is_file()
    trainer.close()
    assert backend.calls[-1] == ("close", None)

    # Resume goes through the toy's load and restores its state exactly (of a run stopped before its end:
    # a finished run is only resumed with --overwrite).
    (tmp_path / "a" / "final.safetensors").unlink()
    resumed = Trainer(toy_job(shards, tmp_path / "a", save_every_steps=2, resume="latest"))
    assert ("load", str(latest / "backend")) in resumed.backend.calls
    assert resumed.global_step == 6 and resumed.backend.optimizer_step_count() == 6
    for key, value in resumed.backend.model.state_dict().items():
        assert torch.equal(value, after[key]), key
    resumed.close()
