"""Tasks: metrics against naive references, scoring from fixed features, CSV loaders, build_tasks."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.config import EVAL_METRICS, EvalConfig
from engine.demo.synthetic import render_retrieval_task, render_zeroshot_task
from engine.evaluate import EvalTask, RetrievalTask, ZeroShotTask, build_tasks
from engine.evaluate.tasks import (
    DEFAULT_TEMPLATES,
    retrieval_metrics,
    retrieval_metrics_blockwise,
    zero_shot_metrics,
)
from tests.helpers.eval_fixtures import (
    naive_retrieval,
    naive_zero_shot,
    retrieval_fixture,
    unit,
    zero_shot_fixture,
)


def score(task, model, tokenizer, image_features, *, batch_size=64):
    features = F.normalize(torch.as_tensor(np.asarray(image_features), dtype=torch.float32), dim=-1)
    with torch.no_grad():
        return task.score(model, tokenizer, features, batch_size=batch_size, device="cpu")


# ---------------------------------------------------------------------------- pure metrics


def test_zero_shot_metrics_match_naive_on_random_imbalanced_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 7))
    labels = list(rng.choice(7, size=60, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05]))
    got = zero_shot_metrics(torch.tensor(logits), torch.tensor(labels))
    assert got == pytest.approx(naive_zero_shot(logits, labels))
    assert tuple(got) == EVAL_METRICS["zeroshot"]  # the names the config checks metric names against


def test_zero_shot_metrics_cap_top5_at_number_of_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2]])
    got = zero_shot_metrics(logits, torch.tensor([0, 0]))
    assert got == pytest.approx({"acc1": 0.5, "acc5": 1.0, "mean_per_class_recall": 0.5})


def test_retrieval_metrics_match_naive_with_multiple_captions_per_image():
    rng = np.random.default_rng(1)
    num_images = 14
    caption_to_image = list(range(num_images)) + list(rng.integers(0, num_images, size=20))
    similarity = rng.normal(size=(len(caption_to_image), num_images))
    got = retrieval_metrics(torch.tensor(similarity), torch.tensor(caption_to_image))
    assert got == pytest.approx(naive_retrieval(similarity, caption_to_image))
    assert tuple(got) == EVAL_METRICS["retrieval"]


@pytest.mark.parametrize(("num_images", "block"), [(40, 7), (40, 1024), (3, 2), (50, 3)])
def test_blockwise_retrieval_metrics_equal_the_full_matrix_ones(num_images, block):
    """Blocks of captions (a last block of one, k above the number of candidates included) give the same numbers
    as ranking the whole captions x images matrix."""
    rng = np.random.default_rng(num_images + block)
    caption_to_image = torch.tensor(list(range(num_images)) + list(rng.integers(0, num_images, size=2 * num_images)))
    images = F.normalize(torch.tensor(rng.normal(size=(num_images, 16)), dtype=torch.float32), dim=-1)
    texts = F.normalize(images[caption_to_image] + 0.8 * torch.randn(len(caption_to_image), 16,
                                                                   generator=torch.Generator().manual_seed(0)), dim=-1)
    got = retrieval_metrics_blockwise(texts, images, caption_to_image, block=block)
    want = retrieval_metrics(texts @ images.t(), caption_to_image)
    assert got == want
    assert 0 < got["mean_recall@1"] < 1


# ---------------------------------------------------------------------------- scoring fixed features


def test_zero_shot_is_perfect_when_image_features_equal_class_text(tmp_path):
    rng = np.random.default_rng(2)
    class_features = unit(rng.normal(size=(4, 8)))
    labels = [0, 1, 2, 3, 1, 2]
    task, model, tokenizer = zero_shot_fixture(
        tmp_path, class_features[labels], labels, [[f, 2.0 * f] for f in class_features]
    )
    got = score(task, model, tokenizer, 3.0 * class_features[labels], batch_size=4)
    assert got == pytest.approx({"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0})


def test_mean_per_class_recall_differs_from_acc1_on_imbalanced_classes(tmp_path):
    e = np.eye(4)
    labels = [0, 0, 0, 1, 2]
    # The class-1 image looks like class 0: acc1 = 4/5, per-class recalls (1, 0, 1) -> 2/3.
    task, model, tokenizer = zero_shot_fixture(tmp_path, e, labels, [[e[c]] for c in range(3)])
    got = score(task, model, tokenizer, e[[0, 0, 0, 0, 2]], batch_size=2)
    assert got == pytest.approx({"acc1": 0.8, "acc5": 1.0, "mean_per_class_recall": 2 / 3})


def test_classifier_normalises_template_embeddings_before_averaging(tmp_path):
    # Class 0 mixes a long and a short template vector: averaged after normalising it points
    # along (1, 1, 0) like the image; averaged raw it leans to x and class 1 would win.
    class_templates = [[[10.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 0.6, 0.0], [1.0, 0.6, 0.0]]]
    task, model, tokenizer = zero_shot_fixture(tmp_path, [[1.0, 1.0, 0.0]], [0], class_templates)
    assert score(task, model, tokenizer, [[1.0, 1.0, 0.0]])["acc1"] == 1.0


@pytest.mark.parametrize("batch_size", [1, 3, 6, 100])
def test_zero_shot_matches_naive_classifier_for_any_text_batch(tmp_path, batch_size):
    rng = np.random.default_rng(5)
    class_templates = rng.normal(size=(7, 3, 16))
    image_features = rng.normal(size=(20, 16))
    labels = list(rng.integers(0, 7, size=20))
    task, model, tokenizer = zero_shot_fixture(tmp_path, image_features, labels, class_templates)
    classifier = unit(unit(class_templates).mean(axis=1))
    expected = naive_zero_shot(unit(image_features) @ classifier.T, labels)
    assert score(task, model, tokenizer, image_features, batch_size=batch_size) == pytest.approx(expected)
    # All templates of a class share a forward pass; no pass exceeds batch_size unless one class must.
    assert all(n % 3 == 0 and n <= max(batch_size, 3) for n in model.text_batch_sizes)


def test_templates_are_filled_by_replace_so_other_braces_stay(tmp_path):
    templates = ["a {c} {x}", "{c} as JSON: {}"]
    task, model, tokenizer = zero_shot_fixture(
        tmp_path, [[1.0, 0.0]], [0], [[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]], templates=templates
    )
    assert "a class0 {x}" in tokenizer.ids and "class1 as JSON: {}" in tokenizer.ids
    assert score(task, model, tokenizer, [[1.0, 0.0]])["acc1"] == 1.0  # unknown prompts would raise KeyError


def test_retrieval_is_perfect_when_captions_match_their_image(tmp_path):
    rng = np.random.default_rng(3)
    image_features = rng.normal(size=(5, 16))
    caption_to_image = [0, 0, 1, 2, 3, 3, 4]
    caption_features = image_features[caption_to_image] + 0.01 * rng.normal(size=(7, 16))
    task, model, tokenizer = retrieval_fixture(tmp_path, image_features, caption_features, caption_to_image)
    got = score(task, model, tokenizer, image_features, batch_size=3)
    assert all(v == 1.0 for v in got.values())
    assert set(got) == {
        *(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)),
        "mean_recall@1",
    }
    assert model.text_batch_sizes == [3, 3, 1]


def test_retrieval_with_swapped_captions_gives_half_recall_at_1(tmp_path):
    e = np.eye(4)
    # Captions of images 2 and 3 describe each other's image.
    task, model, tokenizer = retrieval_fixture(tmp_path, e, e[[0, 1, 3, 2]], [0, 1, 2, 3])
    got = score(task, model, tokenizer, e)
    assert got["image_retrieval_recall@1"] == 0.5
    assert got["text_retrieval_recall@1"] == 0.5
    assert got["mean_recall@1"] == 0.5
    assert got["image_retrieval_recall@5"] == got["text_retrieval_recall@10"] == 1.0


def test_text_retrieval_counts_any_caption_of_the_image(tmp_path):
    e = np.eye(3)
    caption_features = [[0.6, 0.0, 0.8], [1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.3, 0.0, 1.0]]
    caption_to_image = [0, 0, 1, 2]
    task, model, tokenizer = retrieval_fixture(tmp_path, e, caption_features, caption_to_image)
    got = score(task, model, tokenizer, e)
    # Caption 0 is closer to image 2; image 0's best caption is its second one, which counts.
    assert got["image_retrieval_recall@1"] == 0.75
    assert got["text_retrieval_recall@1"] == 1.0
    assert got["mean_recall@1"] == 0.875


def test_tasks_yield_rgb_images_in_path_order_and_satisfy_the_protocol(tmp_path):
    task, _, _ = retrieval_fixture(tmp_path, np.eye(3), np.eye(3), [0, 1, 2])
    Image.new("L", (4, 4), 7).save(task.image_paths[1])  # a greyscale file comes back as RGB
    images = list(task.images())
    assert [image.mode for image in images] == ["RGB"] * 3
    assert [image.getpixel((0, 0)) for image in images] == [(0, 0, 0), (7, 7, 7), (2, 0, 0)]
    assert isinstance(task, EvalTask)


# ---------------------------------------------------------------------------- CSV loaders


def write_images(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(folder / name)


def test_zero_shot_from_csv_reads_labels_as_indices_or_names(tmp_path):
    write_images(tmp_path, ["img/a.png", "img/b.png"])
    (tmp_path / "classes.txt").write_text("cat\ndog\n\n")
    (tmp_path / "by_index.csv").write_text("filepath,label\nimg/a.png,1\nimg/b.png,0\n")
    (tmp_path / "by_name.csv").write_text("filepath,label\nimg/a.png,dog\nimg/b.png,cat\n")
    (tmp_path / "templates.txt").write_text("a {c}.\nthe {c}\n")
    by_index = ZeroShotTask.from_csv(tmp_path / "by_index.csv", tmp_path / "classes.txt")
    by_name = ZeroShotTask.from_csv(
        tmp_path / "by_name.csv", tmp_path / "classes.txt", tmp_path / "templates.txt"
    )
    assert by_index.labels == by_name.labels == [1, 0]
    assert by_index.image_paths == [tmp_path / "img/a.png", tmp_path / "img/b.png"]
    assert by_index.classnames == ["cat", "dog"]
    assert by_index.name == "by_index"
    assert by_index.templates == list(DEFAULT_TEMPLATES)
    assert by_name.templates == ["a {c}.", "the {c}"]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ("img/a.png,cat\nimg/a.png,bird\n", r"bad\.csv:3: unknown class 'bird'"),
        ("img/a.png,0\nimg/a.png,2\n", r"bad\.csv:3: label 2 is out of range"),
        ("img/a.png,0\nimg/missing.png,1\n", r"bad\.csv:3: image 'img/missing.png' not found"),
    ],
)
def test_zero_shot_from_csv_names_file_and_line_of_bad_rows(tmp_path, rows, match):
    write_images(tmp_path, ["img/a.png"])
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "bad.csv").write_text("filepath,label\n" + rows)
    with pytest.raises(ValueError, match=match):
        ZeroShotTask.from_csv(tmp_path / "bad.csv", tmp_path / "classes.txt")


def test_task_loaders_reject_bad_header_templates_and_missing_files(tmp_path):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "classes.txt").write_text("cat\n")
    (tmp_path / "templates.txt").write_text("a {c}\na photo\n")
    (tmp_path / "ok.csv").write_text("filepath,label\na.png,0\n")
    (tmp_path / "bad_header.csv").write_text("path,text\na.png,a cat\n")
    with pytest.raises(ValueError, match=r"templates\.txt:2: template 'a photo' must contain \{c\}"):
        ZeroShotTask.from_csv(tmp_path / "ok.csv", tmp_path / "classes.txt", tmp_path / "templates.txt")
    with pytest.raises(ValueError, match=r"bad_header\.csv:1: .*the header must be filepath,caption"):
        RetrievalTask.from_csv(tmp_path / "bad_header.csv")
    with pytest.raises(ValueError, match=r"nope\.txt: class name file not found"):
        ZeroShotTask.from_csv(tmp_path / "ok.csv", tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=r"nope\.csv: CSV file not found"):
        RetrievalTask.from_csv(tmp_path / "nope.csv")


def test_retrieval_from_csv_groups_captions_of_one_image(tmp_path):
    write_images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "pairs.csv").write_text(
        'filepath,caption\na.png,a cat\nb.png,a dog\na.png,"a cat, sleeping"\nc.png,a bird\n'
    )
    task = RetrievalTask.from_csv(tmp_path / "pairs.csv", name="pets")
    assert task.name == "pets"
    assert task.image_paths == [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    assert task.captions == ["a cat", "a dog", "a cat, sleeping", "a bird"]
    assert task.caption_to_image == [0, 1, 0, 2]


# ---------------------------------------------------------------------------- build_tasks


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task_files")
    zs_csv, classnames, templates = render_zeroshot_task(folder, num_per_class=1, seed=0)
    return zs_csv, classnames, templates, render_retrieval_task(folder, num_images=4, seed=0)


def test_build_tasks_follows_the_eval_section_zero_shot_first(task_files):
    zs_csv, classnames, templates, rt_csv = task_files
    cfg = EvalConfig(
        retrieval=[{"name": "pairs", "csv": str(rt_csv)}],
        zeroshot=[
            {"name": "shapes", "csv": str(zs_csv), "classnames": str(classnames), "templates": str(templates)},
            {"name": "shapes-default", "csv": str(zs_csv), "classnames": str(classnames)},
        ],
    )
    tasks = build_tasks(cfg)
    assert [(type(t), t.name) for t in tasks] == [
        (ZeroShotTask, "shapes"), (ZeroShotTask, "shapes-default"), (RetrievalTask, "pairs")
    ]
    assert tasks[0] == ZeroShotTask.from_csv(zs_csv, classnames, templates, name="shapes")
    assert tasks[1].templates == list(DEFAULT_TEMPLATES)
    assert tasks[2] == RetrievalTask.from_csv(rt_csv, name="pairs")
    assert build_tasks(EvalConfig()) == []


def test_build_tasks_names_every_bad_spec_in_one_error(task_files, tmp_path):
    zs_csv, _, _, rt_csv = task_files
    cfg = EvalConfig(
        zeroshot=[{"name": "shapes", "csv": str(zs_csv), "classnames": str(tmp_path / "none.txt")}],
        retrieval=[{"name": "ok", "csv": str(rt_csv)}, {"name": "typo", "csv": str(rt_csv), "captions": "x"}],
    )
    with pytest.raises(ValueError) as info:
        build_tasks(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert "eval.zeroshot[0] 'shapes': " in message and "none.txt: class name file not found" in message
    assert "eval.retrieval[1] 'typo': unknown key(s) ['captions']; a retrieval task takes name, csv" in message
    assert "'ok'" not in message
