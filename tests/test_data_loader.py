"""ShardLoader epochs: every sample once, the split over ranks and workers, skipped and broken samples.

Epochs with planted bad samples on 1 and 2 ranks x 2 workers, and their resume: `test_data_loader_fill.py`.
"""

import io
import math
import re
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.data import Batch, Manifest, ShardEntry, ShardLoader, SkipRecord
from engine.data.manifest import COUNT_FROM_STATS
from engine.data.plan import shard_order, slot_segments
from engine.data.skips import SKIP_WARNINGS_PER_EPOCH
from engine.data.sources import build_manifest


def red_of(row: int) -> int:
    return (row * 7) % 256


def make_dataset(tmp_path: Path, sizes: list[int], bad: dict[tuple[int, int], str] | None = None) -> Manifest:
    """Shards of 36x36 PNGs whose red channel encodes the global row; `bad` maps (shard, position) to a defect."""
    bad = bad or {}
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths, row = [], 0
    for s, size in enumerate(sizes):
        path = tmp_path / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for p in range(size):
                kind = bad.get((s, p))
                png = io.BytesIO()
                Image.new("RGB", (36, 36), (red_of(row), p, s)).save(png, format="PNG")
                members = {"png": png.getvalue(), "txt": f"shard {s} sample {p}".encode()}
                if kind == "corrupt":
                    members["png"] = b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8
                elif kind == "empty":
                    members["txt"] = b"  \n"
                elif kind == "nonutf8":
                    members["txt"] = b"caf\xe9 \xff"
                elif kind == "nocaption":
                    del members["txt"]
                elif kind == "noimage":
                    del members["png"]
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"s{s}p{p}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                row += 1
        paths.append(path)
    manifest = build_manifest(paths, root=tmp_path)
    manifest.save(tmp_path / "manifest.json")
    return manifest


def check_batch(batch: Batch, manifest: Manifest, batch_size: int) -> list[int]:
    """Assert shapes and that every id is the row of its (shard, raw position) and matches its image."""
    assert batch.images.shape == (batch_size, 3, 32, 32)
    assert batch.texts.shape == (batch_size, 77) and batch.texts.dtype == torch.long
    assert batch.rows.shape == (batch_size,) and batch.rows.dtype == torch.long
    ids = batch.rows.tolist()
    for i, (key, row) in enumerate(zip(batch.keys, ids)):
        shard, position = map(int, re.fullmatch(r"s(\d+)p(\d+)", key).groups())
        assert row == manifest.row(shard, position)
        assert abs(round(batch.images[i, 0, 16, 16].item() * 255) - red_of(row)) <= 1
    return ids


def run_epoch(loader: ShardLoader, epoch: int, manifest: Manifest) -> list[int]:
    batches = list(loader.epoch(epoch))
    assert len(batches) == loader.num_batches()
    return [row for batch in batches for row in check_batch(batch, manifest, loader.batch_size)]


def split_epoch(loader: ShardLoader, epoch: int, manifest: Manifest) -> tuple[list[int], list[int]]:
    """(rows used, rows repeated to fill) of one rank's epoch; the repeats are its first rows, in order."""
    batches = list(loader.epoch(epoch))
    assert len(batches) == loader.num_batches()
    used, repeated = [], []
    for batch in batches:
        rows = check_batch(batch, manifest, loader.batch_size)
        num_used = len(rows) - batch.num_padding
        used += rows[:num_used]
        repeated += rows[num_used:]
        assert rows[num_used:] == used[: batch.num_padding]  # a fill is the start of the first batch
    return used, repeated


def make_loader(manifest, tokenizer, transform, **kwargs) -> ShardLoader:
    kwargs = {"batch_size": 2, "shuffle_buffer": 8, **kwargs}
    return ShardLoader(manifest, image_transform=transform, tokenizer=tokenizer, **kwargs)


@pytest.mark.parametrize("sizes", [[23], [7, 5, 9], [8, 4]], ids=["1shard", "3shards", "2shards"])
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_each_sample_once_per_epoch(tmp_path, tokenizer, transform, sizes, num_workers, world_size):
    manifest = make_dataset(tmp_path, sizes)
    batch_size = 3 if sizes == [8, 4] else 2
    loaders = [
        make_loader(
            manifest,
            tokenizer,
            transform,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
        )
        for rank in range(world_size)
    ]
    num_batches = loaders[0].num_batches()
    assert all(loader.num_batches() == num_batches for loader in loaders)
    # Enough batches for the largest rank share (ceil(M / W) rows): nothing is left out.
    assert num_batches == math.ceil(math.ceil(manifest.num_samples / world_size) / batch_size)
    for epoch in (0, 1):
        used, repeated = zip(*(split_epoch(loader, epoch, manifest) for loader in loaders))
        rows = [row for rank_rows in used for row in rank_rows]
        assert sorted(rows) == list(range(manifest.num_samples)), "every sample exactly once"
        assert sum(map(len, repeated)) == world_size * num_batches * batch_size - manifest.num_samples
    assert sum(loader.num_padding for loader in loaders) == 2 * (
        world_size * num_batches * batch_size - manifest.num_samples
    )
    if sizes == [8, 4]:  # 12 rows, 6 per rank: 2 batches of 3, nothing repeated
        assert sum(loader.num_padding for loader in loaders) == 0
    assert all(not loader.skipped for loader in loaders)


def test_full_coverage_single_rank(tmp_path, tokenizer, transform):
    manifest = make_dataset(tmp_path, [7, 5, 9])
    for num_workers in (0, 2):
        loader = make_loader(manifest, tokenizer, transform, batch_size=1, num_workers=num_workers)
        assert loader.num_batches() == 21
        assert sorted(run_epoch(loader, 0, manifest)) == list(range(21))


@pytest.mark.parametrize(
    ("world_size", "batch_size", "expected"),
    [(1, 5, 5), (2, 2, 6), (2, 5, 3), (4, 5, 2), (4, 6, 0), (3, 7, 1)],
)
def test_num_batches_fits_the_largest_rank_share(
    tmp_path, tokenizer, transform, world_size, batch_size, expected
):
    # 21 rows: rank shares of ceil(21 / W) or floor(21 / W) rows, batches for the larger; none when the
    # smaller share is under one batch (4 x 5 rows < 6). Workers and shuffling do not change it.
    manifest = make_dataset(tmp_path, [7, 5, 9])
    for kwargs in ({}, {"shuffle": False}, {"num_workers": 2}):
        loader = make_loader(
            manifest, tokenizer, transform, batch_size=batch_size, world_size=world_size, **kwargs
        )
        assert loader.num_batches() == expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_order_seeded(tmp_path, tokenizer, transform, num_workers):
    manifest = make_dataset(tmp_path, [10, 10, 12])
    loader = make_loader(manifest, tokenizer, transform, batch_size=4, num_workers=num_workers, seed=3)
    epoch0, epoch1 = run_epoch(loader, 0, manifest), run_epoch(loader, 1, manifest)
    assert epoch0 != epoch1
    assert sorted(epoch0) == sorted(epoch1) == list(range(32))
    again = make_loader(manifest, tokenizer, transform, batch_size=4, num_workers=num_workers, seed=3)
    assert run_epoch(again, 1, manifest) == epoch1
    assert run_epoch(again, 0, manifest) == epoch0
    other_seed = make_loader(manifest, tokenizer, transform, batch_size=4, num_workers=num_workers, seed=4)
    assert run_epoch(other_seed, 1, manifest) != epoch1


def test_unshuffled_order_is_tar_order(tmp_path, tokenizer, transform):
    manifest = make_dataset(tmp_path, [4, 3])
    loader = make_loader(manifest, tokenizer, transform, batch_size=1, shuffle=False)
    assert run_epoch(loader, 0, manifest) == list(range(7))


BAD = {(0, 1): "empty", (0, 3): "nocaption", (1, 0): "corrupt", (1, 2): "nonutf8"}
BAD_REASONS = {
    "shard-000000.tar": {"empty caption": 1, "missing caption": 1},
    "shard-000001.tar": {"corrupt image": 1, "non-UTF-8 caption": 1},
}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_skipped_counted_and_rows_kept(tmp_path, tokenizer, transform, caplog, num_workers):
    manifest = make_dataset(tmp_path, [8, 8], BAD)
    bad_rows = {manifest.row(s, p) for s, p in BAD}
    # 16 rows by the manifest: 3 batches of 6; 12 good ones fill 2, the third repeats the first.
    loader = make_loader(manifest, tokenizer, transform, batch_size=6, num_workers=num_workers, shuffle=False)
    assert loader.num_batches() == 3
    with caplog.at_level("WARNING", logger="engine.data"):
        used, repeated = split_epoch(loader, 0, manifest)
    assert sorted(used) == sorted(set(range(16)) - bad_rows) and len(repeated) == 6
    assert {shard: dict(reasons) for shard, reasons in loader.skipped.items()} == BAD_REASONS
    assert sorted(loader.skipped_log) == sorted(
        [
            SkipRecord("shard-000000.tar", "s0p1", "empty caption"),
            SkipRecord("shard-000000.tar", "s0p3", "missing caption"),
            SkipRecord("shard-000001.tar", "s1p0", "corrupt image"),
            SkipRecord("shard-000001.tar", "s1p2", "non-UTF-8 caption"),
        ]
    )
    # Logged by the main process, also for samples that worker processes read.
    assert any("s1p0" in r.getMessage() and "corrupt image" in r.getMessage() for r in caplog.records)

    # Counts accumulate across epochs.
    run_epoch(loader, 1, manifest)
    assert loader.skipped["shard-000001.tar"]["corrupt image"] == 2
    assert loader.num_padding == 12


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_samples_logged_a_few_per_epoch_then_totalled(
    tmp_path, tokenizer, transform, caplog, num_workers
):
    bad = {(s, p): "corrupt" if p % 2 else "empty" for s in range(2) for p in range(1, 10)}
    manifest = make_dataset(tmp_path, [12, 12], bad)  # 18 of 24 samples skipped each epoch
    loader = make_loader(manifest, tokenizer, transform, batch_size=2, num_workers=num_workers)
    for epoch in (0, 1):
        caplog.clear()
        with caplog.at_level("WARNING", logger="engine.data"):
            run_epoch(loader, epoch, manifest)
        messages = [r.getMessage() for r in caplog.records]
        assert sum(m.startswith("skipping sample") for m in messages) == SKIP_WARNINGS_PER_EPOCH == 5
        assert f"rank 0 epoch {epoch}: 5 samples skipped; more are counted, not logged one by one" in "".join(
            messages
        )
        totals = [m for m in messages if "not logged one by one):" in m]
        expected = f"rank 0 epoch {epoch}: 18 samples skipped (13 not logged one by one): "
        assert totals == [expected + "{'corrupt image': 10, 'empty caption': 8}"]
    assert loader.num_skipped == 36


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batch_size", [4, 3])
def test_short_rank_fills_its_last_batches_with_its_first_samples(
    tmp_path, tokenizer, transform, caplog, num_workers, batch_size
):
    bad = {(0, 0): "corrupt", (0, 5): "noimage", (1, 7): "corrupt", (2, 1): "empty"}
    manifest = make_dataset(tmp_path, [8, 8, 8], bad)
    loader = make_loader(
        manifest, tokenizer, transform, batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    # 24 rows by the manifest, 20 readable: batches of 4 -> 5 used, 1 repeated; of 3 -> 6 used, a seventh
    # with 2 used and 1 repeated, an eighth repeated.
    assert loader.num_batches() == {4: 6, 3: 8}[batch_size]
    with caplog.at_level("INFO", logger="engine.data"):
        batches = list(loader.epoch(0))
    assert [b.num_padding for b in batches[-2:]] == {4: [0, 4], 3: [1, 3]}[batch_size]
    used, repeated = split_epoch(loader, 0, manifest)
    assert sorted(used) == sorted(set(range(24)) - {manifest.row(s, p) for s, p in bad})
    assert len(repeated) == 4 and loader.num_padding == 8
    assert loader.num_skipped == 8 and len(loader.skipped_log) == 8  # 4 per epoch, each counted once
    num_left = {4: 1, 3: 2}[batch_size]
    assert (
        f"rank 0 epoch 0: its usable samples fill all but its last {num_left} batch(es); 4 masked padding"
        in (caplog.text)
    )


def run_with_timeout(fn, timeout: float = 30.0):
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exn:  # noqa: BLE001 -- re-raised in the test thread
            result["error"] = exn

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"epoch did not finish within {timeout} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("damage", ["truncated", "zero-bytes", "deleted"])
def test_broken_shard_is_counted_and_does_not_hang(tmp_path, tokenizer, transform, num_workers, damage):
    manifest = make_dataset(tmp_path, [5, 5, 5])
    path = manifest.shard_path(1)
    if damage == "truncated":
        with tarfile.open(path) as tar:
            cut = tar.getmember("s1p2.png").offset_data + 20
        path.write_bytes(path.read_bytes()[:cut])
        lost, read = 3, [manifest.row(1, 0), manifest.row(1, 1)]
    elif damage == "zero-bytes":
        path.write_bytes(b"")
        lost, read = 5, []
    else:
        path.unlink()
        lost, read = 5, []
    loader = make_loader(manifest, tokenizer, transform, batch_size=2, num_workers=num_workers)
    ids = run_with_timeout(lambda: run_epoch(loader, 0, manifest))
    assert len(ids) == 2 * loader.num_batches()
    readable = set(range(5)) | set(read) | set(range(10, 15))
    assert set(ids) == readable
    assert dict(loader.skipped) == {"shard-000001.tar": {"truncated shard": lost}}
    assert loader.skipped_log == [SkipRecord("shard-000001.tar", None, "truncated shard")]


@pytest.mark.parametrize(("cut_before", "kept"), [("s0p3.png", {0, 1, 2}), ("s0p2.txt", {0, 1})])
def test_shard_cut_at_member_boundary_is_detected(tmp_path, tokenizer, transform, cut_before, kept):
    manifest = make_dataset(tmp_path, [6])
    path = manifest.shard_path(0)
    with tarfile.open(path) as tar:
        cut = tar.getmember(cut_before).offset  # a header boundary: tarfile just sees a shorter archive
    path.write_bytes(path.read_bytes()[:cut])
    loader = make_loader(manifest, tokenizer, transform, batch_size=1, shuffle=False)
    ids = run_with_timeout(lambda: run_epoch(loader, 0, manifest))
    # A sample cut between its image and caption is lost with the rest of the shard.
    assert set(ids) == kept
    assert dict(loader.skipped) == {"shard-000000.tar": {"truncated shard": 6 - len(kept)}}


def test_invalid_arguments(tmp_path, tokenizer, transform):
    manifest = make_dataset(tmp_path, [2])
    with pytest.raises(ValueError, match=r"batch_size.*rank.*num_workers"):
        make_loader(manifest, tokenizer, transform, batch_size=0, rank=2, world_size=2, num_workers=-1)
    shard = manifest.shards[0]
    escaping = Manifest(
        root=tmp_path / "sub",
        shards=[ShardEntry("../shard-000000.tar", shard.num_samples, shard.num_bytes, shard.sha256)],
    )
    with pytest.raises(ValueError, match="escapes"):
        make_loader(escaping, tokenizer, transform)


def dealt_rows(loader: ShardLoader, epoch: int) -> list[int]:
    """Rows the split deals to `loader`'s rank in `epoch`, computed from the manifest alone."""
    manifest, workers = loader.manifest, loader.workers_per_rank
    order = shard_order(manifest.num_shards, seed=loader.seed, epoch=epoch, shuffle=loader.shuffle)
    rows = []
    for slot in range(loader.rank * workers, (loader.rank + 1) * workers):
        segments = slot_segments(
            manifest, slot=slot, world_size=loader.world_size, workers_per_rank=workers, order=order
        )
        for shard, start, stop, _ in segments:
            rows += [manifest.offsets[shard] + position for position in range(start, stop)]
    return rows


@pytest.mark.parametrize(
    "sizes", [[29], [9, 4, 13], [6, 3, 9, 5, 7, 2, 8, 4]], ids=["1shard", "3shards", "8shards"]
)
def test_two_ranks_two_workers_each_sample_once(tmp_path, tokenizer, transform, sizes):
    manifest = make_dataset(tmp_path, sizes)
    loaders = [
        make_loader(manifest, tokenizer, transform, batch_size=1, rank=rank, world_size=2, num_workers=2)
        for rank in range(2)
    ]
    num_batches = loaders[0].num_batches()
    assert num_batches == {1: 15, 3: 13, 8: 22}[len(sizes)]  # ceil(M / 2)
    for epoch in (0, 1):
        dealt = [dealt_rows(loader, epoch) for loader in loaders]
        # Contiguous shares of the epoch's shard sequence: disjoint, covering, sizes differing by at most 1.
        assert sorted(dealt[0] + dealt[1]) == list(range(manifest.num_samples))
        assert sorted(map(len, dealt)) == [manifest.num_samples // 2, num_batches]
        for rank, loader in enumerate(loaders):
            used, repeated = split_epoch(loader, epoch, manifest)
            assert sorted(used) == sorted(dealt[rank])  # each rank delivers exactly its own rows
            assert len(repeated) == num_batches - len(dealt[rank])


def test_fewer_shards_than_readers_does_not_hang(tmp_path, tokenizer, transform):
    # One shard of 3 samples for 2 ranks x 2 workers: shares of 2 and 1, slot 3 has no sample at all.
    manifest = make_dataset(tmp_path, [3])
    loaders = [
        make_loader(manifest, tokenizer, transform, batch_size=1, rank=rank, world_size=2, num_workers=2)
        for rank in range(2)
    ]
    assert [loader.num_batches() for loader in loaders] == [2, 2]
    splits = [run_with_timeout(lambda loader=loader: split_epoch(loader, 0, manifest)) for loader in loaders]
    assert sorted(splits[0][0] + splits[1][0]) == [0, 1, 2]
    assert [len(repeated) for _, repeated in splits] == [0, 1]


def stated_manifest(manifest: Manifest, counts: list[int]) -> Manifest:
    """The same shards with the counts a stale img2dataset _stats.json could state."""
    shards = [
        ShardEntry(s.path, n, s.num_bytes, "", COUNT_FROM_STATS) for s, n in zip(manifest.shards, counts)
    ]
    return Manifest(root=manifest.root, shards=shards)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_tar_with_more_or_fewer_samples_than_stated(tmp_path, tokenizer, transform, num_workers):
    # Shard 0 holds 6 samples but is stated to hold 4; shard 1 holds 3 of a stated 5.
    stated = stated_manifest(make_dataset(tmp_path, [6, 3, 4]), [4, 5, 4])
    loader = make_loader(stated, tokenizer, transform, batch_size=1, num_workers=num_workers, shuffle=False)
    assert loader.num_batches() == 13
    batches = run_with_timeout(lambda: list(loader.epoch(0)))
    assert len(batches) == 13
    # (key, row) pairs: shard 0 keeps its first 4 at rows 0-3; s0p4 and s0p5 would have collided with shard 1.
    # 11 samples are read, the 2 shard 1 lacks are filled by repeats.
    assert [b.num_padding for b in batches] == [0] * 11 + [1, 1]
    first_pass = [(b.keys[0], b.rows.item()) for b in batches[:11]]
    expected = [(f"s0p{p}", p) for p in range(4)] + [(f"s1p{p}", 4 + p) for p in range(3)]
    expected += [(f"s2p{p}", 9 + p) for p in range(4)]
    assert sorted(first_pass, key=lambda kr: kr[1]) == expected  # workers interleave their shards
    assert dict(loader.skipped) == {
        "shard-000000.tar": {"samples beyond manifest count": 2},
        "shard-000001.tar": {"truncated shard": 2},
    }


def test_extra_samples_counted_once_across_readers(tmp_path, tokenizer, transform):
    # Split by sample (1 shard < 4 readers): each extra sample is counted by exactly one reader.
    stated = stated_manifest(make_dataset(tmp_path, [11]), [8])
    loaders = [
        make_loader(stated, tokenizer, transform, batch_size=2, rank=rank, world_size=2, num_workers=2)
        for rank in range(2)
    ]
    ids = [
        row
        for loader in loaders
        for b in run_with_timeout(lambda loader=loader: list(loader.epoch(0)))
        for row in b.rows.tolist()
    ]
    assert sorted(ids) == list(range(8))
    assert sum(loader.skipped["shard-000000.tar"]["samples beyond manifest count"] for loader in loaders) == 3


def test_pin_memory_follows_cuda(tmp_path, tokenizer, transform):
    manifest = make_dataset(tmp_path, [2])
    assert make_loader(manifest, tokenizer, transform).pin_memory == torch.cuda.is_available()
    assert make_loader(manifest, tokenizer, transform, pin_memory=False).pin_memory is False
