"""run.compile: the forward compiled in place (blocks or whole model; step adds the loss's block kernels), training
as eager does, resuming bitwise, weights and checkpoints unchanged; the backends it cannot run on refused in one
line. Compiled here with torch.compile's `eager` backend (or dynamo's counting backend, which runs the graphs the
same way): dynamo captures the graphs as for inductor and runs them as they are, so the numbers must equal eager's
bit for bit (inductor's code generation takes a minute on CPU: its speed and compile time are measured in
benchmarks/compile_step.py and benchmarks/loss_speed.py; one small loss case compiles with it here)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.testing import CompileCounter

from engine import compiling
from engine.backends.fsdp import transformer_blocks
from engine.compiling import is_compiled
from engine.config import load_config
from engine.objectives import build_objective
from engine.objectives.block_kernels import BlockKernels, kept_coefficient_block, whole_log_phi_block
from engine.objectives.contrastive import GlobalContrastiveLoss, SurrogateSpec, feature_gradients
from engine.objectives.normaliser import update_log_estimate
from engine.objectives.padding import BatchMask
from engine.trainer import Trainer
from tests.helpers.jobs import crash_after, job


class Crash(RuntimeError):
    pass


def compiled_job(shards, out, mode, **run):
    return job(shards, out, run={"compile": mode, "compile_backend": "eager", "save_every_steps": 2,
                                 "max_steps_per_epoch": 3, **run})


@pytest.mark.parametrize("mode", ["blocks", "step"])
def test_compiled_run_trains_as_eager_and_resumes_bitwise(shards, tmp_path, mode):
    eager = Trainer(load_config(base=compiled_job(shards, tmp_path / "eager", "none")))
    eager.tune()
    eager.close()
    straight = Trainer(load_config(base=compiled_job(shards, tmp_path / "a", mode)))
    blocks = transformer_blocks(straight.backend.model)
    kernels = straight.objective.term("contrastive").build("hgcl").loss.kernels
    if mode == "blocks":
        assert len(blocks) > 2 and all(is_compiled(block) for block in blocks)
        assert not is_compiled(straight.backend.model) and kernels is None
    else:  # the whole forward (one process) and the loss's block kernels
        assert is_compiled(straight.backend.model) and not any(is_compiled(block) for block in blocks)
        assert isinstance(kernels, BlockKernels) and kernels.backend == "eager"
    torch._dynamo.reset()
    straight.tune()
    straight.close()
    # The loss ran its compiled kernels (one process, one chunk: these two), or none of them.
    used = [bool(_debug_get_cache_entry_list(fn.__code__)) for fn in (whole_log_phi_block, kept_coefficient_block)]
    assert used == [mode == "step"] * 2
    crashed = Trainer(load_config(base=compiled_job(shards, tmp_path / "b", mode)))
    crash_after(crashed, 4, Crash("simulated failure"))
    with pytest.raises(Crash):
        crashed.tune()
    crashed.close()
    resumed = Trainer(load_config(base=compiled_job(shards, tmp_path / "b", mode, resume="latest")))
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
                                                   ("step", 3, "ZeRO-3"), ("model", "fsdp", "blocks")])
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


def test_step_on_fsdp_compiles_the_blocks_and_the_loss(monkeypatch):
    """FSDP2 cannot compile the whole forward: run.compile=step compiles its blocks (and the loss's kernels)."""
    from types import SimpleNamespace

    from engine.backends.fsdp import FSDPBackend

    compiled = []
    monkeypatch.setattr(compiling, "apply_compile", lambda model, mode, **_: compiled.append(mode))
    backend = SimpleNamespace(model=None)
    backend.compile_problem = lambda mode: FSDPBackend.compile_problem(backend, mode)
    compiling.compile_model(backend, SimpleNamespace(compile="step", compile_backend="eager"))
    assert compiled == ["blocks"]
    assert isinstance(compiling.loss_kernels(SimpleNamespace(compile="step", compile_backend="eager")), BlockKernels)
    assert compiling.loss_kernels(SimpleNamespace(compile="model", compile_backend="eager")) is None


# ----- run.compile=step: GCL / HGCL's block kernels -----

class Rows:
    """A stand-in normaliser: the table's moving average over float32 rows, kept after each step."""

    def __init__(self, num_rows: int):
        self.log_u, self.seen, self.staged = torch.zeros(num_rows, 2), torch.zeros(num_rows, dtype=torch.bool), None

    def estimate(self, rows, log_phi_x, log_phi_z, **_):
        log_u = [update_log_estimate(self.log_u[rows, i], self.seen[rows], phi, 0.6)
                 for i, phi in enumerate((log_phi_x, log_phi_z))]
        self.staged = (rows, *log_u)
        return log_u

    def commit(self):
        rows, log_u_x, log_u_z = self.staged
        self.log_u[rows] = torch.stack([log_u_x, log_u_z], dim=1)
        self.seen[rows] = True


def identity(x):
    return x


def compiled_kernels() -> set[str]:
    """The block functions dynamo holds graphs of (since its last reset)."""
    return {fn.__name__ for fn in BlockKernels.FUNCTIONS if _debug_get_cache_entry_list(fn.__code__)}


def loss_steps(kind, chunk_size, kernels, *, num_steps=4):
    """Steps of GCL / HGCL on batches of 8, every other one (the first too) a padded tail with 5 real samples: per
    step the term, the u rows and the feature gradients."""
    table, results = Rows(64), []
    for step in range(num_steps):
        gen = torch.Generator().manual_seed(step)
        f = F.normalize(torch.randn(8, 12, generator=gen), dim=1).requires_grad_(True)
        g = F.normalize(f.detach() + 0.8 * torch.randn(8, 12, generator=gen), dim=1).requires_grad_(True)
        objective = build_objective(kind, tau=0.05, margin=0.1, eps=1e-10, chunk_size=chunk_size, normaliser=table,
                                    rank=0, world_size=1, local_batch=8, gather=identity, reduce_sum=identity,
                                    kernels=kernels)
        mask = BatchMask.of(torch.arange(8) < (8 if step % 2 else 5), num_local=8, rank=0, gather=identity)
        term = objective(f, g, rows=torch.arange(8) + 8 * step, mask=mask)["contrastive_loss"]
        term.backward()
        objective.after_step()
        results.append((term.detach(), table.log_u.clone(), f.grad, g.grad))
    return results


@pytest.mark.parametrize("kind", ["gcl", "hgcl"])
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_step_kernels_captured_by_dynamo_change_no_number(kind, chunk_size):
    """Captured and run as captured, the block kernels give the eager loss bit for bit (term, u rows, feature
    gradients; whole batches and padded tails), and the shapes that vary (tail batch, last chunk) stop compiling
    after the first steps."""
    torch._dynamo.reset()
    counter = CompileCounter()
    eager = loss_steps(kind, chunk_size, None, num_steps=6)
    loss_steps(kind, chunk_size, BlockKernels(counter), num_steps=1)
    assert counter.frame_count > 0  # the padded batch's loss (the real rows) runs the kernels
    compiled = loss_steps(kind, chunk_size, BlockKernels(counter), num_steps=4)
    first_steps = counter.frame_count
    compiled += loss_steps(kind, chunk_size, BlockKernels(counter), num_steps=6)[4:]
    assert 0 < first_steps <= 8 and counter.frame_count == first_steps
    assert compiled_kernels() == {"whole_log_phi_block", "coefficient_block" if chunk_size else "kept_coefficient_block"}
    for step, (ours, ref) in enumerate(zip(compiled, eager)):
        for a, b in zip(ours, ref):
            assert torch.equal(a, b), step


def test_step_kernels_on_ranks_change_no_number():
    """Ranks of 4 and 5 rows against the gathered batch of 9 (a block per anchor direction), bit for bit."""
    torch._dynamo.reset()
    counter = CompileCounter()
    gen = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(9, 12, generator=gen), dim=1)
    g = F.normalize(f + 0.8 * torch.randn(9, 12, generator=gen), dim=1)
    log_wx, log_wz = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
    spec = SurrogateSpec(kind="hgcl", margin=0.1, tau=0.05, chunk_size=3)
    for rows in (slice(0, 4), slice(4, 9)):
        results = []
        for kernels in (None, BlockKernels(counter)):
            loss = GlobalContrastiveLoss(spec, gather=lambda x, rows=rows: f if torch.equal(x, f[rows]) else g,
                                         world_size=2, kernels=kernels)
            part = loss.batch_estimates(f[rows], g[rows], offset=rows.start)
            results.append((part.log_phi_x, part.log_phi_z, *feature_gradients(
                f[rows], g[rows], f, g, log_wx, log_wz, offset=rows.start, spec=spec, kept=part.kept,
                kernels=kernels)))
        for a, b in zip(*results):
            assert torch.equal(a, b)
    assert counter.frame_count > 0 and compiled_kernels() == {"rank_log_phi_block", "coefficient_block"}


def test_step_kernels_with_inductor_match_eager():
    """Inductor's fused kernels (one small chunked case: its code generation takes tens of seconds on CPU)."""
    torch._dynamo.reset()
    for ours, ref in zip(loss_steps("hgcl", 3, BlockKernels("inductor"), num_steps=2),
                         loss_steps("hgcl", 3, None, num_steps=2)):
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
