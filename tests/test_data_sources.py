"""Shard sources (folders, patterns, `::`, img2dataset stats, wids indexes) and `shards index`."""

import json
import os
from pathlib import Path

import pytest

from engine.data import Manifest
from engine.data.manifest import COUNT_FROM_STATS, COUNT_FROM_TAR, COUNT_FROM_WIDS
from engine.data.sources import build_manifest, find_shards, index_shards
from tests.conftest import write_tar


def sample_members(keys: list[str]) -> list[tuple[str, bytes]]:
    return [m for key in keys for m in ((f"{key}.png", b"img-" + key.encode()), (f"{key}.txt", key.encode()))]


def test_build_manifest_refuses_non_tar(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match="bad.tar"):
        build_manifest([bad], root=tmp_path)


def test_index_shards_directory_and_patterns(tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for i, keys in enumerate([["a", "b"], ["c"], ["d", "e", "f"]]):
        write_tar(shard_dir / f"shard-{i:06d}.tar", sample_members(keys))
    (shard_dir / "notes.txt").write_text("not a shard")

    manifest = index_shards(shard_dir)
    assert [s.path for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.num_samples for s in manifest.shards] == [2, 1, 3]
    assert Manifest.load(shard_dir / "manifest.json") == manifest

    subset = index_shards(str(shard_dir / "shard-{000001..000002}.tar"))
    assert [s.path for s in subset.shards] == ["shard-000001.tar", "shard-000002.tar"]
    assert Manifest.load(shard_dir / "manifest.json") == subset

    globbed = index_shards(str(shard_dir / "shard-*.tar"))
    assert globbed.fingerprint() == manifest.fingerprint()

    with pytest.raises(ValueError, match="not found"):
        index_shards(str(shard_dir / "shard-{000002..000003}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.tar"):
        index_shards(tmp_path / "empty")


def img2dataset_dir(folder: Path, sizes: list[int], *, stats: bool = True) -> list[Path]:
    """img2dataset-like output: 00000.tar ... with gaps in the keys, <stem>_stats.json and .parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, size in enumerate(sizes):
        # Download-completion order with failed downloads: keys out of order, with gaps.
        keys = [f"{s:05d}{k:04d}" for k in sorted(range(0, 3 * size, 3), key=lambda k: (k * 7) % 11)]
        path = write_tar(folder / f"{s:05d}.tar", sample_members(keys))
        if stats:
            stats_json = {"count": 3 * size, "successes": size, "failed_to_download": 2 * size}
            (folder / f"{s:05d}_stats.json").write_text(json.dumps(stats_json))
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1")
        paths.append(path)
    return paths


def test_counts_from_img2dataset_stats_equal_counts_from_tars(tmp_path):
    paths = img2dataset_dir(tmp_path / "shards", [5, 3, 7, 1])
    from_tars = index_shards(tmp_path / "shards", read_tars=True, num_workers=2)
    from_stats = index_shards(tmp_path / "shards")
    assert (
        [s.num_samples for s in from_stats.shards]
        == [s.num_samples for s in from_tars.shards]
        == [5, 3, 7, 1]
    )
    assert from_stats.offsets == from_tars.offsets == [0, 5, 8, 15, 16]
    assert [s.path for s in from_stats.shards] == [s.path for s in from_tars.shards]
    assert [s.num_bytes for s in from_stats.shards] == [p.stat().st_size for p in paths]
    rows = [(i, p) for i, shard in enumerate(from_tars.shards) for p in range(shard.num_samples)]
    assert (
        [from_stats.row(i, p) for i, p in rows] == [from_tars.row(i, p) for i, p in rows] == list(range(16))
    )
    # Recorded as unread: no checksums, and the source of every count.
    assert {s.count_source for s in from_stats.shards} == {COUNT_FROM_STATS}
    assert all(s.sha256 == "" for s in from_stats.shards) and not from_stats.checksums_available
    assert {s.count_source for s in from_tars.shards} == {COUNT_FROM_TAR} and from_tars.checksums_available
    saved = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert saved["checksums"] is False and saved["shards"][0]["count_source"] == COUNT_FROM_STATS
    assert Manifest.load(tmp_path / "shards") == from_stats


def test_verify_says_checksums_are_unavailable(tmp_path):
    img2dataset_dir(tmp_path, [2, 2])
    manifest = index_shards(tmp_path)
    manifest.verify()  # sizes are known without reading
    with pytest.raises(
        ValueError, match=r"checksums are unavailable for 2 shard\(s\).*img2dataset-stats.*--read-tars"
    ):
        manifest.verify(checksums=True)
    (tmp_path / "00001.tar").unlink()
    with pytest.raises(ValueError, match=r"00001\.tar is missing.*checksums are unavailable"):
        manifest.verify(checksums=True)


def test_mixed_sources_and_old_manifests(tmp_path):
    paths = img2dataset_dir(tmp_path, [2, 3, 4])
    (tmp_path / "00001_stats.json").unlink()
    manifest = index_shards(tmp_path)
    assert [s.count_source for s in manifest.shards] == [COUNT_FROM_STATS, COUNT_FROM_TAR, COUNT_FROM_STATS]
    assert [s.has_checksum for s in manifest.shards] == [False, True, False]
    # A manifest written before count sources existed still loads, as read from the tars.
    old = build_manifest(paths, root=tmp_path).to_json()
    for shard in old["shards"]:
        del shard["count_source"]
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert {s.count_source for s in Manifest.load(tmp_path).shards} == {COUNT_FROM_TAR}


def test_bad_stats_file_names_it(tmp_path):
    img2dataset_dir(tmp_path, [2])
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": "2"}))
    with pytest.raises(ValueError, match=r"00000_stats\.json: 'successes' must be an integer"):
        index_shards(tmp_path)


def wids_index(path: Path, shards: list[Path], counts: list[int], **extra) -> Path:
    shardlist = [
        {"url": os.path.relpath(p, path.parent), "nsamples": n, **extra} for p, n in zip(shards, counts)
    ]
    path.write_text(
        json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": shardlist})
    )
    return path


def test_wids_shardindex_accepted(tmp_path):
    paths = img2dataset_dir(tmp_path / "data", [4, 2, 3], stats=False)
    # Given directly: its shard order (here reversed) is the dataset order; urls relative to the index.
    index = wids_index(tmp_path / "train.json", paths[::-1], [3, 2, 4])
    manifest = index_shards(index)
    assert [s.path for s in manifest.shards] == ["00002.tar", "00001.tar", "00000.tar"]
    assert [s.num_samples for s in manifest.shards] == [3, 2, 4]
    assert manifest.offsets == [0, 3, 5, 9]
    assert {s.count_source for s in manifest.shards} == {COUNT_FROM_WIDS}
    # Found next to the shards: counts for the tars it lists, before any _stats.json.
    wids_index(tmp_path / "data" / "shardindex.json", paths[:2], [4, 2])
    (tmp_path / "data" / "00000_stats.json").write_text(json.dumps({"successes": 99}))
    _, declared = find_shards(tmp_path / "data")
    assert {p.name: (c.num_samples, c.source) for p, c in declared.items()} == {
        "00000.tar": (4, COUNT_FROM_WIDS),
        "00001.tar": (2, COUNT_FROM_WIDS),
    }
    manifest = index_shards(tmp_path / "data")
    assert [s.count_source for s in manifest.shards] == [COUNT_FROM_WIDS, COUNT_FROM_WIDS, COUNT_FROM_TAR]
    assert manifest.offsets == [0, 4, 6, 9]


def test_wids_index_errors(tmp_path):
    paths = img2dataset_dir(tmp_path / "data", [2], stats=False)
    stale = wids_index(tmp_path / "stale.json", paths, [2], filesize=123)
    with pytest.raises(ValueError, match=r"00000\.tar has \d+ bytes, .*stale\.json says 123"):
        index_shards(stale)
    remote = tmp_path / "remote.json"
    remote.write_text(
        json.dumps({"wids_version": 1, "shardlist": [{"url": "https://x/0.tar", "nsamples": 2}]})
    )
    with pytest.raises(ValueError, match="remote"):
        index_shards(remote)


def test_joined_sources_form_one_manifest_in_order(tmp_path):
    for name, keys in (("a", [["a0", "a1"], ["a2"]]), ("b", [["b0", "b1", "b2"]])):
        (tmp_path / name).mkdir()
        for i, shard_keys in enumerate(keys):
            write_tar(tmp_path / name / f"{i:03d}.tar", sample_members(shard_keys))
    spec = f"{tmp_path}/b/{{000..000}}.tar::{tmp_path}/a/{{000..001}}.tar"
    manifest = index_shards(spec, num_workers=2)
    assert manifest.root == tmp_path
    assert [s.path for s in manifest.shards] == ["b/000.tar", "a/000.tar", "a/001.tar"]
    assert manifest.offsets == [0, 3, 5, 6]
    assert Manifest.load(tmp_path / "manifest.json") == manifest
    with pytest.raises(ValueError, match="twice"):
        index_shards(f"{tmp_path}/a::{tmp_path}/a/000.tar")
    with pytest.raises(ValueError, match="empty part"):
        index_shards(f"{tmp_path}/a::")


def test_parallel_indexing_matches_serial(tmp_path):
    for i in range(6):
        write_tar(tmp_path / f"s{i}.tar", sample_members([f"k{i}_{j}" for j in range(i + 1)]))
    paths = sorted(tmp_path.glob("*.tar"))
    serial = build_manifest(paths, root=tmp_path, num_workers=1)
    parallel = build_manifest(paths, root=tmp_path, num_workers=2)
    assert parallel == serial
    assert [s.num_samples for s in parallel.shards] == [1, 2, 3, 4, 5, 6]
    (tmp_path / "s3.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match=r"s3\.tar is not a readable tar"):
        build_manifest(paths, root=tmp_path, num_workers=2)


def test_cli_index_reports_unread_shards(tmp_path, capsys):
    from engine.cli import main as cli_main

    img2dataset_dir(tmp_path, [3, 4])
    assert cli_main(["shards", "index", str(tmp_path), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "indexed 2 shards, 7 samples" in out and "2 shard(s) counted from img2dataset/wids" in out
    assert cli_main(["shards", "index", str(tmp_path), "--read-tars"]) == 0
    assert "without reading" not in capsys.readouterr().out
    assert Manifest.load(tmp_path).checksums_available
