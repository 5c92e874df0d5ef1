"""Who reads what in an epoch: shard order, each rank's and reader slot's share (pure functions).

Per epoch the shard list is shuffled with (seed, epoch), identically on every rank, and read as one
sequence of the manifest's rows (each shard's raw positions 0..n-1 in turn). The sequence is cut into
`world_size` contiguous shares of floor(M / world_size) or one more rows (M = the manifest's samples),
and each rank's share into `workers_per_rank` contiguous parts, one per reader slot (slot = rank *
workers_per_rank + worker). Each row thus belongs to exactly one slot, ranks' shares differ by at most
one row, and a shard is read by the slots whose parts meet it (a slot starting inside a shard passes
over its first members without extracting them). In resampled mode each slot instead draws whole shards
with replacement from its own seeded generator.
"""

from __future__ import annotations

import hashlib
import random
from typing import NamedTuple

from engine.data.manifest import Manifest


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from `parts`, the same in every process and Python run (unlike `hash`)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Order in which shards are dealt to reader slots in `epoch`; identical on every rank."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"tuneclip-shards/{seed}/{epoch}").shuffle(order)
    return order


def sample_shuffle_rng(seed: int, epoch: int, slot: int) -> random.Random:
    """The generator of reader `slot`'s shuffle buffer in `epoch`."""
    return random.Random(f"tuneclip-samples/{seed}/{epoch}/{slot}")


def resample_rng(seed: int, epoch: int, slot: int) -> random.Random:
    """The generator that draws reader `slot`'s shards in a resampled `epoch`."""
    return random.Random(f"tuneclip-resample/{seed}/{epoch}/{slot}")


class Segment(NamedTuple):
    """Raw positions start..stop-1 of shard `shard_index` (in its tar, counted before any decoding);
    only those in `keep` when given (the scattered rest of an interrupted epoch, see `continuation.py`)."""

    shard_index: int
    start: int
    stop: int
    keep: frozenset[int] | None = None


def share(num_items: int, *, index: int, num_parts: int, first: int = 0) -> range:
    """Part `index` of `num_parts` contiguous near-equal parts of first..first+num_items-1 (larger first)."""
    base, extra = divmod(num_items, num_parts)
    begin = first + index * base + min(index, extra)
    return range(begin, begin + base + (index < extra))


def slot_segments(
    manifest: Manifest, *, slot: int, world_size: int, workers_per_rank: int, order: list[int]
) -> list[Segment]:
    """The shard segments reader `slot` reads in an epoch whose shard order is `order`, in reading order."""
    rank, worker = divmod(slot, workers_per_rank)
    rank_span = share(manifest.num_samples, index=rank, num_parts=world_size)
    span = share(len(rank_span), index=worker, num_parts=workers_per_rank, first=rank_span.start)
    segments = []
    begin = 0  # where the shard starts in the epoch's sequence
    for shard_index in order:
        size = manifest.shards[shard_index].num_samples
        start, stop = max(span.start, begin), min(span.stop, begin + size)
        if start < stop:
            segments.append(Segment(shard_index, start - begin, stop - begin))
        begin += size
    return segments


def slot_num_samples(
    manifest: Manifest, *, slot: int, world_size: int, workers_per_rank: int, order: list[int]
) -> int:
    """Samples reader `slot` is dealt by the manifest's counts (counting corrupt ones)."""
    segments = slot_segments(
        manifest, slot=slot, world_size=world_size, workers_per_rank=workers_per_rank, order=order
    )
    return sum(segment.stop - segment.start for segment in segments)


def rank_num_samples(manifest: Manifest, *, rank: int, world_size: int) -> int:
    """Samples `rank` is dealt in every epoch (counting corrupt ones): floor(M / world_size) or one more."""
    return len(share(manifest.num_samples, index=rank, num_parts=world_size))
