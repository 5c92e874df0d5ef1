"""Zero-shot classification and image-text retrieval of an open_clip model on local data.

Metric names follow clip_benchmark so results can be compared with published tables.
Similarities are cosine similarities of L2-normalised features; the model's logit scale is
not applied because every metric here depends only on the ranking, which it does not change.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a {c}.",
    "a picture of the {c}.",
    "an image showing a {c}.",
)
RETRIEVAL_KS: tuple[int, ...] = (1, 5, 10)
ZEROSHOT_CLASSIFICATION = "zeroshot_classification"
ZEROSHOT_RETRIEVAL = "zeroshot_retrieval"

Transform = Callable[[Image.Image], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]


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


EvalTask = ZeroShotTask | RetrievalTask


def _read_lines(path: Path, *, what: str) -> list[str]:
    """Stripped lines of `path`; blank lines are allowed only at the end."""
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


# ---------------------------------------------------------------------------- features


@contextlib.contextmanager
def _inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd inside; every submodule's own train/eval flag restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def load_images(image_paths: Sequence[Path], transform: Transform) -> torch.Tensor:
    """Stack `transform(RGB image)` of every path into one [N, ...] tensor."""
    images = []
    for path in image_paths:
        with Image.open(path) as image:
            images.append(transform(image.convert("RGB")))
    return torch.stack(images)


def _encode_images(model, images: torch.Tensor, *, batch_size: int, device) -> torch.Tensor:
    """[N, D] L2-normalised float32 image features, computed `batch_size` images at a time."""
    features = [
        model.encode_image(images[i : i + batch_size].to(device)).float()
        for i in range(0, len(images), batch_size)
    ]
    return F.normalize(torch.cat(features), dim=-1)


def _encode_texts(model, tokens: torch.Tensor, *, batch_size: int, device) -> torch.Tensor:
    """[N, D] L2-normalised float32 text features, computed `batch_size` texts at a time."""
    features = [
        model.encode_text(tokens[i : i + batch_size].to(device)).float()
        for i in range(0, len(tokens), batch_size)
    ]
    return F.normalize(torch.cat(features), dim=-1)


def _prompts(task: ZeroShotTask) -> list[str]:
    """Class-major prompts: all templates of class 0, then of class 1, ..."""
    return [template.replace("{c}", c) for c in task.classnames for template in task.templates]


def _classifier(model, tokens: torch.Tensor, task: ZeroShotTask, *, batch_size: int, device) -> torch.Tensor:
    """[C, D] class embeddings: mean of normalised template embeddings, renormalised."""
    features = _encode_texts(model, tokens, batch_size=batch_size, device=device)
    features = features.view(len(task.classnames), len(task.templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1)


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


# ---------------------------------------------------------------------------- evaluation


def _zero_shot_on(model, tokens, images, task: ZeroShotTask, *, batch_size: int, device) -> dict[str, float]:
    classifier = _classifier(model, tokens, task, batch_size=batch_size, device=device)
    image_features = _encode_images(model, images, batch_size=batch_size, device=device)
    logits = (image_features @ classifier.t()).cpu()
    return zero_shot_metrics(logits, torch.tensor(task.labels))


def _retrieval_on(model, tokens, images, task: RetrievalTask, *, batch_size: int, device) -> dict[str, float]:
    text_features = _encode_texts(model, tokens, batch_size=batch_size, device=device)
    image_features = _encode_images(model, images, batch_size=batch_size, device=device)
    similarity = (text_features @ image_features.t()).cpu()
    return retrieval_metrics(similarity, torch.tensor(task.caption_to_image))


def zero_shot(
    model,
    tokenizer: Tokenizer,
    transform: Transform,
    task: ZeroShotTask,
    *,
    batch_size: int = 64,
    device="cpu",
) -> dict[str, float]:
    """acc1, acc5, mean_per_class_recall of `model` on `task` (see `zero_shot_metrics`)."""
    images = load_images(task.image_paths, transform)
    with _inference_mode(model):
        return _zero_shot_on(
            model, tokenizer(_prompts(task)), images, task, batch_size=batch_size, device=device
        )


def retrieval(
    model,
    tokenizer: Tokenizer,
    transform: Transform,
    task: RetrievalTask,
    *,
    batch_size: int = 64,
    device="cpu",
) -> dict[str, float]:
    """Image and text retrieval recall@1/5/10 and mean_recall@1 (see `retrieval_metrics`)."""
    images = load_images(task.image_paths, transform)
    with _inference_mode(model):
        return _retrieval_on(
            model, tokenizer(task.captions), images, task, batch_size=batch_size, device=device
        )


class Evaluator:
    """Evaluate a model on several local tasks, caching transformed images and tokens across calls."""

    def __init__(self, tasks: Sequence[EvalTask], *, batch_size: int = 64, device="cpu") -> None:
        tasks = list(tasks)
        errors = []
        if not tasks:
            errors.append("tasks is empty; give at least one ZeroShotTask or RetrievalTask")
        errors += [
            f"task {i} is a {type(t).__name__}, expected ZeroShotTask or RetrievalTask"
            for i, t in enumerate(tasks)
            if not isinstance(t, ZeroShotTask | RetrievalTask)
        ]
        names = [t.name for t in tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            errors.append(f"task names {duplicates} are used more than once; names must be unique")
        if batch_size <= 0:
            errors.append(f"batch_size must be greater than 0, got {batch_size}")
        if errors:
            raise ValueError("Evaluator: " + "; ".join(errors))
        self.tasks = tasks
        self.batch_size = batch_size
        self.device = device
        # Keyed by task name; the transform/tokenizer is kept so a different one invalidates the entry.
        self._images: dict[str, tuple[Transform, torch.Tensor]] = {}
        self._tokens: dict[str, tuple[Tokenizer, torch.Tensor]] = {}

    def __call__(self, model, tokenizer: Tokenizer, transform: Transform) -> dict[str, dict[str, float]]:
        """Metrics of every task, keyed by task name; `model` keeps its train/eval mode."""
        results = {}
        with _inference_mode(model):
            for task in self.tasks:
                start = time.perf_counter()
                images = self._cached_images(task, transform)
                tokens = self._cached_tokens(task, tokenizer)
                run = _zero_shot_on if isinstance(task, ZeroShotTask) else _retrieval_on
                results[task.name] = run(
                    model, tokens, images, task, batch_size=self.batch_size, device=self.device
                )
                logger.info(
                    "eval %s (%.1fs): %s",
                    task.name,
                    time.perf_counter() - start,
                    " ".join(f"{k}={v:.4f}" for k, v in results[task.name].items()),
                )
        return results

    def _cached_images(self, task: EvalTask, transform: Transform) -> torch.Tensor:
        cached = self._images.get(task.name)
        if cached is None or cached[0] is not transform:
            cached = (transform, load_images(task.image_paths, transform))
            self._images[task.name] = cached
        return cached[1]

    def _cached_tokens(self, task: EvalTask, tokenizer: Tokenizer) -> torch.Tensor:
        cached = self._tokens.get(task.name)
        if cached is None or cached[0] is not tokenizer:
            texts = _prompts(task) if isinstance(task, ZeroShotTask) else task.captions
            cached = (tokenizer, tokenizer(texts))
            self._tokens[task.name] = cached
        return cached[1]


# ---------------------------------------------------------------------------- results


def _task_kind(task_name: str, metrics: dict[str, float]) -> str:
    if "acc1" in metrics:
        return ZEROSHOT_CLASSIFICATION
    if "image_retrieval_recall@1" in metrics:
        return ZEROSHOT_RETRIEVAL
    raise ValueError(
        f"results[{task_name!r}] has neither acc1 nor image_retrieval_recall@1; "
        f"cannot tell its task kind (metrics: {sorted(metrics)})"
    )


def write_results(
    path: str | Path, results: dict[str, dict[str, float]], *, model_name: str, pretrained: str
) -> Path:
    """Write clip_benchmark-style records (one per task) as a JSON list, atomically; returns `path`."""
    path = Path(path)
    records = [
        {
            "dataset": task_name,
            "model": model_name,
            "pretrained": pretrained,
            "task": _task_kind(task_name, metrics),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "language": "en",
        }
        for task_name, metrics in results.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    return path


def headline_metric(results: dict[str, dict[str, float]], key: str) -> float:
    """The metric named `"<task>/<metric>"`, e.g. `"synthetic-zeroshot/acc1"`."""
    task_name, sep, metric = key.rpartition("/")
    if not sep or metric not in results.get(task_name, {}):
        available = [f"{t}/{m}" for t, metrics in results.items() for m in metrics]
        raise ValueError(
            f"headline metric {key!r} not found; use '<task>/<metric>', "
            f"one of: {', '.join(available) or 'none'}"
        )
    return float(results[task_name][metric])
