"""run.compile: the forward compiled in place (blocks or whole model), training as eager does, resuming bitwise,
weights and checkpoints unchanged; the backends it cannot run on refused in one line. Compiled here with
torch.compile's `eager` backend: dynamo captures the graphs as for inductor and runs them as they are, so the
numbers must equal eager's bit for bit (inductor's code generation takes a minute on CPU: its speed and compile
time are measured in benchmarks/compile_step.py)."""

import pytest
import torch
from safetensors.torch import load_file

from engine.backends.fsdp import transformer_blocks
from engine.compiling import is_compiled
from engine.config import load_config
from engine.trainer import Trainer
from tests.helpers.jobs import crash_after, job


class Crash(RuntimeError):
    pass


def compiled_job(shards, out, mode, **run):
    return job(shards, out, run={"compile": mode, "compile_backend": "eager", "save_every_steps": 2,
                                 "max_steps_per_epoch": 3, **run})


def test_compiled_blocks_train_as_eager_and_resume_bitwise(shards, tmp_path):
    eager = Trainer(load_config(base=compiled_job(shards, tmp_path / "eager", "none")))
    eager.tune()
    eager.close()
    straight = Trainer(load_config(base=compiled_job(shards, tmp_path / "a", "blocks")))
    blocks = transformer_blocks(straight.backend.model)
    assert len(blocks) > 2 and all(is_compiled(block) for block in blocks)
    assert not is_compiled(straight.backend.model)
    straight.tune()
    straight.close()
    crashed = Trainer(load_config(base=compiled_job(shards, tmp_path / "b", "blocks")))
    crash_after(crashed, 4, Crash("simulated failure"))
    with pytest.raises(Crash):
        crashed.tune()
    crashed.close()
    resumed = Trainer(load_config(base=compiled_job(shards, tmp_path / "b", "blocks", resume="latest")))
    assert resumed.global_step > 0
    resumed.tune()
    resumed.close()
    ref, final, again = (load_file(tmp_path / run / "final.safetensors") for run in ("eager", "a", "b"))
    assert final.keys() == ref.keys() == again.keys()  # names as without compile: no wrapper prefixes
    for name, value in ref.items():
        assert torch.equal(again[name], final[name]), name
        assert torch.equal(final[name], value), name  # dynamo alone changes no number


def test_whole_model_compiled_on_one_process(shards, tmp_path):
    trainer = Trainer(load_config(base=compiled_job(shards, tmp_path / "m", "model", max_steps_per_epoch=1)))
    assert is_compiled(trainer.backend.model)
    trainer.tune()
    trainer.close()
    assert (tmp_path / "m" / "final.safetensors").is_file()


@pytest.mark.parametrize(("mode", "stage", "fix"), [("blocks", 3, "ZeRO-3"), ("model", 3, "ZeRO-3"),
                                                   ("model", "fsdp", "blocks")])
def test_backends_that_cannot_compile_are_refused_with_the_fix(mode, stage, fix):
    """Each backend names what it cannot compile (checked on stand-ins: no process group needed)."""
    from types import SimpleNamespace

    from engine.backends.deepspeed.backend import DeepSpeedBackend
    from engine.backends.fsdp import FSDPBackend
    from engine.backends.single import SingleProcessBackend

    if stage == "fsdp":
        problem = FSDPBackend.compile_problem(SimpleNamespace(), mode)
    else:
        problem = DeepSpeedBackend.compile_problem(SimpleNamespace(zero_stage=stage), mode)
    assert problem and problem.startswith(f"run.compile={mode}") and fix in problem and "\n" not in problem
    assert DeepSpeedBackend.compile_problem(SimpleNamespace(zero_stage=2), mode) is None
    assert FSDPBackend.compile_problem(SimpleNamespace(), "blocks") is None
    assert SingleProcessBackend.compile_problem(SimpleNamespace(), mode) is None


def test_an_unknown_mode_is_a_config_error(shards, tmp_path):
    with pytest.raises(ValueError, match="run.compile"):
        load_config(base=compiled_job(shards, tmp_path / "x", "fast"))


def test_open_clip_trains_torchcompile_flag_is_run_compile_blocks():
    from engine.cli import build_parser, open_clip_train_overrides

    said = []
    args = build_parser().parse_args(["tune", "--torchcompile"])
    assert open_clip_train_overrides(args, say=said.append) == ["run.compile=blocks"]
    assert said == ["note: --torchcompile is run as --set run.compile=blocks"]
    assert open_clip_train_overrides(build_parser().parse_args(["tune"])) == []
