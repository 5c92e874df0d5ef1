"""Every good sample exactly once per epoch with planted bad samples, on 1 and 2 ranks x 2 workers, and
after resuming at any batch; ranks' short shares end in padding slots (copies of their first batch, masked by the objective)."""

import itertools
import json
import logging

import pytest
from test_data_loader import check_batch, make_dataset, make_loader, stated_manifest

from engine.data.loader import LOADER_STATE_FORMAT

SIZES = [9, 4, 13, 7, 5, 11]  # 49 rows
BAD = {
    (0, 1): "corrupt",
    (0, 2): "empty",
    (2, 0): "noimage",
    (2, 7): "nocaption",
    (2, 8): "nonutf8",
    (2, 12): "corrupt",
    (3, 3): "corrupt",
    (5, 5): "empty",
    (5, 10): "corrupt",
}


def rank_loaders(manifest, tokenizer, transform, world_size: int) -> list:
    return [
        lambda rank=rank: make_loader(
            manifest,
            tokenizer,
            transform,
            batch_size=3,
            rank=rank,
            world_size=world_size,
            num_workers=2,
            shuffle_buffer=5,
        )
        for rank in range(world_size)
    ]


def used_and_repeated(batches, manifest) -> tuple[list[int], list[int]]:
    """(rows used, rows repeated) of one rank's batches of an epoch."""
    used, repeated = [], []
    for batch in batches:
        rows = check_batch(batch, manifest, 3)
        num_used = len(rows) - batch.num_padding
        used += rows[:num_used]
        repeated += rows[num_used:]
    return used, repeated


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_good_sample_exactly_once_per_epoch(tmp_path, tokenizer, transform, world_size):
    manifest = make_dataset(tmp_path, SIZES, BAD)
    good = sorted(set(range(manifest.num_samples)) - {manifest.row(s, p) for s, p in BAD})
    loaders = [new_loader() for new_loader in rank_loaders(manifest, tokenizer, transform, world_size)]
    num_batches = loaders[0].num_batches()
    assert num_batches == {1: 17, 2: 9}[world_size]  # ceil(ceil(49 / W) / 3)
    for epoch in (0, 1):
        used, repeated = [], []
        for loader in loaders:
            batches = list(loader.epoch(epoch))
            assert len(batches) == num_batches  # equal on every rank
            rank_used, rank_repeated = used_and_repeated(batches, manifest)
            used += rank_used
            repeated += rank_repeated
            assert set(rank_repeated) <= set(rank_used[:3])  # repeats are the rank's first batch
        assert sorted(used) == good, "every good sample exactly once, no bad one"
        assert len(repeated) == world_size * num_batches * 3 - len(good)
    assert sum(loader.num_padding for loader in loaders) == 2 * (world_size * num_batches * 3 - len(good))
    assert sum(loader.num_skipped for loader in loaders) == 2 * len(BAD)


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_at_any_batch_keeps_every_good_sample_once(tmp_path, tokenizer, transform, world_size):
    manifest = make_dataset(tmp_path, SIZES, BAD)
    good = sorted(set(range(manifest.num_samples)) - {manifest.row(s, p) for s, p in BAD})
    factories = rank_loaders(manifest, tokenizer, transform, world_size)
    num_batches = factories[0]().num_batches()
    straight = [list(new_loader().epoch(2)) for new_loader in factories]
    # Stops early in the epoch, mid-way, at the last batch with samples of the share, in the fill batches.
    stops = {1: [1, 6, 13, 14, 16], 2: [1, 4, 6, 7, 8]}[world_size]
    for k in stops:
        used, num_skipped = [], 0
        for rank, new_loader in enumerate(factories):
            first = new_loader()
            batches = first.epoch(2)
            head = list(itertools.islice(batches, k))
            state = json.loads(json.dumps(first.state_dict()))
            del batches
            resumed = new_loader()
            resumed.load_state_dict(state)
            tail = list(resumed.epoch(2, start_batch=k))
            assert len(head) + len(tail) == num_batches
            assert [b.rows.tolist() for b in head + tail] == [
                b.rows.tolist() for b in straight[rank]
            ]
            assert [b.num_padding for b in head + tail] == [b.num_padding for b in straight[rank]]
            used += used_and_repeated(head + tail, manifest)[0]
            num_skipped += resumed.num_skipped
        assert sorted(used) == good
        assert num_skipped == len(BAD)  # each counted once, before or after the resume


def test_fill_batches_after_a_truncated_shard_and_a_resume_in_them(tmp_path, tokenizer, transform, caplog):
    # Shard 1 is stated to hold 9 samples but holds 4: 5 rows of the share are lost, counted, and filled.
    manifest = stated_manifest(make_dataset(tmp_path, [8, 4, 8]), [8, 9, 8])
    loader = make_loader(manifest, tokenizer, transform, batch_size=4, num_workers=2, shuffle=False)
    assert loader.num_batches() == 7  # 25 rows by the manifest, 20 readable
    with caplog.at_level(logging.INFO, logger="engine.data"):
        batches = list(loader.epoch(0))
    assert [b.num_padding for b in batches] == [0, 0, 0, 0, 0, 4, 4]
    assert loader.skipped == {"shard-000001.tar": {"truncated shard": 5}} and loader.num_padding == 8
    assert "its usable samples fill all but its last 2 batch(es); 8 masked padding slot(s)" in caplog.text
    first = batches[0].rows.tolist()
    assert all(b.rows.tolist() == first for b in batches[-2:])
    # Resumed in the fill batches by a new loader: it reads its first batch again (counting nothing twice).
    stopped = make_loader(manifest, tokenizer, transform, batch_size=4, num_workers=2, shuffle=False)
    head = stopped.epoch(0)
    assert [b.num_padding for b in itertools.islice(head, 6)] == [0, 0, 0, 0, 0, 4]
    state = json.loads(json.dumps(stopped.state_dict()))
    del head
    assert all(done for _, _, done in state["workers"]) and state["num_padding"] == 4
    resumed = make_loader(manifest, tokenizer, transform, batch_size=4, num_workers=2, shuffle=False)
    resumed.load_state_dict(state)
    (last,) = resumed.epoch(0, start_batch=6)
    assert last.rows.tolist() == first and last.num_padding == 4
    assert resumed.skipped == loader.skipped  # reading the first batch again counts nothing


def test_version_1_state_continues_from_the_manifest_counts(tmp_path, tokenizer, transform, caplog):
    manifest = make_dataset(tmp_path, [9, 4, 13])
    loader = make_loader(manifest, tokenizer, transform, batch_size=3, num_workers=2, shuffle_buffer=5)
    straight = [b.rows.tolist() for b in loader.epoch(1)]
    identity = {key: value for key, value in loader.state_dict().items() if key != "max_image_pixels"}
    old = identity | {
        "format": LOADER_STATE_FORMAT,
        "version": 1,
        "epoch": 1,
        "batches_done": 4,
        "read_pass": 0,
        "workers": [[2, 9, False], [2, 8, False]],
        "straddle": None,
        "skipped": {"shard-000000.tar": {"corrupt image": 2}},
    }
    del old["num_padding"]
    resumed = make_loader(manifest, tokenizer, transform, batch_size=3, num_workers=2, shuffle_buffer=5)
    with caplog.at_level(logging.WARNING, logger="engine.data"):
        resumed.load_state_dict(old)
    assert "loader state version 1" in caplog.text
    assert [b.rows.tolist() for b in resumed.epoch(1, start_batch=4)] == straight[4:]
    assert resumed.skipped == {"shard-000000.tar": {"corrupt image": 2}}
    assert resumed.state_dict()["version"] == 2
    with pytest.raises(ValueError, match="loader state version 7; this engine reads 1 and 2"):
        resumed.load_state_dict(old | {"version": 7})
