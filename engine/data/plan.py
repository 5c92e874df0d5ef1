"""Who reads what in an epoch: shard order, reader slots and their shares (pure functions).

Per epoch the shard list is shuffled with (seed, epoch), identically on every rank. There are
`world_size * workers_per_rank` reader slots (slot = rank * workers_per_rank + worker). With at least
one shard per slot, rank r reads shards order[r::world_size] and its worker w every
workers_per_rank-th of those; with fewer shards, every slot reads every shard and keeps the samples
whose global row satisfies row % num_slots == slot. Either way each row belongs to exactly one slot.
In resampled mode each slot instead draws shards with replacement from its own seeded generator.
"""

from __future__ import annotations

import hashlib
import random

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


def slot_shards(
    manifest: Manifest, *, slot: int, world_size: int, workers_per_rank: int, order: list[int]
) -> tuple[list[int], tuple[int, int] | None]:
    """(shards reader `slot` reads, in order; row filter (num_slots, slot), or None when it owns whole shards)."""
    num_slots = world_size * workers_per_rank
    if manifest.num_shards >= num_slots:
        rank, worker = divmod(slot, workers_per_rank)
        return order[rank::world_size][worker::workers_per_rank], None
    return order, (num_slots, slot)


def slot_num_samples(
    manifest: Manifest, *, slot: int, world_size: int, workers_per_rank: int, order: list[int]
) -> int:
    """Samples reader `slot` is dealt by the manifest's counts (counting corrupt ones)."""
    shards, row_filter = slot_shards(
        manifest, slot=slot, world_size=world_size, workers_per_rank=workers_per_rank, order=order
    )
    if row_filter is None:
        return sum(manifest.shards[i].num_samples for i in shards)
    return len(range(row_filter[1], manifest.num_samples, row_filter[0]))


def rank_num_samples(
    manifest: Manifest, *, rank: int, world_size: int, workers_per_rank: int, shuffle: bool
) -> int:
    """Samples `rank` is guaranteed to be dealt in any epoch (counting corrupt ones)."""
    num_slots = world_size * workers_per_rank
    sizes = [shard.num_samples for shard in manifest.shards]
    if len(sizes) < num_slots:
        slots = range(rank * workers_per_rank, (rank + 1) * workers_per_rank)
        return sum(len(range(slot, manifest.num_samples, num_slots)) for slot in slots)
    if not shuffle:
        return sum(sizes[rank::world_size])
    # Shuffled: the rank gets len(sizes) // world_size shards or one more, in the worst case the smallest.
    return sum(sorted(sizes)[: len(sizes) // world_size])
