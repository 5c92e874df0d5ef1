"""An epoch interrupted on W ranks and continued on another number: every good sample of it exactly once.

Old ranks read k batches and save their states; the new ranks continue the epoch from all of them
(`load_rank_states`), also twice in a row (2 -> 3 -> 1) and with a same-size resume inside the rest.
"""

import itertools
import json

import pytest
from test_data_loader import check_batch, make_dataset, make_loader
from test_data_loader_fill import BAD, SIZES

from engine.data.continuation import Positions

EPOCH = 1


def loaders(manifest, tokenizer, transform, world_size: int, batch_size: int = 3) -> list:
    return [
        make_loader(
            manifest, tokenizer, transform, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=2,
            shuffle_buffer=5,
        )
        for rank in range(world_size)
    ]


def read(loader, manifest, *, start: int, count: int | None = None) -> tuple[list[int], int]:
    """(rows used, batches) of `count` batches (all left if None) from batch `start` of EPOCH."""
    batches = loader.epoch(EPOCH, start_batch=start)
    taken = list(batches if count is None else itertools.islice(batches, count))
    del batches
    used = []
    for batch in taken:
        rows = check_batch(batch, manifest, loader.batch_size)
        used += rows[: len(rows) - batch.num_padding]
    return used, len(taken)


def saved(ranks) -> tuple[dict, list[dict]]:
    """(plan state, rank states) as a checkpoint holds them (JSON round trip)."""
    plan = json.loads(json.dumps(ranks[0].plan_state_dict()))
    return plan, [json.loads(json.dumps(loader.state_dict())) for loader in ranks]


def continued(manifest, tokenizer, transform, world_size: int, plan: dict, states: list[dict],
              batch_size: int | None = None) -> list:
    ranks = loaders(manifest, tokenizer, transform, world_size, batch_size or states[0]["batch_size"])
    for loader in ranks:
        loader.load_plan_state_dict(plan)
        loader.load_rank_states(states)
    return ranks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    manifest = make_dataset(tmp_path_factory.mktemp("world"), SIZES, BAD)
    good = sorted(set(range(manifest.num_samples)) - {manifest.row(s, p) for s, p in BAD})
    return manifest, good


# (old world size, batches read, new world size, batch size per rank before and after): early, mid-way, in
# the fill batches, at the end; with batch size 4 the old ranks stop inside a piece (a straddle: part of it
# went out); the trainer keeps the global batch, so the batch per rank follows the world size (3 x 2 = 6).
CASES = [(2, 4, 1, 3, 3), (1, 6, 2, 3, 3), (2, 3, 3, 3, 3), (3, 2, 2, 3, 3), (1, 1, 3, 3, 3), (2, 8, 1, 3, 3),
         (2, 9, 3, 3, 3), (1, 14, 2, 3, 3), (2, 5, 1, 4, 4), (3, 3, 2, 4, 4), (2, 4, 1, 3, 6), (1, 3, 2, 6, 3)]


@pytest.mark.parametrize("old_size,k,new_size,batch_size,new_batch_size", CASES)
def test_every_good_sample_once_across_a_world_size_change(
    data, tokenizer, transform, old_size, k, new_size, batch_size, new_batch_size
):
    manifest, good = data
    old = loaders(manifest, tokenizer, transform, old_size, batch_size)
    used = []
    for loader in old:
        used += read(loader, manifest, start=0, count=k)[0]
    if batch_size == 4:
        assert any(loader.state_dict()["straddle"] for loader in old), "the case stops inside a piece"
    new = continued(manifest, tokenizer, transform, new_size, *saved(old), batch_size=new_batch_size)
    counts = set()
    for loader in new:
        rows, num = read(loader, manifest, start=k)
        used += rows
        counts.add(num)
    assert len(counts) == 1, "every new rank yields the same number of batches"
    assert sorted(used) == good, "each good sample of the epoch exactly once"
    assert sum(loader.num_skipped for loader in new) == len(BAD), "each bad sample counted once"
    # Later epochs follow the new world size's own plan.
    assert new[0].num_batches(EPOCH + 1) == loaders(manifest, tokenizer, transform, new_size, new_batch_size)[0].num_batches()


def test_two_changes_in_one_epoch_and_a_resume_inside_the_rest(data, tokenizer, transform):
    manifest, good = data
    two = loaders(manifest, tokenizer, transform, 2)
    used = []
    for loader in two:
        used += read(loader, manifest, start=0, count=3)[0]
    three = continued(manifest, tokenizer, transform, 3, *saved(two))
    for loader in three:
        used += read(loader, manifest, start=3, count=2)[0]
    plan, states = saved(three)
    # The same world size again: the exact rest of the continued epoch.
    again = loaders(manifest, tokenizer, transform, 3)
    for loader, state in zip(again, states):
        loader.load_plan_state_dict(plan)
        loader.load_state_dict(state)
    straight = [read(loader, manifest, start=5)[0] for loader in three]
    assert [read(loader, manifest, start=5)[0] for loader in again] == straight
    one = continued(manifest, tokenizer, transform, 1, plan, states)
    used += read(one[0], manifest, start=5)[0]
    assert sorted(used) == good


def test_positions_slice_and_union():
    left = Positions([(10, 13), (0, 2), (2, 4), (20, 21)])
    assert left.intervals == [(0, 4), (10, 13), (20, 21)]
    assert list(left) == [0, 1, 2, 3, 10, 11, 12, 20] and len(left) == 8
    assert list(left.slice(3, 7)) == [3, 10, 11, 12]
    assert list(left.slice(7, 8)) == [20] and len(left.slice(8, 8)) == 0
    assert list(Positions.of([5, 3, 4]) | Positions([(0, 1)])) == [0, 3, 4, 5]
