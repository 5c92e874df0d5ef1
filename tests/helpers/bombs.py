"""Hostile inputs built from scratch: tar members whose headers claim more than the file holds, and the peak
memory of a command that reads them."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

BLOCK = 512


def _octal(value: int, width: int) -> bytes:
    """A tar numeric field: zero-padded octal, NUL-terminated."""
    return f"{value:0{width - 1}o}".encode() + b"\0"


def gnu_sparse_member(name: str, *, claimed: int, data: bytes) -> bytes:
    """One GNU sparse member (header type 'S', hand-built: tarfile cannot write one) of `claimed` bytes whose
    only stored region is `data`, at its very end; the rest is a hole. Header + padded data."""
    header = bytearray(BLOCK)
    header[0:len(name)] = name.encode()
    header[100:108] = _octal(0o644, 8)
    header[108:116] = _octal(0, 8)
    header[116:124] = _octal(0, 8)
    header[124:136] = _octal(len(data), 12)  # bytes stored in the archive
    header[136:148] = _octal(0, 12)
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[257:265] = tarfile.GNU_MAGIC
    header[386:398] = _octal(claimed - len(data), 12)  # sparse[0].offset
    header[398:410] = _octal(len(data), 12)  # sparse[0].numbytes
    header[482] = 0  # no extended sparse headers
    header[483:495] = _octal(claimed, 12)  # realsize
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    assert len(header) == BLOCK
    padding = -len(data) % BLOCK
    return bytes(header) + data + b"\0" * padding


def regular_member(name: str, data: bytes) -> bytes:
    """One plain member as tarfile writes it (GNU format)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % BLOCK)


def write_raw_tar(path: Path, members: list[bytes]) -> Path:
    """A tar of already-encoded members, closed by its two zero blocks."""
    path.write_bytes(b"".join(members) + b"\0" * (2 * BLOCK))
    return path


def png_claiming(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header says `width` x `height` RGB pixels (decoding it would need all of them)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# Runs argv[1:] as a child and prints its peak RSS (KiB), its exit status and its stderr as one JSON line.
_MEASURE = """
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "rc": done.returncode,
                  "stdout": done.stdout, "stderr": done.stderr}))
"""


def peak_rss(argv: list[str], *, cwd: Path, timeout: float = 300) -> dict:
    """Run `argv` in a fresh process; {"peak_kib", "rc", "stdout", "stderr"} of it (its children included)."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout)
