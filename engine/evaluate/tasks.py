"""Evaluation tasks: the `EvalTask` protocol, and zero-shot classification and retrieval from CSV.

Metric names follow clip_benchmark so results can be compared with published tables.
Similarities are cosine similarities of L2-normalised features; the model's logit scale is
not applied because every metric here depends only on the ranking, which it does not change.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from open_clip import build_zero_shot_classifier
from PIL import Image

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a {c}.",
    "a picture of the {c}.",
    "an image showing a {c}.",
)
RETRIEVAL_KS: tuple[int, ...] = (1, 5, 10)

Tokenizer = Callable[[list[str]], torch.Tensor]


@runtime_checkable
class EvalTask(Protocol):
    """A named benchmark: images in a fixed order, and metrics computed from their features.

    The evaluator encodes `images()` and calls `score` inside eval mode and `torch.no_grad()`.
    """

    name: str

    def images(self) -> Iterator[Image.Image]:
        """The task's images as RGB, in the order `score` expects their features."""
        ...

    def score(
        self, model: torch.nn.Module, tokenizer: Tokenizer, image_features: torch.Tensor, *,
        batch_size: int, device: str | torch.device,
    ) -> dict[str, float]:
        """Metrics from [N, D] L2-normalised float32 features of `images()`, on `device`."""
        ...


# ---------------------------------------------------------------------------- metrics


def zero_shot_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 and mean_per_class_recall from [N, C] class scores and [N] integer labels.

    acc5 uses the top min(5, C) classes; mean_per_class_recall averages top-1 recall over the
    classes that occur in `labels` (balanced accuracy).
    """
    num_classes = logits.shape[1]
    labels = labels.to(logits.device)
    top = logits.topk(min(5, num_classes), dim=1).indices
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
    if 1 in ks:
        metrics["mean_recall@1"] = (
            metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]
        ) / 2
    return metrics


# ---------------------------------------------------------------------------- tasks


@dataclass
class ZeroShotTask:
    """Images with class labels, classified by text prompts `template.replace("{c}", classname)`."""

    name: str
    image_paths: list[Path]
    labels: list[int]
    classnames: list[str]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))

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
        if not self.templates:
            errors.append("templates is empty; give at least one template containing {c}")
        errors += [f"template {t!r} does not contain {{c}}" for t in self.templates if "{c}" not in t]
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
    ) -> ZeroShotTask:
        """Load a task from a `filepath,label` CSV (paths relative to the CSV's folder).

        Labels are class indices when every label in the file is an integer, class names otherwise.
        `name` defaults to the CSV's file stem; templates default to `DEFAULT_TEMPLATES`.
        """
        csv_path = Path(csv_path)
        classnames = _read_lines(Path(classnames_path), what="class name")
        if len(set(classnames)) != len(classnames):
            duplicates = sorted({c for c in classnames if classnames.count(c) > 1})
            raise ValueError(f"{classnames_path}: duplicate class names {duplicates}; names must be unique")
        templates = list(DEFAULT_TEMPLATES)
        if templates_path is not None:
            templates = _read_lines(Path(templates_path), what="template")
            for line_num, template in enumerate(templates, start=1):
                if "{c}" not in template:
                    raise ValueError(
                        f"{templates_path}:{line_num}: template {template!r} must contain {{c}} "
                        "where the class name goes"
                    )
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
        )

    def images(self) -> Iterator[Image.Image]:
        """The images as RGB, in `image_paths` order."""
        return _open_rgb(self.image_paths)

    def score(
        self, model: torch.nn.Module, tokenizer: Tokenizer, image_features: torch.Tensor, *,
        batch_size: int, device: str | torch.device,
    ) -> dict[str, float]:
        """acc1, acc5, mean_per_class_recall (see `zero_shot_metrics`) of the class prompts' classifier.

        A class's embedding is the mean of its normalised template embeddings, renormalised
        (open_clip's `build_zero_shot_classifier`); at most `batch_size` prompts go through the
        text tower at once (all templates of a class together).
        """
        # Templates hold "{c}" and may hold other braces, so they are filled by replace, not format().
        fill = [lambda c, t=template: t.replace("{c}", c) for template in self.templates]
        classifier = build_zero_shot_classifier(
            model, tokenizer, self.classnames, fill,
            num_classes_per_batch=max(1, batch_size // len(self.templates)), device=device,
        )  # [D, C]
        logits = (image_features @ classifier.float()).cpu()
        return zero_shot_metrics(logits, torch.tensor(self.labels))


@dataclass
class RetrievalTask:
    """Images and captions; caption `j` describes image `caption_to_image[j]`."""

    name: str
    image_paths: list[Path]
    captions: list[str]
    caption_to_image: list[int]

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

    @classmethod
    def from_csv(cls, csv_path: str | Path, *, name: str | None = None) -> RetrievalTask:
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
        )

    def images(self) -> Iterator[Image.Image]:
        """The images as RGB, in `image_paths` order."""
        return _open_rgb(self.image_paths)

    def score(
        self, model: torch.nn.Module, tokenizer: Tokenizer, image_features: torch.Tensor, *,
        batch_size: int, device: str | torch.device,
    ) -> dict[str, float]:
        """Image and text retrieval recall@1/5/10 and mean_recall@1 (see `retrieval_metrics`)."""
        tokens = tokenizer(self.captions)
        text_features = F.normalize(
            torch.cat([
                model.encode_text(tokens[i : i + batch_size].to(device)).float()
                for i in range(0, len(tokens), batch_size)
            ]),
            dim=-1,
        )
        similarity = (text_features @ image_features.t()).cpu()
        return retrieval_metrics(similarity, torch.tensor(self.caption_to_image))


# ---------------------------------------------------------------------------- files


def _open_rgb(paths: Sequence[Path]) -> Iterator[Image.Image]:
    for path in paths:
        with Image.open(path) as image:
            yield image.convert("RGB")


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
        for row in reader:
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
