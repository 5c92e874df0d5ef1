"""The atomic writer: whole files appear at once, failures leave the old file and no temporaries."""

import json
import os
import stat

import pytest

from engine.io import atomic_open, atomic_path, write_atomic, write_json_atomic


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def strict_umask():
    """A umask that would make a plain new file 0600: the writer must still give 0644."""
    old = os.umask(0o077)
    yield
    os.umask(old)


def mode_of(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_write_atomic_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "file.txt"  # missing parent folders are created
    assert write_atomic(target, "first\n") == target
    assert target.read_text() == "first\n"
    write_atomic(target, b"\x00\x01binary")
    assert target.read_bytes() == b"\x00\x01binary"
    write_atomic(target, "ünïcode")
    assert target.read_bytes() == "ünïcode".encode()
    assert listing(target.parent) == ["file.txt"]


def test_readers_of_the_old_file_keep_it_whole(tmp_path):
    # The new content arrives by rename: a reader holding the old file still reads all of it.
    target = tmp_path / "f.bin"
    write_atomic(target, b"a" * 10_000)
    with open(target, "rb") as reader:
        inode = os.fstat(reader.fileno()).st_ino
        write_atomic(target, b"b" * 10)
        assert reader.read() == b"a" * 10_000
    assert target.read_bytes() == b"b" * 10
    assert target.stat().st_ino != inode


def test_content_appears_only_when_the_block_ends(tmp_path):
    target = tmp_path / "out.txt"
    write_atomic(target, "old")
    with atomic_open(target, "w") as fh:
        fh.write("new half")
        fh.flush()
        assert target.read_text() == "old"  # nothing visible at the target yet
        temporaries = [n for n in listing(tmp_path) if n != "out.txt"]
        assert len(temporaries) == 1 and temporaries[0].startswith(".out.txt.")
        fh.write(" and the rest")
    assert target.read_text() == "new half and the rest"
    assert listing(tmp_path) == ["out.txt"]

    with atomic_path(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"123")
        assert not (tmp_path / "new.bin").exists()
        assert tmp.parent == tmp_path  # beside the target: the rename stays on one filesystem
    assert (tmp_path / "new.bin").read_bytes() == b"123"
    assert listing(tmp_path) == ["new.bin", "out.txt"]


def test_exception_inside_atomic_path_keeps_old_file_and_removes_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    write_atomic(target, b"old content")
    with pytest.raises(RuntimeError, match="writer crashed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"new partial content")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old content"
    assert listing(tmp_path) == ["model.safetensors"]

    # The same for a target that does not exist yet, and for KeyboardInterrupt (BaseException).
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "fresh.bin") as tmp:
        tmp.write_bytes(b"x")
        raise KeyboardInterrupt
    assert listing(tmp_path) == ["model.safetensors"]

    with pytest.raises(ValueError, match="fails"), atomic_open(target, "wb") as fh:
        fh.write(b"torn")
        raise ValueError("fails")
    assert target.read_bytes() == b"old content"
    assert listing(tmp_path) == ["model.safetensors"]


def test_write_json_atomic_sorted_and_refuses_nan_without_damage(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"b": [1, 2], "a": {"z": 1.5, "y": None}})
    text = target.read_text()
    assert text.endswith("\n")
    assert json.loads(text) == {"a": {"y": None, "z": 1.5}, "b": [1, 2]}
    assert text.index('"a"') < text.index('"b"')  # sort_keys by default
    write_json_atomic(target, {"k": 1}, indent=None)
    assert target.read_text() == '{"k": 1}\n'
    with pytest.raises(ValueError):
        write_json_atomic(target, {"loss": float("nan")})
    assert target.read_text() == '{"k": 1}\n'
    assert listing(tmp_path) == ["state.json"]


def test_files_are_created_0644_whatever_the_umask(tmp_path, strict_umask):
    write_atomic(tmp_path / "a.txt", "x")
    write_json_atomic(tmp_path / "b.json", {"x": 1})
    with atomic_path(tmp_path / "c.bin") as tmp:
        tmp.write_bytes(b"c")
    with atomic_open(tmp_path / "d.txt") as fh:
        fh.write("d")
    for name in ("a.txt", "b.json", "c.bin", "d.txt"):
        assert mode_of(tmp_path / name) == 0o644, name
    # Replacing a file with other permissions gives 0644 too.
    os.chmod(tmp_path / "a.txt", 0o600)
    write_atomic(tmp_path / "a.txt", "y")
    assert mode_of(tmp_path / "a.txt") == 0o644
    # An explicit mode is honoured.
    with atomic_path(tmp_path / "e.sh", mode=0o755) as tmp:
        tmp.write_text("#!/bin/sh\n")
    assert mode_of(tmp_path / "e.sh") == 0o755


def test_atomic_open_refuses_partial_modes(tmp_path):
    for mode in ("a", "r+", "ab", "x"):
        with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"), atomic_open(tmp_path / "f", mode):
            pass
    assert listing(tmp_path) == []
