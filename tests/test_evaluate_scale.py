"""Evaluation at scale: who reads which sample, clip_benchmark's layout, open_clip's built-in lists,
2 ranks against 1, a slow rank, and evaluation at epoch ends during training."""

import itertools
import json

import pytest
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from engine.config import EvalConfig, load_config
from engine.demo.synthetic import render_retrieval_task, render_zeroshot_task
from engine.evaluate import Evaluator, RetrievalTask, ZeroShotTask, build_tasks
from engine.evaluate.sources import Part, list_plan, shard_plan
from engine.evaluate.tasks import read_classnames, read_templates
from engine.trainer import Trainer
from models import build_model
from tests.helpers.eval_fixtures import clip_benchmark_copies
from tests.helpers.harness import run_ranks
from tests.helpers.jobs import job


@pytest.mark.parametrize(("num_shards", "world_size", "num_workers"),
                         [(1, 2, 2), (3, 2, 2), (5, 2, 2), (8, 2, 3), (2, 3, 1), (4, 1, 2)])
def test_every_sample_is_read_by_exactly_one_rank_and_worker(num_shards, world_size, num_workers):
    shard_sizes = [7, 3, 5, 6, 1, 4, 9, 2][:num_shards]
    owners = {}
    for rank, worker in itertools.product(range(world_size), range(num_workers)):
        shards, keep = shard_plan(num_shards, Part(rank, world_size, worker, num_workers))
        for shard in shards:
            for pos in filter(keep, range(shard_sizes[shard])):
                assert (shard, pos) not in owners, f"({shard}, {pos}) read by {owners[(shard, pos)]} and {rank, worker}"
                owners[(shard, pos)] = (rank, worker)
        rows = list_plan(23, Part(rank, world_size, worker, num_workers))
        owners.update({("csv", i): (rank, worker) for i in rows})
    assert set(owners) == {(s, p) for s in range(num_shards) for p in range(shard_sizes[s])} | {
        ("csv", i) for i in range(23)}
    assert sum(1 for key in owners if key[0] == "csv") == 23  # no row given to two parts
    if num_shards >= world_size * num_workers:  # enough shards: each part opens only its own
        assert len({owners[(s, 0)] for s in range(num_shards)}) == world_size * num_workers


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A zero-shot and a retrieval CSV task, and the specs of both as CSV and clip_benchmark tasks."""
    folder = tmp_path_factory.mktemp("scale")
    zs_csv, classnames, templates = render_zeroshot_task(folder, num_per_class=1, seed=1)
    rt_csv = render_retrieval_task(folder, num_images=16, seed=1)
    zeroshot = ZeroShotTask.from_csv(zs_csv, classnames, templates, name="zs")
    retrieval = RetrievalTask.from_csv(rt_csv, name="ret")
    specs = clip_benchmark_copies(zeroshot, retrieval, folder / "clip_benchmark")
    specs["zeroshot"].insert(0, {"name": "zs", "csv": str(zs_csv), "classnames": str(classnames),
                                 "templates": str(templates)})
    specs["retrieval"].insert(0, {"name": "ret", "csv": str(rt_csv)})
    return zeroshot, retrieval, specs


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny-vit", seed=0)


def test_clip_benchmark_layout_gives_the_numbers_of_the_same_images_from_csv(tasks, tiny):
    zeroshot, retrieval, specs = tasks
    from_csv = Evaluator([zeroshot, retrieval], batch_size=7)(tiny.model, tiny.tokenizer, tiny.eval_transform)
    wds_tasks = build_tasks(EvalConfig(zeroshot=specs["zeroshot"][1:], retrieval=specs["retrieval"][1:]))
    assert wds_tasks[0].classnames == zeroshot.classnames and wds_tasks[0].templates == zeroshot.templates
    from_wds = Evaluator(wds_tasks, batch_size=5, num_workers=2)(tiny.model, tiny.tokenizer, tiny.eval_transform)
    assert from_wds == {"zs_wds": from_csv["zs"], "ret_wds": from_csv["ret"]}
    assert 0 < from_csv["ret"]["image_retrieval_recall@5"] < 1  # not trivially 0 or 1


def test_imagenet_names_and_openai_templates_come_from_open_clip(tmp_path):
    assert read_classnames("imagenet1k") == list(IMAGENET_CLASSNAMES)
    templates = read_templates("openai")
    assert [t.replace("{c}", "dog") for t in templates] == [t("dog") for t in OPENAI_IMAGENET_TEMPLATES]
    assert len(templates) == 80


def test_clip_benchmark_problems_name_the_file(tasks, tmp_path):
    _, _, specs = tasks
    with pytest.raises(ValueError, match=r"eval\.zeroshot\[0\] 'x': .*/zs/train: no such folder"):
        build_tasks(EvalConfig(zeroshot=[{**specs["zeroshot"][1], "name": "x", "split": "train"}]))
    with pytest.raises(ValueError, match=r"dataset_type\.txt says retrieval, but the task is listed under "
                                         r"eval\.zeroshot"):
        build_tasks(EvalConfig(zeroshot=[{"name": "r", "clip_benchmark": specs["retrieval"][1]["clip_benchmark"]}]))
    with pytest.raises(ValueError, match=r"give exactly one of csv, wds, clip_benchmark"):
        build_tasks(EvalConfig(retrieval=[{"name": "r", "csv": "a.csv", "wds": "b"}]))


def test_two_ranks_give_the_one_rank_numbers_and_a_slow_rank_does_not_time_out(tasks, tiny):
    """Rank 1 spends longer than the 10 s process-group timeout evaluating; rank 0 must never wait that long."""
    _, _, specs = tasks
    one = Evaluator(build_tasks(EvalConfig(**specs)), batch_size=4)(tiny.model, tiny.tokenizer, tiny.eval_transform)
    # 16 retrieval + 30 zero-shot images per set, 2 ranks, batch 4: rank 1 sleeps 1.2 s before each of its 11 image batches.
    ranks = run_ranks("tests.helpers.dist_cases_eval:evaluate_ranks", world_size=2, specs=specs, batch_size=4,
                      num_workers=1, timeout_s=10, slow_rank=1, delay_s=1.2)
    assert [r["results"] for r in ranks] == [one, one]
    assert ranks[1]["seconds"] > 10  # the slow rank alone outlasts the timeout...
    assert ranks[0]["longest_wait"] < 5  # ...yet rank 0 never sits in one collective for long


def test_finetuning_evaluates_at_every_epoch_end_in_bf16(shards, tasks, tmp_path):
    _, retrieval, _ = tasks
    csv = retrieval.image_paths[0].parent.parent / "synthetic-retrieval.csv"
    cfg = load_config(base=job(shards, tmp_path / "run", method="fastclip", model={"precision": "bf16"},
                               eval={"retrieval": [{"name": "ret", "csv": str(csv)}], "num_workers": 1},
                               run={"epochs": 2, "max_steps_per_epoch": 2}))
    trainer = Trainer(cfg)
    try:
        trainer.tune()
    finally:
        trainer.close()
    evals = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "eval"]
    assert [(r["stage"], r["step"]) for r in evals] == [("finetune", 2), ("finetune", 4)]
    assert all(set(r["seconds"]) == {"ret"} and r["seconds"]["ret"] > 0 for r in evals)
    assert evals[0]["results"] != evals[1]["results"]  # the weights moved between the two epoch ends


def test_bf16_weights_get_bf16_images(tasks):
    """DeepSpeed bf16 holds bf16 weights: images are cast to the weights' dtype (fp32 images would raise)."""
    _, retrieval, _ = tasks
    bundle = build_model("tiny-vit", seed=0)
    fp32 = Evaluator([retrieval], batch_size=8)(bundle.model, bundle.tokenizer, bundle.eval_transform)
    bf16 = Evaluator([retrieval], batch_size=8)(bundle.model.to(torch.bfloat16), bundle.tokenizer,
                                                bundle.eval_transform)
    assert bf16["ret"] == pytest.approx(fp32["ret"], abs=0.2)  # same model, rounded weights
