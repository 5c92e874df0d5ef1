import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from engine.evaluate import (
    DEFAULT_TEMPLATES,
    Evaluator,
    RetrievalTask,
    ZeroShotTask,
    headline_metric,
    retrieval,
    retrieval_metrics,
    write_results,
    zero_shot,
    zero_shot_metrics,
)
from engine.synthetic import render_retrieval_task, render_zeroshot_task

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ---------------------------------------------------------------------------- naive references


def naive_zero_shot(logits: np.ndarray, labels: list[int]) -> dict[str, float]:
    num_images, num_classes = logits.shape
    order = np.argsort(-logits, axis=1, kind="stable")
    k5 = min(5, num_classes)
    acc1 = sum(order[i, 0] == labels[i] for i in range(num_images)) / num_images
    acc5 = sum(labels[i] in order[i, :k5] for i in range(num_images)) / num_images
    recalls = []
    for c in sorted(set(labels)):
        members = [i for i in range(num_images) if labels[i] == c]
        recalls.append(sum(order[i, 0] == c for i in members) / len(members))
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": sum(recalls) / len(recalls)}


def naive_retrieval(similarity: np.ndarray, caption_to_image: list[int]) -> dict[str, float]:
    num_captions, num_images = similarity.shape
    out = {}
    for k in (1, 5, 10):
        image_hits = [caption_to_image[t] in np.argsort(-similarity[t])[:k] for t in range(num_captions)]
        text_hits = [
            any(caption_to_image[t] == i for t in np.argsort(-similarity[:, i])[:k])
            for i in range(num_images)
        ]
        out[f"image_retrieval_recall@{k}"] = sum(image_hits) / num_captions
        out[f"text_retrieval_recall@{k}"] = sum(text_hits) / num_images
    out["mean_recall@1"] = (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"]) / 2
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------- fixed-feature model


class TableModel(torch.nn.Module):
    """Looks features up by id: an image's id is its red value, a text's id comes from `LookupTokenizer`."""

    def __init__(self, image_features, text_features):
        super().__init__()
        self.register_buffer("image_table", torch.as_tensor(np.asarray(image_features), dtype=torch.float32))
        self.register_buffer("text_table", torch.as_tensor(np.asarray(text_features), dtype=torch.float32))
        self.head = torch.nn.Linear(1, 1)
        self.seen_modes = []

    def encode_image(self, ids):
        self.seen_modes.append((self.training, self.head.training, torch.is_grad_enabled()))
        return self.image_table[ids.long()]

    def encode_text(self, ids):
        self.seen_modes.append((self.training, self.head.training, torch.is_grad_enabled()))
        return self.text_table[ids]


class LookupTokenizer:
    def __init__(self, texts):
        self.ids = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts):
        return torch.tensor([self.ids[t] for t in texts])


class IdTransform:
    def __init__(self):
        self.num_calls = 0

    def __call__(self, image):
        self.num_calls += 1
        return torch.tensor(float(image.getpixel((0, 0))[0]))


def id_images(folder: Path, num_images: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(num_images):
        path = folder / f"{i}.png"
        Image.new("RGB", (4, 4), (i, 0, 0)).save(path)
        paths.append(path)
    return paths


def zero_shot_fixture(tmp_path, image_features, labels, class_template_features):
    """Task + model whose prompt for class c / template t has features class_template_features[c][t]."""
    num_classes, num_templates = len(class_template_features), len(class_template_features[0])
    classnames = [f"class{c}" for c in range(num_classes)]
    templates = [f"t{t} {{c}}" for t in range(num_templates)]
    prompts = [tpl.replace("{c}", c) for c in classnames for tpl in templates]
    text_features = [f for per_class in class_template_features for f in per_class]
    task = ZeroShotTask("zs", id_images(tmp_path / "zs", len(labels)), labels, classnames, templates)
    return task, TableModel(image_features, text_features), LookupTokenizer(prompts)


def retrieval_fixture(tmp_path, image_features, caption_features, caption_to_image):
    captions = [f"caption {j}" for j in range(len(caption_to_image))]
    task = RetrievalTask("ret", id_images(tmp_path / "ret", len(image_features)), captions, caption_to_image)
    return task, TableModel(image_features, caption_features), LookupTokenizer(captions)


# ---------------------------------------------------------------------------- pure metrics


def test_zero_shot_metrics_match_naive_on_random_imbalanced_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 7))
    labels = list(rng.choice(7, size=60, p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05]))
    got = zero_shot_metrics(torch.tensor(logits), torch.tensor(labels))
    assert got == pytest.approx(naive_zero_shot(logits, labels))


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


# ---------------------------------------------------------------------------- fixed features


def test_zero_shot_is_perfect_when_image_features_equal_class_text(tmp_path):
    rng = np.random.default_rng(2)
    class_features = unit(rng.normal(size=(4, 8)))
    labels = [0, 1, 2, 3, 1, 2]
    task, model, tokenizer = zero_shot_fixture(
        tmp_path, 3.0 * class_features[labels], labels, [[f, 2.0 * f] for f in class_features]
    )
    got = zero_shot(model, tokenizer, IdTransform(), task, batch_size=4)
    assert got == pytest.approx({"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0})


def test_mean_per_class_recall_differs_from_acc1_on_imbalanced_classes(tmp_path):
    e = np.eye(4)
    labels = [0, 0, 0, 1, 2]
    # The class-1 image looks like class 0: acc1 = 4/5, per-class recalls (1, 0, 1) -> 2/3.
    task, model, tokenizer = zero_shot_fixture(
        tmp_path, e[[0, 0, 0, 0, 2]], labels, [[e[c]] for c in range(3)]
    )
    got = zero_shot(model, tokenizer, IdTransform(), task, batch_size=2)
    assert got == pytest.approx({"acc1": 0.8, "acc5": 1.0, "mean_per_class_recall": 2 / 3})


def test_classifier_normalises_template_embeddings_before_averaging(tmp_path):
    # Class 0 mixes a long and a short template vector: averaged after normalising it points
    # along (1, 1, 0) like the image; averaged raw it leans to x and class 1 would win.
    class_templates = [[[10.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[1.0, 0.6, 0.0], [1.0, 0.6, 0.0]]]
    task, model, tokenizer = zero_shot_fixture(tmp_path, [[1.0, 1.0, 0.0]], [0], class_templates)
    assert zero_shot(model, tokenizer, IdTransform(), task)["acc1"] == 1.0


def test_retrieval_is_perfect_when_captions_match_their_image(tmp_path):
    rng = np.random.default_rng(3)
    image_features = rng.normal(size=(5, 16))
    caption_to_image = [0, 0, 1, 2, 3, 3, 4]
    caption_features = image_features[caption_to_image] + 0.01 * rng.normal(size=(7, 16))
    task, model, tokenizer = retrieval_fixture(tmp_path, image_features, caption_features, caption_to_image)
    got = retrieval(model, tokenizer, IdTransform(), task, batch_size=3)
    assert all(v == 1.0 for v in got.values())
    assert set(got) == {
        *(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)),
        "mean_recall@1",
    }


def test_retrieval_with_swapped_captions_gives_half_recall_at_1(tmp_path):
    e = np.eye(4)
    # Captions of images 2 and 3 describe each other's image.
    task, model, tokenizer = retrieval_fixture(tmp_path, e, e[[0, 1, 3, 2]], [0, 1, 2, 3])
    got = retrieval(model, tokenizer, IdTransform(), task)
    assert got["image_retrieval_recall@1"] == 0.5
    assert got["text_retrieval_recall@1"] == 0.5
    assert got["mean_recall@1"] == 0.5
    assert got["image_retrieval_recall@5"] == got["text_retrieval_recall@10"] == 1.0


def test_text_retrieval_counts_any_caption_of_the_image(tmp_path):
    e = np.eye(3)
    caption_features = [[0.6, 0.0, 0.8], [1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.3, 0.0, 1.0]]
    caption_to_image = [0, 0, 1, 2]
    task, model, tokenizer = retrieval_fixture(tmp_path, e, caption_features, caption_to_image)
    got = retrieval(model, tokenizer, IdTransform(), task)
    # Caption 0 is closer to image 2; image 0's best caption is its second one, which counts.
    assert got["image_retrieval_recall@1"] == 0.75
    assert got["text_retrieval_recall@1"] == 1.0
    assert got["mean_recall@1"] == 0.875


def test_evaluator_caches_images_and_restores_each_module_mode(tmp_path):
    rng = np.random.default_rng(4)
    image_features = rng.normal(size=(6, 8))
    task, model, tokenizer = retrieval_fixture(
        tmp_path, image_features, image_features[[0, 1, 2, 3, 4, 5, 5]], [0, 1, 2, 3, 4, 5, 5]
    )
    transform = IdTransform()
    evaluator = Evaluator([task], batch_size=4)
    model.train()
    model.head.eval()
    first = evaluator(model, tokenizer, transform)
    second = evaluator(model, tokenizer, transform)
    assert transform.num_calls == 6
    assert first == second == {"ret": retrieval(model, tokenizer, IdTransform(), task)}
    assert model.training and not model.head.training
    assert model.seen_modes and set(model.seen_modes) == {(False, False, False)}
    evaluator(model, tokenizer, IdTransform())  # a new transform invalidates the cached images
    assert transform.num_calls == 6


def test_evaluator_rejects_duplicate_names_and_bad_batch_size(tmp_path):
    task, _, _ = retrieval_fixture(tmp_path, np.eye(2), np.eye(2), [0, 1])
    with pytest.raises(ValueError, match=r"\['ret'\].*batch_size must be greater than 0"):
        Evaluator([task, task], batch_size=0)


# ---------------------------------------------------------------------------- tiny open_clip model


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model_configs")
    (folder / "tuneclip-test-tiny.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder / "tuneclip-test-tiny.json")
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms("tuneclip-test-tiny")
    return model, open_clip.get_tokenizer("tuneclip-test-tiny"), transform


@pytest.fixture(scope="module")
def synthetic_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    zeroshot = ZeroShotTask.from_csv(*render_zeroshot_task(folder, num_per_class=2, seed=0))
    retrieval_task = RetrievalTask.from_csv(render_retrieval_task(folder, num_images=24, seed=0))
    return zeroshot, retrieval_task


def one_by_one(encode, inputs) -> np.ndarray:
    return unit(np.stack([encode(x[None])[0].numpy() for x in inputs]))


def test_tiny_clip_metrics_match_naive_computation(tiny_clip, synthetic_tasks):
    model, tokenizer, transform = tiny_clip
    zeroshot_task, retrieval_task = synthetic_tasks
    evaluator = Evaluator([zeroshot_task, retrieval_task], batch_size=7)
    results = evaluator(model, tokenizer, transform)

    model.eval()
    with torch.no_grad():
        load = [transform(Image.open(p).convert("RGB")) for p in zeroshot_task.image_paths]
        image_features = one_by_one(model.encode_image, load)
        classifier = []
        for c in zeroshot_task.classnames:
            prompts = tokenizer([t.replace("{c}", c) for t in zeroshot_task.templates])
            classifier.append(unit(one_by_one(model.encode_text, prompts).mean(axis=0)))
        expected_zeroshot = naive_zero_shot(image_features @ np.stack(classifier).T, zeroshot_task.labels)

        load = [transform(Image.open(p).convert("RGB")) for p in retrieval_task.image_paths]
        image_features = one_by_one(model.encode_image, load)
        text_features = one_by_one(model.encode_text, tokenizer(retrieval_task.captions))
        expected_retrieval = naive_retrieval(
            text_features @ image_features.T, retrieval_task.caption_to_image
        )
    model.train()

    assert results[zeroshot_task.name] == pytest.approx(expected_zeroshot)
    assert results[retrieval_task.name] == pytest.approx(expected_retrieval)
    assert zero_shot(model, tokenizer, transform, zeroshot_task, batch_size=5) == pytest.approx(
        expected_zeroshot
    )
    assert model.training


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


def test_task_loaders_reject_bad_header_and_templates(tmp_path):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "classes.txt").write_text("cat\n")
    (tmp_path / "templates.txt").write_text("a {c}\na photo\n")
    (tmp_path / "ok.csv").write_text("filepath,label\na.png,0\n")
    (tmp_path / "bad_header.csv").write_text("path,text\na.png,a cat\n")
    with pytest.raises(ValueError, match=r"templates\.txt:2: template 'a photo' must contain \{c\}"):
        ZeroShotTask.from_csv(tmp_path / "ok.csv", tmp_path / "classes.txt", tmp_path / "templates.txt")
    with pytest.raises(ValueError, match=r"bad_header\.csv:1: .*the header must be filepath,caption"):
        RetrievalTask.from_csv(tmp_path / "bad_header.csv")


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
