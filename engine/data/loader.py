"""ShardLoader: one rank's batches of (images, tokenized texts, u-table row ids), and its position.

Every rank yields the same number of batches per epoch: as many full batches as the smallest share any
rank can be dealt holds (see `plan.py`). With shard splitting, equal shard sizes and a shard count
divisible by world_size waste nothing; otherwise the surplus of larger shares waits for a later epoch.
A rank left short by skipped samples reads its share again (logged) rather than stall the others. In
`resampled` mode (data too large for epochs) an epoch is `samples_per_epoch` samples over all ranks.

The loader tracks its position (see `batching.py`): `state_dict()` is the position after the last batch
it yielded, with the skip counts so far; `load_state_dict()` restores it, and `epoch(e, start_batch=k)`
continues there exactly, each worker passing over the samples it had already delivered.

Skipped samples are counted per shard (`skipped`); the first SKIP_WARNINGS_PER_EPOCH of an epoch are
logged one by one, then only their totals at the epoch's end. Lost shard parts are always logged.
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
    Skip,
    WorkerStart,
    keep_piece,
    planned_position,
    position_after,
    take_batch,
)
from engine.data.manifest import Manifest
from engine.data.plan import rank_num_samples, shard_order, slot_num_samples, stable_seed
from engine.data.reader import EpochReader, StreamSettings
from engine.data.samples import DEFAULT_MAX_IMAGE_PIXELS, SkipRecord

logger = logging.getLogger(__name__)

LOADER_STATE_FORMAT = "tuneclip-loader-state"
LOADER_STATE_VERSION = 1
# Skipped samples logged one by one per epoch and rank; the rest are counted (and totalled at the epoch's end).
SKIP_WARNINGS_PER_EPOCH = 5


class ShardLoader:
    """Batches of one rank from a manifest's shards; every rank yields exactly `num_batches()` per epoch.

    `resampled`: each reader slot draws shards with replacement (seeded by seed, epoch, slot) and an epoch
    is `samples_per_epoch` samples over all ranks. `pin_memory` (default: when CUDA is available) pins
    batches for fast host-to-device copies; `prefetch_factor` is the pieces each worker keeps ready.
    Images of more than `max_image_pixels` pixels are skipped from their header, before decoding.
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
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
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
        )
        self.skipped: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.skipped_log: list[SkipRecord] = []
        self._epoch_skips: tuple[int, Counter[str]] = (-1, Counter())  # skipped samples of the epoch being read
        # After the last batch yielded, as restored by load_state_dict, or where epoch() was asked to start.
        self._position = Position.pass_start(0, self.workers_per_rank)
        if resampled:
            self._num_batches = samples_per_epoch // (batch_size * world_size)
            return
        shares = [
            rank_num_samples(
                manifest,
                rank=r,
                world_size=world_size,
                workers_per_rank=self.workers_per_rank,
                shuffle=shuffle,
            )
            for r in range(world_size)
        ]
        self._num_batches = min(shares) // batch_size
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

    def num_batches(self) -> int:
        """Batches per epoch on every rank (drop_last): the smallest full-batch count any rank can be dealt."""
        return self._num_batches

    @property
    def num_skipped(self) -> int:
        return sum(sum(reasons.values()) for reasons in self.skipped.values())

    # ----- reading -----
    def epoch(self, epoch: int, *, start_batch: int = 0) -> Iterator[Batch]:
        """Yield the batches of this rank for `epoch` after the first `start_batch`, in a (seed, epoch) order.

        The batches are exactly those a run from batch 0 yields from `start_batch` on. The position is
        this loader's own when it is (epoch, start_batch) (it yielded those batches, or
        `load_state_dict` restored them); otherwise it is computed from the manifest's counts, which is
        exact unless samples before it were skipped. Samples before the position are read, not decoded.
        """
        if not 0 <= start_batch <= self.num_batches():
            raise ValueError(
                f"start_batch must be in [0, {self.num_batches()}] (batches per epoch), got {start_batch}"
            )
        self._position = self._position_at(epoch, start_batch)
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

    def _record(self, skips: list[Skip], epoch: int) -> None:
        """Count skips; log lost shard parts always, skipped samples up to SKIP_WARNINGS_PER_EPOCH per epoch."""
        if self._epoch_skips[0] != epoch:
            self._epoch_skips = (epoch, Counter())
        counts = self._epoch_skips[1]
        for record, count, detail in skips:
            self.skipped[record.shard][record.reason] += count
            self.skipped_log.append(record)
            if record.key is None:
                logger.error(
                    "rank %d: shard %s: %s, %d sample(s) lost%s", self.rank, record.shard, record.reason, count, detail
                )
                continue
            num_logged = sum(counts.values())
            counts[record.reason] += count
            if num_logged < SKIP_WARNINGS_PER_EPOCH:
                logger.warning(
                    "skipping sample %s of shard %s: %s%s", record.key, record.shard, record.reason, detail
                )
                if num_logged + 1 == SKIP_WARNINGS_PER_EPOCH:
                    logger.warning(
                        "rank %d epoch %d: %d samples skipped; more are counted, not logged one by one "
                        "(totals at the end of the epoch)",
                        self.rank,
                        epoch,
                        SKIP_WARNINGS_PER_EPOCH,
                    )

    def _log_epoch_skips(self, epoch: int) -> None:
        """At the end of an epoch, the totals of its skipped samples if some were not logged one by one."""
        skip_epoch, counts = self._epoch_skips
        num_skipped = sum(counts.values())
        if skip_epoch == epoch and num_skipped > SKIP_WARNINGS_PER_EPOCH:
            logger.warning(
                "rank %d epoch %d: %d samples skipped (%d not logged one by one): %s",
                self.rank,
                epoch,
                num_skipped,
                num_skipped - SKIP_WARNINGS_PER_EPOCH,
                dict(sorted(counts.items())),
            )

    def _batches(self, position: Position) -> Iterator[Batch]:
        num_batches = self.num_batches()
        num_yielded, read_pass = position.batches_done, position.read_pass
        while num_yielded < num_batches:
            reader = EpochReader(
                self.settings, epoch=position.epoch, record_skips=read_pass == 0, starts=position.workers
            )
            merger = PieceMerger(position.workers)
            queue: deque[Piece] = deque()
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
                        self._record(piece.skips, position.epoch)
                    if not len(piece):
                        continue
                    queue.append(piece)
                    num_queued += len(piece)
                    num_read += len(piece)
                    while num_queued >= self.batch_size and num_yielded < num_batches:
                        batch = take_batch(queue, self.batch_size, pin=self.pin_memory)
                        num_queued -= self.batch_size
                        num_yielded += 1
                        self._position = self._position_after(
                            position.epoch, num_yielded, read_pass, merger, queue
                        )
                        if num_yielded == num_batches:
                            self._log_epoch_skips(position.epoch)
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
            position = Position.pass_start(
                position.epoch, self.workers_per_rank, batches_done=num_yielded, read_pass=read_pass
            )

    # ----- positions -----
    def _position_after(
        self, epoch: int, batches_done: int, read_pass: int, merger: PieceMerger, queue: deque[Piece]
    ) -> Position:
        """The position after a batch; the end of an epoch is kept as a clean pass start."""
        if batches_done == self.num_batches():
            return Position.pass_start(epoch, self.workers_per_rank, batches_done=batches_done)
        return position_after(epoch, batches_done, read_pass, merger, queue)

    def _position_at(self, epoch: int, start_batch: int) -> Position:
        if start_batch == 0:
            return Position.pass_start(epoch, self.workers_per_rank)
        known = self._position
        if (known.epoch, known.batches_done) == (epoch, start_batch):
            return known
        if start_batch == self.num_batches():
            return Position.pass_start(epoch, self.workers_per_rank, batches_done=start_batch)
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
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position of this rank, with the skip counts so far, for `load_state_dict`.

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
            "read_pass": position.read_pass,
            "workers": [[w.next_piece, w.raw, w.done] for w in position.workers],
            "straddle": list(position.straddle) if position.straddle else None,
            "skipped": {shard: dict(reasons) for shard, reasons in self.skipped.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` saved by a loader over the same data and split, skip counts included.

        Continue with `epoch(state["epoch"], start_batch=state["batches_done"])`. ValueError names every
        setting that differs.
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
        workers = tuple(WorkerStart(int(n), int(raw), bool(done)) for n, raw, done in state["workers"])
        batches_done = int(state["batches_done"])
        if len(workers) != self.workers_per_rank or not 0 <= batches_done <= self.num_batches():
            raise ValueError(
                f"loader state is inconsistent: {len(workers)} worker positions for {self.workers_per_rank} "
                f"workers, batch {batches_done} of {self.num_batches()}"
            )
        straddle = tuple(state["straddle"]) if state["straddle"] else None
        self._position = Position(
            int(state["epoch"]), batches_done, int(state["read_pass"]), workers, straddle
        )
        self.skipped = defaultdict(Counter, {shard: Counter(r) for shard, r in state["skipped"].items()})
