import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from engine.manifest import (
    Manifest,
    ShardEntry,
    build_manifest,
    index_shards,
    iter_sample_keys,
    sample_key,
)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(keys: list[str]) -> list[tuple[str, bytes]]:
    return [m for key in keys for m in ((f"{key}.png", b"img-" + key.encode()), (f"{key}.txt", key.encode()))]


@pytest.fixture
def two_shards(tmp_path: Path) -> list[Path]:
    return [
        write_tar(tmp_path / "a-0.tar", sample_members(["k0", "k1", "k2"])),
        write_tar(tmp_path / "a-1.tar", sample_members(["k3", "k4"])),
    ]


def test_sample_key_follows_webdataset_grouping():
    assert sample_key("dir/img.001.png") == "dir/img"
    assert sample_key("README") is None
    names = ["a.png", "a.txt", "b.jpg", "README", "dir/c.d.png", "dir/c.d.txt", "a.json"]
    # A key that comes back after another key starts a new sample, as in webdataset.
    assert list(iter_sample_keys(names)) == ["a", "b", "dir/c", "a"]


def test_build_manifest_counts_sizes_checksums(two_shards, tmp_path):
    manifest = build_manifest(two_shards, root=tmp_path)
    assert [s.path for s in manifest.shards] == ["a-0.tar", "a-1.tar"]
    assert [s.num_samples for s in manifest.shards] == [3, 2]
    for shard, path in zip(manifest.shards, two_shards):
        assert shard.num_bytes == path.stat().st_size
        assert shard.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest.num_samples == 5
    assert manifest.offsets == [0, 3, 5]
    assert manifest.row(0, 2) == 2
    assert manifest.row(1, 0) == 3
    assert manifest.row(1, 1) == 4
    with pytest.raises(IndexError):
        manifest.row(1, 2)
    with pytest.raises(IndexError):
        manifest.row(2, 0)


def test_build_manifest_refuses_non_tar(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ValueError, match="bad.tar"):
        build_manifest([bad], root=tmp_path)


def test_round_trip_and_fingerprint(two_shards, tmp_path):
    manifest = build_manifest(two_shards, root=tmp_path)
    saved = manifest.save(tmp_path / "manifest.json")
    loaded = Manifest.load(saved)
    assert loaded == manifest
    assert loaded.fingerprint() == manifest.fingerprint()
    assert Manifest.load(tmp_path).fingerprint() == manifest.fingerprint()
    assert not list(tmp_path.glob("*.tmp"))

    expected = hashlib.sha256(
        json.dumps([[s.path, s.num_samples, s.num_bytes, s.sha256] for s in manifest.shards]).encode()
    ).hexdigest()
    assert manifest.fingerprint() == expected

    # Moving the dataset keeps the fingerprint; any change to the shard list changes it.
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("moved"))
    assert Manifest.load(moved / "manifest.json").fingerprint() == manifest.fingerprint()
    reordered = Manifest(root=tmp_path, shards=manifest.shards[::-1])
    assert reordered.fingerprint() != manifest.fingerprint()
    first = manifest.shards[0]
    recounted = Manifest(
        root=tmp_path,
        shards=[
            ShardEntry(first.path, first.num_samples + 1, first.num_bytes, first.sha256),
            manifest.shards[1],
        ],
    )
    assert recounted.fingerprint() != manifest.fingerprint()


def test_save_outside_root_refused(two_shards, tmp_path):
    manifest = build_manifest(two_shards, root=tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ValueError, match="must be saved in that directory"):
        manifest.save(tmp_path / "elsewhere" / "manifest.json")


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Manifest.load(missing)

    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json.*not valid JSON"):
        Manifest.load(broken)

    no_shards = tmp_path / "no_shards.json"
    no_shards.write_text(json.dumps({"format": "tuneclip-shard-manifest"}))
    with pytest.raises(ValueError, match=r"no_shards\.json.*'shards'"):
        Manifest.load(no_shards)

    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps({"shards": [{"path": "a.tar", "num_samples": 3, "num_bytes": 10}]}))
    with pytest.raises(ValueError, match=r"lacking\.json.*shard 0 lacks field\(s\) sha256"):
        Manifest.load(lacking)

    mistyped = tmp_path / "mistyped.json"
    entry = {"path": "a.tar", "num_samples": "3", "num_bytes": 10, "sha256": "00"}
    mistyped.write_text(json.dumps({"shards": [entry]}))
    with pytest.raises(ValueError, match=r"mistyped\.json.*num_samples"):
        Manifest.load(mistyped)


def test_edited_manifest_is_refused(two_shards, tmp_path):
    path = build_manifest(two_shards, root=tmp_path).save(tmp_path / "manifest.json")
    data = json.loads(path.read_text())
    data["shards"][0]["num_samples"] = 4
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="fingerprint"):
        Manifest.load(path)


def test_shard_path_escape_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    entries = [
        ShardEntry("../x.tar", 1, 1, "0"),
        ShardEntry(str(tmp_path / "outside.tar"), 1, 1, "0"),
        ShardEntry("sub/../inside.tar", 1, 1, "0"),
        ShardEntry(str(root / "abs-inside.tar"), 1, 1, "0"),
        ShardEntry("sub/../../x.tar", 1, 1, "0"),
    ]
    manifest = Manifest(root=root, shards=entries)
    for i in (0, 1, 4):
        with pytest.raises(ValueError, match="escapes the manifest directory"):
            manifest.shard_path(i)
    assert manifest.shard_path(2) == root / "inside.tar"
    assert manifest.shard_path(3) == root / "abs-inside.tar"


def test_verify_detects_missing_resized_and_changed_shards(two_shards, tmp_path):
    manifest = build_manifest(two_shards, root=tmp_path)
    manifest.verify(checksums=True)

    # Same size, different bytes: only the checksum pass notices.
    data = bytearray(two_shards[0].read_bytes())
    position = data.index(b"img-k1")
    data[position : position + 6] = b"IMG-K1"
    two_shards[0].write_bytes(bytes(data))
    manifest.verify()
    with pytest.raises(ValueError, match=r"a-0\.tar has sha256 .*run\.py shards index"):
        manifest.verify(checksums=True)

    with open(two_shards[1], "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(
        ValueError, match=r"a-1\.tar has \d+ bytes, the manifest says \d+.*run\.py shards index"
    ):
        manifest.verify()

    two_shards[1].unlink()
    with pytest.raises(ValueError, match=r"a-1\.tar is missing"):
        manifest.verify()


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
