"""Read webdataset shards into batches of (images, tokenized texts, u-table row ids), split across ranks.

Work split, per epoch: the shard list is shuffled with (seed, epoch), identically on every rank. There are
`world_size * max(num_workers, 1)` reader slots (slot = rank * workers + worker). With at least one shard per
slot, rank r reads shards order[r::world_size] and its worker w every workers-th of those; with fewer shards,
every slot reads every shard and keeps the samples whose global row satisfies row % slots == slot. Either
way each row belongs to exactly one slot. Every rank yields the same number of batches: as many full
batches as the smallest share any rank can be dealt holds. With shard splitting, equal shard sizes and a
shard count divisible by world_size waste nothing; otherwise the surplus of larger shares waits for a later
epoch. A rank left short by skipped samples reads its share again (logged) rather than stall the others.
In `resampled` mode (data too large for epochs) each slot instead draws shards with replacement from its
own seeded generator, and an epoch is `samples_per_epoch` samples.

Each slot's samples pass a seeded shuffle buffer and are decoded in the worker, which sends "pieces" (the
next batch_size decoded samples, with the skip records made while collecting them) numbered 0, 1, ... and
ending with a final piece. The main process takes the pieces in (number, worker) order and cuts them into
batches of exactly batch_size. The position after any batch is therefore a few counters per worker (pieces
taken, raw samples they spanned) plus how much of a partly used piece went out; `epoch(e, start_batch=k)`
restarts there, each worker passing over the samples it had already delivered without decoding them.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import random
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tar_file_expander, url_opener

from engine.manifest import Manifest, sample_key
from engine.shards import (
    IMAGE_ERRORS,
    IMAGE_EXTENSIONS,
    SKIP_CORRUPT_IMAGE,
    SKIP_EMPTY_CAPTION,
    SKIP_MISSING_CAPTION,
    SKIP_NON_UTF8_CAPTION,
)

logger = logging.getLogger(__name__)

SKIP_MISSING_IMAGE = "missing image"
SKIP_DUPLICATE_MEMBER = "duplicate member"
SKIP_TRUNCATED_SHARD = "truncated shard"
SKIP_EXTRA_SAMPLES = "samples beyond manifest count"

LOADER_STATE_FORMAT = "tuneclip-loader-state"
LOADER_STATE_VERSION = 1
# Resampled streams never end: a worker gives up (instead of spinning) after this many undecodable samples
# in a row, or this many shard draws in a row that yield no sample at all (plus 4 per shard).
MAX_UNDECODABLE_RUN = 10_000
MAX_EMPTY_DRAWS = 16

# Passed as webdataset's end-of-shard marker so it can never be mistaken for a tar member.
_END_OF_SHARD = object()


class SkipRecord(NamedTuple):
    """One skipped sample (or, with key None, samples of a shard that were not read or not used)."""

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
    """Piece `index` of a worker: its next decoded samples (up to batch_size) and the skips made meanwhile.

    It spans raw samples raw_start..raw_end of the worker's (shuffled) stream; `final` marks the last
    piece; `offset` counts samples already cut off into earlier batches.
    """

    worker: int
    index: int
    raw_start: int
    raw_end: int
    final: bool
    images: Tensor | None
    texts: Tensor | None
    sample_ids: list[int]
    keys: list[str]
    skips: list[tuple[SkipRecord, int]] = field(default_factory=list)
    offset: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> _Piece:
        """Called by DataLoader's pinning thread."""
        if self.images is not None:
            self.images = self.images.pin_memory()
            self.texts = self.texts.pin_memory()
        return self

    def cut(self, n: int) -> _Piece:
        """This piece without its first `n` samples."""
        return replace(
            self,
            images=self.images[n:] if self.images is not None else None,
            texts=self.texts[n:] if self.texts is not None else None,
            sample_ids=self.sample_ids[n:],
            keys=self.keys[n:],
            skips=[],
            offset=self.offset + n,
        )


@dataclass(frozen=True)
class _WorkerStart:
    """Where a worker (re)starts: its next piece number, the raw samples before it; `done`: nothing left."""

    next_piece: int = 0
    raw: int = 0
    done: bool = False


@dataclass(frozen=True)
class _Position:
    """A rank's place in an epoch: after `batches_done` batches, in read pass `read_pass`.

    `straddle` = (worker, n): that worker's next piece went partly into the last batch, its first n samples.
    """

    epoch: int
    batches_done: int
    read_pass: int
    workers: tuple[_WorkerStart, ...]
    straddle: tuple[int, int] | None = None

    @classmethod
    def pass_start(
        cls, epoch: int, num_workers: int, *, batches_done: int = 0, read_pass: int = 0
    ) -> _Position:
        return cls(epoch, batches_done, read_pass, (_WorkerStart(),) * num_workers)

    @property
    def at_pass_start(self) -> bool:
        return self.straddle is None and all(w == _WorkerStart() for w in self.workers)


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


def _resample_rng(seed: int, epoch: int, slot: int) -> random.Random:
    return random.Random(f"tuneclip-resample/{seed}/{epoch}/{slot}")


def _keep_piece(piece: _Piece) -> _Piece:
    return piece


class _EpochReader(IterableDataset):
    """The sample stream of one rank for one read pass of an epoch; each DataLoader worker reads its slot."""

    def __init__(
        self, loader: ShardLoader, *, epoch: int, record_skips: bool, starts: tuple[_WorkerStart, ...]
    ):
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
        self.resampled = loader.resampled
        self.epoch = epoch
        self.record_skips = record_skips
        self.starts = starts
        self._passing_over = False

    def __iter__(self) -> Iterator[_Piece]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        start = self.starts[worker]
        if start.done:
            return
        workers_per_rank = max(self.num_workers, 1)
        slot = self.rank * workers_per_rank + worker
        skips: list[tuple[SkipRecord, int]] = []
        if self.resampled:
            samples = self._resampled_samples(slot, skips)
        else:
            shards, row_filter = slot_shards(
                self.manifest,
                slot=slot,
                world_size=self.world_size,
                workers_per_rank=workers_per_rank,
                order=shard_order(
                    self.manifest.num_shards, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle
                ),
            )
            samples = self._raw_samples(shards, row_filter, skips)
        if self.shuffle:
            rng = random.Random(f"tuneclip-samples/{self.seed}/{self.epoch}/{slot}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        samples = iter(samples)
        if start.raw:
            # Samples delivered before the resume point: read (the shuffle needs them) but never decoded.
            # Their skips were counted when they were delivered: record none while passing over them.
            self._passing_over = True
            passed = sum(1 for _ in itertools.islice(samples, start.raw))
            self._passing_over = False
            if passed < start.raw:
                logger.warning(
                    "slot %d: the stream holds %d samples, the resume position is after %d",
                    slot,
                    passed,
                    start.raw,
                )
        yield from self._pieces(samples, skips, worker=worker, start=start)

    def _skip(
        self, skips: list[tuple[SkipRecord, int]], record: SkipRecord, count: int, detail: str = ""
    ) -> None:
        if not self.record_skips or count == 0 or self._passing_over:
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

    def _resampled_samples(self, slot: int, skips: list[tuple[SkipRecord, int]]) -> Iterator[_RawSample]:
        """Whole shards drawn with replacement, forever; an error if the draws keep coming up empty."""
        rng = _resample_rng(self.seed, self.epoch, slot)
        limit = MAX_EMPTY_DRAWS + 4 * self.manifest.num_shards
        num_empty = 0
        while True:
            num_read = 0
            for sample in self._read_shard(rng.randrange(self.manifest.num_shards), None, skips):
                num_read += 1
                yield sample
            num_empty = 0 if num_read else num_empty + 1
            if num_empty > limit:
                raise RuntimeError(
                    f"resampled reader slot {slot}: {num_empty} shard draws in a row held no readable sample; "
                    "check the shards with `python run.py shards check <dir>`"
                )

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
        current_key = None
        position = -1
        num_extra = 0
        for member in members:
            if member is _END_OF_SHARD:
                break
            assert member["__url__"] == url, (member["__url__"], url)
            key = sample_key(member["fname"])
            if key is None:
                continue
            if key != current_key:
                if pending is not None and mine(pending.position):
                    yield pending
                pending, current_key = None, key
                position += 1
                if position >= entry.num_samples:
                    # Its row would be the next shard's: never used; counted (by one slot) to the tar's end.
                    num_extra += mine(position)
                    continue
                pending = _RawSample(shard_index, position, offset + position, key)
            if pending is None or not mine(position):
                continue
            suffix = member["fname"][len(key) + 1 :].lower()
            if suffix in pending.parts:
                pending.problem = SKIP_DUPLICATE_MEMBER
            pending.parts[suffix] = member["data"]

        num_started = min(position + 1, entry.num_samples)
        truncated = bool(errors) or num_started < entry.num_samples
        # After a truncation the last sample read may lack members: keep it only if it has image and caption.
        complete = pending is not None and (not truncated or _has_image_and_caption(pending))
        if complete and mine(pending.position):
            yield pending
        if num_extra:
            detail = f" (the tar holds {position + 1}, the manifest {entry.num_samples}; re-index the shards)"
            self._skip(skips, SkipRecord(entry.path, None, SKIP_EXTRA_SAMPLES), num_extra, detail)
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
        return self._augment(rgb, sample.row), caption

    def _augment(self, rgb: Image.Image, row: int) -> Tensor:
        """`image_transform` with torch's RNG seeded by (seed, epoch, row), restored afterwards in-process.

        Random augmentations then depend on the sample alone: the same with any number of workers and
        after a resume, whose workers draw nothing for the samples they pass over.
        """
        generator = torch.default_generator
        saved = generator.get_state() if get_worker_info() is None else None
        generator.manual_seed(_stable_seed("augment", self.seed, self.epoch, row))
        try:
            return self.image_transform(rgb)
        finally:
            if saved is not None:
                generator.set_state(saved)

    def _pieces(
        self,
        samples: Iterator[_RawSample],
        skips: list[tuple[SkipRecord, int]],
        *,
        worker: int,
        start: _WorkerStart,
    ) -> Iterator[_Piece]:
        images: list[Tensor] = []
        captions: list[str] = []
        rows: list[int] = []
        keys: list[str] = []
        index, raw, piece_start = start.next_piece, start.raw, start.raw
        num_undecodable = 0
        for sample in samples:
            raw += 1
            decoded = self._decode(sample, skips)
            if decoded is None:
                num_undecodable += 1
                if self.resampled and num_undecodable >= MAX_UNDECODABLE_RUN:
                    raise RuntimeError(
                        f"resampled reader of rank {self.rank}: {num_undecodable} samples in a row could not be "
                        "used; check the shards with `python run.py shards check <dir>`"
                    )
                continue
            num_undecodable = 0
            images.append(decoded[0])
            captions.append(decoded[1])
            rows.append(sample.row)
            keys.append(sample.key)
            if len(keys) == self.batch_size:
                yield self._piece(worker, index, piece_start, raw, False, images, captions, rows, keys, skips)
                images, captions, rows, keys = [], [], [], []
                index, piece_start = index + 1, raw
        yield self._piece(worker, index, piece_start, raw, True, images, captions, rows, keys, skips)

    def _piece(
        self,
        worker: int,
        index: int,
        raw_start: int,
        raw_end: int,
        final: bool,
        images: list[Tensor],
        captions: list[str],
        rows: list[int],
        keys: list[str],
        skips: list[tuple[SkipRecord, int]],
    ) -> _Piece:
        piece = _Piece(
            worker=worker,
            index=index,
            raw_start=raw_start,
            raw_end=raw_end,
            final=final,
            images=torch.stack(images) if images else None,
            texts=self.tokenizer(captions) if captions else None,
            sample_ids=rows,
            keys=keys,
            skips=list(skips),
        )
        skips.clear()
        return piece


def slot_shards(
    manifest: Manifest, *, slot: int, world_size: int, workers_per_rank: int, order: list[int]
) -> tuple[list[int], tuple[int, int] | None]:
    """(shards reader `slot` reads, in order; row filter (num_slots, slot), or None when it owns whole shards)."""
    num_slots = world_size * workers_per_rank
    if manifest.num_shards >= num_slots:
        rank, worker = divmod(slot, workers_per_rank)
        return order[rank::world_size][worker::workers_per_rank], None
    return order, (num_slots, slot)


class _PieceMerger:
    """Hands on pieces in (piece number, worker) order, whatever order the workers deliver them in."""

    def __init__(self, starts: tuple[_WorkerStart, ...]):
        self.next_piece = [start.next_piece for start in starts]
        self.raw = [start.raw for start in starts]
        self.done = [start.done for start in starts]

    def progress(self) -> list[_WorkerStart]:
        return [_WorkerStart(n, raw, done) for n, raw, done in zip(self.next_piece, self.raw, self.done)]

    def merge(self, pieces: Iterable[_Piece]) -> Iterator[_Piece]:
        pending: dict[tuple[int, int], _Piece] = {}
        for piece in pieces:
            pending[(piece.worker, piece.index)] = piece
            while not all(self.done):
                worker = min(
                    (w for w, done in enumerate(self.done) if not done), key=lambda w: (self.next_piece[w], w)
                )
                ready = pending.pop((worker, self.next_piece[worker]), None)
                if ready is None:
                    break
                self.next_piece[worker] += 1
                self.raw[worker] = ready.raw_end
                self.done[worker] = ready.final
                yield ready
        if not all(self.done):
            raise RuntimeError(
                f"data workers {self.done} ended without their final piece (pending: {list(pending)})"
            )


class ShardLoader:
    """Batches of one rank from a manifest's shards; every rank yields exactly `num_batches()` per epoch.

    `resampled`: each reader slot draws shards with replacement (seeded by seed, epoch, slot) and an epoch
    is `samples_per_epoch` samples over all ranks. `pin_memory` (default: when CUDA is available) pins
    batches for fast host-to-device copies; `prefetch_factor` is the pieces each worker keeps ready.
    """

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
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        pin_memory: bool | None = None,
        prefetch_factor: int = 2,
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
        if prefetch_factor < 1:
            problems.append(f"prefetch_factor must be at least 1, got {prefetch_factor}")
        if resampled and (samples_per_epoch is None or samples_per_epoch < batch_size * world_size):
            problems.append(
                f"resampled needs samples_per_epoch >= batch_size x world_size = {batch_size * world_size} "
                f"(samples of all ranks per epoch), got {samples_per_epoch}"
            )
        if not resampled and samples_per_epoch is not None:
            problems.append(
                "samples_per_epoch sets the epoch length of resampled=True only; drop it or resample"
            )
        if resampled and manifest.num_shards == 0:
            problems.append("resampled needs at least one shard")
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
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        self.skipped: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.skipped_log: list[SkipRecord] = []
        self._position: _Position | None = None  # after the last batch yielded, or as restored by load_state
        if resampled:
            self._num_batches = samples_per_epoch // (batch_size * world_size)
            return
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

    @property
    def workers_per_rank(self) -> int:
        return max(self.num_workers, 1)

    def _rank_num_samples(self, rank: int) -> int:
        """Samples `rank` is guaranteed to be dealt in any epoch (counting corrupt ones)."""
        workers_per_rank = self.workers_per_rank
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

    # ----- reading -----
    def _pieces(self, reader: _EpochReader) -> Iterator[_Piece]:
        if self.num_workers == 0:
            yield from reader
            return
        # Worker RNG seeds follow (seed, epoch, rank), not the caller's global RNG.
        generator = torch.Generator().manual_seed(_stable_seed("workers", self.seed, reader.epoch, self.rank))
        loader = DataLoader(
            reader,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_keep_piece,
            generator=generator,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
        )
        yield from loader

    def _record(self, skips: list[tuple[SkipRecord, int]]) -> None:
        for record, count in skips:
            self.skipped[record.shard][record.reason] += count
            self.skipped_log.append(record)

    def epoch(self, epoch: int, *, start_batch: int = 0) -> Iterator[Batch]:
        """Yield the batches of this rank for `epoch` after the first `start_batch`, in a (seed, epoch) order.

        The batches are exactly those a run from batch 0 yields from `start_batch` on. The resume position
        comes from this loader (it yielded those batches, or `load_state` restored them); otherwise it is
        computed from the manifest's counts, which is exact unless samples before it were skipped (a saved
        `state()` makes it exact always). Samples before the position are read but not decoded.
        """
        if not 0 <= start_batch <= self.num_batches():
            raise ValueError(
                f"start_batch must be in [0, {self.num_batches()}] (batches per epoch), got {start_batch}"
            )
        position = self._position_at(epoch, start_batch)
        return self._batches(position)

    def _batches(self, position: _Position) -> Iterator[Batch]:
        num_batches = self.num_batches()
        num_yielded, read_pass = position.batches_done, position.read_pass
        while num_yielded < num_batches:
            reader = _EpochReader(
                self, epoch=position.epoch, record_skips=read_pass == 0, starts=position.workers
            )
            merger = _PieceMerger(position.workers)
            queue: deque[_Piece] = deque()
            num_queued = num_read = 0
            first_yielded = num_yielded
            pieces = self._pieces(reader)
            try:
                for piece in merger.merge(pieces):
                    straddle = position.straddle
                    if straddle and (piece.worker, piece.index) == (
                        straddle[0],
                        position.workers[straddle[0]].next_piece,
                    ):
                        piece = piece.cut(straddle[1])  # its first samples (and its skips) went out before
                    else:
                        self._record(piece.skips)
                    if not len(piece):
                        continue
                    queue.append(piece)
                    num_queued += len(piece)
                    num_read += len(piece)
                    while num_queued >= self.batch_size and num_yielded < num_batches:
                        batch = _take_batch(queue, self.batch_size, pin=self.pin_memory)
                        num_queued -= self.batch_size
                        num_yielded += 1
                        self._position = _position_after(
                            position.epoch, num_yielded, read_pass, merger, queue
                        )
                        yield batch
                    if num_yielded == num_batches:
                        break
            finally:
                del pieces  # stops DataLoader workers when the epoch ends early
            if num_yielded == num_batches:
                break
            if position.at_pass_start and num_yielded == first_yielded:
                raise RuntimeError(
                    f"rank {self.rank}: its part of epoch {position.epoch} holds {num_read} readable sample(s), "
                    f"less than one batch of {self.batch_size} (skipped: {dict(self.skipped)}); check the shards "
                    "with `python run.py shards check <dir>` or lower the batch size"
                )
            logger.warning(
                "rank %d epoch %d: %d of %d batches after skipped samples; reading its samples again to fill%s",
                self.rank,
                position.epoch,
                num_yielded,
                num_batches,
                f" ({num_queued} left over are dropped)" if num_queued else "",
            )
            read_pass += 1
            position = _Position.pass_start(
                position.epoch, self.workers_per_rank, batches_done=num_yielded, read_pass=read_pass
            )

    # ----- positions -----
    def _position_at(self, epoch: int, start_batch: int) -> _Position:
        if start_batch == 0:
            return _Position.pass_start(epoch, self.workers_per_rank)
        known = self._position
        if known is not None and (known.epoch, known.batches_done) == (epoch, start_batch):
            return known
        if start_batch == self.num_batches():
            return _Position.pass_start(epoch, self.workers_per_rank, batches_done=start_batch)
        logger.info(
            "rank %d: resuming epoch %d at batch %d from the manifest's counts (exact unless samples before it "
            "were skipped; restore a saved state() for an exact resume)",
            self.rank,
            epoch,
            start_batch,
        )
        return self._planned_position(epoch, start_batch)

    def _planned_position(self, epoch: int, batches_done: int) -> _Position:
        """The position after `batches_done` batches if every sample decodes and every tar matches its count."""
        workers_per_rank = self.workers_per_rank
        sizes = []
        for worker in range(workers_per_rank):
            slot = self.rank * workers_per_rank + worker
            if self.resampled:
                sizes.append(math.inf)
                continue
            order = shard_order(self.manifest.num_shards, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
            shards, row_filter = slot_shards(
                self.manifest,
                slot=slot,
                world_size=self.world_size,
                workers_per_rank=workers_per_rank,
                order=order,
            )
            if row_filter is None:
                sizes.append(sum(self.manifest.shards[i].num_samples for i in shards))
            else:
                sizes.append(len(range(row_filter[1], self.manifest.num_samples, row_filter[0])))
        merger = _PieceMerger((_WorkerStart(),) * workers_per_rank)
        queue: deque[_Piece] = deque()
        num_queued = num_yielded = 0

        def planned_pieces() -> Iterator[_Piece]:
            # Same numbering as the workers: full pieces, then a final one with the rest (maybe empty).
            for index in itertools.count():
                for worker, size in enumerate(sizes):
                    start = index * self.batch_size
                    if start > size:
                        continue
                    n = min(self.batch_size, size - start)
                    final = start + self.batch_size > size
                    yield _Piece(worker, index, start, start + n, final, None, None, [0] * n, [""] * n)
                if all(index * self.batch_size > size for size in sizes):
                    return

        for piece in merger.merge(planned_pieces()):
            if not len(piece):
                continue
            queue.append(piece)
            num_queued += len(piece)
            while num_queued >= self.batch_size:
                _take_counts(queue, self.batch_size)
                num_queued -= self.batch_size
                num_yielded += 1
                if num_yielded == batches_done:
                    return _position_after(epoch, num_yielded, 0, merger, queue)
        raise AssertionError(f"batch {batches_done} is beyond the planned epoch")

    def _identity(self) -> dict[str, Any]:
        """What a saved position depends on: the data, the split and the batching."""
        return {
            "manifest_fingerprint": self.manifest.fingerprint(),
            "world_size": self.world_size,
            "rank": self.rank,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "resampled": self.resampled,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def state(self, epoch: int, batches_done: int) -> dict[str, Any]:
        """JSON-able position of this rank after `batches_done` batches of `epoch`, for `load_state`.

        Available for batch 0, the end of the epoch, and the batch this loader last yielded (call it right
        after receiving that batch). Holds the skip counts so far, so they continue exactly on resume.
        """
        known = self._position
        if batches_done in (0, self.num_batches()):
            position = _Position.pass_start(epoch, self.workers_per_rank, batches_done=batches_done)
        elif known is not None and (known.epoch, known.batches_done) == (epoch, batches_done):
            position = known
        else:
            where = f"epoch {known.epoch} after {known.batches_done} batches" if known else "no batch yet"
            raise ValueError(
                f"state({epoch}, {batches_done}): this loader's last position is {where}; ask for the state "
                "right after receiving the batch it describes"
            )
        return {
            "format": LOADER_STATE_FORMAT,
            "version": LOADER_STATE_VERSION,
            **self._identity(),
            "epoch": position.epoch,
            "batches_done": position.batches_done,
            "read_pass": position.read_pass,
            "workers": [[w.next_piece, w.raw, w.done] for w in position.workers],
            "straddle": list(position.straddle) if position.straddle else None,
            "skipped": {shard: dict(reasons) for shard, reasons in self.skipped.items()},
        }

    def load_state(self, state: dict[str, Any]) -> tuple[int, int]:
        """Restore a `state()` saved by a loader over the same data and split; returns (epoch, start_batch).

        Continue with `epoch(epoch, start_batch=start_batch)`. ValueError names every setting that differs.
        """
        if not isinstance(state, dict) or state.get("format") != LOADER_STATE_FORMAT:
            raise ValueError("not a ShardLoader state (missing format 'tuneclip-loader-state')")
        if state.get("version") != LOADER_STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')!r}; this engine reads {LOADER_STATE_VERSION}"
            )
        problems = [
            f"{key}: saved {state.get(key)!r}, this loader {value!r}"
            for key, value in self._identity().items()
            if state.get(key) != value
        ]
        if problems:
            raise ValueError(
                "loader state does not fit this loader (" + "; ".join(problems) + "): resume with the same "
                "manifest, world size, rank, workers, seed and batching, or restart the epoch from batch 0"
            )
        workers = tuple(_WorkerStart(int(n), int(raw), bool(done)) for n, raw, done in state["workers"])
        batches_done = int(state["batches_done"])
        if len(workers) != self.workers_per_rank or not 0 <= batches_done <= self.num_batches():
            raise ValueError(
                f"loader state is inconsistent: {len(workers)} worker positions for {self.workers_per_rank} "
                f"workers, batch {batches_done} of {self.num_batches()}"
            )
        straddle = tuple(state["straddle"]) if state["straddle"] else None
        self._position = _Position(
            int(state["epoch"]), batches_done, int(state["read_pass"]), workers, straddle
        )
        self.skipped = defaultdict(Counter, {shard: Counter(r) for shard, r in state["skipped"].items()})
        return self._position.epoch, batches_done


def _position_after(
    epoch: int, batches_done: int, read_pass: int, merger: _PieceMerger, queue: deque[_Piece]
) -> _Position:
    """The position once `batches_done` batches are out; `queue` holds the rest of the last piece taken."""
    workers = merger.progress()
    straddle = None
    if queue:
        assert len(queue) == 1, "a batch is cut as soon as the queue can fill one"
        rest = queue[0]
        # The worker must produce that piece again; its first `offset` samples are then dropped.
        workers[rest.worker] = _WorkerStart(rest.index, rest.raw_start, False)
        straddle = (rest.worker, rest.offset)
    return _Position(epoch, batches_done, read_pass, tuple(workers), straddle)


def _take_counts(queue: deque[_Piece], batch_size: int) -> None:
    """`_take_batch` for pieces without tensors (planning)."""
    needed = batch_size
    while needed:
        piece = queue.popleft()
        n = min(needed, len(piece))
        if n < len(piece):
            queue.appendleft(piece.cut(n))
        needed -= n


def _take_batch(queue: deque[_Piece], batch_size: int, *, pin: bool = False) -> Batch:
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
            queue.appendleft(piece.cut(n))
        needed -= n
    batch = Batch(
        images=_concat(images, pin),
        texts=_concat(texts, pin),
        sample_ids=torch.tensor(sample_ids, dtype=torch.long),
        keys=keys,
    )
    if pin:
        batch.sample_ids = batch.sample_ids.pin_memory()
    return batch


def _concat(parts: list[Tensor], pin: bool) -> Tensor:
    if len(parts) == 1:
        return parts[0].pin_memory() if pin and not parts[0].is_pinned() else parts[0]
    if not pin:
        return torch.cat(parts)
    out = torch.empty(
        (sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype, pin_memory=True
    )
    return torch.cat(parts, out=out)
