"""ShardLoader: one rank's batches of (images, tokenized texts, u-table row ids), and its position.

Every usable sample is used exactly once per epoch, on any number of ranks and workers, skips or not.
The rule that keeps ranks' batch counts equal depends on the manifest alone, so every rank computes it
without communicating:

- each epoch's M rows (the manifest's samples, in the epoch's shuffled shard order) are dealt to the W
  ranks as contiguous shares of floor(M / W) or ceil(M / W) rows (see `plan.py`);
- every rank yields num_batches() = ceil(ceil(M / W) / B) batches of B, enough for the largest share,
  so no usable sample is ever left out (0 when the smallest share is under one batch);
- a rank yields every usable sample of its share once; when they are fewer than its batches take (its
  share is not a multiple of B, is the smaller one, or had samples skipped), its last batch(es) are
  completed by padding slots (copies of its first samples of the epoch, in order, so shapes stay fixed
  and the model sees ordinary inputs). Padding comes last in a batch, is flagged (`Batch.valid`,
  `Batch.num_padding`), counted (`num_padding`) and logged, and the objective masks it: a padding slot
  is never an anchor or a negative and updates no estimate (`engine.objectives.padding`), so no sample
  counts twice in an epoch. A rank with fewer usable samples than one batch raises instead.

In `resampled` mode (data too large for epochs) an epoch is `samples_per_epoch` samples over all ranks.

The loader tracks its position (see `batching.py`): `state_dict()` is the position after the last batch
it yielded, with the skip counts so far; `load_state_dict()` restores it, and `epoch(e, start_batch=k)`
continues there exactly, each worker passing over the samples it had already delivered.

Skipped samples are counted per shard (`skipped`) by the loader's `SkipReport` (`skips.py`): the first
SKIP_WARNINGS_PER_EPOCH of an epoch are logged one by one, then only their totals at the epoch's end. Lost
shard parts are always logged.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from engine.data.batching import (
    Batch,
    Piece,
    PieceMerger,
    Position,
    WorkerStart,
    as_piece,
    keep_piece,
    planned_position,
    position_after,
    take_batch,
)
from engine.data.continuation import EpochPlan
from engine.data.manifest import Manifest
from engine.data.plan import Segment, rank_num_samples, shard_order, slot_num_samples, stable_seed
from engine.data.reader import EpochReader, StreamSettings
from engine.data.resharding import WorldSizeChange
from engine.data.samples import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_MEMBER_BYTES, SkipRecord
from engine.data.skips import SkipReport

logger = logging.getLogger(__name__)

LOADER_STATE_FORMAT = "tuneclip-loader-state"
LOADER_STATE_VERSION = 2


class ShardLoader(WorldSizeChange):
    """Batches of one rank from a manifest's shards; every rank yields exactly `num_batches()` per epoch.

    `resampled`: each reader slot draws shards with replacement (seeded by seed, epoch, slot) and an epoch
    is `samples_per_epoch` samples over all ranks. `pin_memory` (default: when CUDA is available) pins
    batches for fast host-to-device copies; `prefetch_factor` is the pieces each worker keeps ready.
    Images of more than `max_image_pixels` pixels are skipped from their header, before decoding; tar
    members of more than `max_member_bytes` bytes, and sparse ones, are skipped unread.
    """

    STATE_VERSION = LOADER_STATE_VERSION

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
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
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
        if max_image_pixels < 1:
            problems.append(f"max_image_pixels must be at least 1, got {max_image_pixels}")
        if max_member_bytes < 1:
            problems.append(f"max_member_bytes must be at least 1, got {max_member_bytes}")
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
        self.settings = StreamSettings(
            manifest=manifest,
            batch_size=batch_size,
            image_transform=image_transform,
            tokenizer=tokenizer,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            seed=seed,
            shuffle=shuffle,
            shuffle_buffer=shuffle_buffer,
            resampled=resampled,
            max_image_pixels=max_image_pixels,
            max_member_bytes=max_member_bytes,
        )
        self.skips = SkipReport(rank=rank)  # counted, logged, written to a skip file by the run (`report`)
        self.num_padding = 0  # padding slots of last batches (masked copies), over all epochs
        # After the last batch yielded, as restored by load_state_dict, or where epoch() was asked to start.
        self._position = Position.start(0, self.workers_per_rank)
        self._fill: tuple[int, Piece] | None = None  # (epoch, its first batch): what fills its last batches
        # The rest of an epoch interrupted on another world size: (its plan, what it continues, for saving).
        self._continuation: tuple[EpochPlan, dict[str, Any]] | None = None
        if resampled:
            self._num_batches = samples_per_epoch // (batch_size * world_size)
            return
        share = rank_num_samples(manifest, rank=rank, world_size=world_size)
        smallest = manifest.num_samples // world_size
        largest = -(-manifest.num_samples // world_size)
        self._num_batches = -(-largest // batch_size) if smallest >= batch_size else 0
        if self._num_batches == 0:
            logger.warning(
                "ShardLoader: %d samples give no full batch of %d per rank on %d rank(s)",
                manifest.num_samples,
                batch_size,
                world_size,
            )
        elif self._num_batches * batch_size > share:
            logger.info(
                "ShardLoader: rank %d is dealt %d of %d samples per epoch for %d batch(es) of %d: its last "
                "batch ends in %d masked padding slot(s) (more if samples are skipped)",
                rank,
                share,
                manifest.num_samples,
                self._num_batches,
                batch_size,
                self._num_batches * batch_size - share,
            )

    @property
    def workers_per_rank(self) -> int:
        return max(self.num_workers, 1)

    def num_batches(self, epoch: int | None = None) -> int:
        """Batches per epoch on every rank: ceil(ceil(M / W) / B), enough for the largest rank share.

        For an epoch continued from another world size (`load_rank_states`): the batches done before the
        change plus enough for the largest share of what was left.
        """
        plan = self._continued(epoch)
        return self._num_batches if plan is None else plan.num_batches()

    def _continued(self, epoch: int | None) -> EpochPlan | None:
        """The plan of `epoch` if it is the rest of an epoch continued from another world size."""
        if epoch is None or self._continuation is None or self._continuation[0].epoch != epoch:
            return None
        return self._continuation[0]

    def _stream_start(self, epoch: int) -> int:
        """The batch this loader's streams of `epoch` start at (0, or where a continued epoch was cut)."""
        plan = self._continued(epoch)
        return 0 if plan is None else plan.first_batch

    def _epoch_start(self, epoch: int) -> Position:
        return Position.start(epoch, self.workers_per_rank, batches_done=self._stream_start(epoch))

    def _reader(self, epoch: int, *, record_skips: bool, starts: tuple[WorkerStart, ...]) -> EpochReader:
        plan = self._continued(epoch)
        segments: tuple[list[Segment], ...] | None = None
        if plan is not None:
            first_slot = self.rank * self.workers_per_rank
            segments = tuple(
                plan.segments(plan.slot_part(first_slot + worker)) for worker in range(self.workers_per_rank)
            )
        return EpochReader(self.settings, epoch=epoch, record_skips=record_skips, starts=starts, segments=segments)

    @property
    def skipped(self) -> defaultdict[str, Counter[str]]:
        """Samples skipped so far: shard -> reason -> count."""
        return self.skips.counts

    @property
    def skipped_log(self) -> list[SkipRecord]:
        """Every skip so far, in order."""
        return self.skips.records

    @property
    def num_skipped(self) -> int:
        return self.skips.num_skipped

    # ----- reading -----
    def epoch(self, epoch: int, *, start_batch: int = 0) -> Iterator[Batch]:
        """Yield the batches of this rank for `epoch` after the first `start_batch`, in a (seed, epoch) order.

        The batches are exactly those a run from batch 0 yields from `start_batch` on. The position is
        this loader's own when it is (epoch, start_batch) (it yielded those batches, or
        `load_state_dict` restored them); otherwise it is computed from the manifest's counts, which is
        exact unless samples before it were skipped. Samples before the position are read, not decoded.
        An epoch continued from another world size starts at the batch it was cut at.
        """
        first, last = self._stream_start(epoch), self.num_batches(epoch)
        if not first <= start_batch <= last:
            raise ValueError(
                f"start_batch must be in [{first}, {last}] (batches of epoch {epoch}), got {start_batch}"
            )
        self._position = self._position_at(epoch, start_batch)
        if start_batch == first:
            self.skips.start_epoch(epoch)
        return self._batches(self._position)

    def _pieces(self, reader: EpochReader) -> Iterator[Piece]:
        if self.num_workers == 0:
            yield from reader
            return
        # Worker RNG seeds follow (seed, epoch, rank), not the caller's global RNG.
        generator = torch.Generator().manual_seed(stable_seed("workers", self.seed, reader.epoch, self.rank))
        loader = DataLoader(
            reader,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=keep_piece,
            generator=generator,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
        )
        yield from loader

    def _batches(self, position: Position) -> Iterator[Batch]:
        """The batches after `position`: its share's usable samples, then fill batches (see the module)."""
        epoch, num_batches = position.epoch, self.num_batches(position.epoch)
        num_yielded = position.batches_done
        continued = self._continued(epoch) is not None
        if num_yielded >= num_batches:
            return
        merger = PieceMerger(position.workers)
        queue: deque[Piece] = deque()
        num_queued = 0
        # The last batch waits for the end of the stream (all skips counted); a resampled stream never ends.
        num_before_end = num_batches if self.resampled else num_batches - 1
        if not position.all_read:
            reader = self._reader(epoch, record_skips=True, starts=position.workers)
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
                        self.skips.add(piece.skips, epoch)
                    if not len(piece):
                        continue
                    queue.append(piece)
                    num_queued += len(piece)
                    while num_queued >= self.batch_size and num_yielded < num_before_end:
                        batch = take_batch(queue, self.batch_size, pin=self.pin_memory)
                        num_queued -= self.batch_size
                        num_yielded += 1
                        yield self._yielding(batch, position_after(epoch, num_yielded, merger, queue))
                    if num_yielded == num_batches:
                        break
            finally:
                del pieces  # stops DataLoader workers when the epoch ends early
        if num_yielded == num_batches:
            return
        assert num_queued <= self.batch_size, "a share never holds more usable samples than its batches take"
        if num_yielded == 0 and num_queued < self.batch_size and not continued:
            raise RuntimeError(
                f"rank {self.rank}: its part of epoch {epoch} holds {num_queued} readable sample(s), "
                f"less than one batch of {self.batch_size} (skipped: {dict(self.skipped)}); check the shards "
                "with `python run.py shards check <dir>` or lower the batch size"
            )
        logged = False
        while num_yielded < num_batches:
            num_fill = self.batch_size - num_queued
            if num_fill:
                if not logged:
                    self._log_fill(epoch, num_batches - num_yielded, num_fill)
                    logged = True
                queue.append(self._first_batch(epoch))
            batch = take_batch(queue, self.batch_size, pin=self.pin_memory)
            batch.num_padding = num_fill
            queue.clear()
            num_queued = 0
            num_yielded += 1
            self.num_padding += num_fill
            yield self._yielding(batch, Position(epoch, num_yielded, tuple(merger.progress())))

    def _yielding(self, batch: Batch, position: Position) -> Batch:
        """Note the position after `batch` (an epoch's end as its clean end); keep the epoch's first batch."""
        epoch, num_done = position.epoch, position.batches_done
        if num_done == self._stream_start(epoch) + 1 and batch.num_padding == 0:
            self._fill = (epoch, as_piece(batch))
        if num_done == self.num_batches(epoch):
            position = Position.start(epoch, self.workers_per_rank, batches_done=num_done)
            self.skips.log_epoch_totals(epoch)
        self._position = position
        return batch

    def _first_batch(self, epoch: int) -> Piece:
        """The epoch's first batch as a piece: kept when this loader yielded it, else read again.

        In a continued epoch: the first batch of this rank's part of the rest, completed (when the part holds
        less than a batch) by the first samples of its share of the whole epoch.
        """
        if self._fill is None or self._fill[0] != epoch:
            queue: deque[Piece] = deque()
            self._read_first(epoch, queue, continued=True)
            if self._continued(epoch) is not None and sum(map(len, queue)) < self.batch_size:
                self._read_first(epoch, queue, continued=False)
            if sum(map(len, queue)) < self.batch_size:
                raise RuntimeError(f"rank {self.rank}: epoch {epoch} no longer holds its first batch")
            self._fill = (epoch, as_piece(take_batch(queue, self.batch_size)))
        return self._fill[1]

    def _read_first(self, epoch: int, queue: deque[Piece], *, continued: bool) -> None:
        """Queue the first pieces of this rank's streams of `epoch` until they hold a batch (or end)."""
        start = Position.start(epoch, self.workers_per_rank)
        if continued:
            reader = self._reader(epoch, record_skips=False, starts=start.workers)
        else:
            reader = EpochReader(self.settings, epoch=epoch, record_skips=False, starts=start.workers)
        pieces = self._pieces(reader)
        try:
            for piece in PieceMerger(start.workers).merge(pieces):
                if len(piece):
                    queue.append(piece)
                if sum(map(len, queue)) >= self.batch_size:
                    break
        finally:
            del pieces

    def _log_fill(self, epoch: int, num_left: int, num_fill: int) -> None:
        """Log that the last `num_left` batches are padded (the first with `num_fill` padding slots)."""
        num_padded = num_fill + (num_left - 1) * self.batch_size
        logger.info(
            "rank %d epoch %d: its usable samples fill all but its last %d batch(es); "
            "%d masked padding slot(s) complete them",
            self.rank,
            epoch,
            num_left,
            num_padded,
        )

    # ----- positions -----
    def _position_at(self, epoch: int, start_batch: int) -> Position:
        if start_batch == self._stream_start(epoch):
            return self._epoch_start(epoch)
        known = self._position
        if (known.epoch, known.batches_done) == (epoch, start_batch):
            return known
        if start_batch == self.num_batches(epoch):
            return Position.start(epoch, self.workers_per_rank, batches_done=start_batch)
        logger.info(
            "rank %d: resuming epoch %d at batch %d from the manifest's counts (exact unless samples before it "
            "were skipped; restore a saved state_dict() for an exact resume)",
            self.rank,
            epoch,
            start_batch,
        )
        return self._planned_position(epoch, start_batch)

    def _planned_position(self, epoch: int, batches_done: int) -> Position:
        """The position after `batches_done` batches if every sample decodes and every tar matches its count."""
        plan = self._continued(epoch)
        if plan is not None:
            sizes = [len(plan.slot_part(self.rank * self.workers_per_rank + w)) for w in range(self.workers_per_rank)]
            relative = planned_position(
                epoch, batches_done - plan.first_batch, slot_sizes=list(map(float, sizes)), batch_size=self.batch_size
            )
            return Position(epoch, batches_done, relative.workers, relative.straddle)
        order = shard_order(self.manifest.num_shards, seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        slot_sizes: list[float] = [
            float("inf")
            if self.resampled
            else slot_num_samples(
                self.manifest,
                slot=self.rank * self.workers_per_rank + worker,
                world_size=self.world_size,
                workers_per_rank=self.workers_per_rank,
                order=order,
            )
            for worker in range(self.workers_per_rank)
        ]
        return planned_position(epoch, batches_done, slot_sizes=slot_sizes, batch_size=self.batch_size)

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
            "max_image_pixels": self.settings.max_image_pixels,
            "max_member_bytes": self.settings.max_member_bytes,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position of this rank, with the skip and padding counts so far, for `load_state_dict`.

        The position is the one after the last batch this loader yielded, else the one restored or asked
        of `epoch()` (before any: the start of epoch 0). Valid at any time, on every rank.
        """
        position = self._position
        return {
            "format": LOADER_STATE_FORMAT,
            "version": LOADER_STATE_VERSION,
            **self._identity(),
            "epoch": position.epoch,
            "batches_done": position.batches_done,
            "workers": [[w.next_piece, w.raw, w.done] for w in position.workers],
            "straddle": list(position.straddle) if position.straddle else None,
            "straddle_rest": list(position.straddle_rest) if position.straddle_rest is not None else None,
            "skipped": {shard: dict(reasons) for shard, reasons in self.skipped.items()},
            "num_padding": self.num_padding,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` saved by a loader over the same data and split, skip counts included.

        Continue with `epoch(state["epoch"], start_batch=state["batches_done"])`. ValueError names every
        setting that differs. A version 1 state (dealt by whole shards, before this engine's rule) keeps its
        epoch, batch and counts, and continues from the manifest's counts under the current rule (logged).
        """
        if not isinstance(state, dict) or state.get("format") != LOADER_STATE_FORMAT:
            raise ValueError("not a ShardLoader state (missing format 'tuneclip-loader-state')")
        version = state.get("version")
        if version not in (1, LOADER_STATE_VERSION):
            raise ValueError(
                f"loader state version {version!r}; this engine reads 1 and {LOADER_STATE_VERSION}"
            )
        identity = self._identity()
        if version == 1:
            del identity["max_image_pixels"]  # not recorded then
        if "max_member_bytes" not in state:
            del identity["max_member_bytes"]  # saved before members were capped
        problems = [
            f"{key}: saved {state.get(key)!r}, this loader {value!r}"
            for key, value in identity.items()
            if state.get(key) != value
        ]
        if problems:
            raise ValueError(
                "loader state does not fit this loader (" + "; ".join(problems) + "): resume with the same "
                "manifest, world size, rank, workers, seed and batching, or restart the epoch from batch 0"
            )
        workers = tuple(WorkerStart(int(n), int(raw), bool(done)) for n, raw, done in state["workers"])
        epoch, batches_done = int(state["epoch"]), int(state["batches_done"])
        self.skips.counts = defaultdict(Counter, {shard: Counter(r) for shard, r in state["skipped"].items()})
        self.num_padding = int(state.get("num_padding", state.get("num_repeated", 0)))  # saved by older versions
        if version == 1:
            batches_done = min(batches_done, self.num_batches())
            logger.warning(
                "rank %d: loader state version 1 (samples dealt by whole shards): epoch %d continues at "
                "batch %d from the manifest's counts under the current rule (this epoch may repeat or miss "
                "samples)",
                self.rank,
                epoch,
                batches_done,
            )
            self._position = (
                Position.start(epoch, self.workers_per_rank, batches_done=batches_done)
                if batches_done in (0, self.num_batches())
                else self._planned_position(epoch, batches_done)
            )
            return
        if len(workers) != self.workers_per_rank:
            raise ValueError(
                f"loader state is inconsistent: {len(workers)} worker positions for {self.workers_per_rank} workers"
            )
        if not 0 <= batches_done <= self.num_batches(epoch):
            raise ValueError(f"loader state is inconsistent: batch {batches_done} of {self.num_batches(epoch)}")
        straddle = tuple(state["straddle"]) if state["straddle"] else None
        rest = state.get("straddle_rest")
        self._position = Position(epoch, batches_done, workers, straddle, tuple(rest) if rest is not None else None)
