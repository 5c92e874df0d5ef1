"""File safety: the one atomic writer every file the engine writes goes through.

A file is written to a hidden temporary name in its own folder, flushed and fsynced, then renamed
over the target, and the folder is fsynced so the rename survives a crash: readers see the old
file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and creations inside folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error it replaces `path`.

    For writers that want a file name (safetensors, tar writers). On error the temporary file is
    removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp creates 0600; outputs are meant to be shared
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """`open(path, mode)` whose content appears at `path` only once the block has finished."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        encoding = "utf-8" if mode == "w" else None
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically; returns the path."""
    with atomic_open(path, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: Any, *, indent: int | None = 2,
                      sort_keys: bool = True) -> Path:
    """`payload` as JSON (no NaN: it is not JSON) at `path`, atomically."""
    return write_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n")


def first_link(root: str | os.PathLike, names: Iterable[str]) -> Path | None:
    """The first symbolic link among `root/<name>` and everything under those folders, or None.

    Links are listed, never followed. For folders the engine writes in place (appends, memory maps,
    copies into), where a link would carry the writes outside `root`.
    """
    for name in names:
        entry = Path(root) / name
        if entry.is_symlink():
            return entry
        if entry.is_dir():
            for folder, dirs, files in os.walk(entry):  # a linked folder appears in `dirs` and is not entered
                for child in (*dirs, *files):
                    if os.path.islink(os.path.join(folder, child)):
                        return Path(folder, child)
    return None
