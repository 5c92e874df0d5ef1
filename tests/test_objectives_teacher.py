"""The wma_teacher term: Beta weights and the moving average against naive references, the distillation term's
value and gradient against autograd on the plain formula (one process and two simulated ranks), and the term in
a training run (teacher = the average of the student's weights; kill + resume bitwise equal)."""

import math
import threading
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.objectives.distill import similarity_distillation
from engine.objectives.teacher import MovingAverageTeacher, beta_weight
from engine.trainer import Trainer
from tests.helpers.jobs import crash_after, job, merge


def naive_beta_pdf(x: float, a: float) -> float:
    return x ** (a - 1) * (1 - x) ** (a - 1) * math.gamma(2 * a) / math.gamma(a) ** 2


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_wma_teacher_is_the_beta_weighted_average_of_the_student_weights(beta):
    torch.manual_seed(0)
    num_updates = 6
    thetas = [torch.randn(3, 4, dtype=torch.float64) for _ in range(num_updates + 1)]
    weights = [naive_beta_pdf((k + 0.5) / (num_updates + 1), beta) for k in range(num_updates + 1)]
    assert [beta_weight(k, num_updates, beta) for k in range(num_updates + 1)] == pytest.approx(weights, rel=1e-12)
    teacher = MovingAverageTeacher(kind="wma", beta=beta)
    teacher.start({"w": thetas[0]}, num_updates=num_updates)
    for theta in thetas[1:]:
        teacher.update({"w": theta})
    expected = sum(w * t for w, t in zip(weights, thetas)) / sum(weights)
    torch.testing.assert_close(teacher.shards["w"], expected.float(), rtol=1e-6, atol=1e-6)
    assert teacher.weight_sum == pytest.approx(sum(weights), rel=1e-12)


def test_beta_one_gives_the_plain_average_and_ema_its_own_rule():
    teacher = MovingAverageTeacher(kind="wma", beta=1.0)
    teacher.start({"w": torch.tensor([0.0, 10.0])}, num_updates=3)
    for k in (1, 2, 3):
        teacher.update({"w": torch.tensor([float(k), 10.0 - k])})
    # (0 + 1 + 2 + 3) / 4, (10 + 9 + 8 + 7) / 4, to float32 rounding of the incremental form
    assert teacher.shards["w"].tolist() == pytest.approx([1.5, 8.5], rel=1e-6)
    ema = MovingAverageTeacher(kind="ema", ema_momentum=0.5)
    ema.start({"w": torch.tensor([0.0])}, num_updates=2)
    ema.update({"w": torch.tensor([4.0])})
    ema.update({"w": torch.tensor([8.0])})
    assert ema.shards["w"].tolist() == [5.0]  # 0.5 * (0.5 * 0 + 0.5 * 4) + 0.5 * 8


def naive_distillation(f, g, tf, tg, tau):
    """The plain formula: -(1/B) sum_i [softmax(T_i.) . log softmax(S_i.) + softmax(T^T_i.) . log softmax(S^T_i.)]."""
    s, t = f @ g.T / tau, tf @ tg.T / tau
    rows = (torch.softmax(t, 1) * torch.log_softmax(s, 1)).sum()
    cols = (torch.softmax(t.T, 1) * torch.log_softmax(s.T, 1)).sum()
    return -(rows + cols) / f.shape[0]


def features(num: int, dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.nn.functional.normalize(torch.randn(num, dim, generator=gen, dtype=torch.float64), dim=1)
           for _ in range(4)]
    return out


def test_distillation_value_and_gradients_equal_the_plain_formula_fp64():
    f, g, tf, tg = features(8, 5, seed=1)
    tau = 0.07
    f, g = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
    weight = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)  # a parameter the features pass through
    ident = lambda x: x
    ours = similarity_distillation(f @ weight, g @ weight, tf, tg, tau=tau, offset=0, world_size=1,
                                   gather=ident, reduce_sum=ident)
    ours_grads = torch.autograd.grad(ours, [f, g, weight])
    naive = naive_distillation(f @ weight, g @ weight, tf, tg, tau)
    naive_grads = torch.autograd.grad(naive, [f, g, weight])
    torch.testing.assert_close(ours, naive, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours_grads, naive_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class ThreadRanks:
    """Collectives between threads standing in for ranks (gather: concatenate; reduce_sum: sum)."""

    def __init__(self, world_size: int):
        self.world_size, self.barrier, self.slots = world_size, threading.Barrier(world_size), {}

    def collective(self, rank: int, combine):
        def call(x):
            self.barrier.wait()
            self.slots[rank] = x
            self.barrier.wait()
            out = combine([self.slots[r] for r in range(self.world_size)])
            self.barrier.wait()
            return out
        return call


def test_two_ranks_carry_the_global_value_and_world_size_times_their_share_of_the_gradient():
    f, g, tf, tg = features(8, 5, seed=2)
    tau, world, local = 0.05, 2, 4
    naive_f, naive_g = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
    naive = naive_distillation(naive_f, naive_g, tf, tg, tau)
    grad_f, grad_g = torch.autograd.grad(naive, [naive_f, naive_g])
    ranks, results = ThreadRanks(world), {}

    def run(rank):
        part = slice(rank * local, (rank + 1) * local)
        fl, gl = f[part].clone().requires_grad_(True), g[part].clone().requires_grad_(True)
        value = similarity_distillation(fl, gl, tf, tg, tau=tau, offset=rank * local, world_size=world,
                                        gather=ranks.collective(rank, lambda xs: torch.cat(xs)),
                                        reduce_sum=ranks.collective(rank, lambda xs: sum(xs)))
        results[rank] = (value.detach(), *torch.autograd.grad(value, [fl, gl]))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank in range(world):
        value, gf, gg = results[rank]
        part = slice(rank * local, (rank + 1) * local)
        torch.testing.assert_close(value, naive.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gf / world, grad_f[part], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gg / world, grad_g[part], rtol=1e-10, atol=1e-12)


def test_teacher_file_holds_whole_parameters_and_is_read_back_in_another_slicing(tmp_path):
    """Written from 2 simulated ranks' padded flat partitions (ZeRO-3's layout), the file holds the whole
    parameters; 3 ranks slicing rows (FSDP2's layout) or flat ranges, and 1 rank, read back exactly their parts."""
    from safetensors.torch import load_file

    from engine.objectives.teacher_checkpoint import read_parts, write_whole

    gen = torch.Generator().manual_seed(0)
    whole = {"w": torch.randn(5, 3, generator=gen), "b": torch.randn(7, generator=gen), "s": torch.randn((), generator=gen)}

    def flat_partitions(rank, world):
        spans, parts = {}, {}
        for name, value in whole.items():
            size = -(-value.numel() // world)
            start = min(rank * size, value.numel())
            stop = min(start + size, value.numel())
            spans[name] = (start, stop, tuple(value.shape))
            parts[name] = torch.cat([value.reshape(-1)[start:stop], torch.full((size - (stop - start),), 7.0)])
        return spans, parts

    ranks = ThreadRanks(2)

    def write(rank):
        spans, parts = flat_partitions(rank, 2)
        write_whole(tmp_path / "teacher.safetensors", parts, spans, gather=ranks.collective(rank, torch.cat),
                    is_main=rank == 0, metadata={"kind": "wma"})

    threads = [threading.Thread(target=write, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = load_file(tmp_path / "teacher.safetensors")
    assert stored.keys() == whole.keys() and all(torch.equal(stored[n], whole[n]) for n in whole)
    def row_slices(rank, world):
        spans = {}
        for name, value in whole.items():
            rows, row = (value.shape[0], value[0].numel()) if value.ndim else (1, 1)
            first = min(rank * -(-rows // world), rows)
            spans[name] = (first * row, min(first + -(-rows // world), rows) * row, tuple(value.shape))
        return spans

    layouts = [row_slices(r, 3) for r in range(3)] + [flat_partitions(r, 3)[0] for r in range(3)]
    for spans in [*layouts, flat_partitions(0, 1)[0]]:
        like = {name: torch.empty(stop - start + 1) for name, (start, stop, _) in spans.items()}  # one padding entry
        parts = read_parts(tmp_path / "teacher.safetensors", spans, like)
        for name, (start, stop, _) in spans.items():
            assert torch.equal(parts[name][:stop - start], whole[name].reshape(-1)[start:stop]), (spans, name)
            assert parts[name][stop - start:].eq(0).all()


def teacher_job(shards, out, **run):
    return job(shards, out, loss={"terms": {"contrastive": 1.0, "wma_teacher": 0.5}},
               run={"epochs": 1, "save_every_steps": 2, "keep_last_n": 2, **run})


def test_teacher_in_training_is_the_plain_average_of_the_student_weights(shards, tmp_path):
    """beta = 1, every 2 steps: the teacher at the end is the mean of theta_0 (start of fine-tuning, after OSR)
    and the student after every second fine-tuning step; its term is logged."""
    trainer = Trainer(load_config(base={**teacher_job(shards, tmp_path), "teacher": {"beta": 1.0, "every_steps": 2}}))
    term = trainer.objective.term("wma_teacher")
    seen = []
    update = term.teacher.update

    def recording_update(student):
        seen.append({k: v.detach().clone() for k, v in student.items()})
        update(student)

    term.teacher.update = recording_update
    start = term.teacher.start

    def recording_start(student, *, num_updates):
        seen.append({k: v.detach().clone() for k, v in student.items()})
        start(student, num_updates=num_updates)

    term.teacher.start = recording_start
    trainer.tune()
    trainer.close()
    assert len(seen) == 1 + 6 // 2  # theta_0 and 3 updates (6 fine-tuning steps)
    for name, value in term.teacher.shards.items():
        expected = torch.stack([s[name] for s in seen]).double().mean(0).float()
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(term.teacher.shards["visual.proj"], seen[-1]["visual.proj"])  # not the student
    from engine.run.log import read_jsonl

    steps = [r for r in read_jsonl(tmp_path / "log.jsonl") if r.get("event") == "step" and r["stage"] == "finetune"]
    assert steps and all(math.isfinite(r["wma_teacher_loss"]) for r in steps)


def test_osr_with_the_teacher_recovers_the_same_moments_and_logs_zero(shards, tmp_path):
    """In OSR (weights frozen at w0) the teacher is the student: the term computes nothing and adds exactly no
    gradient, so the recovered moments equal those of the same job without it, bit for bit."""
    from engine.run.log import read_jsonl

    moments = {}
    for name, terms in (("plain", {"contrastive": 1.0}), ("teacher", {"contrastive": 1.0, "wma_teacher": 0.5})):
        trainer = Trainer(load_config(base=job(shards, tmp_path / name, loss={"terms": terms})))
        trainer.tune(finetune=False)
        moments[name] = trainer.backend.full_moments()
        trainer.close()
    assert moments["plain"].keys() == moments["teacher"].keys()
    for key, (m, v) in moments["plain"].items():
        assert torch.equal(m, moments["teacher"][key][0]) and torch.equal(v, moments["teacher"][key][1]), key
    osr = [r for r in read_jsonl(tmp_path / "teacher" / "log.jsonl") if r.get("event") == "step"]
    assert osr and all(r["stage"] == "osr" and r["wma_teacher_loss"] == 0.0 for r in osr)


@pytest.mark.parametrize("how", ["pointers", "copies"])
def test_shards_replaced_forwards_at_other_values_and_restores_the_student_bitwise(shards, tmp_path, how):
    """Inside `shards_replaced` the forward reads the given values (the single backend's pointer swap, and the
    default copies every other backend uses); afterwards the student's values and a pending backward are
    exactly as without it."""
    import copy

    from engine.backends.base import Backend
    from models import features_of

    trainer = Trainer(load_config(base=teacher_job(shards, tmp_path)))
    backend = trainer.backend
    batch = next(iter(trainer.loader.epoch(0)))
    student = {name: value.clone() for name, value in backend.parameter_shards().items()}
    gen = torch.Generator().manual_seed(0)
    other = {name: value + 0.05 * torch.randn(value.shape, generator=gen) for name, value in student.items()}
    reference = copy.deepcopy(backend.model)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name in other:
                param.copy_(other[name])
        expected = features_of(reference(batch.images, batch.texts))

    def gradients(replace: bool) -> dict:
        out = features_of(backend.forward(batch.images, batch.texts))
        if replace:
            replaced = backend.shards_replaced if how == "pointers" else lambda v: Backend.shards_replaced(backend, v)
            with replaced(other):
                at_other = features_of(backend.forward_no_grad(batch.images, batch.texts))
            assert all(torch.equal(a, b) for a, b in zip(at_other, expected))
        (out[0].square().sum() + out[1].sum()).backward()
        grads = {name: param.grad.clone() for name, param in backend.model.named_parameters() if param.grad is not None}
        backend.zero_grad()
        return grads

    plain, around = gradients(replace=False), gradients(replace=True)
    assert all(torch.equal(around[name], plain[name]) for name in plain) and around.keys() == plain.keys()
    assert all(torch.equal(value, student[name]) for name, value in backend.parameter_shards().items())
    trainer.close()


class Crash(RuntimeError):
    pass


def test_teacher_kill_and_resume_is_bitwise_equal_to_a_straight_run(shards, tmp_path):
    """Killed 2 steps into fine-tuning (a checkpoint then, one teacher update every 3 steps), resumed: weights and
    teacher bitwise as in a straight run."""
    from safetensors.torch import load_file

    def end_state(out):
        latest = max((out / "checkpoints").glob("step_*"))
        teacher = load_file(latest / "objective" / "wma_teacher" / "teacher.safetensors")
        return load_file(out / "final.safetensors"), teacher

    every_3 = {"teacher": {"every_steps": 3}}
    straight = Trainer(load_config(base={**teacher_job(shards, tmp_path / "a"), **every_3}))
    straight.tune()
    straight.close()
    crashed = Trainer(load_config(base={**teacher_job(shards, tmp_path / "b"), **every_3}))
    crash_after(crashed, 9, Crash("simulated failure"))  # 6 OSR steps, then 3 of fine-tuning
    with pytest.raises(Crash):
        crashed.tune()
    crashed.close()
    resumed = Trainer(load_config(base={**teacher_job(shards, tmp_path / "b", resume="latest"), **every_3}))
    assert resumed.global_step == 8 and resumed.objective.term("wma_teacher").num_steps == 2
    resumed.tune()
    resumed.close()
    for a, b in zip(end_state(tmp_path / "a"), end_state(tmp_path / "b")):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def tune_teacher(config: dict, stop_at: int | None = None) -> dict:
    """A run of `config` (every rank), stopped as by SIGTERM after global step `stop_at`. A finished run returns the
    number of elements of each of this rank's teacher shards and (rank 0) its final weights, the teacher file of its
    last checkpoint and its logged fine-tuning `wma_teacher_loss` values."""
    from safetensors.torch import load_file

    from engine.run.log import read_jsonl
    from engine.run.preemption import Preempted
    from tests.helpers.jobs import stop_after

    trainer = Trainer(load_config(base=config))
    stop_after(trainer, stop_at)
    try:
        trainer.tune()
    except Preempted:
        return {"finished": False}
    finally:
        trainer.close()
    shards = {name: shard.numel() for name, shard in trainer.objective.term("wma_teacher").teacher.shards.items()}
    if not trainer.ctx.is_main:
        return {"finished": True, "shard_numel": shards}
    out = Path(config["run"]["out_dir"])
    latest = max((out / "checkpoints").glob("step_*"))
    log = read_jsonl(out / "log.jsonl")
    losses = [r.get("wma_teacher_loss") for r in log if r.get("event") == "step" and r["stage"] == "finetune"]
    started = [r for r in log if r.get("event") == "teacher_started"][-1]
    return {"finished": True, "shard_numel": shards, "weights": load_file(out / "final.safetensors"),
            "teacher": load_file(latest / "objective" / "wma_teacher" / "teacher.safetensors"), "losses": losses,
            "bytes": (started["bytes_this_rank"], started["bytes_whole_fp32"])}


def tune_teachers(runs: list[dict]) -> list[dict]:
    """`tune_teacher(**run)` of each of `runs` in turn, in one launch."""
    return [tune_teacher(**run) for run in runs]


def full_batch_job(shards, out, **sections) -> dict:
    """A teacher job whose every global batch is the whole training set (48 pairs, 1 OSR step, 4 fine-tuning
    steps, a teacher update and a checkpoint after each): every step sees the same samples at any world size,
    so runs on 1 and 2 ranks differ only by float rounding (all terms are invariant to the order in a batch)."""
    config = teacher_job(shards, out, epochs=4, save_every_steps=1, log_every=1)
    return merge(config, data={"batch_size": 48, "shuffle_buffer": 48}, teacher={"every_steps": 1}, **sections)


# float32 rounding between 2 ranks and 1 (reduction orders differ), measured max |diff| of weights / teacher:
# FSDP2 1.5e-6 / 8e-7, ZeRO-3 3.7e-6 / 1.9e-6, ZeRO-2 1.8e-6 / 8.8e-7. Without the distillation's column-gradient
# all-reduce the weights differ by 2e-3; a ZeRO-3 teacher forward that reads stale gathered weights changes the
# logged term by > 1e-4 (relative).
TWO_RANKS_ATOL = 1e-5


def assert_close_to_one_rank(two: dict, one: dict, what: str) -> None:
    """`two` (2 ranks) equals `one` (1 rank) to TWO_RANKS_ATOL: whole runs (final weights, teacher)."""
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4), f"{what}: wma_teacher_loss"
    assert len(two["losses"]) == 4 and all(math.isfinite(v) for v in two["losses"]), what
    for kind in ("weights", "teacher"):
        mine, theirs = two[kind], one[kind]
        assert mine.keys() == theirs.keys(), (what, kind)
        worst = max((mine[k].double().reshape(-1) - theirs[k].double().reshape(-1)).abs().max().item()
                    for k in theirs)
        assert worst <= TWO_RANKS_ATOL, f"{what}: {kind} on 2 ranks differ from 1 rank by up to {worst:.3g}"


def assert_bitwise(resumed: dict, straight: dict, what: str) -> None:
    """A resumed run ended exactly where the straight one did (final weights, teacher)."""
    for kind in ("weights", "teacher"):
        assert resumed[kind].keys() == straight[kind].keys(), (what, kind)
        for key, value in straight[kind].items():
            assert torch.equal(resumed[kind][key], value), (what, kind, key)


def assert_sharded(ranks: list[dict], what: str) -> None:
    """Each rank's teacher holds a part of every parameter of more than one element, never all of it."""
    whole = ranks[0]["teacher"]
    assert len(ranks) == 2 and whole.keys() == ranks[1]["shard_numel"].keys(), what
    for name, value in whole.items():
        if value.numel() > 1:
            assert all(rank["shard_numel"][name] < value.numel() for rank in ranks), (what, name)
            assert sum(rank["shard_numel"][name] for rank in ranks) >= value.numel(), (what, name)


@pytest.mark.slow
def test_teacher_on_two_fsdp_ranks_equals_one_rank_is_sharded_and_resumes(shards, tmp_path):
    """2 FSDP2 ranks: weights and teacher end equal to a 1-rank run's (the same global batches: float32
    rounding), each rank's teacher holds its part of every parameter (never a full copy), a run stopped inside
    fine-tuning and resumed ends bitwise where the straight run ends, teacher included, and one resumed on 1 rank
    (the teacher's file read in other slices) ends where the straight run does, to float32 rounding."""
    import shutil

    from tests.helpers.harness import run_ranks

    def config(out, **run):
        return full_batch_job(shards, tmp_path / out, run={"backend": "fsdp", **run})

    ranks = run_ranks("tests.test_objectives_teacher:tune_teachers", world_size=2, runs=[
        {"config": config("a")}, {"config": config("b"), "stop_at": 3}])
    (first, stopped), first_rank1 = ranks[0], ranks[1][0]
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    resumed = run_ranks("tests.test_objectives_teacher:tune_teacher", world_size=2,
                        config=config("b", resume="latest"))[0]
    on_one_rank = run_ranks("tests.test_objectives_teacher:tune_teacher", world_size=1,
                            config=config("c", resume="latest"))[0]
    one = tune_teacher(full_batch_job(shards, tmp_path / "one"))
    assert not stopped["finished"]
    assert_sharded([first, first_rank1], "fsdp")
    assert_close_to_one_rank(first, one, "fsdp")
    assert_bitwise(resumed, first, "fsdp")
    assert_close_to_one_rank(on_one_rank, first, "fsdp resumed on 1 rank")


@pytest.mark.slow
def test_teacher_under_zero3_and_zero2_equals_one_rank_and_resumes_bitwise(shards, tmp_path):
    """2 DeepSpeed ranks, ZeRO-3 (matrices partitioned, small parameters persistent) and ZeRO-2 (replicated):
    weights, teacher and logged term equal to a 1-rank run's; ZeRO-3's teacher holds each rank's partitions
    only; runs stopped inside fine-tuning and resumed end bitwise where the straight runs end."""
    import json

    from models import build_model, export_weights
    from tests.helpers.harness import ROOT, run_ranks

    base = tmp_path / "base.safetensors"  # ZeRO-3 initialises partitioned (other random values): start from a file
    export_weights(build_model("tiny-vit", seed=0).model, base)
    zero3 = json.loads((ROOT / "zero_configs" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 1000  # blocks' biases and norms persist
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))

    def config(out, stage, **run):
        zero_config = str(tmp_path / "zero3.json") if stage == 3 else str(ROOT / "zero_configs" / "zero2.json")
        return full_batch_job(shards, tmp_path / out, run={"backend": "deepspeed", "zero_config": zero_config, **run},
                              model={"weights": str(base)})

    ranks = run_ranks("tests.test_objectives_teacher:tune_teachers", world_size=2, runs=[
        {"config": config("z3", 3)}, {"config": config("z3b", 3), "stop_at": 3},
        {"config": config("z2", 2)}, {"config": config("z2b", 2), "stop_at": 3}])
    (z3, z3_stopped, z2, z2_stopped), z3_rank1 = ranks[0], ranks[1][0]
    z3_resumed, z2_resumed = run_ranks("tests.test_objectives_teacher:tune_teachers", world_size=2, runs=[
        {"config": config("z3b", 3, resume="latest")}, {"config": config("z2b", 2, resume="latest")}])[0]
    one = tune_teacher(full_batch_job(shards, tmp_path / "one", model={"weights": str(base)}))
    assert not z3_stopped["finished"] and not z2_stopped["finished"]
    assert_sharded([z3, z3_rank1], "zero3")
    # The logged cost: one rank holds the whole fp32 teacher; a ZeRO-3 rank about half of it (+ persistent ones).
    assert one["bytes"][0] == one["bytes"][1] == z2["bytes"][0] == z3["bytes"][1]
    assert 0.5 * z3["bytes"][1] <= z3["bytes"][0] < 0.6 * z3["bytes"][1]
    assert_close_to_one_rank(z3, one, "zero3")
    assert_close_to_one_rank(z2, one, "zero2")
    assert_bitwise(z3_resumed, z3, "zero3")
    assert_bitwise(z2_resumed, z2, "zero2")
