"""The one tar reader and the one sample validator, and that every tool judges a shard alike through them."""

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from engine.data import ShardLoader, SkipRecord
from engine.data.build import build_shards
from engine.data.check import check_shard
from engine.data.samples import (
    SKIP_CORRUPT_IMAGE,
    SKIP_DUPLICATE_MEMBER,
    SKIP_EMPTY_CAPTION,
    SKIP_IMAGE_TOO_LARGE,
    SKIP_KEY_COLLISION,
    SKIP_MISSING_CAPTION,
    SKIP_MISSING_IMAGE,
    SKIP_NON_UTF8_CAPTION,
    SKIP_TRUNCATED_SHARD,
    DecodedSample,
    Rejection,
    TarSamples,
    decode_sample,
    sample_key,
    validate_pair,
)
from engine.data.sources import build_manifest
from tests.conftest import write_tar
from tests.test_data_images import png_header_only


def image_bytes(fmt: str = "PNG", color: tuple[int, int, int] = (9, 8, 7), size: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format=fmt)
    return out.getvalue()


def read_all(tar: TarSamples) -> list[tuple[int, str, list[str]]]:
    return [(s.position, s.key, sorted(s.parts)) for s in tar]


def test_members_group_into_numbered_samples_as_webdataset(tmp_path):
    assert sample_key("dir/img.001.png") == "dir/img"
    assert sample_key("README") is None
    names = ["a.png", "a.txt", "b.jpg", "README", "__meta__", "dir/c.d.png", "dir/c.d.TXT", "a.json"]
    path = write_tar(tmp_path / "s.tar", [(name, name.encode()) for name in names])
    tar = TarSamples(path)
    # A key that comes back after another key starts a new sample; metadata and extensionless members
    # belong to none; extensions are lower-cased.
    assert read_all(tar) == [
        (0, "a", ["png", "txt"]),
        (1, "b", ["jpg"]),
        (2, "dir/c", ["d.png", "d.txt"]),
        (3, "a", ["json"]),
    ]
    assert (tar.num_started, tar.num_whole, tar.truncated, tar.error, tar.end_marker) == (
        4,
        4,
        False,
        None,
        True,
    )
    # Only kept positions are handed out; every sample is still counted, and the checksum covers the file.
    counted = TarSamples(path, keep=lambda position: position % 2 == 1, checksum=True)
    assert [s.key for s in counted] == ["b", "a"]
    assert counted.num_started == 4
    assert counted.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert counted.num_bytes == path.stat().st_size


def test_duplicate_member_keeps_the_later_bytes(tmp_path):
    path = write_tar(tmp_path / "s.tar", [("a.png", b"1"), ("a.png", b"2"), ("a.txt", b"t"), ("b.txt", b"u")])
    first, second = TarSamples(path)
    assert (first.duplicate_member, first.parts["png"]) == (True, b"2")
    assert not second.duplicate_member


@pytest.mark.parametrize(
    ("cut", "expected", "kept"),
    [
        ("inside b.txt", None, ["a"]),  # an error: b lost its caption, so it is lost with the tail
        ("before b.txt", 3, ["a"]),  # a shorter tar than stated: b is cut, dropped
        ("before b.txt", None, ["a", "b"]),  # count unknown and no error: b is handed out as read
        ("before c.png", 3, ["a", "b"]),
    ],
)
def test_truncated_tar_drops_a_cut_last_sample(tmp_path, cut, expected, kept):
    members = [
        (f"{k}.{ext}", image_bytes() if ext == "png" else b"caption") for k in "abc" for ext in ("png", "txt")
    ]
    path = write_tar(tmp_path / "s.tar", members)
    where, member = cut.split(" ")
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    path.write_bytes(path.read_bytes()[: info.offset_data + 3 if where == "inside" else info.offset])
    tar = TarSamples(path, expected=expected)
    assert [s.key for s in tar] == kept
    assert tar.num_whole == len(kept) and tar.truncated == (expected is not None or where == "inside")
    assert tar.end_marker is (None if where == "inside" else False)


def test_missing_file_is_an_error_not_an_exception(tmp_path):
    tar = TarSamples(tmp_path / "absent.tar", expected=2)
    assert list(tar) == [] and isinstance(tar.error, FileNotFoundError) and tar.truncated


def test_validator_checks_reasons_in_order():
    png = image_bytes()
    assert validate_pair(png, b"x", duplicate_member=True) == Rejection(SKIP_DUPLICATE_MEMBER)
    assert validate_pair(None, None) == Rejection(SKIP_MISSING_IMAGE)
    assert validate_pair(b"garbage", None) == Rejection(SKIP_MISSING_CAPTION)
    assert validate_pair(b"garbage", b"caf\xe9") == Rejection(SKIP_NON_UTF8_CAPTION)
    assert validate_pair(b"garbage", b" \n") == Rejection(SKIP_EMPTY_CAPTION)
    assert validate_pair(b"garbage", b"ok").reason == SKIP_CORRUPT_IMAGE
    decoded = validate_pair(image_bytes("WEBP"), b"  a caption \n")
    assert isinstance(decoded, DecodedSample)
    assert (decoded.image.mode, decoded.image.size, decoded.caption) == ("RGB", (8, 8), "a caption")


def good(key: str, fmt: str = "PNG", ext: str = "png") -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", image_bytes(fmt)), (f"{key}.txt", f"caption of {key}".encode())]


# One shard with every defect kind, in tar order, and the reason the loader gives for each.
DEFECT_SHARD = [
    *good("k00"),
    *good("k01", "JPEG", "jpg"),
    ("k02.png", b"\x89PNG\r\n\x1a\n garbage"),
    ("k02.txt", b"undecodable image"),
    ("k03.txt", b"no image at all"),
    ("k04.webp", image_bytes("WEBP")),  # no caption
    ("k05.png", image_bytes()),
    ("k05.txt", b" \n\t"),
    ("k06.png", image_bytes()),
    ("k06.txt", b"caf\xe9"),
    ("k07.png", image_bytes()),
    ("k07.png", image_bytes(color=(1, 2, 3))),  # the same member twice
    ("k07.txt", b"twice"),
    ("__meta__/info.json", b"{}"),  # webdataset metadata: no sample
    ("README", b"no extension: no sample"),
    ("k08.json", b"{}"),
    ("k08.txt", b"metadata and caption, no image"),
    *good("k00"),  # a key again: another sample, another row, used
    ("k09.PNG", image_bytes()),
    ("k09.TXT", b"upper-case extensions"),
    ("k10.png", b"garbage"),
    ("k10.txt", b""),  # two defects: the first reason in the validator's order
    ("k12.png", png_header_only(9000, 8000)),  # over the default pixel cap: judged from its header
    ("k12.txt", b"too large"),
    ("k13.b.png", image_bytes()),  # dotted names: parts 'b.png' and 'b.txt' of sample k13
    ("k13.b.txt", b"a dotted pair"),
    *good("k11"),  # cut by the truncation below
]
EXPECTED_SKIPS = [
    ("k02", SKIP_CORRUPT_IMAGE),
    ("k03", SKIP_MISSING_IMAGE),
    ("k04", SKIP_MISSING_CAPTION),
    ("k05", SKIP_EMPTY_CAPTION),
    ("k06", SKIP_NON_UTF8_CAPTION),
    ("k07", SKIP_DUPLICATE_MEMBER),
    ("k08", SKIP_MISSING_IMAGE),
    ("k10", SKIP_EMPTY_CAPTION),
    ("k12", SKIP_IMAGE_TOO_LARGE),
    ("k13", SKIP_KEY_COLLISION),
]
USABLE = ["k00", "k01", "k00", "k09"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_defect_judged_alike_by_check_loader_index_and_build(
    tmp_path, tokenizer, transform, num_workers
):
    (tmp_path / "shards").mkdir()
    shard = write_tar(tmp_path / "shards" / "shard-000000.tar", DEFECT_SHARD)
    manifest = build_manifest([shard], root=shard.parent)
    intact = check_shard(shard, expected_samples=manifest.shards[0].num_samples)
    # The index counts what check reads: 15 samples, one row each, defective or not.
    assert manifest.num_samples == intact.num_samples == 15 and not intact.broken
    assert intact.skipped == EXPECTED_SKIPS and intact.repeated_keys == 1

    with tarfile.open(shard) as tar:
        cut = tar.getmember("k11.txt").offset_data + 4  # inside the last caption
    shard.write_bytes(shard.read_bytes()[:cut])
    checked = check_shard(shard, expected_samples=manifest.shards[0].num_samples)
    assert checked.skipped == EXPECTED_SKIPS
    assert checked.num_samples == 14 and checked.status().startswith("BROKEN: truncated after 14 sample(s)")
    with pytest.raises(ValueError, match="not a readable tar"):
        build_manifest([shard], root=shard.parent)

    loader = ShardLoader(
        manifest,
        batch_size=1,
        image_transform=transform,
        tokenizer=tokenizer,
        shuffle=False,
        num_workers=num_workers,
    )
    batches = list(loader.epoch(0))
    keys = [key for batch in batches for key in batch.keys]
    # 15 rows by the manifest, 4 usable: yielded once each, then repeated to fill the 15 batches.
    assert sorted(keys[:4]) == sorted(USABLE) and set(keys) == set(USABLE)
    assert [batch.num_padding for batch in batches] == [0] * 4 + [1] * 11
    if num_workers == 0:
        assert keys[:4] == USABLE
    per_sample = [(r.key, r.reason) for r in loader.skipped_log if r.key is not None]
    assert sorted(per_sample) == sorted(checked.skipped)
    assert [r for r in loader.skipped_log if r.key is None] == [
        SkipRecord("shard-000000.tar", None, SKIP_TRUNCATED_SHARD)
    ]
    lost = loader.skipped["shard-000000.tar"][SKIP_TRUNCATED_SHARD]
    assert lost == manifest.num_samples - checked.num_samples == 1
    assert dict(checked.skipped_by_reason) == {
        reason: n
        for reason, n in loader.skipped["shard-000000.tar"].items()
        if reason != SKIP_TRUNCATED_SHARD
    }


def test_build_skips_a_source_pair_for_the_reason_the_loader_gives(tmp_path):
    # The pair-level defects of the shard above, as a folder of images and captions.
    source = tmp_path / "folder"
    source.mkdir()
    pairs = {}
    for name, data in DEFECT_SHARD:
        key = sample_key(name)
        if key in ("k07", "k08") or key is None or name.startswith("__"):
            continue  # a duplicate member or a metadata member cannot exist in a folder
        pairs.setdefault(key, {})[name.split(".", 1)[1].lower()] = data
    for key, parts in pairs.items():
        for ext, data in parts.items():
            (source / f"{key}.{ext}").write_bytes(data)
    _, report = build_shards(source, tmp_path / "out")
    judged = sorted((Path(s["source"]).stem, s["reason"]) for s in report["skipped"])
    # k13's files k13.b.png + k13.b.txt are a pair for the builder, which keys samples by number.
    assert judged == sorted(skip for skip in EXPECTED_SKIPS if skip[0] not in ("k07", "k08", "k13"))
    assert report["num_written"] == len({"k00", "k01", "k09", "k11", "k13"})


def test_key_collision_names_the_members_and_the_rule(tmp_path):
    stem = "clipart_flying_wasp_gerald_g._01"
    path = write_tar(
        tmp_path / "s.tar",
        [
            (f"{stem}.jpg", image_bytes("JPEG")),
            (f"{stem}.txt", b"a wasp"),
            ("x/a.1.png", image_bytes()),
            ("x/a.1.txt", b"one"),
            ("x/a.2.png", image_bytes()),
            ("x/a.2.txt", b"two"),
            ("c.png", image_bytes()),
            ("c.v2.txt", b"the caption under a dotted name"),
            ("d.png", image_bytes()),
            ("d.seg.json", b"{}"),  # a dotted member that is neither image nor caption: just no caption
        ],
    )
    judged = [decode_sample(sample) for sample in TarSamples(path)]
    rule = "under webdataset's first-dot rule (rename them so that only the extension follows the first dot)"
    assert judged == [
        Rejection(
            SKIP_KEY_COLLISION,
            f": members '{stem}.jpg' and '{stem}.txt' share key 'clipart_flying_wasp_gerald_g' {rule}",
        ),
        Rejection(
            SKIP_KEY_COLLISION,
            ": members 'x/a.1.png', 'x/a.1.txt', 'x/a.2.png' and 1 more share key 'x/a' " + rule,
        ),
        Rejection(SKIP_KEY_COLLISION, ": member 'c.v2.txt' has key 'c' " + rule),
        Rejection(SKIP_MISSING_CAPTION),
    ]
