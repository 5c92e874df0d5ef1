"""Evaluation tasks: the `EvalTask` protocol; zero-shot classification and retrieval from CSV files,
webdataset tars or clip_benchmark's offline layout.

Metric names follow clip_benchmark so results can be compared with published tables.
Similarities are cosine similarities of L2-normalised features; the model's logit scale is
not applied because every metric here depends only on the ranking, which it does not change.
A task is streamed: the evaluator decodes its samples batch by batch and the task keeps per batch
only what its metrics need (zero-shot: the top-5 classes; retrieval: the embeddings).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from open_clip import build_zero_shot_classifier
from open_clip.zero_shot_metadata import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
)
from PIL import Image

from engine.csvfile import csv_rows
from engine.data.samples import DEFAULT_LIMITS, ReadLimits
from engine.evaluate.sources import (
    Part,
    Sample,
    captions,
    class_label,
    list_samples,
    read_clip_benchmark,
    shard_list,
    tar_samples,
)

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a {c}.",
    "a picture of the {c}.",
    "an image showing a {c}.",
)
# Names a task may give instead of a classnames / templates file (shipped by open_clip).
BUILTIN_CLASSNAMES: dict[str, tuple[str, ...]] = {"imagenet1k": tuple(IMAGENET_CLASSNAMES)}
BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "openai": tuple(t("{c}") for t in OPENAI_IMAGENET_TEMPLATES),
    "simple": tuple(t("{c}") for t in SIMPLE_IMAGENET_TEMPLATES),
}
RETRIEVAL_KS: tuple[int, ...] = (1, 5, 10)
RETRIEVAL_BLOCK = 256  # captions scored against all images at once (memory: block x images scores)
ZEROSHOT_CLASSIFICATION = "zeroshot_classification"
ZEROSHOT_RETRIEVAL = "zeroshot_retrieval"

Tokenizer = Callable[[list[str]], torch.Tensor]
Kept = dict[str, torch.Tensor]


@runtime_checkable
class EvalTask(Protocol):
    """A named benchmark whose samples are streamed and whose metrics come from what each batch keeps.

    The evaluator calls `prepare` once, then `keep` on every batch of `samples` (its rank's share),
    concatenates the kept tensors of all batches of all ranks and calls `metrics`, all inside eval
    mode and `torch.no_grad()`.
    """

    name: str
    kind: str  # clip_benchmark task type: zeroshot_classification | zeroshot_retrieval
    main_metric: str

    def samples(self, part: Part) -> Iterator[Sample]:
        """`part`'s share of `(key, RGB image, target)`; all parts together cover each sample once."""
        ...

    def prepare(self, model: torch.nn.Module, tokenizer: Tokenizer, *, batch_size: int,
                device: str | torch.device) -> Any:
        """What every batch needs (a zero-shot classifier), built once per evaluation."""
        ...

    def keep(self, prepared: Any, model: torch.nn.Module, tokenizer: Tokenizer, image_features: torch.Tensor,
             targets: list, *, batch_size: int, device: str | torch.device) -> Kept:
        """CPU tensors to keep from one batch ([b, D] L2-normalised float32 features of its images)."""
        ...

    def metrics(self, prepared: Any, kept: Kept, order: torch.Tensor) -> dict[str, float]:
        """Metrics from every batch's kept tensors, concatenated; `order` sorts the images by key."""
        ...


# ---------------------------------------------------------------------------- metrics


def zero_shot_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 and mean_per_class_recall from [N, C] class scores and [N] integer labels.

    acc5 uses the top min(5, C) classes; mean_per_class_recall averages top-1 recall over the
    classes that occur in `labels` (balanced accuracy).
    """
    return top_classes_metrics(top_classes(logits), labels, num_classes=logits.shape[1])


def top_classes(logits: torch.Tensor) -> torch.Tensor:
    """[N, min(5, C)] indices of the highest class scores, best first."""
    return logits.topk(min(5, logits.shape[1]), dim=1).indices


def top_classes_metrics(top: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> dict[str, float]:
    """`zero_shot_metrics` from the top classes of each image (see `top_classes`)."""
    labels = labels.to(top.device)
    hits = top == labels[:, None]
    top1 = hits[:, 0].double()
    count = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels, weights=top1, minlength=num_classes)
    present = count > 0
    return {
        "acc1": top1.mean().item(),
        "acc5": hits.any(dim=1).double().mean().item(),
        "mean_per_class_recall": (correct[present] / count[present]).mean().item(),
    }


def retrieval_metrics(
    similarity: torch.Tensor, caption_to_image: torch.Tensor, *, ks: Sequence[int] = RETRIEVAL_KS
) -> dict[str, float]:
    """Recall@k both ways from a [num_captions, num_images] similarity matrix.

    image_retrieval_recall@k: fraction of captions whose image is among their top k images.
    text_retrieval_recall@k: fraction of images with any of their captions among their top k captions.
    k is capped at the number of candidates. mean_recall@1 is the mean of the two recall@1.
    """
    num_captions, num_images = similarity.shape
    caption_to_image = caption_to_image.to(similarity.device)
    positive = torch.zeros_like(similarity, dtype=torch.bool)
    positive[torch.arange(num_captions, device=similarity.device), caption_to_image] = True
    metrics = {}
    for k in ks:
        top_images = similarity.topk(min(k, num_images), dim=1).indices
        image_hits = positive.gather(1, top_images).any(dim=1)
        top_captions = similarity.t().topk(min(k, num_captions), dim=1).indices
        caption_hits = positive.t().gather(1, top_captions).any(dim=1)
        metrics[f"image_retrieval_recall@{k}"] = image_hits.double().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = caption_hits.double().mean().item()
    return _with_mean_recall(metrics, ks)


def _with_mean_recall(metrics: dict[str, float], ks: Sequence[int]) -> dict[str, float]:
    if 1 in ks:
        metrics["mean_recall@1"] = (
            metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]
        ) / 2
    return metrics


def retrieval_metrics_blockwise(
    text_features: torch.Tensor, image_features: torch.Tensor, caption_to_image: torch.Tensor, *,
    ks: Sequence[int] = RETRIEVAL_KS, block: int = RETRIEVAL_BLOCK,
) -> dict[str, float]:
    """`retrieval_metrics(text_features @ image_features.T, caption_to_image)` without the full matrix.

    The matrix is computed `block` captions (rows) at a time: each caption ranks all images from its row, and
    each image keeps a running top-k of the captions seen so far, merged with every block's column. Memory is
    O((captions + images) x D + block x images) instead of captions x images; the scores are the full matrix's
    rows, so the metrics are the same numbers (identical scores, ties, rank in an unspecified order in both).
    """
    num_captions, num_images = len(text_features), len(image_features)
    caption_to_image = caption_to_image.to(text_features.device)
    k_images, k_captions = min(max(ks), num_images), min(max(ks), num_captions)
    image_hits = dict.fromkeys(ks, 0)  # captions whose image is in their top k
    best_scores = text_features.new_empty((num_images, 0))  # per image: its best captions so far
    best_captions = torch.empty((num_images, 0), dtype=torch.long, device=text_features.device)
    for start in range(0, num_captions, block):
        scores = text_features[start : start + block] @ image_features.t()
        hit = scores.topk(k_images, dim=1).indices == caption_to_image[start : start + block, None]
        for k in ks:
            image_hits[k] += int(hit[:, :k].any(dim=1).sum())
        merged = torch.cat([best_scores, scores.t()], dim=1)
        del scores
        top = merged.topk(min(k_captions, merged.shape[1]), dim=1)
        del merged
        kept = best_scores.shape[1]  # columns of `merged` below this are kept captions, the rest this block's
        from_block = top.indices >= kept
        best_captions = torch.where(from_block, top.indices - kept + start,
                                    best_captions.gather(1, top.indices.clamp(max=max(kept - 1, 0))) if kept else 0)
        best_scores = top.values
    hit = caption_to_image[best_captions] == torch.arange(num_images, device=best_captions.device)[:, None]
    metrics = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = image_hits[k] / num_captions
        metrics[f"text_retrieval_recall@{k}"] = int(hit[:, :k].any(dim=1).sum()) / num_images
    return _with_mean_recall(metrics, ks)


# ---------------------------------------------------------------------------- scoring


class ZeroShotScoring:
    """Zero-shot classification of streamed images: needs `classnames` and `templates` (with "{c}")."""

    kind = ZEROSHOT_CLASSIFICATION
    classnames: list[str]
    templates: list[str]

    def prepare(self, model: torch.nn.Module, tokenizer: Tokenizer, *, batch_size: int,
                device: str | torch.device) -> torch.Tensor:
        """[D, C] classifier: per class, the mean of its normalised template embeddings, renormalised
        (open_clip's `build_zero_shot_classifier`); at most `batch_size` prompts go through the text
        tower at once (all templates of a class together)."""
        # Templates hold "{c}" and may hold other braces, so they are filled by replace, not format().
        fill = [lambda c, t=template: t.replace("{c}", c) for template in self.templates]
        classifier = build_zero_shot_classifier(
            model, tokenizer, self.classnames, fill,
            num_classes_per_batch=max(1, batch_size // len(self.templates)), device=device,
        )
        return classifier.float()

    def keep(self, prepared: torch.Tensor, model: torch.nn.Module, tokenizer: Tokenizer,
             image_features: torch.Tensor, targets: list, *, batch_size: int,
             device: str | torch.device) -> Kept:
        """The top-5 classes and the label of each image: 6 integers per image."""
        return {"top": top_classes(image_features @ prepared).cpu(), "label": torch.tensor(targets, dtype=torch.long)}

    def metrics(self, prepared: torch.Tensor, kept: Kept, order: torch.Tensor) -> dict[str, float]:
        """acc1, acc5, mean_per_class_recall (see `zero_shot_metrics`)."""
        labels = kept["label"][order]
        bad = labels[(labels < 0) | (labels >= len(self.classnames))]
        if len(bad):
            raise ValueError(f"task {self.name!r}: labels {sorted(set(bad.tolist()))[:5]} are outside "
                             f"[0, {len(self.classnames)}); check the classnames list")
        return top_classes_metrics(kept["top"][order], labels, num_classes=len(self.classnames))

    def score(self, model: torch.nn.Module, tokenizer: Tokenizer, image_features: torch.Tensor, *,
              batch_size: int, device: str | torch.device) -> dict[str, float]:
        """Metrics from [N, D] features of all images in key order (needs `labels`)."""
        prepared = self.prepare(model, tokenizer, batch_size=batch_size, device=device)
        kept = self.keep(prepared, model, tokenizer, image_features.float(), list(self.labels),
                         batch_size=batch_size, device=device)
        return self.metrics(prepared, kept, torch.arange(len(image_features)))


class RetrievalScoring:
    """Image-text retrieval of streamed images; each sample's target is its list of captions."""

    kind = ZEROSHOT_RETRIEVAL

    def prepare(self, model: torch.nn.Module, tokenizer: Tokenizer, *, batch_size: int,
                device: str | torch.device) -> None:
        return None

    def keep(self, prepared: None, model: torch.nn.Module, tokenizer: Tokenizer, image_features: torch.Tensor,
             targets: list, *, batch_size: int, device: str | torch.device) -> Kept:
        """The image embeddings, the embeddings of their captions (at most `batch_size` through the
        text tower at once) and each image's number of captions."""
        texts = [caption for image_captions in targets for caption in image_captions]
        tokens = tokenizer(texts)
        text_features = F.normalize(torch.cat([
            model.encode_text(tokens[i : i + batch_size].to(device)).float() for i in range(0, len(texts), batch_size)
        ]), dim=-1)
        return {"image_features": image_features.cpu(), "text_features": text_features.cpu(),
                "num_captions": torch.tensor([len(c) for c in targets], dtype=torch.long)}

    def metrics(self, prepared: None, kept: Kept, order: torch.Tensor) -> dict[str, float]:
        """Image and text retrieval recall@1/5/10 and mean_recall@1 (see `retrieval_metrics_blockwise`).

        Recall counts captions and images: it does not depend on their order, so the features are scored in
        the order they were kept (`order`, a permutation into key order, is not applied: no copy of them)."""
        num_captions = kept["num_captions"]
        caption_to_image = torch.repeat_interleave(torch.arange(len(num_captions)), num_captions)
        return retrieval_metrics_blockwise(kept["text_features"], kept["image_features"], caption_to_image)

    def score(self, model: torch.nn.Module, tokenizer: Tokenizer, image_features: torch.Tensor, *,
              batch_size: int, device: str | torch.device) -> dict[str, float]:
        """Metrics from [N, D] features of all images in key order (needs `captions`, `caption_to_image`)."""
        per_image: list[list[str]] = [[] for _ in range(len(image_features))]
        for caption, image in zip(self.captions, self.caption_to_image, strict=True):
            per_image[image].append(caption)
        kept = self.keep(None, model, tokenizer, image_features.float(), per_image, batch_size=batch_size,
                         device=device)
        return self.metrics(None, kept, torch.arange(len(image_features)))


# ---------------------------------------------------------------------------- tasks


@dataclass
class ZeroShotTask(ZeroShotScoring):
    """Images on disk with class labels, classified by text prompts `template.replace("{c}", classname)`."""

    name: str
    image_paths: list[Path]
    labels: list[int]
    classnames: list[str]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    main_metric: str = "acc1"
    limits: ReadLimits = DEFAULT_LIMITS  # data.max_image_pixels / max_member_bytes, as training's

    def __post_init__(self) -> None:
        self.image_paths = [Path(p) for p in self.image_paths]
        self.labels = [int(label) for label in self.labels]
        self.classnames = list(self.classnames)
        self.templates = list(self.templates)
        errors = []
        if not self.image_paths:
            errors.append("image_paths is empty; a task needs at least one image")
        if len(self.labels) != len(self.image_paths):
            errors.append(
                f"labels has {len(self.labels)} entries but image_paths has {len(self.image_paths)}"
            )
        if not self.classnames:
            errors.append("classnames is empty; give at least one class")
        bad_labels = sorted({label for label in self.labels if not 0 <= label < len(self.classnames)})
        if bad_labels:
            errors.append(f"labels {bad_labels[:5]} are outside [0, {len(self.classnames)})")
        errors += _template_errors(self.templates)
        if errors:
            raise ValueError(f"ZeroShotTask {self.name!r}: " + "; ".join(errors))

    @classmethod
    def from_csv(
        cls,
        csv_path: str | Path,
        classnames_path: str | Path,
        templates_path: str | Path | None = None,
        *,
        name: str | None = None,
        limits: ReadLimits = DEFAULT_LIMITS,
    ) -> ZeroShotTask:
        """Load a task from a `filepath,label` CSV (paths relative to the CSV's folder).

        Labels are class indices when every label in the file is an integer, class names otherwise.
        `name` defaults to the CSV's file stem; templates default to `DEFAULT_TEMPLATES`.
        `classnames_path` may be `imagenet1k` and `templates_path` `openai` or `simple` (open_clip's lists).
        """
        csv_path = Path(csv_path)
        classnames = read_classnames(classnames_path)
        templates = read_templates(templates_path)
        rows = _read_csv(csv_path, ("filepath", "label"))
        by_index = all(row["label"].strip().isdigit() for _, row in rows)
        class_index = {c: i for i, c in enumerate(classnames)}
        image_paths, labels = [], []
        for line_num, row in rows:
            raw = row["label"].strip()
            if by_index:
                label = int(raw)
                if label >= len(classnames):
                    raise ValueError(
                        f"{csv_path}:{line_num}: label {label} is out of range; {classnames_path} "
                        f"has {len(classnames)} classes (indices 0..{len(classnames) - 1})"
                    )
            elif raw in class_index:
                label = class_index[raw]
            else:
                raise ValueError(
                    f"{csv_path}:{line_num}: unknown class {raw!r}; not listed in {classnames_path} "
                    "(labels are read as class names because not every label is an integer)"
                )
            image_paths.append(_existing_image(csv_path, line_num, row["filepath"]))
            labels.append(label)
        return cls(
            name=name or csv_path.stem,
            image_paths=image_paths,
            labels=labels,
            classnames=classnames,
            templates=templates,
            limits=limits,
        )

    def images(self) -> Iterator[Image.Image]:
        """The images as RGB, in `image_paths` order."""
        return (image for _, image, _ in self.samples(Part()))

    def samples(self, part: Part) -> Iterator[Sample]:
        return list_samples(self.image_paths, self.labels, part, self.limits)


@dataclass
class RetrievalTask(RetrievalScoring):
    """Images on disk and captions; caption `j` describes image `caption_to_image[j]`."""

    name: str
    image_paths: list[Path]
    captions: list[str]
    caption_to_image: list[int]
    main_metric: str = "mean_recall@1"
    limits: ReadLimits = DEFAULT_LIMITS  # data.max_image_pixels / max_member_bytes, as training's

    def __post_init__(self) -> None:
        self.image_paths = [Path(p) for p in self.image_paths]
        self.captions = list(self.captions)
        self.caption_to_image = [int(i) for i in self.caption_to_image]
        errors = []
        if not self.image_paths:
            errors.append("image_paths is empty; a task needs at least one image")
        if len(self.captions) != len(self.caption_to_image):
            errors.append(
                f"captions has {len(self.captions)} entries but caption_to_image has "
                f"{len(self.caption_to_image)}"
            )
        bad = sorted({i for i in self.caption_to_image if not 0 <= i < len(self.image_paths)})
        if bad:
            errors.append(f"caption_to_image values {bad[:5]} are outside [0, {len(self.image_paths)})")
        uncaptioned = sorted(set(range(len(self.image_paths))) - set(self.caption_to_image))
        if uncaptioned:
            errors.append(f"images {uncaptioned[:5]} have no caption; every image needs at least one")
        if errors:
            raise ValueError(f"RetrievalTask {self.name!r}: " + "; ".join(errors))
        self._per_image: list[list[str]] = [[] for _ in self.image_paths]
        for caption, image in zip(self.captions, self.caption_to_image, strict=True):
            self._per_image[image].append(caption)

    @classmethod
    def from_csv(cls, csv_path: str | Path, *, name: str | None = None,
                 limits: ReadLimits = DEFAULT_LIMITS) -> RetrievalTask:
        """Load a task from a `filepath,caption` CSV; repeated filepaths are captions of one image.

        Images keep the order of their first row; `name` defaults to the CSV's file stem.
        """
        csv_path = Path(csv_path)
        image_index: dict[Path, int] = {}
        captions, caption_to_image = [], []
        for line_num, row in _read_csv(csv_path, ("filepath", "caption")):
            caption = row["caption"].strip()
            if not caption:
                raise ValueError(f"{csv_path}:{line_num}: empty caption; remove the row or write a caption")
            path = _existing_image(csv_path, line_num, row["filepath"])
            captions.append(caption)
            caption_to_image.append(image_index.setdefault(path, len(image_index)))
        return cls(
            name=name or csv_path.stem,
            image_paths=list(image_index),
            captions=captions,
            caption_to_image=caption_to_image,
            limits=limits,
        )

    def images(self) -> Iterator[Image.Image]:
        """The images as RGB, in `image_paths` order."""
        return (image for _, image, _ in self.samples(Part()))

    def samples(self, part: Part) -> Iterator[Sample]:
        return list_samples(self.image_paths, self._per_image, part, self.limits)


@dataclass
class ShardZeroShotTask(ZeroShotScoring):
    """Zero-shot classification of webdataset tars: an image member and a `cls` member (class index)."""

    name: str
    shards: list[Path]
    classnames: list[str]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    main_metric: str = "acc1"
    limits: ReadLimits = DEFAULT_LIMITS  # data.max_image_pixels / max_member_bytes, as training's

    def __post_init__(self) -> None:
        errors = [] if self.shards else ["no shards"]
        errors += [] if self.classnames else ["classnames is empty; give at least one class"]
        errors += _template_errors(self.templates)
        if errors:
            raise ValueError(f"ZeroShotTask {self.name!r}: " + "; ".join(errors))

    def samples(self, part: Part) -> Iterator[Sample]:
        return tar_samples(self.shards, part, class_label, self.limits)


@dataclass
class ShardRetrievalTask(RetrievalScoring):
    """Retrieval on webdataset tars: an image member and a `txt` member with one caption per line."""

    name: str
    shards: list[Path]
    main_metric: str = "mean_recall@1"
    limits: ReadLimits = DEFAULT_LIMITS  # data.max_image_pixels / max_member_bytes, as training's

    def __post_init__(self) -> None:
        if not self.shards:
            raise ValueError(f"RetrievalTask {self.name!r}: no shards")

    def samples(self, part: Part) -> Iterator[Sample]:
        return tar_samples(self.shards, part, captions, self.limits)


def zeroshot_from_shards(spec: str, classnames: str | Path | None, templates: str | Path | None, *,
                         name: str, limits: ReadLimits = DEFAULT_LIMITS) -> ShardZeroShotTask:
    """A zero-shot task over the tars `spec` names (folder, brace/glob pattern, '::'-joined)."""
    if classnames is None:
        raise ValueError("a zero-shot task on tars needs 'classnames' (a file, or imagenet1k)")
    return ShardZeroShotTask(name, shard_list(spec), read_classnames(classnames), read_templates(templates),
                             limits=limits)


def from_clip_benchmark(root: str | Path, *, name: str, split: str = "test", kind: str | None = None,
                        classnames: str | Path | None = None,
                        templates: str | Path | None = None,
                        limits: ReadLimits = DEFAULT_LIMITS) -> ShardZeroShotTask | ShardRetrievalTask:
    """A task over clip_benchmark's webdataset layout, read offline: `<root>/<split>/*.tar`,
    `classnames.txt`, `zeroshot_classification_templates.txt`, `dataset_type.txt`.

    `classnames` / `templates` given here replace the folder's files (builtin names allowed).
    """
    found = read_clip_benchmark(root, split)
    found_kind = "retrieval" if found.dataset_type == "retrieval" else "zeroshot"
    if kind is not None and kind != found_kind:
        raise ValueError(f"{root}/dataset_type.txt says {found.dataset_type}, but the task is listed under "
                         f"eval.{kind}; list it under eval.{found_kind}")
    if found_kind == "retrieval":
        return ShardRetrievalTask(name, found.shards, limits=limits)
    names = read_classnames(classnames) if classnames is not None else found.classnames
    if names is None:
        raise ValueError(f"{root}/classnames.txt not found; add it or give 'classnames' (a file, or imagenet1k)")
    prompts = read_templates(templates) if templates is not None else found.templates
    return ShardZeroShotTask(name, found.shards, names, prompts or list(DEFAULT_TEMPLATES), limits=limits)


def read_classnames(source: str | Path) -> list[str]:
    """Class names from a file (one per line) or a builtin list (`imagenet1k`)."""
    if str(source) in BUILTIN_CLASSNAMES:
        return list(BUILTIN_CLASSNAMES[str(source)])
    classnames = _read_lines(Path(source), what="class name")
    if len(set(classnames)) != len(classnames):
        duplicates = sorted({c for c in classnames if classnames.count(c) > 1})
        raise ValueError(f"{source}: duplicate class names {duplicates}; names must be unique")
    return classnames


def read_templates(source: str | Path | None) -> list[str]:
    """Templates from a file (one per line, each with {c}), a builtin list (`openai`, `simple`), or the default."""
    if source is None:
        return list(DEFAULT_TEMPLATES)
    if str(source) in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[str(source)])
    templates = _read_lines(Path(source), what="template")
    for line_num, template in enumerate(templates, start=1):
        if "{c}" not in template:
            raise ValueError(
                f"{source}:{line_num}: template {template!r} must contain {{c}} where the class name goes"
            )
    return templates


def _template_errors(templates: list[str]) -> list[str]:
    if not templates:
        return ["templates is empty; give at least one template containing {c}"]
    return [f"template {t!r} does not contain {{c}}" for t in templates if "{c}" not in t]


# ---------------------------------------------------------------------------- files


def _read_lines(path: Path, *, what: str) -> list[str]:
    """Stripped lines of `path`; blank lines are allowed only at the end."""
    if not path.is_file():
        raise ValueError(f"{path}: {what} file not found; write one {what} per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for line_num, line in enumerate(lines, start=1):
        if not line:
            raise ValueError(f"{path}:{line_num}: blank line; write one {what} per line with no gaps")
    if not lines:
        raise ValueError(f"{path}: no {what}s found; write one {what} per line")
    return lines


def _read_csv(csv_path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of a CSV whose header contains `columns`."""
    if not csv_path.is_file():
        raise ValueError(f"{csv_path}: CSV file not found")
    rows = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(
                f"{csv_path}:1: header {','.join(header)!r} lacks column(s) {missing}; "
                f"the header must be {','.join(columns)}"
            )
        for row in csv_rows(reader, csv_path):
            if any(row.get(c) is None for c in columns):
                raise ValueError(f"{csv_path}:{reader.line_num}: row has too few fields; expected {columns}")
            rows.append((reader.line_num, row))
    if not rows:
        raise ValueError(f"{csv_path}: no data rows below the header")
    return rows


def _existing_image(csv_path: Path, line_num: int, filepath: str) -> Path:
    path = csv_path.parent / filepath.strip()
    if not path.is_file():
        raise ValueError(
            f"{csv_path}:{line_num}: image {filepath!r} not found (looked for {path}); "
            "paths are relative to the CSV's folder"
        )
    return path
