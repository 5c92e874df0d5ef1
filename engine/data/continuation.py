"""The rest of an interrupted epoch, dealt to another number of ranks: each unused sample exactly once.

An epoch reads the manifest's rows as one sequence (shards in the epoch's order, each shard's raw
positions in turn); `plan.py` cuts it into one contiguous part per reader slot. A saved loader position
says, per slot, how many samples of its (shuffled) stream it delivered (`raw`), how far a partly used
piece went (the straddle, with the rows of it not yet delivered), and whether the slot is done. The
stream of a slot is a pure function of its part and its seeded shuffle buffer, so which positions of the
sequence every old rank used is recomputed without reading a tar: the slot's positions go through the
same `webdataset.shuffle`, and the first `raw` come out in the same order. What no old rank used (the
slots' tails, the samples still in their shuffle buffers, the undelivered rest of a straddled piece) is
the continuation: kept in epoch order, cut into near-equal contiguous parts for the new ranks' slots
exactly as a whole epoch is, each part read through its own shuffle buffer. Its batch count is the old
ranks' batches plus ceil(ceil(left / W) / B); a rank whose part runs out fills its last batch(es) with
masked padding slots (see `loader.py`). An interruption inside a continuation is continued the same way
(a continuation records what it continues, so a chain of world-size changes replays exactly).

Exact as long as every tar holds the samples its manifest entry states (a truncated shard is logged as
lost when it is read; its rows then shift the replayed streams of the slots that read it).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds

from engine.data.manifest import Manifest
from engine.data.plan import Segment, sample_shuffle_rng, shard_order, share


class Positions:
    """A sorted set of epoch-sequence positions as disjoint, non-adjacent [start, stop) intervals."""

    def __init__(self, intervals: Iterable[tuple[int, int]] = ()):
        merged: list[tuple[int, int]] = []
        for start, stop in sorted(intervals):
            if start >= stop:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
            else:
                merged.append((start, stop))
        self.intervals = merged
        self._ends = list(itertools.accumulate(stop - start for start, stop in merged))

    @classmethod
    def of(cls, positions: Iterable[int]) -> Positions:
        return cls((p, p + 1) for p in positions)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __iter__(self) -> Iterator[int]:
        for start, stop in self.intervals:
            yield from range(start, stop)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Positions) and self.intervals == other.intervals

    def __or__(self, other: Positions) -> Positions:
        return Positions(self.intervals + other.intervals)

    def slice(self, begin: int, end: int) -> Positions:
        """The positions with index begin..end-1 in sorted order."""
        out = []
        first = bisect.bisect_right(self._ends, begin)
        for i in range(first, len(self.intervals)):
            start, stop = self.intervals[i]
            before = self._ends[i] - (stop - start)  # index of `start`
            if before >= end:
                break
            out.append((start + max(0, begin - before), start + min(stop - start, end - before)))
        return Positions(out)


@dataclass(frozen=True)
class EpochPlan:
    """Who reads what of an epoch: the whole sequence, or (`left` given) the positions an interruption
    left, after `first_batch` batches. Settings are those of the loaders that read it."""

    manifest: Manifest
    epoch: int
    world_size: int
    workers_per_rank: int
    batch_size: int
    seed: int
    shuffle: bool
    shuffle_buffer: int
    left: Positions | None = None
    first_batch: int = 0

    @property
    def positions(self) -> Positions:
        return Positions([(0, self.manifest.num_samples)]) if self.left is None else self.left

    def num_batches(self) -> int:
        """Batches per rank. A whole epoch: ceil(ceil(M / W) / B), 0 if a rank's share is under one batch.
        A continuation: the batches before it plus enough for its largest share."""
        count = len(self.positions)
        largest = -(-count // self.world_size)
        if self.left is None:
            return -(-largest // self.batch_size) if count // self.world_size >= self.batch_size else 0
        return self.first_batch + -(-largest // self.batch_size)

    def slot_part(self, slot: int) -> Positions:
        rank, worker = divmod(slot, self.workers_per_rank)
        rank_span = share(len(self.positions), index=rank, num_parts=self.world_size)
        span = share(len(rank_span), index=worker, num_parts=self.workers_per_rank, first=rank_span.start)
        return self.positions.slice(span.start, span.stop)

    def stream(self, slot: int, positions: Iterable[int]) -> Iterator[int]:
        """`positions` (a slot's part, in order) as that slot's reader shuffles them."""
        it = iter(positions)
        if not self.shuffle:
            return it
        rng = sample_shuffle_rng(self.seed, self.epoch, slot)
        return iter(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(it))

    # ----- positions <-> shards -----
    def _starts(self) -> tuple[list[int], list[int]]:
        """(shard order, where each shard of it starts in the sequence)."""
        order = shard_order(self.manifest.num_shards, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        sizes = [self.manifest.shards[i].num_samples for i in order]
        return order, [0, *itertools.accumulate(sizes)]

    def segments(self, part: Positions) -> list[Segment]:
        """The shard segments that read exactly `part`, in sequence order (one per shard met)."""
        order, starts = self._starts()
        segments: list[Segment] = []
        for start, stop in part.intervals:
            k = bisect.bisect_right(starts, start) - 1
            while start < stop:
                shard_stop = starts[k + 1]
                end = min(stop, shard_stop)
                shard = order[k]
                a, b = start - starts[k], end - starts[k]
                if segments and segments[-1].shard_index == shard:
                    last = segments[-1]
                    keep = (last.keep or frozenset(range(last.start, last.stop))) | frozenset(range(a, b))
                    segments[-1] = Segment(shard, last.start, b, keep)
                else:
                    segments.append(Segment(shard, a, b))
                start = end
                k += 1
        return segments

    def position_of_rows(self, rows: Iterable[int]) -> list[int]:
        order, starts = self._starts()
        where = {shard: starts[k] for k, shard in enumerate(order)}
        offsets = self.manifest.offsets
        out = []
        for row in rows:
            shard = bisect.bisect_right(offsets, row) - 1
            out.append(where[shard] + row - offsets[shard])
        return out

    # ----- what a position leaves -----
    def left_after(self, states: list[dict[str, Any]]) -> Positions:
        """The positions no rank had used at the saved loader `states` (one per rank of this plan)."""
        if len(states) != self.world_size:
            raise ValueError(f"{len(states)} loader states for {self.world_size} ranks")
        left: list[tuple[int, int]] = []
        for rank, state in enumerate(states):
            if state["batches_done"] >= self.num_batches():
                continue  # the epoch's clean end: every position used
            straddle = state.get("straddle")
            for worker, (_, raw, done) in enumerate(state["workers"]):
                if done:
                    continue
                slot = rank * self.workers_per_rank + worker
                part = self.slot_part(slot)
                rest = None
                if straddle and straddle[0] == worker:
                    rest = state.get("straddle_rest")
                left += self._slot_left(slot, part, raw, rest).intervals
        return Positions(left)

    def _slot_left(self, slot: int, part: Positions, raw: int, rest: list[int] | None) -> Positions:
        """What slot `slot` (reading `part`) has not delivered after `raw` stream samples (+ a straddle)."""
        pulled = 0

        def source() -> Iterator[int]:
            nonlocal pulled
            for position in part:
                pulled += 1
                yield position

        stream = self.stream(slot, source())
        delivered = set(itertools.islice(stream, raw))
        if rest:
            # A piece went out partly: its samples up to its last undelivered one were read; of those, only
            # `rest` (usable, not yet delivered) are left. The others were delivered or skipped.
            waiting = set(self.position_of_rows(rest))
            for position in stream:
                if position not in waiting:
                    delivered.add(position)
                    continue
                waiting.discard(position)
                if not waiting:
                    break
        read = part.slice(0, pulled)
        unread = part.slice(pulled, len(part))
        return Positions.of(p for p in read if p not in delivered) | unread
