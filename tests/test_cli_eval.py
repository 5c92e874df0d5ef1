"""`run.py eval` in-process: a model file on CSV tasks with no training data; its table, JSON and errors."""

import json
import re

import pytest
import torch
import yaml

from engine.cli import main
from engine.demo.synthetic import render_retrieval_task, render_zeroshot_task
from engine.evaluate import Evaluator, RetrievalTask, ZeroShotTask
from models import build_model, export_weights


@pytest.fixture(scope="module")
def task_specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_tasks")
    zs_csv, classnames, templates = render_zeroshot_task(folder, num_per_class=2, seed=0)
    rt_csv = render_retrieval_task(folder, num_images=12, seed=0)
    return {
        "zeroshot": [{"name": "shapes", "csv": str(zs_csv), "classnames": str(classnames),
                      "templates": str(templates)}],
        "retrieval": [{"name": "pairs", "csv": str(rt_csv)}],
    }


def direct_results(task_specs, **model_args):
    bundle = build_model("tiny-vit", **model_args)
    (zs,), (rt,) = task_specs["zeroshot"], task_specs["retrieval"]
    tasks = [ZeroShotTask.from_csv(zs["csv"], zs["classnames"], zs["templates"], name=zs["name"]),
             RetrievalTask.from_csv(rt["csv"], name=rt["name"])]
    return Evaluator(tasks, batch_size=128)(bundle.model, bundle.tokenizer, bundle.eval_transform)


def printed_rows(stdout: str) -> dict[tuple[str, str], str]:
    lines = stdout.splitlines()
    assert lines[0].split() == ["task", "metric", "value"]
    return {(task, metric): value for task, metric, value in (line.split() for line in lines[1:] if line.strip()
                                                             and not line.startswith("wrote "))}


def tree(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_eval_a_run_folder_with_a_task_file_and_no_training_data(task_specs, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000010").mkdir(parents=True)  # a run folder with checkpoints is no obstacle
    weights = run / "final.safetensors"
    export_weights(build_model("tiny-vit", seed=7).model, weights)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump(task_specs))
    before = tree(run)
    out = tmp_path / "out"

    assert main(["eval", "--model", "tiny-vit", "--weights", str(run), "--tasks", str(tasks),
                 "--out", str(out)]) == 0
    stdout = capsys.readouterr().out

    assert tree(run) == before  # the run folder is read, never written
    expected = direct_results(task_specs, weights=weights)
    average = (expected["shapes"]["acc1"] + expected["pairs"]["mean_recall@1"]) / 2
    assert printed_rows(stdout) == {
        **{(task, metric): f"{value:.4f}" for task, metrics in expected.items() for metric, value in metrics.items()},
        ("aggregate", "retrieval"): f"{expected['pairs']['mean_recall@1']:.4f}",
        ("aggregate", "average"): f"{average:.4f}",
    }
    records = json.loads((out / "eval_results.json").read_text())
    assert {r["dataset"]: r["metrics"] for r in records} == expected  # exact: same weights, same computation
    assert [(r["model"], r["pretrained"], r["task"]) for r in records] == [
        ("tiny-vit", str(weights), "zeroshot_classification"), ("tiny-vit", str(weights), "zeroshot_retrieval")
    ]
    lines = [json.loads(line) for line in (out / "eval_results.jsonl").read_text().splitlines()]
    assert [(r["key"], r["dataset"], r["main_metric"]) for r in lines] == [
        ("shapes", "shapes", expected["shapes"]["acc1"]), ("pairs", "pairs", expected["pairs"]["mean_recall@1"])]
    assert lines[0]["metrics"] == {**expected["shapes"], "main_metric": expected["shapes"]["acc1"]}
    assert json.loads((out / "eval_aggregates.json").read_text()) == pytest.approx(
        {"retrieval": expected["pairs"]["mean_recall@1"], "average": average})
    assert f"wrote {out / 'eval_results.json'}" in stdout
    # Different weights give different numbers, so the comparison above can fail.
    assert direct_results(task_specs, seed=0) != expected


def test_eval_tasks_from_set_with_random_weights_and_no_out(task_specs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    retrieval = json.dumps(task_specs["retrieval"])  # YAML flow syntax
    assert main(["eval", "--model", "tiny-vit", "--set", f"eval.retrieval={retrieval}",
                 "--set", f"eval.zeroshot={json.dumps(task_specs['zeroshot'])}", "--set", "run.seed=3"]) == 0
    expected = direct_results(task_specs, seed=3)
    assert printed_rows(capsys.readouterr().out)[("pairs", "mean_recall@1")] == \
        f"{expected['pairs']['mean_recall@1']:.4f}"
    assert list(tmp_path.iterdir()) == []  # nothing written without --out


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        ({"retrieval": [{"name": "gone", "csv": "missing/pairs.csv"}]},
         # checked with the config, before torch or the model load
         r"^error: invalid configuration:\n  - eval\.retrieval\[0\] 'gone': csv missing/pairs\.csv does not exist"),
        ({}, r"^error: no evaluation tasks: "),
    ],
)
def test_eval_bad_input_is_one_error_line(tmp_path, capsys, specs, match):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"eval": specs, "model": {"name": "tiny-vit"}}))
    assert main(["eval", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len([line for line in lines if line.startswith("error: ")]) == 1 and len(lines) <= 2
    assert re.match(match, captured.err)
    assert not (tmp_path / "out").exists()


class _Job:
    """The train_state part of a checkpoint: what run wrote it."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def test_eval_a_checkpoint_folder_reads_its_weights_and_writes_nothing(task_specs, tmp_path, capsys):
    """`--weights runs/x/checkpoints/step_N` (written here by the single backend through the checkpoint manager;
    the DeepSpeed and FSDP2 folders are exported in tests/test_launch.py)."""
    from engine.backends.single import SingleProcessBackend
    from engine.checkpoint import CheckpointManager
    from engine.config import JobConfig
    from engine.distributed import DistContext

    backend = SingleProcessBackend(build_model("tiny-vit", seed=7).model, device=torch.device("cpu"),
                                   betas=(0.9, 0.98), weight_decay=0.1, eps=1e-6)
    job = _Job({"model": "tiny-vit", "config": JobConfig().to_dict()})
    step = CheckpointManager(tmp_path / "run" / "checkpoints", DistContext(),
                             parts={"train_state": job, "backend": backend}).save(10)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump(task_specs))
    before = tree(tmp_path / "run")
    assert main(["eval", "--model", "tiny-vit", "--weights", str(step), "--tasks", str(tasks)]) == 0
    expected = direct_results(task_specs, seed=7)
    assert printed_rows(capsys.readouterr().out)[("shapes", "acc1")] == f"{expected['shapes']['acc1']:.4f}"
    # The `latest` pointer means the newest complete checkpoint, as for --resume latest.
    latest = tmp_path / "run" / "checkpoints" / "latest"
    assert main(["eval", "--model", "tiny-vit", "--weights", str(latest), "--tasks", str(tasks)]) == 0
    assert printed_rows(capsys.readouterr().out)[("shapes", "acc1")] == f"{expected['shapes']['acc1']:.4f}"
    assert tree(tmp_path / "run") == before
    assert direct_results(task_specs, seed=0)["shapes"] != expected["shapes"]  # other weights, other numbers

    assert main(["eval", "--model", "ViT-B-32", "--weights", str(step), "--tasks", str(tasks)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --weights {step} is a checkpoint of model 'tiny-vit', "
                                               "not 'ViT-B-32'; pass --model tiny-vit")
