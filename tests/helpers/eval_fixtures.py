"""Shared pieces of the evaluation tests: naive metric references and a model with fixed features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.evaluate import RetrievalTask, ZeroShotTask

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
        self.text_batch_sizes = []

    def encode_image(self, ids, normalize=False):
        self.seen_modes.append((self.training, self.head.training, torch.is_grad_enabled()))
        features = self.image_table[ids.long()]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, ids, normalize=False):
        self.seen_modes.append((self.training, self.head.training, torch.is_grad_enabled()))
        self.text_batch_sizes.append(len(ids))
        features = self.text_table[ids]
        return F.normalize(features, dim=-1) if normalize else features


class LookupTokenizer:
    """Token = index of the text in `texts`; an unexpected text raises KeyError."""

    def __init__(self, texts):
        self.ids = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts):
        return torch.tensor([self.ids[t] for t in texts])


class IdTransform:
    """An image's id (its red value) as a scalar tensor; counts its calls."""

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


def zero_shot_fixture(tmp_path, image_features, labels, class_template_features, *, templates=None):
    """Task + model whose prompt for class c / template t has features class_template_features[c][t]."""
    num_classes, num_templates = len(class_template_features), len(class_template_features[0])
    classnames = [f"class{c}" for c in range(num_classes)]
    templates = templates or [f"t{t} {{c}}" for t in range(num_templates)]
    prompts = [tpl.replace("{c}", c) for c in classnames for tpl in templates]
    text_features = [f for per_class in class_template_features for f in per_class]
    task = ZeroShotTask("zs", id_images(tmp_path / "zs", len(labels)), labels, classnames, templates)
    return task, TableModel(image_features, text_features), LookupTokenizer(prompts)


def retrieval_fixture(tmp_path, image_features, caption_features, caption_to_image):
    captions = [f"caption {j}" for j in range(len(caption_to_image))]
    task = RetrievalTask("ret", id_images(tmp_path / "ret", len(image_features)), captions, caption_to_image)
    return task, TableModel(image_features, caption_features), LookupTokenizer(captions)


# ---------------------------------------------------------------------------- clip_benchmark layout


def write_clip_benchmark_set(root: Path, samples: list[tuple[Path, str]], *, num_shards: int,
                             dataset_type: str, classnames=None, templates=None, split: str = "test") -> Path:
    """clip_benchmark's offline webdataset layout: `root/split/{0..n-1}.tar` (+ nshards.txt) and text files.

    `samples`: (image file, target member text) in order: `cls` for classification, `txt` for retrieval;
    consecutive samples fill the shards round robin by block.
    """
    import io
    import tarfile

    folder = root / split
    folder.mkdir(parents=True)
    member = "txt" if dataset_type == "retrieval" else "cls"
    per_shard = -(-len(samples) // num_shards)
    for shard in range(num_shards):
        with tarfile.open(folder / f"{shard}.tar", "w") as tar:
            for i, (image, target) in enumerate(samples[shard * per_shard:(shard + 1) * per_shard]):
                key = f"s{shard * per_shard + i:06d}"
                for name, data in ((f"{key}.png", image.read_bytes()), (f"{key}.{member}", target.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "nshards.txt").write_text(f"{num_shards}\n")
    (root / "dataset_type.txt").write_text(dataset_type + "\n")
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def clip_benchmark_copies(zeroshot: ZeroShotTask, retrieval: RetrievalTask, root: Path) -> dict:
    """The two CSV tasks written in clip_benchmark's layout (3 and 2 shards); their eval specs."""
    per_image = [[] for _ in retrieval.image_paths]
    for caption, image in zip(retrieval.captions, retrieval.caption_to_image, strict=True):
        per_image[image].append(caption)
    write_clip_benchmark_set(root / "zs", [(p, str(label)) for p, label in zip(zeroshot.image_paths, zeroshot.labels,
                                                                              strict=True)],
                             num_shards=3, dataset_type="classification", classnames=zeroshot.classnames,
                             templates=zeroshot.templates)
    write_clip_benchmark_set(root / "ret", [(p, "\n".join(c)) for p, c in zip(retrieval.image_paths, per_image,
                                                                            strict=True)],
                             num_shards=2, dataset_type="retrieval")
    return {"zeroshot": [{"name": "zs_wds", "clip_benchmark": str(root / "zs")}],
            "retrieval": [{"name": "ret_wds", "clip_benchmark": str(root / "ret")}]}


class ScriptedEvaluator:
    """Stands in for the evaluator: returns the next score of a script."""

    def __init__(self, scores):
        self.scores = list(scores)
        self.calls = 0
        self.seconds = {"zs": 0.0}  # evaluation time per task, as the Evaluator keeps it

    def __call__(self, model, tokenizer, transform):
        score = self.scores[min(self.calls, len(self.scores) - 1)]
        self.calls += 1
        return {"zs": {"acc1": score}}
