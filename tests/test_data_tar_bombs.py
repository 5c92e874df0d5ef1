"""Tar-level bombs: a member whose header (or GNU sparse map) claims gigabytes is never read, by `shards check`,
the training loader or evaluation; sparse and oversized members are skipped and counted as their own reasons."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from engine.cli import main
from engine.data.loader import ShardLoader
from engine.data.manifest import Manifest
from engine.data.samples import SKIP_MEMBER_TOO_LARGE, SKIP_SPARSE_MEMBER
from engine.data.sources import index_shards
from tests.helpers.bombs import gnu_sparse_member, peak_rss, regular_member, write_raw_tar
from tests.helpers.images import png_bytes

REPO = Path(__file__).resolve().parents[1]
CLAIMED = 2 * 1024**3  # what the sparse member says it holds; the tar itself is 15 KB
SMALL_CAP = 4096  # max_member_bytes under which sample 002's 5 KB image is oversized


def pair(key: str, image: bytes, caption: bytes = b"a red square") -> list[bytes]:
    return [regular_member(f"{key}.png", image), regular_member(f"{key}.txt", caption)]


def big_png() -> bytes:
    """A valid 8-px PNG padded to 5 KB (PIL ignores bytes after the image)."""
    return png_bytes((0, 200, 0)) + b"\0" * 5000


def bomb_shard(folder: Path) -> Path:
    """`folder/bomb.tar`: 000 and 003 good, 001's image a GNU sparse member claiming 2 GiB, 002's image 5 KB."""
    folder.mkdir(parents=True, exist_ok=True)
    members = [
        *pair("000", png_bytes((200, 0, 0))),
        gnu_sparse_member("001.png", claimed=CLAIMED, data=b"\x89PNG" + b"x" * 1020),
        regular_member("001.txt", b"claims two gigabytes"),
        *pair("002", big_png()),
        *pair("003", png_bytes((0, 0, 200))),
    ]
    path = write_raw_tar(folder / "bomb.tar", members)
    assert path.stat().st_size < 16_000
    return path


def normal_shard(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_raw_tar(folder / "normal.tar", [m for i in range(4) for m in pair(f"{i:03d}", png_bytes((i, 0, 0)))])


def table_row(stdout: str, name: str) -> dict[str, str]:
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("shard ")).split()
    row = next(line for line in lines if line.startswith(name)).split()
    return dict(zip(header, row, strict=True))


def test_check_reports_sparse_and_oversized_members_without_reading_them(tmp_path, capsys):
    bomb_shard(tmp_path / "data")
    assert main(["shards", "check", str(tmp_path / "data"), "--workers", "1",
                 "--max-member-bytes", str(SMALL_CAP)]) == 0
    row = table_row(capsys.readouterr().out, "bomb.tar")
    assert (row["samples"], row["sparse"], row["huge_mbr"], row["status"]) == ("4", "1", "1", "defects")
    # Under the default cap (64 MiB) the 5 KB image is an ordinary sample; the sparse one stays skipped.
    assert main(["shards", "check", str(tmp_path / "data"), "--workers", "1"]) == 0
    row = table_row(capsys.readouterr().out, "bomb.tar")
    assert (row["sparse"], row["huge_mbr"], row["bad_img"], row["status"]) == ("1", "0", "0", "defects")


def test_loader_skips_them_and_counts_each_reason(tmp_path, tokenizer, transform):
    bomb_shard(tmp_path / "data")
    manifest = index_shards(tmp_path / "data")
    assert manifest.num_samples == 4  # the unread samples keep their rows
    loader = ShardLoader(Manifest.load(tmp_path / "data"), batch_size=2, image_transform=transform,
                         tokenizer=tokenizer, shuffle=False, max_member_bytes=SMALL_CAP)
    keys = [key for batch in loader.epoch(0) for key in batch.keys]
    assert keys == ["000", "003", "000", "003"] and loader.num_padding == 2  # 4 rows: the usable 2 fill 2 batches
    assert {shard: dict(reasons) for shard, reasons in loader.skipped.items()} == {
        "bomb.tar": {SKIP_SPARSE_MEMBER: 1, SKIP_MEMBER_TOO_LARGE: 1}}


def test_max_member_bytes_is_validated_with_the_config(tmp_path, capsys):
    bomb_shard(tmp_path / "data")
    index_shards(tmp_path / "data")
    assert main(["tune", "--train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--model", "tiny-vit",
                 "--set", "data.max_member_bytes=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == ["error: invalid configuration:"]
    assert "data.max_member_bytes must be >= 1 (bytes of one tar member), got 0" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bomb_costs_no_more_memory_than_a_normal_shard(tmp_path):
    """Peak RSS of `shards check`, `tune` and `eval` on the 2 GiB sparse bomb stays under twice that of
    `shards check` on a normal shard (before the cap, `check` alone peaked at 2.8 GB)."""
    normal_shard(tmp_path / "normal")
    bomb_shard(tmp_path / "data")
    index_shards(tmp_path / "data")
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(yaml.safe_dump({"retrieval": [{"name": "bombed", "wds": str(tmp_path / "data" / "bomb.tar")}]}))
    run = [sys.executable, "run.py"]
    job = ["--model", "tiny-vit", "--batch-size", "2", "--epochs", "1", "--osr-epochs", "1", "--set",
           "run.progress=false", "--set", "eval.at_start=false", "--set", "data.num_workers=1"]
    measured = {
        "check normal": peak_rss([*run, "shards", "check", str(tmp_path / "normal"), "--workers", "1"], cwd=REPO),
        "check bomb": peak_rss([*run, "shards", "check", str(tmp_path / "data"), "--workers", "1"], cwd=REPO),
        "tune bomb": peak_rss([*run, "tune", "--train", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                               *job], cwd=REPO),
        "eval bomb": peak_rss([*run, "eval", "--model", "tiny-vit", "--tasks", str(tasks)], cwd=REPO),
    }
    print({name: f"{m['peak_kib'] / 1024:.0f} MiB" for name, m in measured.items()})
    baseline = measured["check normal"]["peak_kib"]
    assert {name: m["peak_kib"] < 2 * baseline for name, m in measured.items()} == dict.fromkeys(measured, True)
    assert measured["check bomb"]["rc"] == 0
    assert table_row(measured["check bomb"]["stdout"], "bomb.tar")["sparse"] == "1"
    assert measured["tune bomb"]["rc"] == 0, measured["tune bomb"]["stderr"][-2000:]
    skips = [json.loads(line) for path in (tmp_path / "run" / "skipped").glob("*.jsonl")
             for line in path.read_text().splitlines()]
    assert {(s.get("key"), s.get("reason")) for s in skips} >= {("001", SKIP_SPARSE_MEMBER)}
    eval_err = measured["eval bomb"]["stderr"]
    assert measured["eval bomb"]["rc"] == 2 and "Traceback" not in eval_err
    [line] = [line for line in eval_err.splitlines() if line.startswith("error: ")]
    assert re.search(r"sample '001': sparse member \(member '001.png' is sparse, claiming 2147483648 bytes", line)


def test_header_blocks_tarfile_would_buffer_are_bounded(tmp_path, capsys):
    """A 2 MiB GNU long name (gzip makes such a block from a few KB) ends the tar as unreadable, unbuffered."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_raw_tar(folder / "longname.tar", [*pair("000", png_bytes((1, 2, 3))),
                                            regular_member("0" * (2 * 1024 * 1024) + ".txt", b"x")])
    assert main(["shards", "check", str(folder), "--workers", "1"]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("longname.tar"))
    assert line.split()[1] == "1"  # the sample before it
    assert line.endswith("BROKEN: truncated after 1 sample(s) (header block of 2097157 bytes (type b'L') > 1048576: "
                         "not a shard's tar)")
