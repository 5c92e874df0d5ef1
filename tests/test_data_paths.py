"""Paths read from data files stay inside their folder: `shards build` reads no file outside its source (no `../`,
absolute or symlinked way out), `shards index` writes nothing outside a wids index's folder, a manifest names only
shards inside its own."""

import json
import re
from pathlib import Path

import pytest

from engine.cli import main
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
