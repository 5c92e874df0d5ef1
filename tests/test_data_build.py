"""`shards build`: shards and manifest from a CSV or a folder; pairs judged by the loader's validator."""

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from engine.data import Manifest, ShardLoader
from engine.data.build import build_shards
from tests.helpers.images import image_bytes, png_bytes


def read_shard(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.fixture
def csv_source(tmp_path: Path) -> Path:
    """7 good rows, then one row per skip reason (corrupt, missing file, empty caption, non-UTF-8 caption)."""
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    lines = [b"filepath,caption"]
    for i in range(7):
        (src / "images" / f"im{i}.png").write_bytes(png_bytes((10 * i, 0, 0)))
        lines.append(f"images/im{i}.png,a red square number {i}".encode())
    (src / "images" / "broken.png").write_bytes(png_bytes((1, 2, 3))[:40])
    lines.append(b"images/broken.png,truncated png")
    lines.append(b"images/absent.png,no such file")
    lines.append(b'images/im0.png,"   "')
    lines.append(b"images/im1.png,caf\xe9 latin-1")
    (src / "pairs.csv").write_bytes(b"\n".join(lines) + b"\n")
    return src / "pairs.csv"


def test_build_from_csv(csv_source, tmp_path, caplog):
    out = tmp_path / "shards"
    with caplog.at_level(logging.WARNING, logger="engine.data.build"):
        manifest, report = build_shards(csv_source, out, samples_per_shard=3)

    assert [s.path for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.num_samples for s in manifest.shards] == [3, 3, 1]
    assert Manifest.load(out / "manifest.json") == manifest
    manifest.verify(checksums=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]

    assert report["num_written"] == 7
    assert report["num_skipped"] == 4
    assert report["skipped_by_reason"] == {
        "corrupt image": 1,
        "missing image": 1,
        "empty caption": 1,
        "non-UTF-8 caption": 1,
    }
    assert [s["reason"] for s in report["skipped"]] == [
        "corrupt image",
        "missing image",
        "empty caption",
        "non-UTF-8 caption",
    ]
    assert "broken.png" in report["skipped"][0]["source"]
    logged = [r.getMessage() for r in caplog.records]
    assert any("broken.png" in m and "corrupt image" in m for m in logged)
    assert any("absent.png" in m and "missing image" in m for m in logged)

    members = [m for i in range(3) for m in read_shard(manifest.shard_path(i))]
    assert [name for name, _ in members] == [f"{k:09d}.{ext}" for k in range(7) for ext in ("json", "png", "txt")]
    captions = [data.decode() for name, data in members if name.endswith(".txt")]
    assert captions == [f"a red square number {i}" for i in range(7)]
    # Each sample keeps its original file name (keys are numbers: no dots).
    sources = [json.loads(data)["source"] for name, data in members if name.endswith(".json")]
    assert len(sources) == 7 and sources[1] == "images/im1.png"
    # PNG sources are stored byte for byte.
    assert members[4][1] == (csv_source.parent / "images" / "im1.png").read_bytes()


def test_build_from_folder(tmp_path):
    src = tmp_path / "folder"
    (src / "nested").mkdir(parents=True)
    (src / "cat.jpg").write_bytes(image_bytes((200, 10, 10), "JPEG"))
    (src / "cat.txt").write_text("a cat")
    (src / "dog.webp").write_bytes(image_bytes((10, 200, 10), "WEBP"))
    (src / "dog.txt").write_text("a dog\n")
    (src / "nested" / "fox.png").write_bytes(png_bytes((10, 10, 200)))
    (src / "nested" / "fox.txt").write_text("a fox")
    (src / "nocaption.png").write_bytes(png_bytes((5, 5, 5)))
    (src / "orphan.txt").write_text("a caption without an image")
    (src / "garbage.png").write_bytes(b"\x89PNG not really")
    (src / "garbage.txt").write_text("garbage")
    (src / "blank.png").write_bytes(png_bytes((7, 7, 7)))
    (src / "blank.txt").write_text("\n  \n")

    manifest, report = build_shards(src, tmp_path / "out", samples_per_shard=100)
    assert manifest.num_samples == 3
    assert report["skipped_by_reason"] == {
        "missing image": 1,
        "missing caption": 1,
        "corrupt image": 1,
        "empty caption": 1,
    }
    members = dict(read_shard(manifest.shard_path(0)))
    assert sorted(members) == sorted(
        [
            "000000000.jpg",
            "000000000.txt",
            "000000000.json",
            "000000001.webp",
            "000000001.txt",
            "000000001.json",
            "000000002.png",
            "000000002.txt",
            "000000002.json",
        ]
    )
    assert json.loads(members["000000002.json"]) == {"source": "nested/fox.png"}
    assert members["000000000.txt"] == b"a cat"
    assert members["000000001.txt"] == b"a dog"
    assert members["000000002.txt"] == b"a fox"


DOTTED_STEMS = [
    "clipart_flying_wasp_gerald_g._01",
    "clipart_flying_wasp_gerald_g._02",
    "a.b.c",
    "a.b",
    "v1.0",
]


@pytest.mark.parametrize("source", ["folder", "csv"])
def test_dotted_file_names_stay_pairs_under_webdataset_rule(tmp_path, source, tokenizer, transform):
    # Read by webdataset's own grouping (key = name up to the first dot), every written pair is one sample
    # with its image and caption, and the loader uses them all.
    src = tmp_path / "src"
    src.mkdir()
    rows = [b"filepath,caption"]
    for i, stem in enumerate(DOTTED_STEMS):
        (src / f"{stem}.png").write_bytes(png_bytes((40 * i, 0, 0)))
        if source == "folder":
            (src / f"{stem}.txt").write_text(f"caption of {stem}")
        rows.append(f"{stem}.png,caption of {stem}".encode())
    (src / "pairs.csv").write_bytes(b"\n".join(rows) + b"\n")
    manifest, report = build_shards(
        src if source == "folder" else src / "pairs.csv", tmp_path / "out", samples_per_shard=2
    )
    assert report["num_skipped"] == 0 and manifest.num_samples == len(DOTTED_STEMS)
    urls = [str(manifest.shard_path(i)) for i in range(manifest.num_shards)]
    samples = list(group_by_keys(tar_file_expander(url_opener([{"url": url} for url in urls]))))
    assert [sorted(k for k in sample if not k.startswith("__")) for sample in samples] == [["json", "png", "txt"]] * 5
    # The original (dotted) names are kept in each sample's .json.
    assert sorted(json.loads(sample["json"])["source"] for sample in samples) == sorted(f"{s}.png" for s in DOTTED_STEMS)
    keys = [sample["__key__"] for sample in samples]
    assert len(set(keys)) == len(keys) and not any("." in key for key in keys)
    assert sorted(sample["txt"].decode() for sample in samples) == sorted(
        f"caption of {s}" for s in DOTTED_STEMS
    )
    loader = ShardLoader(manifest, batch_size=1, image_transform=transform, tokenizer=tokenizer)
    assert sorted(key for batch in loader.epoch(0) for key in batch.keys) == sorted(keys)
    assert not loader.skipped


def test_image_ext_reencodes(tmp_path):
    src = tmp_path / "folder"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes((100, 50, 25)))
    (src / "a.txt").write_text("a square")
    manifest, _ = build_shards(src, tmp_path / "out", image_ext="jpg")
    members = dict(read_shard(manifest.shard_path(0)))
    image = Image.open(io.BytesIO(members["000000000.jpg"]))
    assert image.format == "JPEG"
    assert abs(image.convert("RGB").getpixel((4, 4))[0] - 100) <= 3


def test_rebuild_is_byte_identical_and_refuses_nonempty_out(csv_source, tmp_path):
    first, _ = build_shards(csv_source, tmp_path / "one", samples_per_shard=4)
    second, _ = build_shards(csv_source, tmp_path / "two", samples_per_shard=4)
    assert first.fingerprint() == second.fingerprint()
    with pytest.raises(ValueError, match="already holds shards"):
        build_shards(csv_source, tmp_path / "one")


def test_bad_arguments(csv_source, tmp_path):
    with pytest.raises(ValueError, match="samples_per_shard"):
        build_shards(csv_source, tmp_path / "o1", samples_per_shard=0)
    with pytest.raises(ValueError, match="image_ext"):
        build_shards(csv_source, tmp_path / "o2", image_ext="gif")
    with pytest.raises(ValueError, match="does not exist"):
        build_shards(tmp_path / "nothing.csv", tmp_path / "o3")
    bad_header = tmp_path / "bad.csv"
    bad_header.write_text("path,text\na.png,hello\n")
    with pytest.raises(ValueError, match="no column 'filepath' or 'caption'.*'path', 'text'"):
        build_shards(bad_header, tmp_path / "o4")


def test_tsv_with_other_column_names_through_the_cli(csv_source, tmp_path, capsys):
    """open_clip_train's --csv-separator / --csv-img-key / --csv-caption-key: a TSV gives the CSV's shards."""
    from engine.cli import main

    rows = [line.split(b",", 1) for line in csv_source.read_bytes().split(b"\n")[1:] if line]
    tsv = csv_source.with_name("pairs.tsv")
    tsv.write_bytes(b"title\tid\timage\n" + b"".join(caption.replace(b'"', b"") + b"\t7\t" + path + b"\n"
                                                     for path, caption in rows))
    reference, _ = build_shards(csv_source, tmp_path / "csv", samples_per_shard=4)
    for separator in ("\\t", "tab"):
        out = tmp_path / f"tsv-{separator}"
        assert main(["shards", "build", str(tsv), str(out), "--samples-per-shard", "4", "--csv-separator", separator,
                     "--csv-img-key", "image", "--csv-caption-key", "title"]) == 0
        built = Manifest.load(out / "manifest.json")
        assert [s.num_samples for s in built.shards] == [s.num_samples for s in reference.shards]
        assert [read_shard(out / s.path) for s in built.shards] == [
            read_shard(tmp_path / "csv" / s.path) for s in reference.shards]
    capsys.readouterr()

    # Without the flags: one error line naming the missing columns and the columns found.
    assert main(["shards", "build", str(tsv), str(tmp_path / "plain"), "--csv-separator", "tab"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "'filepath' or 'caption'" in err[0] and "'title', 'id', 'image'" in err[0] and "--csv-img-key" in err[0]
    assert main(["shards", "build", str(tsv), str(tmp_path / "plain"), "--csv-img-key", "image"]) == 2
    err = capsys.readouterr().err
    assert "no column 'image' or 'caption'" in err and "'title\\tid\\timage'" in err  # separator named too
    assert main(["shards", "build", str(tsv), str(tmp_path / "plain"), "--csv-separator", "::"]) == 2
    assert "--csv-separator '::' must be one character" in capsys.readouterr().err
