"""Where evaluation images come from and who reads which: image lists (CSV), webdataset tars,
clip_benchmark's offline layout; the stream a DataLoader decodes batch by batch.

Every sample has a sort key `(shard, position)` (a CSV row is `(0, row)`), so results gathered from
any number of ranks and loader workers are put back in one order. A sample belongs to exactly one
`Part` (rank, loader worker): whole shards are dealt out while there are enough of them, single
samples otherwise, so every rank reads only what it evaluates when the set has many shards.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from engine.data.samples import (
    DEFAULT_LIMITS,
    IMAGE_ERRORS,
    IMAGE_EXTENSIONS,
    SKIP_MEMBER_TOO_LARGE,
    ReadLimits,
    TarSamples,
    describe_error,
    open_image,
    pixel_rejection,
    to_rgb,
)
from engine.data.sources import find_shards

Key = tuple[int, int]  # (shard index, position in the shard)
Sample = tuple[Key, Image.Image, Any]  # key, RGB image, target (label or captions)


@dataclass(frozen=True)
class Part:
    """One reader of a set: loader worker `worker` of `num_workers` on rank `rank` of `world_size`."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1


def shard_plan(num_shards: int, part: Part) -> tuple[list[int], Callable[[int], bool]]:
    """The shards `part` opens and which positions in them it keeps (pure; disjoint over all parts).

    Ranks get whole shards while there are at least as many shards as ranks, else every rank opens
    every shard and keeps positions `pos % world_size == rank`; loader workers split a rank's share
    the same way.
    """
    shards = list(range(num_shards))
    rank_by_shard = num_shards >= part.world_size
    if rank_by_shard:
        shards = [s for s in shards if s % part.world_size == part.rank]
        keep_rank = lambda pos: True
    else:
        keep_rank = lambda pos: pos % part.world_size == part.rank
    if rank_by_shard and len(shards) >= part.num_workers:
        return shards[part.worker :: part.num_workers], keep_rank
    if rank_by_shard:
        return shards, lambda pos: pos % part.num_workers == part.worker
    # Positions kept by this rank are pos = rank + k * world_size; workers take every num_workers-th k.
    return shards, lambda pos: keep_rank(pos) and (pos // part.world_size) % part.num_workers == part.worker


def list_plan(num_items: int, part: Part) -> range:
    """Indices of a list-backed set (a CSV) that `part` reads: rank, then worker, round robin."""
    return range(part.rank + part.worker * part.world_size, num_items, part.world_size * part.num_workers)


def decode_image(source: bytes | Path, where: str, *, max_image_pixels: int) -> Image.Image:
    """The image in `source` (bytes, or a file) as RGB; ValueError naming `where` when it has more than
    `max_image_pixels` pixels (judged from its header, before decoding) or cannot be decoded."""
    try:
        with open_image(source) as image:
            too_large = pixel_rejection(image, max_image_pixels=max_image_pixels)
            if too_large is None:
                return to_rgb(image)
    except IMAGE_ERRORS as exn:
        raise ValueError(f"{where}: cannot decode its image ({describe_error(exn)})") from exn
    raise ValueError(f"{where}: image too large{too_large.detail}; raise data.max_image_pixels "
                     "(--set data.max_image_pixels=N) or remove the image from the set")


def list_samples(paths: Sequence[Path], targets: Sequence[Any], part: Part,
                 limits: ReadLimits = DEFAULT_LIMITS) -> Iterator[Sample]:
    """`part`'s share of images on disk, as RGB, with their targets; see `decode_image` for the errors."""
    for i in list_plan(len(paths), part):
        yield (0, i), decode_image(paths[i], str(paths[i]), max_image_pixels=limits.max_image_pixels), targets[i]


def tar_samples(
    shards: Sequence[Path], part: Part, target: Callable[[dict[str, bytes], str], Any],
    limits: ReadLimits = DEFAULT_LIMITS,
) -> Iterator[Sample]:
    """`part`'s share of webdataset shards: the first image member of each sample (jpg, jpeg, png,
    webp) as RGB and `target(parts, where)`; a sample without an image, with a member the reader left
    unread (sparse, larger than `limits.max_member_bytes`) or an image over `limits.max_image_pixels`, and a
    damaged tar raise ValueError naming the shard and sample."""
    indices, keep = shard_plan(len(shards), part)
    for shard_index in indices:
        path = shards[shard_index]
        reader = TarSamples(path, keep=keep, max_member_bytes=limits.max_member_bytes)
        for sample in reader:
            where = f"{path}: sample {sample.key!r}"
            if sample.unread is not None:
                fix = ("raise data.max_member_bytes (--set data.max_member_bytes=N) or remove the sample"
                       if sample.unread.reason == SKIP_MEMBER_TOO_LARGE else "rewrite the shard with plain members")
                raise ValueError(f"{where}: {sample.unread.reason}{sample.unread.detail}; {fix}")
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample.parts), None)
            if ext is None:
                raise ValueError(f"{where} has no image ({', '.join(IMAGE_EXTENSIONS)} member); "
                                 "fix or remove the sample")
            rgb = decode_image(sample.parts[ext], where, max_image_pixels=limits.max_image_pixels)
            yield (shard_index, sample.position), rgb, target(sample.parts, where)
        if reader.error is not None:
            raise ValueError(f"{path}: cannot read the tar ({describe_error(reader.error)}); replace the shard")


def class_label(parts: dict[str, bytes], where: str) -> int:
    """The class index in a sample's `cls` member (clip_benchmark and webdataset convention)."""
    raw = parts.get("cls")
    try:
        return int(raw.decode("utf-8").strip())
    except (AttributeError, UnicodeDecodeError, ValueError):
        raise ValueError(f"{where}: needs a 'cls' member holding the class index, got {raw!r}") from None


def captions(parts: dict[str, bytes], where: str) -> list[str]:
    """The captions in a sample's `txt` member, one per line (clip_benchmark's retrieval sets)."""
    raw = parts.get("txt")
    try:
        lines = [line.strip() for line in raw.decode("utf-8").splitlines()]
    except (AttributeError, UnicodeDecodeError):
        raise ValueError(f"{where}: needs a UTF-8 'txt' member with one caption per line") from None
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{where}: its 'txt' member holds no caption")
    return lines


def shard_list(spec: str | os.PathLike) -> list[Path]:
    """Tars named by `spec`: a folder (its *.tar), a brace/glob pattern, several joined by '::'."""
    return find_shards(spec)[0]


_NSHARDS = re.compile(r"[0-9]{1,12}")
_NSHARDS_MAX_CHARS = 64  # read no more of nshards.txt than a number needs


@dataclass(frozen=True)
class ClipBenchmarkSet:
    """A clip_benchmark webdataset folder: `<root>/<split>/{0..n-1}.tar` (+ nshards.txt) and its text files."""

    root: Path
    split: str
    shards: list[Path]
    dataset_type: str  # classification | retrieval
    classnames: list[str] | None
    templates: list[str] | None


def read_clip_benchmark(root: str | os.PathLike, split: str = "test") -> ClipBenchmarkSet:
    """Read the layout offline; raises ValueError naming the file that is missing or wrong."""
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder; a clip_benchmark set is <root>/<split>/*.tar "
                         f"(split {split!r}; set 'split' in the task)")
    nshards_file = folder / "nshards.txt"
    present = sorted(folder.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    if nshards_file.is_file():
        with nshards_file.open("rb") as file:
            text = file.read(_NSHARDS_MAX_CHARS + 1).decode("utf-8", errors="replace").strip()
        if not _NSHARDS.fullmatch(text) or int(text) == 0:
            raise ValueError(f"{nshards_file}: must hold the number of shards (a positive integer), got "
                             f"{text[:_NSHARDS_MAX_CHARS]!r}")
        # The shards it names are 0.tar .. n-1.tar: more than the folder holds cannot all exist.
        if int(text) > len(present):
            raise ValueError(f"{nshards_file} says {text} shards but {folder} holds {len(present)} *.tar "
                             f"file(s); fix nshards.txt or add the missing shards")
        shards = [folder / f"{i}.tar" for i in range(int(text))]
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise ValueError(f"{nshards_file} says {text} shards but {missing[0]} is missing")
    else:
        shards = present
        if not shards:
            raise ValueError(f"{folder}: no *.tar shards and no nshards.txt")
    type_file = root / "dataset_type.txt"
    dataset_type = type_file.read_text(encoding="utf-8").strip().lower() if type_file.is_file() else "classification"
    if dataset_type not in ("classification", "retrieval"):
        raise ValueError(f"{type_file}: dataset type {dataset_type!r} is not supported; "
                         "classification or retrieval")

    def lines(name: str) -> list[str] | None:
        path = root / name
        if not path.is_file():
            return None
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    return ClipBenchmarkSet(root, split, shards, dataset_type, lines("classnames.txt"),
                            lines("zeroshot_classification_templates.txt"))


class SampleError(NamedTuple):
    """A ValueError met while reading samples, carried as data: re-raised by a DataLoader, its message would
    gain the worker's traceback; the evaluator raises it again as one line."""

    message: str

    def error(self, task_name: str) -> ValueError:
        return ValueError(f"task {task_name!r}: {self.message}")


class EvalStream(IterableDataset):
    """One rank's share of a task's samples as `(key, transform(image), target)`, split over loader workers.

    A ValueError of the samples (a bad file) ends the stream with a `SampleError` holding its message.
    """

    def __init__(self, samples: Callable[[Part], Iterator[Sample]], transform: Callable, *, rank: int,
                 world_size: int):
        self.samples, self.transform = samples, transform
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = get_worker_info()
        part = Part(self.rank, self.world_size, info.id if info else 0, info.num_workers if info else 1)
        try:
            for key, image, target in self.samples(part):
                yield key, self.transform(image), target
        except ValueError as exn:
            yield SampleError(str(exn))


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, list] | SampleError:
    """[b, 2] int64 keys, stacked images, targets as a list; the batch's SampleError if it holds one."""
    error = next((item for item in batch if isinstance(item, SampleError)), None)
    if error is not None:
        return error
    keys, images, targets = zip(*batch, strict=True)
    return torch.tensor(keys, dtype=torch.long), torch.stack(images), list(targets)
