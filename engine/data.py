"""Read webdataset shards into batches of (images, tokenized texts, u-table row ids), split across ranks.

Work split, per epoch: the shard list is shuffled with (seed, epoch), identically on every rank. There are
`world_size * max(num_workers, 1)` reader slots (slot = rank * workers + worker). With at least one shard per
slot, rank r reads shards order[r::world_size] and its worker w every workers-th of those; with fewer shards,
every slot reads every shard and keeps the samples whose global row satisfies row % slots == slot. Either
way each row belongs to exactly one slot. Every rank yields the same number of batches: as many full
batches as the smallest share any rank can be dealt holds. With shard splitting, equal shard sizes and a
shard count divisible by world_size waste nothing; otherwise the surplus of larger shares waits for a later
epoch. A rank left short by skipped samples repeats its own samples (logged) rather than stall the others.

Workers send "pieces" (up to batch_size decoded samples plus the skip records made since their last
piece) to the main process, which cuts them into batches of exactly batch_size and merges the skip
records into `ShardLoader.skipped`, so the counts are right with worker processes too.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tar_file_expander, url_opener

from engine.manifest import Manifest, sample_key
from engine.shards import (
    IMAGE_ERRORS,
    SKIP_CORRUPT_IMAGE,
    SKIP_EMPTY_CAPTION,
    SKIP_MISSING_CAPTION,
    SKIP_NON_UTF8_CAPTION,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SKIP_MISSING_IMAGE = "missing image"
SKIP_DUPLICATE_MEMBER = "duplicate member"
SKIP_TRUNCATED_SHARD = "truncated shard"
SKIP_EXTRA_SAMPLES = "samples beyond manifest count"

# Passed as webdataset's end-of-shard marker so it can never be mistaken for a tar member.
_END_OF_SHARD = object()


class SkipRecord(NamedTuple):
    """One skipped sample (or, with key None, the unread rest of a shard)."""

    shard: str
    key: str | None
    reason: str


@dataclass
class Batch:
    """images [B,3,H,W] float, texts [B,ctx] long, sample_ids [B] long (global u-table rows), tar keys."""

    images: Tensor
    texts: Tensor
    sample_ids: Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Piece:
    """Up to batch_size decoded samples from one reader slot, with the skips recorded since its last piece."""

    images: Tensor | None
    texts: Tensor | None
    sample_ids: list[int]
    keys: list[str]
    skips: list[tuple[SkipRecord, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _RawSample:
    """Undecoded tar members of one sample, with its raw position in its shard and its global row."""

    shard_index: int
    position: int
    row: int
    key: str
    parts: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


def _has_image_and_caption(sample: _RawSample) -> bool:
    return "txt" in sample.parts and any(ext in sample.parts for ext in IMAGE_EXTENSIONS)


def _describe(exn: Exception) -> str:
    # webdataset appends the stream and url to exn.args (or " @ <stream>" to the first); keep the readable part.
    message = getattr(exn, "strerror", None) or (exn.args[0] if exn.args else "")
    return f"{type(exn).__name__}: {str(message).split(' @ ')[0]}"


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Order in which shards are dealt to reader slots in `epoch`; identical on every rank."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"tuneclip-shards/{seed}/{epoch}").shuffle(order)
    return order


def _keep_piece(piece: _Piece) -> _Piece:
    return piece


class _EpochReader(IterableDataset):
    """The sample stream of one rank for one epoch; each DataLoader worker reads its own slot."""

    def __init__(self, loader: ShardLoader, *, epoch: int, record_skips: bool):
        super().__init__()
        self.manifest = loader.manifest
        self.batch_size = loader.batch_size
        self.image_transform = loader.image_transform
        self.tokenizer = loader.tokenizer
        self.rank = loader.rank
        self.world_size = loader.world_size
        self.num_workers = loader.num_workers
        self.seed = loader.seed
        self.shuffle = loader.shuffle
        self.shuffle_buffer = loader.shuffle_buffer
        self.epoch = epoch
        self.record_skips = record_skips

    def __iter__(self) -> Iterator[_Piece]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        workers_per_rank = max(self.num_workers, 1)
        num_slots = self.world_size * workers_per_rank
        slot = self.rank * workers_per_rank + worker
        order = shard_order(self.manifest.num_shards, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        if self.manifest.num_shards >= num_slots:
            shards, row_filter = order[self.rank :: self.world_size][worker::workers_per_rank], None
        else:
            shards, row_filter = order, (num_slots, slot)
        skips: list[tuple[SkipRecord, int]] = []
        samples: Iterator[_RawSample] = self._raw_samples(shards, row_filter, skips)
        if self.shuffle:
            rng = random.Random(f"tuneclip-samples/{self.seed}/{self.epoch}/{slot}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        yield from self._pieces(samples, skips)

    def _skip(
        self, skips: list[tuple[SkipRecord, int]], record: SkipRecord, count: int, detail: str = ""
    ) -> None:
        if not self.record_skips or count == 0:
            return
        skips.append((record, count))
        if record.key is None:
            logger.error(
                "shard %s: %s, %d sample(s) of this reader lost%s", record.shard, record.reason, count, detail
            )
        else:
            logger.warning(
                "skipping sample %s of shard %s: %s%s", record.key, record.shard, record.reason, detail
            )

    def _raw_samples(
        self, shards: list[int], row_filter: tuple[int, int] | None, skips: list[tuple[SkipRecord, int]]
    ) -> Iterator[_RawSample]:
        for shard_index in shards:
            yield from self._read_shard(shard_index, row_filter, skips)

    def _read_shard(
        self, shard_index: int, row_filter: tuple[int, int] | None, skips: list[tuple[SkipRecord, int]]
    ) -> Iterator[_RawSample]:
        """Group the shard's members into samples in tar order, numbering them before any decoding."""
        entry = self.manifest.shards[shard_index]
        url = str(self.manifest.shard_path(shard_index))
        offset = self.manifest.offsets[shard_index]

        def mine(position: int) -> bool:
            return row_filter is None or (offset + position) % row_filter[0] == row_filter[1]

        errors: list[Exception] = []

        def stop_shard(exn: Exception) -> bool:
            errors.append(exn)
            return False

        members = tar_file_expander(
            url_opener([{"url": url}], handler=stop_shard), handler=stop_shard, eof_value=_END_OF_SHARD
        )
        pending: _RawSample | None = None
        position = -1
        for member in members:
            if member is _END_OF_SHARD:
                break
            assert member["__url__"] == url, (member["__url__"], url)
            key = sample_key(member["fname"])
            if key is None:
                continue
            if pending is None or key != pending.key:
                if pending is not None and mine(pending.position):
                    yield pending
                position += 1
                if position >= entry.num_samples:
                    pending = None
                    extra = SkipRecord(entry.path, key, SKIP_EXTRA_SAMPLES)
                    self._skip(
                        skips, extra, 1, f" (the manifest lists {entry.num_samples}; re-index the shards)"
                    )
                    break
                pending = _RawSample(shard_index, position, offset + position, key)
            if not mine(position):
                continue
            suffix = member["fname"][len(key) + 1 :].lower()
            if suffix in pending.parts:
                pending.problem = SKIP_DUPLICATE_MEMBER
            pending.parts[suffix] = member["data"]

        num_started = position + 1
        truncated = bool(errors) or num_started < entry.num_samples
        # After a truncation the last sample read may lack members: keep it only if it has image and caption.
        complete = pending is not None and (not truncated or _has_image_and_caption(pending))
        if complete and mine(pending.position):
            yield pending
        if not truncated:
            return
        lost_from = num_started if complete or pending is None else pending.position
        lost = sum(1 for p in range(lost_from, entry.num_samples) if mine(p))
        cause = _describe(errors[0]) if errors else "tar ends early"
        detail = f" ({cause}; read {lost_from} of {entry.num_samples} samples)"
        self._skip(skips, SkipRecord(entry.path, None, SKIP_TRUNCATED_SHARD), lost, detail)

    def _decode(self, sample: _RawSample, skips: list[tuple[SkipRecord, int]]) -> tuple[Tensor, str] | None:
        """(image tensor, caption), or None after recording why the sample is skipped."""
        shard = self.manifest.shards[sample.shard_index].path
        reason, caption, detail = sample.problem, None, ""
        image_bytes = next((sample.parts[ext] for ext in IMAGE_EXTENSIONS if ext in sample.parts), None)
        if reason is None and image_bytes is None:
            reason = SKIP_MISSING_IMAGE
        if reason is None:
            raw_caption = sample.parts.get("txt")
            if raw_caption is None:
                reason = SKIP_MISSING_CAPTION
            else:
                try:
                    caption = raw_caption.decode("utf-8").strip()
                except UnicodeDecodeError:
                    reason = SKIP_NON_UTF8_CAPTION
                else:
                    reason = None if caption else SKIP_EMPTY_CAPTION
        if reason is None:
            try:
                with Image.open(io.BytesIO(image_bytes)) as image:
                    rgb = image.convert("RGB")
            except IMAGE_ERRORS as exn:
                reason, detail = SKIP_CORRUPT_IMAGE, f" ({type(exn).__name__}: {exn})"
        if reason is not None:
            self._skip(skips, SkipRecord(shard, sample.key, reason), 1, detail)
            return None
        return self.image_transform(rgb), caption

    def _pieces(self, samples: Iterator[_RawSample], skips: list[tuple[SkipRecord, int]]) -> Iterator[_Piece]:
        images: list[Tensor] = []
        captions: list[str] = []
        rows: list[int] = []
        keys: list[str] = []
        for sample in samples:
            decoded = self._decode(sample, skips)
            if decoded is not None:
                images.append(decoded[0])
                captions.append(decoded[1])
                rows.append(sample.row)
                keys.append(sample.key)
            if len(keys) == self.batch_size:
                yield self._piece(images, captions, rows, keys, skips)
                images, captions, rows, keys = [], [], [], []
        if keys or skips:
            yield self._piece(images, captions, rows, keys, skips)

    def _piece(
        self,
        images: list[Tensor],
        captions: list[str],
        rows: list[int],
        keys: list[str],
        skips: list[tuple[SkipRecord, int]],
    ) -> _Piece:
        piece = _Piece(
            images=torch.stack(images) if images else None,
            texts=self.tokenizer(captions) if captions else None,
            sample_ids=rows,
            keys=keys,
            skips=list(skips),
        )
        skips.clear()
        return piece


class ShardLoader:
    """Batches of one rank from a manifest's shards; every rank yields exactly `num_batches()` per epoch."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        batch_size: int,
        image_transform: Callable[[Image.Image], Tensor],
        tokenizer: Callable[[list[str]], Tensor],
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
    ):
        problems = []
        if batch_size < 1:
            problems.append(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            problems.append(f"rank must be in [0, world_size) with world_size >= 1, got {rank}/{world_size}")
        if num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {num_workers}")
        if shuffle and shuffle_buffer < 1:
            problems.append(f"shuffle_buffer must be at least 1 when shuffling, got {shuffle_buffer}")
        if problems:
            raise ValueError("ShardLoader: " + "; ".join(problems))
        for i in range(manifest.num_shards):
            manifest.shard_path(i)  # refuse escaping paths before any worker starts
        self.manifest = manifest
        self.batch_size = batch_size
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.skipped: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.skipped_log: list[SkipRecord] = []
        self._num_batches = min(self._rank_num_samples(r) for r in range(world_size)) // batch_size
        num_used = self._num_batches * batch_size * world_size
        if num_used == 0:
            logger.warning(
                "ShardLoader: %d samples give no full batch of %d per rank on %d rank(s)",
                manifest.num_samples,
                batch_size,
                world_size,
            )
        elif num_used < manifest.num_samples and rank == 0:
            logger.info(
                "ShardLoader: %d of %d samples per epoch fit %d batch(es) of %d on each of %d rank(s)",
                num_used,
                manifest.num_samples,
                self.num_batches(),
                batch_size,
                world_size,
            )

    def _rank_num_samples(self, rank: int) -> int:
        """Samples `rank` is guaranteed to be dealt in any epoch (counting corrupt ones)."""
        workers_per_rank = max(self.num_workers, 1)
        num_slots = self.world_size * workers_per_rank
        sizes = [shard.num_samples for shard in self.manifest.shards]
        if len(sizes) < num_slots:
            slots = range(rank * workers_per_rank, (rank + 1) * workers_per_rank)
            return sum(len(range(slot, self.manifest.num_samples, num_slots)) for slot in slots)
        if not self.shuffle:
            return sum(sizes[rank :: self.world_size])
        # Shuffled: the rank gets len(sizes) // world_size shards or one more, in the worst case the smallest.
        return sum(sorted(sizes)[: len(sizes) // self.world_size])

    def num_batches(self) -> int:
        """Batches per epoch on every rank (drop_last): the smallest full-batch count any rank can be dealt."""
        return self._num_batches

    @property
    def num_skipped(self) -> int:
        return sum(sum(reasons.values()) for reasons in self.skipped.values())

    def _pieces(self, reader: _EpochReader) -> Iterator[_Piece]:
        if self.num_workers == 0:
            yield from reader
            return
        # Seeds the workers' torch RNGs, so random image augmentations repeat for the same (seed, epoch).
        generator = torch.Generator().manual_seed(_stable_seed("workers", self.seed, reader.epoch, self.rank))
        loader = DataLoader(
            reader, batch_size=None, num_workers=self.num_workers, collate_fn=_keep_piece, generator=generator
        )
        yield from loader

    def _record(self, skips: list[tuple[SkipRecord, int]]) -> None:
        for record, count in skips:
            self.skipped[record.shard][record.reason] += count
            self.skipped_log.append(record)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Yield exactly `num_batches()` batches of this rank for `epoch`, in a (seed, epoch)-determined order."""
        num_batches = self.num_batches()
        queue: deque[_Piece] = deque()
        num_queued = num_yielded = 0
        read_pass = 0
        while num_yielded < num_batches:
            # A rank that runs short (skipped samples) refills from its own samples so no rank stalls.
            reader = _EpochReader(self, epoch=epoch, record_skips=read_pass == 0)
            num_read = 0
            pieces = self._pieces(reader)
            try:
                for piece in pieces:
                    self._record(piece.skips)
                    if not len(piece):
                        continue
                    queue.append(piece)
                    num_queued += len(piece)
                    num_read += len(piece)
                    while num_queued >= self.batch_size and num_yielded < num_batches:
                        yield _take_batch(queue, self.batch_size)
                        num_queued -= self.batch_size
                        num_yielded += 1
                    if num_yielded == num_batches:
                        break
            finally:
                del pieces  # stops DataLoader workers when the epoch ends early
            if num_yielded < num_batches:
                if num_read == 0:
                    raise RuntimeError(
                        f"rank {self.rank}: no readable samples in its part of epoch {epoch} "
                        f"(skipped: {dict(self.skipped)}); check the shards with Manifest.verify(checksums=True)"
                    )
                logger.warning(
                    "rank %d epoch %d: %d of %d batches after skipped samples; repeating its samples to fill",
                    self.rank,
                    epoch,
                    num_yielded,
                    num_batches,
                )
                read_pass += 1


def _take_batch(queue: deque[_Piece], batch_size: int) -> Batch:
    """Cut the first `batch_size` samples off the queued pieces."""
    images, texts, sample_ids, keys = [], [], [], []
    needed = batch_size
    while needed:
        piece = queue.popleft()
        n = min(needed, len(piece))
        assert piece.images is not None and piece.texts is not None
        images.append(piece.images[:n])
        texts.append(piece.texts[:n])
        sample_ids.extend(piece.sample_ids[:n])
        keys.extend(piece.keys[:n])
        if n < len(piece):
            rest = _Piece(piece.images[n:], piece.texts[n:], piece.sample_ids[n:], piece.keys[n:])
            queue.appendleft(rest)
        needed -= n
    return Batch(
        images=torch.cat(images) if len(images) > 1 else images[0],
        texts=torch.cat(texts) if len(texts) > 1 else texts[0],
        sample_ids=torch.tensor(sample_ids, dtype=torch.long),
        keys=keys,
    )
