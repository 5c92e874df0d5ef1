"""The u table: per-sample SogCLR normalisers (log u_x, log u_z) in a memory-mapped file.

One row per training sample, addressed by the manifest's global row index (cumulative count of
earlier shards + raw position in the shard), so a row is found without loading the table and
RAM does not grow with the dataset. Each shard owns a contiguous region of rows, so any rank
and any world size can read and write the rows of its own samples.

Layout of a table directory:
  u_table.bin   num_rows x (log_u_x float32, log_u_z float32, visits uint32), little endian;
                created sparse, so all-zero rows (visits == 0) mean "never seen".
  u_table.json  header: num_rows, dataset fingerprint, and the statistics' provenance (loss,
                margin, tau, eps) so they are never reused for another dataset or loss.

Dirty pages: `write` marks the pages (PAGE_ROWS rows each) it touched in a bitmap of
num_rows / PAGE_ROWS bytes (1 MB for 1 B rows), so a checkpoint can hold only
what changed since the previous one: a delta (`read_pages` / `write_delta` / `apply_delta`).

A delta folder holds u_table.json (the header at that save), u_delta.bin (int64 page ids, then
those pages' bytes in id order; the last page of the table may be short) and u_delta.json
(page_rows, num_pages, nbytes, sha256 of u_delta.bin, and what the normaliser records about the
chain: its own save id and its parent's).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engine.io import write_json_atomic

ROW_DTYPE = np.dtype([("log_u_x", "<f4"), ("log_u_z", "<f4"), ("visits", "<u4")])
DATA_FILE = "u_table.bin"
HEADER_FILE = "u_table.json"
FORMAT_VERSION = 1
DELTA_FILE = "u_delta.bin"
DELTA_HEADER = "u_delta.json"
# 1024 rows = 12 KiB = 3 OS pages, aligned on disk. Rows written between two saves are whole shards'
# regions (the loader streams shards of ~10k samples), so a delta holds about the rows written plus one
# page at each region's ends (~1.1x for 10k-row shards); the bitmap is 1 byte a page (1 MB for 1 B rows).
PAGE_ROWS = 1024


def _data_regions(fd: int, size: int, *, block: int):
    """(offset, length) of `fd`'s data (not hole) regions, in pieces of at most `block` bytes."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        while start < end:
            length = min(block, end - start)
            yield start, length
            start += length
        pos = end


def _write_regions(dst: Path, size: int, pieces) -> None:
    """A file of `size` bytes holding `pieces` ((offset, bytes)) and holes elsewhere; fsync'ed."""
    with open(dst, "wb") as fout:
        fout.truncate(size)
        for offset, chunk in pieces:
            os.pwrite(fout.fileno(), chunk, offset)
        fout.flush()
        os.fsync(fout.fileno())


FICLONE = 0x40049409  # Linux ioctl: make `dst` share `src`'s extents, copy on write (XFS with reflink, btrfs, ...)


def try_clone(src: Path, dst: Path) -> bool:
    """Make `dst` a copy-on-write clone of `src` (reflink) and fsync it; False (and no `dst`) where the
    filesystem cannot (ext4, tmpfs, another filesystem than `src`'s, not Linux)."""
    try:
        import fcntl

        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            os.fsync(fout.fileno())
        return True
    except (OSError, ImportError):
        Path(dst).unlink(missing_ok=True)
        return False


def sparse_copy(src: Path, dst: Path, *, block: int = 1 << 24) -> None:
    """Copy `src` to `dst` reading only its data regions (SEEK_DATA/SEEK_HOLE), then fsync."""
    size = os.path.getsize(src)
    with open(src, "rb") as fin:
        fd = fin.fileno()
        _write_regions(dst, size, ((offset, os.pread(fd, length, offset))
                                   for offset, length in _data_regions(fd, size, block=block)))


class TableSnapshot:
    """A table's header and data regions read into memory at one instant, to be written later (`write_to`)."""

    def __init__(self, header: dict, size: int, pieces: list[tuple[int, bytes]]):
        self.header, self.size, self.pieces = header, size, pieces

    @property
    def nbytes(self) -> int:
        return sum(len(chunk) for _, chunk in self.pieces)

    def write_to(self, directory: str | os.PathLike) -> None:
        """The table as it was, in `directory` (holes stay holes)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _write_regions(directory / DATA_FILE, self.size, self.pieces)
        write_json_atomic(directory / HEADER_FILE, self.header)


def _page_runs(pages: np.ndarray):
    """(first, count) of runs of consecutive page ids in sorted `pages`."""
    if pages.size == 0:
        return
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    for run in np.split(pages, breaks):
        yield int(run[0]), int(run.size)


class TableDelta:
    """Pages of a table read into memory at one instant: their ids and bytes (what a delta checkpoint holds)."""

    def __init__(self, header: dict, pages: np.ndarray, chunks: list[bytes], *, page_rows: int = PAGE_ROWS):
        self.header, self.pages, self.chunks, self.page_rows = header, pages, chunks, page_rows

    @property
    def nbytes(self) -> int:
        return self.pages.nbytes + sum(len(chunk) for chunk in self.chunks)

    def write_to(self, directory: str | os.PathLike, chain: dict) -> None:
        """u_delta.bin, u_delta.json (with `chain`: the normaliser's save ids) and the header, fsync'ed."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        ids = self.pages.astype("<i8").tobytes()
        with open(directory / DELTA_FILE, "wb") as fout:
            for chunk in (ids, *self.chunks):
                fout.write(chunk)
                digest.update(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        write_json_atomic(directory / DELTA_HEADER, {
            "format_version": FORMAT_VERSION, "page_rows": self.page_rows, "num_pages": int(self.pages.size),
            "nbytes": self.nbytes, "sha256": digest.hexdigest(), **chain})
        write_json_atomic(directory / HEADER_FILE, self.header)


def read_delta_header(directory: str | os.PathLike) -> dict | None:
    """A delta folder's u_delta.json (None: `directory` holds no delta, e.g. a full table)."""
    path = Path(directory) / DELTA_HEADER
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or any(key not in meta for key in ("page_rows", "num_pages", "nbytes", "sha256")):
        raise ValueError(f"{path} is not a u table delta header this engine wrote; use another checkpoint")
    return meta


class UTable:
    """Memory-mapped (log u_x, log u_z, visits) rows; see the module docstring for the layout."""

    def __init__(self, directory: Path, header: dict, *, readonly: bool = False):
        self.directory = Path(directory)
        self.header = header
        self.num_rows = int(header["num_rows"])
        mode = "r" if readonly else "r+"
        self._rows = np.memmap(self.directory / DATA_FILE, dtype=ROW_DTYPE, mode=mode, shape=(self.num_rows,))
        self.num_pages = -(-self.num_rows // PAGE_ROWS)
        self.dirty = np.zeros(self.num_pages, dtype=bool)  # pages written since `clear_dirty`

    @classmethod
    def create(cls, directory: str | os.PathLike, *, num_rows: int, dataset_fingerprint: str,
               provenance: dict | None = None) -> UTable:
        """Create an all-unseen table of `num_rows` rows (a sparse file: no data written)."""
        if num_rows <= 0:
            raise ValueError(f"u table needs at least one row, got num_rows={num_rows}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / DATA_FILE, "wb") as fh:
            fh.truncate(num_rows * ROW_DTYPE.itemsize)
        header = {
            "format_version": FORMAT_VERSION,
            "num_rows": int(num_rows),
            "dataset_fingerprint": dataset_fingerprint,
            "provenance": provenance or {},
        }
        write_json_atomic(directory / HEADER_FILE, header)
        return cls(directory, header)

    @classmethod
    def open(cls, directory: str | os.PathLike, *, dataset_fingerprint: str | None = None,
             readonly: bool = False) -> UTable:
        """Open an existing table; refuse it if it was built for another dataset."""
        directory = Path(directory)
        header_path = directory / HEADER_FILE
        if not header_path.exists() or not (directory / DATA_FILE).exists():
            raise FileNotFoundError(
                f"no u table in {directory} (expected {HEADER_FILE} and {DATA_FILE}); the folder is not a "
                "table written by this engine or was damaged"
            )
        header = json.loads(header_path.read_text())
        expected_size = int(header["num_rows"]) * ROW_DTYPE.itemsize
        actual_size = (directory / DATA_FILE).stat().st_size
        if actual_size != expected_size:
            raise ValueError(
                f"{directory / DATA_FILE} has {actual_size} bytes, header says {expected_size}: "
                "the table is truncated or from another version; delete it to start fresh"
            )
        if dataset_fingerprint is not None and header["dataset_fingerprint"] != dataset_fingerprint:
            raise ValueError(
                f"u table {directory} was built for another dataset (fingerprint "
                f"{header['dataset_fingerprint'][:12]} != {dataset_fingerprint[:12]}); "
                "use the table of this manifest or start a fresh one"
            )
        return cls(directory, header, readonly=readonly)

    @property
    def provenance(self) -> dict:
        return dict(self.header.get("provenance", {}))

    def set_provenance(self, provenance: dict, *, write: bool = True) -> None:
        """Record what computed the statistics (loss, margin, tau, eps, ...); `write` on one rank only."""
        self.header["provenance"] = dict(provenance)
        if write:
            write_json_atomic(self.directory / HEADER_FILE, self.header)

    def _indices(self, rows: Tensor) -> np.ndarray:
        idx = rows.detach().cpu().numpy().astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_rows):
            raise IndexError(f"u table row out of range [0, {self.num_rows}): {idx.min()}..{idx.max()}")
        return idx

    def read(self, rows: Tensor, *, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
        """(log_u_x, log_u_z, seen) of `rows` ([b] int64), float32 / bool tensors on `device`."""
        block = self._rows[self._indices(rows)]
        log_u_x = torch.from_numpy(np.ascontiguousarray(block["log_u_x"])).to(device)
        log_u_z = torch.from_numpy(np.ascontiguousarray(block["log_u_z"])).to(device)
        seen = torch.from_numpy(block["visits"] > 0).to(device)
        return log_u_x, log_u_z, seen

    def write(self, rows: Tensor, log_u_x: Tensor, log_u_z: Tensor) -> None:
        """Store updated rows and count one more visit for each."""
        idx = self._indices(rows)
        block = self._rows[idx]
        block["log_u_x"] = log_u_x.detach().float().cpu().numpy()
        block["log_u_z"] = log_u_z.detach().float().cpu().numpy()
        block["visits"] = block["visits"] + 1
        self._rows[idx] = block
        self.dirty[idx // PAGE_ROWS] = True

    def dirty_pages(self) -> np.ndarray:
        """Ids (sorted int64) of the pages written since `clear_dirty`."""
        return np.flatnonzero(self.dirty).astype(np.int64)

    def clear_dirty(self) -> None:
        self.dirty[:] = False

    def visits(self, rows: Tensor) -> Tensor:
        """How many updates each row has received."""
        return torch.from_numpy(self._rows[self._indices(rows)]["visits"].astype(np.int64))

    def num_seen(self, *, block_rows: int = 1 << 22) -> int:
        """Rows visited at least once (streams the file block by block)."""
        total = 0
        for start in range(0, self.num_rows, block_rows):
            total += int(np.count_nonzero(self._rows[start : start + block_rows]["visits"]))
        return total

    def reset(self) -> None:
        """Forget every estimate (all rows back to unseen)."""
        readonly = self._rows.mode == "r"
        del self._rows
        with open(self.directory / DATA_FILE, "r+b") as fh:
            fh.truncate(0)
            fh.truncate(self.num_rows * ROW_DTYPE.itemsize)
        mode = "r" if readonly else "r+"
        self._rows = np.memmap(self.directory / DATA_FILE, dtype=ROW_DTYPE, mode=mode, shape=(self.num_rows,))

    def flush(self) -> None:
        """Write dirty pages to disk."""
        self._rows.flush()

    def allocated_bytes(self) -> int:
        """Bytes the table's file occupies on disk (its written regions when sparse), after a flush."""
        self.flush()
        return os.stat(self.directory / DATA_FILE).st_blocks * 512

    def copy_to(self, directory: str | os.PathLike) -> UTable:
        """Flush and copy the table to `directory`: a copy-on-write clone where the filesystem makes one (`clone_to`),
        else a copy of its allocated regions only (holes stay holes)."""
        if not self.clone_to(directory):
            directory = Path(directory)
            sparse_copy(self.directory / DATA_FILE, directory / DATA_FILE)
            write_json_atomic(directory / HEADER_FILE, self.header)
        return UTable(Path(directory), dict(self.header))

    def clone_to(self, directory: str | os.PathLike) -> bool:
        """Flush and clone the table into `directory` (reflink: instant, no bytes read or staged in memory, disk
        shared until either side writes a page); False, with nothing written, where the filesystem cannot."""
        self.flush()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not try_clone(self.directory / DATA_FILE, directory / DATA_FILE):
            return False
        write_json_atomic(directory / HEADER_FILE, self.header)
        return True

    def snapshot(self, *, block: int = 1 << 24) -> TableSnapshot:
        """Flush and read the table's allocated regions into memory (its size at most, less when sparse)."""
        self.flush()
        path = self.directory / DATA_FILE
        size = os.path.getsize(path)
        with open(path, "rb") as fin:
            fd = fin.fileno()
            pieces = [(offset, os.pread(fd, length, offset)) for offset, length in _data_regions(fd, size, block=block)]
        return TableSnapshot(json.loads(json.dumps(self.header)), size, pieces)

    def read_pages(self, pages: np.ndarray) -> TableDelta:
        """Flush and read pages `pages` (sorted ids) into memory, one read per run of consecutive pages."""
        self.flush()
        pages = np.asarray(pages, dtype=np.int64)
        row_bytes, chunks = ROW_DTYPE.itemsize, []
        with open(self.directory / DATA_FILE, "rb") as fin:
            for first, count in _page_runs(pages):
                start = first * PAGE_ROWS
                stop = min((first + count) * PAGE_ROWS, self.num_rows)
                chunks.append(os.pread(fin.fileno(), (stop - start) * row_bytes, start * row_bytes))
        return TableDelta(json.loads(json.dumps(self.header)), pages, chunks)

    def apply_delta(self, directory: str | os.PathLike, *, block: int = 1 << 24) -> None:
        """Write the pages of delta folder `directory` into this table (checked first: size, digest, page ids).

        Streamed in pieces of at most `block` bytes (read once to check the digest, once to write), so host
        memory stays O(block + 8 B a page) whatever the delta's size."""
        directory = Path(directory)
        meta = read_delta_header(directory)
        path = directory / DELTA_FILE
        if meta["page_rows"] != PAGE_ROWS:
            raise ValueError(f"{directory / DELTA_HEADER}: page_rows {meta['page_rows']} != {PAGE_ROWS}")
        size = path.stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as fin:
            for piece in iter(lambda: fin.read(block), b""):
                digest.update(piece)
        if size != meta["nbytes"] or digest.hexdigest() != meta["sha256"]:
            raise ValueError(f"{path} does not hold the bytes written ({size} of {meta['nbytes']}, or another "
                             "digest): the delta is damaged; use an earlier checkpoint")
        num_pages = int(meta["num_pages"])
        row_bytes, pos = ROW_DTYPE.itemsize, 8 * num_pages
        if pos > size:
            raise ValueError(f"{path} is shorter than its page ids say")
        with open(path, "rb") as fin:
            pages = np.frombuffer(fin.read(pos), dtype="<i8")
        if num_pages and (pages.min() < 0 or pages.max() >= self.num_pages or np.any(np.diff(pages) <= 0)):
            raise ValueError(f"{path}: page ids are not sorted ids of this table's pages")
        runs = [(first * PAGE_ROWS, (min((first + count) * PAGE_ROWS, self.num_rows) - first * PAGE_ROWS) * row_bytes)
                for first, count in _page_runs(pages)]
        if pos + sum(length for _, length in runs) != size:
            raise ValueError(f"{path} is {'shorter' if pos + sum(n for _, n in runs) > size else 'longer'} "
                             "than its page ids say")
        self.flush()
        with open(path, "rb") as fin, open(self.directory / DATA_FILE, "r+b") as fout:
            for start, length in runs:
                for offset in range(0, length, block):
                    piece = os.pread(fin.fileno(), min(block, length - offset), pos + offset)
                    os.pwrite(fout.fileno(), piece, start * row_bytes + offset)
                pos += length
            fout.flush()
            os.fsync(fout.fileno())
        # The memmap reads the file through the page cache: it sees the new bytes.

    def close(self) -> None:
        self.flush()
        del self._rows
