"""Evaluator: caching and modes, a tiny open_clip model against a naive computation, results files."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine.demo.synthetic import render_retrieval_task, render_zeroshot_task
from engine.evaluate import (
    Evaluator,
    RetrievalTask,
    ZeroShotTask,
    headline_metric,
    results_table,
    write_results,
)
from models import build_model
from tests.helpers.eval_fixtures import IdTransform, naive_retrieval, naive_zero_shot, retrieval_fixture, unit

# ---------------------------------------------------------------------------- the evaluator


def test_evaluator_streams_images_each_call_and_restores_each_module_mode(tmp_path):
    rng = np.random.default_rng(4)
    image_features, caption_features = rng.normal(size=(6, 8)), rng.normal(size=(7, 8))
    caption_to_image = [0, 1, 2, 3, 4, 5, 5]
    task, model, tokenizer = retrieval_fixture(tmp_path, image_features, caption_features, caption_to_image)
    transform = IdTransform()
    evaluator = Evaluator([task], batch_size=4)
    model.train()
    model.head.eval()
    first = evaluator(model, tokenizer, transform)
    second = evaluator(model, tokenizer, transform)
    assert transform.num_calls == 12  # nothing is cached: every call decodes the images again
    expected = naive_retrieval(unit(caption_features) @ unit(image_features).T, caption_to_image)
    assert first == second
    assert first["ret"] == pytest.approx(expected)
    assert expected["image_retrieval_recall@1"] < 1  # random features: not every metric is trivially 1
    assert model.training and not model.head.training
    assert model.seen_modes and set(model.seen_modes) == {(False, False, False)}
    assert set(evaluator.seconds) == {"ret"} and evaluator.seconds["ret"] > 0


def test_evaluator_rejects_duplicate_names_bad_batch_size_and_non_tasks(tmp_path):
    task, _, _ = retrieval_fixture(tmp_path, np.eye(2), np.eye(2), [0, 1])
    with pytest.raises(ValueError, match=r"\['ret'\].*batch_size must be greater than 0"):
        Evaluator([task, task], batch_size=0)
    with pytest.raises(ValueError, match="task 1 is a dict, not an EvalTask"):
        Evaluator([task, {"name": "x"}])
    with pytest.raises(ValueError, match="tasks is empty"):
        Evaluator([])


# ---------------------------------------------------------------------------- tiny open_clip model


@pytest.fixture(scope="module")
def tiny_clip():
    bundle = build_model("tiny-vit", seed=0)
    return bundle.model, bundle.tokenizer, bundle.eval_transform


@pytest.fixture(scope="module")
def synthetic_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    zeroshot = ZeroShotTask.from_csv(*render_zeroshot_task(folder, num_per_class=2, seed=0))
    retrieval_task = RetrievalTask.from_csv(render_retrieval_task(folder, num_images=24, seed=0))
    return zeroshot, retrieval_task


def one_by_one(encode, inputs) -> np.ndarray:
    return unit(np.stack([encode(x[None])[0].double().numpy() for x in inputs]))


@pytest.mark.parametrize("batch_size", [5, 64])
def test_tiny_clip_metrics_match_naive_computation(tiny_clip, synthetic_tasks, batch_size):
    model, tokenizer, transform = tiny_clip
    zeroshot_task, retrieval_task = synthetic_tasks
    model.train()
    results = Evaluator([zeroshot_task, retrieval_task], batch_size=batch_size)(model, tokenizer, transform)
    assert model.training

    model.eval()
    with torch.no_grad():
        load = [transform(Image.open(p).convert("RGB")) for p in zeroshot_task.image_paths]
        image_features = one_by_one(model.encode_image, load)
        classifier = []
        for c in zeroshot_task.classnames:
            prompts = tokenizer([t.replace("{c}", c) for t in zeroshot_task.templates])
            classifier.append(unit(one_by_one(model.encode_text, prompts).mean(axis=0)))
        logits = image_features @ np.stack(classifier).T
        expected_zeroshot = naive_zero_shot(logits, zeroshot_task.labels)

        load = [transform(Image.open(p).convert("RGB")) for p in retrieval_task.image_paths]
        image_features = one_by_one(model.encode_image, load)
        text_features = one_by_one(model.encode_text, tokenizer(retrieval_task.captions))
        expected_retrieval = naive_retrieval(text_features @ image_features.T, retrieval_task.caption_to_image)
    model.train()

    # Rankings can only flip where two classes score within float32 noise; make sure none is that close.
    top2 = np.sort(logits, axis=1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-5
    assert results[zeroshot_task.name] == pytest.approx(expected_zeroshot)
    assert results[retrieval_task.name] == pytest.approx(expected_retrieval)
    assert 0 < results[zeroshot_task.name]["acc1"] < 1  # a random model: the test can tell labels apart


# ---------------------------------------------------------------------------- results


RESULTS = {
    "synthetic-zeroshot": {"acc1": 0.5, "acc5": 0.75, "mean_per_class_recall": 0.25},
    "synthetic-retrieval": {"image_retrieval_recall@1": 0.125, "text_retrieval_recall@1": 0.375},
}


def test_write_results_writes_clip_benchmark_records_atomically(tmp_path):
    path = tmp_path / "out" / "results.json"
    path.parent.mkdir()
    path.write_text("stale")
    assert write_results(path, RESULTS, model_name="ViT-B-32", pretrained="tuned.pt") == path
    records = json.loads(path.read_text())
    assert records == [
        {
            "dataset": "synthetic-zeroshot",
            "model": "ViT-B-32",
            "pretrained": "tuned.pt",
            "task": "zeroshot_classification",
            "metrics": RESULTS["synthetic-zeroshot"],
            "language": "en",
        },
        {
            "dataset": "synthetic-retrieval",
            "model": "ViT-B-32",
            "pretrained": "tuned.pt",
            "task": "zeroshot_retrieval",
            "metrics": RESULTS["synthetic-retrieval"],
            "language": "en",
        },
    ]
    assert list(records[0]) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_write_results_keeps_old_file_when_metrics_are_not_serialisable(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(ValueError):
        write_results(path, {"t": {"acc1": math.nan}}, model_name="m", pretrained="p")
    with pytest.raises(ValueError, match="cannot tell its task kind"):
        write_results(path, {"t": {"loss": 1.0}}, model_name="m", pretrained="p")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_headline_metric_picks_task_metric_and_lists_keys_when_missing():
    assert headline_metric(RESULTS, "synthetic-zeroshot/acc1") == 0.5
    assert headline_metric(RESULTS, "synthetic-retrieval/text_retrieval_recall@1") == 0.375
    with pytest.raises(ValueError, match=r"'synthetic-zeroshot/acc10' not found.*synthetic-zeroshot/acc5"):
        headline_metric(RESULTS, "synthetic-zeroshot/acc10")
    with pytest.raises(ValueError, match="synthetic-retrieval/image_retrieval_recall@1"):
        headline_metric(RESULTS, "acc1")


def test_results_table_has_one_aligned_row_per_metric():
    lines = results_table(RESULTS).splitlines()
    assert lines[0].split() == ["task", "metric", "value"]
    assert [line.split() for line in lines[1:]] == [
        [task, metric, f"{value:.4f}"] for task, metrics in RESULTS.items() for metric, value in metrics.items()
    ]
    assert len({line.index(line.split()[1]) for line in lines}) == 1  # metric column aligned
