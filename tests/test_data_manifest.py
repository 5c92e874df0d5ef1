"""Manifest: counts, rows, fingerprint and JSON bytes, loading errors, verify."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from engine.data import Manifest, ShardEntry
from engine.data.sources import build_manifest
from tests.conftest import write_tar


def sample_members(keys: list[str]) -> list[tuple[str, bytes]]:
    return [m for key in keys for m in ((f"{key}.png", b"img-" + key.encode()), (f"{key}.txt", key.encode()))]


@pytest.fixture
def two_shards(tmp_path: Path) -> list[Path]:
    return [
        write_tar(tmp_path / "a-0.tar", sample_members(["k0", "k1", "k2"])),
        write_tar(tmp_path / "a-1.tar", sample_members(["k3", "k4"])),
    ]


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


def test_round_trip_and_fingerprint(two_shards, tmp_path):
    manifest = build_manifest(two_shards, root=tmp_path)
    saved = manifest.save(tmp_path / "manifest.json")
    # The bytes u tables and checkpoints were keyed on: indent 1, keys in this order, a final newline.
    assert saved.read_text() == json.dumps(manifest.to_json(), indent=1) + "\n"
    assert list(manifest.to_json()) == [
        "format",
        "version",
        "num_samples",
        "fingerprint",
        "checksums",
        "shards",
    ]
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
