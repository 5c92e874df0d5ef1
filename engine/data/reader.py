"""One worker slot's stream: its shards' samples through a seeded shuffle buffer, decoded into pieces.

Each DataLoader worker (or the main process, without workers) reads its reader slot (see `plan.py`),
passes the raw samples through a shuffle buffer seeded by (seed, epoch, slot), decodes and augments
them (augmentation seeded by (seed, epoch, row)) and sends pieces (see `batching.py`). A worker that
restarts mid-epoch passes over the raw samples it had already delivered without decoding them.
Skips travel with the pieces; the main process counts and logs them.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from engine.data.batching import Piece, Skip, WorkerStart
from engine.data.manifest import Manifest
from engine.data.plan import (
    Segment,
    resample_rng,
    sample_shuffle_rng,
    shard_order,
    slot_segments,
    stable_seed,
)
from engine.data.samples import (
    SKIP_EXTRA_SAMPLES,
    SKIP_TRUNCATED_SHARD,
    RawSample,
    Rejection,
    SkipRecord,
    TarSamples,
    decode_sample,
    describe_error,
)

logger = logging.getLogger(__name__)

# Resampled streams never end: a worker gives up (instead of spinning) after this many undecodable samples
# in a row, or this many shard draws in a row that yield no sample at all (plus 4 per shard).
MAX_UNDECODABLE_RUN = 10_000
MAX_EMPTY_DRAWS = 16

Skips = list[Skip]


@dataclass(frozen=True)
class StreamSettings:
    """What every worker of a rank needs to read its slot (sent to worker processes)."""

    manifest: Manifest
    batch_size: int
    image_transform: Callable[[Image.Image], Tensor]
    tokenizer: Callable[[list[str]], Tensor]
    rank: int
    world_size: int
    num_workers: int
    seed: int
    shuffle: bool
    shuffle_buffer: int
    resampled: bool
    max_image_pixels: int
    max_member_bytes: int

    @property
    def workers_per_rank(self) -> int:
        return max(self.num_workers, 1)


class _ShardSample(NamedTuple):
    """A raw sample with the shard it came from and its global u-table row."""

    shard_index: int
    row: int
    raw: RawSample


class EpochReader(IterableDataset):
    """The sample stream of one rank for an epoch; each DataLoader worker reads its slot.

    `starts[w]` is where worker w begins; skip records are made only when `record_skips` (not when the
    epoch's first batch is read again). `segments[w]`, when given, is what worker w reads instead of its
    part of the whole epoch (the rest of an interrupted epoch, see `continuation.py`).
    """

    def __init__(
        self,
        settings: StreamSettings,
        *,
        epoch: int,
        record_skips: bool,
        starts: tuple[WorkerStart, ...],
        segments: tuple[list[Segment], ...] | None = None,
    ):
        super().__init__()
        self.settings = settings
        self.epoch = epoch
        self.record_skips = record_skips
        self.starts = starts
        self.segments = segments
        self._passing_over = False

    def __iter__(self) -> Iterator[Piece]:
        cfg = self.settings
        info = get_worker_info()
        worker = 0 if info is None else info.id
        start = self.starts[worker]
        if start.done:
            return
        slot = cfg.rank * cfg.workers_per_rank + worker
        skips: Skips = []
        if cfg.resampled:
            samples = self._resampled_samples(slot, skips)
        elif self.segments is not None:
            parts = self.segments[worker]
            samples = itertools.chain.from_iterable(self._read_segment(seg, skips) for seg in parts)
        else:
            segments = slot_segments(
                cfg.manifest,
                slot=slot,
                world_size=cfg.world_size,
                workers_per_rank=cfg.workers_per_rank,
                order=shard_order(
                    cfg.manifest.num_shards, seed=cfg.seed, epoch=self.epoch, shuffle=cfg.shuffle
                ),
            )
            samples = itertools.chain.from_iterable(self._read_segment(seg, skips) for seg in segments)
        if cfg.shuffle:
            rng = sample_shuffle_rng(cfg.seed, self.epoch, slot)
            samples = wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng)(samples)
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

    def _skip(self, skips: Skips, record: SkipRecord, count: int, detail: str = "") -> None:
        """Note a skip for the main process, which counts and logs it (workers log nothing themselves)."""
        if self.record_skips and count and not self._passing_over:
            skips.append(Skip(record, count, detail))

    def _resampled_samples(self, slot: int, skips: Skips) -> Iterator[_ShardSample]:
        """Whole shards drawn with replacement, forever; an error if the draws keep coming up empty."""
        manifest = self.settings.manifest
        rng = resample_rng(self.settings.seed, self.epoch, slot)
        limit = MAX_EMPTY_DRAWS + 4 * manifest.num_shards
        num_empty = 0
        while True:
            num_read = 0
            shard_index = rng.randrange(manifest.num_shards)
            whole = Segment(shard_index, 0, manifest.shards[shard_index].num_samples)
            for sample in self._read_segment(whole, skips):
                num_read += 1
                yield sample
            num_empty = 0 if num_read else num_empty + 1
            if num_empty > limit:
                raise RuntimeError(
                    f"resampled reader slot {slot}: {num_empty} shard draws in a row held no readable sample; "
                    "check the shards with `python run.py shards check <dir>`"
                )

    def _read_segment(self, segment: Segment, skips: Skips) -> Iterator[_ShardSample]:
        """The segment's samples in tar order, numbered by the manifest before any decoding.

        Reading stops after the segment unless it ends the shard: then samples beyond the manifest's count
        are counted as not used (their rows would be the next shard's). Samples of the segment that a
        truncated tar lost are counted.
        """
        manifest = self.settings.manifest
        shard_index, start, stop, only = segment
        entry = manifest.shards[shard_index]
        offset = manifest.offsets[shard_index]
        tar = TarSamples(
            manifest.shard_path(shard_index),
            keep=lambda position: start <= position < stop and (only is None or position in only),
            expected=entry.num_samples,
            max_member_bytes=self.settings.max_member_bytes,
        )
        ends_shard = stop == entry.num_samples
        for raw in tar:
            yield _ShardSample(shard_index, offset + raw.position, raw)
            if raw.position == stop - 1 and not ends_shard:
                return  # the rest of the shard is other slots'
        num_extra = max(0, tar.num_started - entry.num_samples) if ends_shard else 0
        if num_extra:
            detail = (
                f" (the tar holds {tar.num_started}, the manifest {entry.num_samples}; re-index the shards)"
            )
            self._skip(skips, SkipRecord(entry.path, None, SKIP_EXTRA_SAMPLES), num_extra, detail)
        if not tar.truncated:
            return
        first_lost = max(start, min(stop, tar.num_whole))
        lost = stop - first_lost if only is None else sum(1 for p in only if p >= first_lost)
        cause = describe_error(tar.error) if tar.error else "tar ends early"
        detail = f" ({cause}; read {tar.num_whole} of {entry.num_samples} samples)"
        self._skip(skips, SkipRecord(entry.path, None, SKIP_TRUNCATED_SHARD), lost, detail)

    def _decode(self, sample: _ShardSample, skips: Skips) -> tuple[Tensor, str] | None:
        """(image tensor, caption), or None after recording why the sample is skipped."""
        decoded = decode_sample(sample.raw, max_image_pixels=self.settings.max_image_pixels)
        if isinstance(decoded, Rejection):
            shard = self.settings.manifest.shards[sample.shard_index].path
            self._skip(skips, SkipRecord(shard, sample.raw.key, decoded.reason), 1, decoded.detail)
            return None
        return self._augment(decoded.image, sample.row), decoded.caption

    def _augment(self, rgb: Image.Image, row: int) -> Tensor:
        """`image_transform` with torch's RNG seeded by (seed, epoch, row), restored afterwards in-process.

        Random augmentations then depend on the sample alone: the same with any number of workers and
        after a resume, whose workers draw nothing for the samples they pass over.
        """
        generator = torch.default_generator
        saved = generator.get_state() if get_worker_info() is None else None
        generator.manual_seed(stable_seed("augment", self.settings.seed, self.epoch, row))
        try:
            return self.settings.image_transform(rgb)
        finally:
            if saved is not None:
                generator.set_state(saved)

    def _pieces(
        self, samples: Iterator[_ShardSample], skips: Skips, *, worker: int, start: WorkerStart
    ) -> Iterator[Piece]:
        batch_size = self.settings.batch_size
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
                if self.settings.resampled and num_undecodable >= MAX_UNDECODABLE_RUN:
                    raise RuntimeError(
                        f"resampled reader of rank {self.settings.rank}: {num_undecodable} samples in a row "
                        "could not be used; check the shards with `python run.py shards check <dir>`"
                    )
                continue
            num_undecodable = 0
            images.append(decoded[0])
            captions.append(decoded[1])
            rows.append(sample.row)
            keys.append(sample.raw.key)
            if len(keys) == batch_size:
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
        skips: Skips,
    ) -> Piece:
        piece = Piece(
            worker=worker,
            index=index,
            raw_start=raw_start,
            raw_end=raw_end,
            final=final,
            images=torch.stack(images) if images else None,
            texts=self.settings.tokenizer(captions) if captions else None,
            rows=rows,
            keys=keys,
            skips=list(skips),
        )
        skips.clear()
        return piece
