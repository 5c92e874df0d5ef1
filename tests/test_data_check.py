"""`shards check`: every planted defect found, broken shards flagged, the CLI's exit code."""

import json
import re
import tarfile
from pathlib import Path

import pytest

from engine.cli import main as cli_main
from engine.data.check import check_shard, check_shards
from engine.data.sources import build_manifest
from tests.conftest import write_tar
from tests.helpers.images import image_bytes, png_bytes
from tests.test_data_images import png_header_only


def good(key: str, *, jpeg: bool = False) -> list[tuple[str, bytes]]:
    """A usable img2dataset-style sample: 16-pixel PNG (or 8-pixel JPEG), caption, metadata."""
    image = (
        (f"{key}.jpg", image_bytes((9, 9, 9), "JPEG")) if jpeg else (f"{key}.png", png_bytes((1, 2, 3), 16))
    )
    return [image, (f"{key}.txt", f"caption of {key}".encode()), (f"{key}.json", b"{}")]


@pytest.fixture
def defect_shards(tmp_path: Path) -> Path:
    """Three shards: one with every per-sample defect once, one clean, one to be broken by each test."""
    shards = tmp_path / "shards"
    shards.mkdir()
    defects = [
        *good("a"),
        ("b.png", b"\x89PNG\r\n\x1a\n garbage"),  # undecodable image
        ("b.txt", b"caption"),
        ("c.txt", b"no image at all"),  # missing image
        ("d.png", png_bytes((5, 5, 5))),  # missing caption
        ("e.png", png_bytes((5, 5, 5))),
        ("e.txt", b"  \n"),  # empty caption
        ("f.png", png_bytes((5, 5, 5))),
        ("f.txt", b"caf\xe9"),  # not UTF-8: counted with the empty ones
        ("g.png", png_bytes((5, 5, 5), size=4)),  # small image (min_size 8)
        ("g.txt", b"tiny"),
        *good("a"),  # key "a" again, after other keys: a duplicate __key__
        ("h.png", png_bytes((5, 5, 5))),
        ("h.png", png_bytes((6, 6, 6))),  # the same member twice in one sample
        ("h.txt", b"twice"),
        ("i.png", png_header_only(9000, 8000)),  # over the default pixel cap (72 Mpx)
        ("i.txt", b"too large"),
        ("j.k.png", png_bytes((5, 5, 5))),  # dotted names: parts of sample "j" under webdataset's rule
        ("j.k.txt", b"dotted"),
    ]
    write_tar(shards / "00000.tar", defects)
    write_tar(shards / "00001.tar", [m for k in "xyz" for m in good(k, jpeg=True)])
    write_tar(shards / "00002.tar", [m for k in "pqrs" for m in good(k)])
    manifest = build_manifest(sorted(shards.glob("*.tar")), root=shards)
    manifest.save(shards / "manifest.json")
    return shards


def test_check_finds_each_planted_defect(defect_shards):
    report = check_shards(defect_shards, min_size=8, num_workers=2)
    assert [s.path for s in report.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    first = report.shards[0]
    found = {
        "num_samples": first.num_samples,
        "expected_samples": first.expected_samples,
        "undecodable_images": first.undecodable_images,
        "large_images": first.large_images,
        "missing_images": first.missing_images,
        "missing_captions": first.missing_captions,
        "empty_captions": first.empty_captions,
        "duplicate_keys": first.duplicate_keys,
        "key_collisions": first.key_collisions,
        "small_images": first.small_images,
    }
    assert found == {
        "num_samples": 11,
        "expected_samples": 11,
        "undecodable_images": 1,
        "large_images": 1,
        "missing_images": 1,
        "missing_captions": 1,
        "empty_captions": 2,
        "duplicate_keys": 2,
        "key_collisions": 1,
        "small_images": 1,
    }
    assert first.error is None and not first.broken and first.status() == "defects"
    assert [s.status() for s in report.shards[1:]] == ["ok", "ok"]
    assert report.broken == []
    assert report.totals()["num_samples"] == 18
    lines = report.table().splitlines()
    assert lines[0].split() == [
        "shard",
        "samples",
        "expected",
        "bad_img",
        "too_big",
        "sparse",
        "huge_mbr",
        "no_img",
        "no_txt",
        "empty_txt",
        "dup_key",
        "dot_key",
        "small",
        "status",
    ]
    assert lines[1].split() == ["00000.tar", "11", "11", "1", "1", "0", "0", "1", "1", "2", "2", "1", "1", "defects"]
    assert lines[-1].split()[:2] == ["total", "18"] and lines[-1].endswith("0 broken of 3")
    # Without a minimum size nothing is small; the 8-pixel JPEGs pass min_size 8 but not 9.
    assert check_shards(defect_shards, num_workers=1).shards[0].small_images == 0
    assert check_shards(defect_shards, min_size=9, num_workers=1).shards[1].small_images == 3
    # The pixel cap is the loader's: raised, the large image is decoded (and its garbage data rejects it).
    raised = check_shards(defect_shards, max_image_pixels=9000 * 8000, num_workers=1).shards[0]
    assert (raised.large_images, raised.undecodable_images) == (0, 2)


def cut_tar(path: Path, member: str, extra: int) -> None:
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    data = path.read_bytes()
    path.write_bytes(data[: info.offset + extra])


@pytest.mark.parametrize(
    ("damage", "status"),
    [
        (
            "mid-member",
            r"BROKEN: truncated after 2 sample\(s\) \(unexpected end of data\); 2 samples, expected 4",
        ),
        (
            "at-boundary",
            r"BROKEN: truncated: no end-of-archive marker after 2 sample\(s\); 2 samples, expected 4",
        ),
        ("garbage", r"BROKEN: unreadable \(.*\); 0 samples, expected 4"),
        ("deleted", r"BROKEN: missing; 0 samples, expected 4"),
        ("recounted", r"BROKEN: 4 samples, expected 5"),
    ],
)
def test_check_flags_broken_shards_and_cli_exits_nonzero(defect_shards, capsys, damage, status):
    path = defect_shards / "00002.tar"
    if damage == "mid-member":
        cut_tar(path, "r.txt", 512 + 3)  # inside the caption of the third sample
    elif damage == "at-boundary":
        cut_tar(path, "r.png", 0)  # a clean member boundary: only the missing end marker tells
    elif damage == "garbage":
        path.write_bytes(b"not a tar" * 300)
    elif damage == "deleted":
        path.unlink()
    else:
        manifest = json.loads((defect_shards / "manifest.json").read_text())
        manifest["shards"][2]["num_samples"] = 5
        del manifest["fingerprint"]
        (defect_shards / "manifest.json").write_text(json.dumps(manifest))
    report = check_shards(defect_shards, num_workers=1)
    assert [s.path for s in report.broken] == ["00002.tar"]
    assert re.fullmatch(status, report.shards[2].status())
    assert cli_main(["shards", "check", str(defect_shards), "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "1 broken shard(s): 00002.tar" in out and "BROKEN" in out
    if damage != "recounted":  # the same shards without a manifest: no expected count, still broken
        (defect_shards / "manifest.json").unlink()
        assert [s.path for s in check_shards(defect_shards / "0000*.tar").broken] == (
            ["00002.tar"] if damage != "deleted" else []
        )


def test_check_without_manifest_uses_declared_counts(tmp_path, capsys):
    write_tar(tmp_path / "00000.tar", [m for k in "ab" for m in good(k)])
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 3}))
    shard = check_shards(tmp_path).shards[0]
    assert (shard.num_samples, shard.expected_samples, shard.broken) == (2, 3, True)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 2}))
    assert cli_main(["shards", "check", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "0 broken of 1" in out
    assert "shard/s" not in err and "it/s" not in err  # no progress bar in a log file (stderr not a terminal)
    assert check_shard(tmp_path / "00000.tar").num_samples == 2
    with pytest.raises(ValueError, match="min_size"):
        check_shards(tmp_path, min_size=-1)
