"""Paths read from data files stay inside their folder: `shards build` reads no file outside its source (no `../`,
absolute or symlinked way out), `shards index` writes nothing outside a wids index's folder, a manifest names only
shards inside its own."""

import json
import re
from pathlib import Path

import pytest

from engine.cli import main
from engine.data.manifest import REINDEX_HINT, Manifest, ShardEntry
from tests.conftest import write_tar
from tests.helpers.images import png_bytes

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- secret-7d41c9"


def error_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error: ")]


def all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the source holding a secret key and a PNG that carries the secret after its image data."""
    folder = tmp_path / "home"
    folder.mkdir()
    (folder / "id_rsa").write_bytes(SECRET)
    (folder / "photo.png").write_bytes(png_bytes((9, 9, 9)) + SECRET)  # decodes fine: PIL ignores the tail
    return folder


def test_build_from_a_folder_skips_symlinks_that_leave_it(tmp_path, outside, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "cat.png").write_bytes(png_bytes((200, 0, 0)))
    (src / "cat.txt").symlink_to(outside / "id_rsa")  # caption -> ~/.ssh/id_rsa
    (src / "dog.png").symlink_to(outside / "photo.png")  # image from elsewhere
    (src / "dog.txt").write_text("a dog")
    (src / "fox.png").write_bytes(png_bytes((0, 0, 200)))
    (src / "fox.txt").write_text("a fox")
    (src / "alias.png").symlink_to(src / "fox.png")  # a link that stays inside is fine
    (src / "alias.txt").write_text("the fox again")
    out = tmp_path / "shards"

    assert main(["shards", "build", str(src), str(out)]) == 0
    stdout = capsys.readouterr().out
    assert 'skipped 2: {"outside source": 2}' in stdout
    assert SECRET not in all_bytes(out)
    captions = sorted(m for m in re.findall(rb"the fox again|a fox|a dog|a cat", all_bytes(out)))
    assert captions == [b"a fox", b"the fox again"]


def test_build_from_a_csv_skips_paths_outside_its_folder(tmp_path, outside, capsys):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "images" / "ok.png").write_bytes(png_bytes((0, 200, 0)))
    (src / "images" / "link.png").symlink_to(outside / "photo.png")
    rows = ["images/ok.png,kept", "../home/photo.png,dotdot", f"{outside / 'photo.png'},absolute",
            "images/link.png,symlink", "images/../../home/photo.png,sneaky"]
    (src / "pairs.csv").write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    out = tmp_path / "shards"

    assert main(["shards", "build", str(src / "pairs.csv"), str(out)]) == 0
    assert 'skipped 4: {"outside source": 4}' in capsys.readouterr().out
    assert SECRET not in all_bytes(out)
    assert b"kept" in all_bytes(out) and b"dotdot" not in all_bytes(out)


def test_build_with_nothing_inside_is_one_error_line(tmp_path, outside, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "pairs.csv").write_text(f"filepath,caption\n{outside / 'photo.png'},absolute\n")
    out = tmp_path / "shards"
    assert main(["shards", "build", str(src / "pairs.csv"), str(out)]) == 2
    assert error_lines(capsys) == [f"error: no usable samples in {src / 'pairs.csv'}: skipped {{'outside source': 1}}"]
    assert not list(out.glob("shard-*")) and not (out / "manifest.json").exists()


def test_build_skips_files_over_max_member_bytes_unread(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.png").write_bytes(png_bytes((1, 1, 1)))
    (src / "small.txt").write_text("small")
    (src / "big.png").write_bytes(png_bytes((2, 2, 2)) + b"\0" * 5000)
    (src / "big.txt").write_text("an oversized picture")
    assert main(["shards", "build", str(src), str(tmp_path / "shards"), "--max-member-bytes", "4096"]) == 0
    assert 'skipped 1: {"member too large": 1}' in capsys.readouterr().out
    assert b"an oversized picture" not in all_bytes(tmp_path / "shards")
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["num_samples"] == 1


def tar_with_one_pair(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tar(path, [("000.png", png_bytes((5, 5, 5))), ("000.txt", b"a grey square")])


def files_named(root: Path, name: str) -> list[Path]:
    return sorted(root.rglob(name))


@pytest.mark.parametrize("command", ["index", "check"])
@pytest.mark.parametrize("escape", ["dotdot", "absolute", "base_path"])
def test_wids_index_pointing_outside_its_folder_is_one_error_line(tmp_path, capsys, command, escape):
    outside = tar_with_one_pair(tmp_path / "x.tar")
    data = tmp_path / "a" / "b" / "data"
    tar_with_one_pair(data / "0.tar")
    url = {"dotdot": "../../../x.tar", "absolute": str(outside), "base_path": "x.tar"}[escape]
    index = {"wids_version": 1, "shardlist": [{"url": "0.tar", "nsamples": 1}, {"url": url, "nsamples": 1}]}
    if escape == "base_path":
        index = {**index, "base_path": "../../..", "shardlist": [{"url": "x.tar", "nsamples": 1}]}
    (data / "shardindex.json").write_text(json.dumps(index))

    assert main(["shards", command, str(data / "shardindex.json")]) == 2
    [line] = error_lines(capsys)
    field = "base_path '../../..'" if escape == "base_path" else f"shardlist[1].url {url!r}"
    assert line.startswith(f"error: wids index {data / 'shardindex.json'}: {field} resolves to ")
    assert line.endswith("move shardindex.json into the folder above its shards")
    assert files_named(tmp_path, "manifest.json") == []  # nothing written, above the data folder or anywhere


def test_manifest_naming_a_shard_outside_its_folder_is_one_error_line(tmp_path, capsys):
    tar_with_one_pair(tmp_path / "x.tar")
    data = tmp_path / "data"
    tar_with_one_pair(data / "0.tar")
    entries = [ShardEntry("0.tar", 1, 1, ""), ShardEntry("../x.tar", 1, 1, "")]
    record = Manifest(root=data, shards=entries).to_json()  # fingerprint and all: only the path is wrong
    (data / "manifest.json").write_text(json.dumps(record))
    expected = (f"error: manifest {data / 'manifest.json'}: shards[1].path '../x.tar' escapes the manifest's "
                f"folder {data}; shard paths must be relative paths inside it: {REINDEX_HINT}")

    assert main(["shards", "check", str(data)]) == 2
    assert error_lines(capsys) == [expected]
    assert main(["tune", "--train", str(data), "--out", str(tmp_path / "run"), "--model", "tiny-vit",
                 "--set", "run.progress=false"]) == 2
    assert error_lines(capsys) == [expected]
    assert not (tmp_path / "run" / "u_table").exists() and not (tmp_path / "run" / "checkpoints").exists()
