"""The tail rule: an epoch's last global batches keep their shape, and their padding slots are flagged.

Every rank yields the same number of batches of fixed shape; where a rank's share (after skips) runs out,
the rest of its batch is padding, flagged `valid` False. Over the real slots of all ranks' batches every good
sample of the epoch appears exactly once, and no global batch holds a real sample twice, on 1, 2 and 3 ranks
with corrupt samples skipped, and across a resume that changes the world size mid-epoch.
"""

import itertools
from collections import Counter

import pytest
from test_data_loader import check_batch, make_dataset
from test_data_loader_fill import BAD, SIZES
from test_data_loader_world import EPOCH, continued, loaders, saved


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    manifest = make_dataset(tmp_path_factory.mktemp("tail"), SIZES, BAD)
    good = sorted(set(range(manifest.num_samples)) - {manifest.row(s, p) for s, p in BAD})
    return manifest, good


def real_rows(batch, manifest) -> tuple[list[int], list[int]]:
    """(rows of the real slots, rows of the padding slots); padding only ever ends a batch."""
    rows = check_batch(batch, manifest, len(batch))
    valid = batch.valid.tolist()
    assert valid == sorted(valid, reverse=True) and sum(valid) == batch.num_real
    return [r for r, ok in zip(rows, valid) if ok], [r for r, ok in zip(rows, valid) if not ok]


def global_batches(ranks, manifest, *, start: int = 0, count: int | None = None) -> list[list[int]]:
    """The real rows of each global batch (ranks' batches of the same index together)."""
    per_rank = []
    for loader in ranks:
        batches = loader.epoch(EPOCH, start_batch=start)
        per_rank.append(list(itertools.islice(batches, count)))
        del batches  # stops its workers
    assert len({len(b) for b in per_rank}) == 1, "every rank yields the same number of batches"
    out = []
    for same_index in zip(*per_rank):
        real = []
        for batch in same_index:
            rows, padding = real_rows(batch, manifest)
            real += rows
            assert len(rows) + len(padding) == len(same_index[0]), "fixed shapes"
        out.append(real)
    return out


def assert_once(batches: list[list[int]], good: list[int]) -> None:
    for real in batches:
        assert len(real) == len(set(real)), "no real sample twice in one global batch"
    counts = Counter(row for real in batches for row in real)
    assert sorted(counts) == good and set(counts.values()) == {1}, "each good sample once per epoch"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_padding_slots_are_flagged_and_real_slots_hold_each_good_sample_once(data, tokenizer, transform,
                                                                              world_size):
    manifest, good = data
    ranks = loaders(manifest, tokenizer, transform, world_size)
    batches = global_batches(ranks, manifest)
    assert_once(batches, good)
    # 49 rows, 9 corrupt: the tail is padded on every world size; what the trainer counts is the real samples.
    assert sum(map(len, batches)) == len(good) == manifest.num_samples - len(BAD)
    assert len(batches[-1]) < world_size * 3
    assert sum(loader.num_padding for loader in ranks) == len(batches) * world_size * 3 - len(good)


@pytest.mark.parametrize("old_size,k,new_size", [(2, 5, 3), (3, 6, 1), (1, 9, 2)])
def test_padding_rule_keeps_each_good_sample_once_across_a_world_size_change(data, tokenizer, transform, old_size,
                                                                             k, new_size):
    manifest, good = data
    old = loaders(manifest, tokenizer, transform, old_size)
    head = global_batches(old, manifest, count=k)
    new = continued(manifest, tokenizer, transform, new_size, *saved(old))
    assert_once(head + global_batches(new, manifest, start=k), good)
