"""ShardLoader positions (state_dict / load_state_dict, resume mid-epoch) and resampled epochs."""

import itertools
import json

import pytest
import torch
from test_data_loader import check_batch, make_dataset, make_loader, run_with_timeout, stated_manifest
from torchvision import transforms

import engine.data.reader
from engine.data import ShardLoader
from engine.data.reader import EpochReader


def rows_of(batches) -> list[list[int]]:
    return [batch.rows.tolist() for batch in batches]


def rank_loaders(manifest, tokenizer, transform, **kwargs) -> list:
    """Factories of the two ranks' loaders (2 ranks x 2 workers)."""
    kwargs = {"batch_size": 3, "world_size": 2, "num_workers": 2, "shuffle_buffer": 5, **kwargs}
    return [
        lambda rank=rank: make_loader(manifest, tokenizer, transform, rank=rank, **kwargs)
        for rank in range(2)
    ]


BAD = {(0, 1): "corrupt", (3, 2): "empty", (5, 0): "noimage", (6, 4): "corrupt"}


def resume_everywhere(
    new_loader, manifest, *, epoch: int, batch_size: int, ks=None, step: int = 1, check_pixels: bool = True
) -> int:
    """Check that stopping after k batches, saving state and resuming a new loader gives the straight run.

    Returns how many of the saved positions fell inside a piece (a batch boundary within a worker's piece).
    """
    straight_loader = new_loader()
    straight = rows_of(straight_loader.epoch(epoch))
    assert len(straight) == straight_loader.num_batches() > 1
    num_inside = 0
    for k in ks or range(1, len(straight), step):
        first = new_loader()
        batches = first.epoch(epoch)
        head = rows_of(itertools.islice(batches, k))
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
        assert (state["epoch"], state["batches_done"]) == (epoch, k)
        num_inside += state["straddle"] is not None
        del batches
        resumed = new_loader()
        resumed.load_state_dict(state)
        tail = resumed.epoch(epoch, start_batch=k)
        rest = [check_batch(b, manifest, batch_size) if check_pixels else b.rows.tolist() for b in tail]
        assert head + rest == straight  # same order, nothing repeated, nothing missing
        assert resumed.skipped == straight_loader.skipped  # skip counts continue, neither restart nor double
        assert resumed.num_padding == straight_loader.num_padding
    return num_inside


@pytest.mark.parametrize("defects", [False, True], ids=["clean", "corrupt"])
def test_resume_two_ranks_two_workers(tmp_path, tokenizer, transform, defects):
    manifest = make_dataset(tmp_path, [9, 4, 13, 7, 5, 11, 6, 8], BAD if defects else None)
    for new_loader in rank_loaders(manifest, tokenizer, transform):
        assert new_loader().num_batches() == 11  # 63 rows: shares of 32 and 31
        resume_everywhere(new_loader, manifest, epoch=1, batch_size=3, ks=[1, 3, 5, 8, 9, 10])


def test_resume_inside_pieces_of_uneven_workers(tmp_path, tokenizer, transform):
    # Unshuffled, each rank's worker 0 loses 7 of its 12 samples: once its final (odd) piece is taken, batch
    # boundaries fall inside worker 1's pieces; the last batches are fill batches.
    bad = {(0, 0): "corrupt", (0, 1): "empty", (0, 2): "corrupt", (1, 0): "noimage", (1, 1): "corrupt"}
    bad |= {(2, 2): "corrupt", (2, 3): "nocaption", (2, 17): "corrupt", (2, 18): "empty", (3, 0): "empty"}
    bad |= {(3, 1): "corrupt", (3, 4): "corrupt", (3, 6): "corrupt", (3, 7): "nonutf8"}
    manifest = make_dataset(tmp_path, [3, 3, 20, 20], bad)
    num_inside = 0
    for new_loader in rank_loaders(manifest, tokenizer, transform, batch_size=2, shuffle=False):
        num_inside += resume_everywhere(new_loader, manifest, epoch=0, batch_size=2, ks=[2, 5, 6, 7, 10, 11])
    assert num_inside == 6
    # Shuffled, one rank: the same with a shuffle buffer in the stream.
    manifest = make_dataset(tmp_path / "two", [3, 20], {(1, p): "corrupt" for p in range(7)})
    single = rank_loaders(manifest, tokenizer, transform, batch_size=2, world_size=1)[0]
    assert resume_everywhere(single, manifest, epoch=3, batch_size=2, ks=[3, 5, 6, 7, 11]) == 3


def test_resume_counts_shard_level_skips_once(tmp_path, tokenizer, transform):
    # Stale declared counts: shard 0 holds 2 samples more than stated, shard 1 two fewer (fill batches).
    stated = stated_manifest(make_dataset(tmp_path, [6, 3, 8]), [4, 5, 8])
    new_loader = rank_loaders(stated, tokenizer, transform, batch_size=2, world_size=1, num_workers=0)[0]
    straight = new_loader()
    list(straight.epoch(0))
    assert dict(straight.skipped) == {
        "shard-000000.tar": {"samples beyond manifest count": 2},
        "shard-000001.tar": {"truncated shard": 2},
    }
    # Rows of shards 1 and 2 are not those their pixels encode here: compare rows only.
    resume_everywhere(new_loader, stated, epoch=0, batch_size=2, check_pixels=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_start_batch_without_state_uses_manifest_counts(tmp_path, tokenizer, transform, num_workers):
    # No saved state (e.g. a trainer that only knows its step): exact when nothing was skipped.
    manifest = make_dataset(tmp_path, [9, 4, 13])
    for new_loader in rank_loaders(manifest, tokenizer, transform, num_workers=num_workers):
        straight = rows_of(new_loader().epoch(2))
        for k in range(1, len(straight) + 1):
            assert rows_of(new_loader().epoch(2, start_batch=k)) == straight[k:]


def test_same_loader_resumes_where_it_stopped(tmp_path, tokenizer, transform):
    manifest = make_dataset(tmp_path, [9, 4, 13], {(2, 3): "corrupt"})
    loader = make_loader(manifest, tokenizer, transform, batch_size=4, num_workers=2, shuffle_buffer=5)
    straight = rows_of(
        make_loader(manifest, tokenizer, transform, batch_size=4, num_workers=2, shuffle_buffer=5).epoch(0)
    )
    head = rows_of(itertools.islice(loader.epoch(0), 2))
    assert head + rows_of(loader.epoch(0, start_batch=2)) == straight


def test_fast_forward_does_not_decode(tmp_path, tokenizer, transform, monkeypatch):
    manifest = make_dataset(tmp_path, [12, 12])
    straight = rows_of(make_loader(manifest, tokenizer, transform, batch_size=4).epoch(0))
    decoded = []
    original = EpochReader._decode

    def counting_decode(self, sample, skips):
        decoded.append(sample.row)
        return original(self, sample, skips)

    monkeypatch.setattr(EpochReader, "_decode", counting_decode)
    tail = rows_of(make_loader(manifest, tokenizer, transform, batch_size=4).epoch(0, start_batch=4))
    assert tail == straight[4:]
    assert sorted(decoded) == sorted(row for batch in tail for row in batch)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_holds_the_position_after_the_last_batch_at_any_time(
    tmp_path, tokenizer, transform, num_workers
):
    manifest = make_dataset(tmp_path, [9, 4, 13], {(0, 2): "corrupt", (2, 5): "empty"})

    def new_loader():
        return make_loader(
            manifest, tokenizer, transform, batch_size=3, num_workers=num_workers, shuffle_buffer=5
        )

    straight_loader = new_loader()
    straight = rows_of(straight_loader.epoch(1))
    loader = new_loader()
    before = loader.state_dict()
    assert (before["epoch"], before["batches_done"], before["skipped"]) == (0, 0, {})  # before any epoch
    batches = loader.epoch(1)
    head = rows_of(itertools.islice(batches, 3))
    saved = json.loads(json.dumps(loader.state_dict()))
    assert (saved["epoch"], saved["batches_done"]) == (1, 3)
    # Unrelated calls meanwhile, while its workers read ahead: the position stays after batch 3.
    assert loader.num_batches() == len(straight)
    assert rows_of(new_loader().epoch(0))
    assert loader.state_dict() == saved
    later = json.loads(json.dumps(loader.state_dict()))
    assert later == saved
    del batches
    resumed = new_loader()
    resumed.load_state_dict(later)
    assert resumed.state_dict() == later  # restored, before any batch
    assert head + rows_of(resumed.epoch(1, start_batch=3)) == straight
    assert resumed.skipped == straight_loader.skipped


def test_epoch_stopped_early_then_next_epoch(tmp_path, tokenizer, transform):
    # A trainer with max_steps_per_epoch takes k < num_batches batches, then asks for the next epoch.
    manifest = make_dataset(tmp_path, [9, 4, 13], {(1, 1): "corrupt"})

    def new_loader():
        return make_loader(manifest, tokenizer, transform, batch_size=3, num_workers=2, shuffle_buffer=5)

    straight = [rows_of(new_loader().epoch(e)) for e in (0, 1, 2)]
    loader = new_loader()
    assert rows_of(itertools.islice(loader.epoch(0), 2)) == straight[0][:2]
    assert loader.state_dict()["batches_done"] == 2
    batches = loader.epoch(1, start_batch=0)
    assert (loader.state_dict()["epoch"], loader.state_dict()["batches_done"]) == (1, 0)
    assert rows_of(itertools.islice(batches, 2)) == straight[1][:2]
    saved = json.loads(json.dumps(loader.state_dict()))
    del batches
    # Restored after an early stop: the next epoch starts from its beginning, the saved one continues.
    resumed = new_loader()
    resumed.load_state_dict(saved)
    assert rows_of(resumed.epoch(2)) == straight[2]
    resumed.load_state_dict(saved)
    assert rows_of(resumed.epoch(1, start_batch=2)) == straight[1][2:]
    # At the end of an epoch the state is its clean end; continuing it yields nothing.
    end = resumed.state_dict()
    assert (end["epoch"], end["batches_done"], end["straddle"]) == (1, len(straight[1]), None)
    fresh = new_loader()
    fresh.load_state_dict(end)
    assert rows_of(fresh.epoch(1, start_batch=len(straight[1]))) == []
    assert rows_of(fresh.epoch(2)) == straight[2]


def test_state_refused_for_another_setup(tmp_path, tokenizer, transform):
    manifest = make_dataset(tmp_path / "a", [6, 6])
    loader = make_loader(manifest, tokenizer, transform, batch_size=2, world_size=2, num_workers=2, seed=1)
    batches = loader.epoch(0)
    next(batches)
    state = loader.state_dict()
    other = make_loader(manifest, tokenizer, transform, batch_size=2, world_size=4, num_workers=1, seed=2)
    with pytest.raises(
        ValueError, match=r"world_size: saved 2, this loader 4.*num_workers: saved 2.*seed: saved 1"
    ):
        other.load_state_dict(state)
    other_data = make_dataset(tmp_path / "b", [6, 5])
    with pytest.raises(ValueError, match="manifest_fingerprint"):
        make_loader(
            other_data, tokenizer, transform, batch_size=2, world_size=2, num_workers=2, seed=1
        ).load_state_dict(state)
    with pytest.raises(ValueError, match="not a ShardLoader state"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match=r"start_batch must be in \[0, 3\]"):
        loader.epoch(0, start_batch=4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_epoch_has_requested_batches(tmp_path, tokenizer, transform, num_workers):
    manifest = make_dataset(tmp_path, [5, 3, 8])

    def loader(rank: int, seed: int = 0) -> ShardLoader:
        return make_loader(
            manifest,
            tokenizer,
            transform,
            batch_size=4,
            rank=rank,
            world_size=2,
            num_workers=num_workers,
            resampled=True,
            samples_per_epoch=45,
            seed=seed,
        )

    assert loader(0).num_batches() == 5  # 45 samples over 2 ranks x 4
    epochs = {}
    for rank in range(2):
        for epoch in (0, 1):
            batches = run_with_timeout(lambda rank=rank, epoch=epoch: list(loader(rank).epoch(epoch)))
            assert len(batches) == 5
            epochs[rank, epoch] = [row for batch in batches for row in check_batch(batch, manifest, 4)]
    # Drawn with replacement, seeded per rank, worker and epoch: reproducible, and different elsewhere.
    assert rows_of(loader(1).epoch(1)) == [epochs[1, 1][i : i + 4] for i in range(0, 20, 4)]
    assert epochs[0, 0] != epochs[1, 0] and epochs[0, 0] != epochs[0, 1]
    assert rows_of(loader(0, seed=5).epoch(0)) != rows_of(loader(0).epoch(0))
    # Resuming works the same way.
    assert rows_of(loader(1).epoch(1, start_batch=3)) == [epochs[1, 1][i : i + 4] for i in range(12, 20, 4)]


def test_resampled_arguments(tmp_path, tokenizer, transform):
    manifest = make_dataset(tmp_path, [4])
    with pytest.raises(ValueError, match="samples_per_epoch >= batch_size x world_size = 8"):
        make_loader(
            manifest, tokenizer, transform, batch_size=4, world_size=2, resampled=True, samples_per_epoch=7
        )
    with pytest.raises(ValueError, match="samples_per_epoch sets the epoch length of resampled=True only"):
        make_loader(manifest, tokenizer, transform, samples_per_epoch=100)


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_resampled_unreadable_data_raises_instead_of_hanging(
    tmp_path, tokenizer, transform, monkeypatch, damage
):
    manifest = make_dataset(tmp_path, [3, 3], {(s, p): "corrupt" for s in range(2) for p in range(3)})
    if damage == "deleted":
        for i in range(2):
            manifest.shard_path(i).unlink()
    monkeypatch.setattr(engine.data.reader, "MAX_UNDECODABLE_RUN", 50)
    loader = make_loader(manifest, tokenizer, transform, batch_size=2, resampled=True, samples_per_epoch=8)
    with pytest.raises(RuntimeError, match="shards check"):
        run_with_timeout(lambda: list(loader.epoch(0)))


def test_short_rank_with_less_than_a_batch_raises(tmp_path, tokenizer, transform):
    manifest = make_dataset(tmp_path, [4], {(0, p): "corrupt" for p in range(3)})
    loader = make_loader(manifest, tokenizer, transform, batch_size=2)
    with pytest.raises(RuntimeError, match="1 readable sample"):
        run_with_timeout(lambda: list(loader.epoch(0)))


def add_noise(image: torch.Tensor) -> torch.Tensor:
    return image + 0.01 * torch.rand_like(image)  # the test images are flat colours: make draws visible


def test_augmentations_follow_the_sample(tmp_path, tokenizer):
    # Random augmentations depend on (seed, epoch, row) only: equal across worker counts and after a resume.
    augment = transforms.Compose(
        [transforms.RandomResizedCrop(16, scale=(0.2, 1.0)), transforms.ToTensor(), add_noise]
    )
    manifest = make_dataset(tmp_path, [9, 4, 13])

    def images_by_row(batches) -> dict:
        return {row: batch.images[i] for batch in batches for i, row in enumerate(batch.rows.tolist())}

    def new_loader(num_workers: int, seed: int = 0):
        return make_loader(manifest, tokenizer, augment, batch_size=2, num_workers=num_workers, seed=seed)

    in_process = images_by_row(new_loader(0).epoch(0))
    two_workers = images_by_row(new_loader(2).epoch(0))
    resumed = images_by_row(new_loader(2).epoch(0, start_batch=5))
    assert sorted(in_process) == sorted(two_workers) == list(range(26)) and len(resumed) == 16
    assert all(torch.equal(in_process[row], two_workers[row]) for row in in_process)
    assert all(torch.equal(in_process[row], resumed[row]) for row in resumed)
    other_seed = images_by_row(new_loader(0, seed=1).epoch(0))
    assert sum(not torch.equal(in_process[row], other_seed[row]) for row in in_process) > 20
    # The caller's RNG is left as it was.
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    list(new_loader(0).epoch(1))
    assert torch.equal(torch.rand(3), expected)
