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
"""

from __future__ import annotations

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


class UTable:
    """Memory-mapped (log u_x, log u_z, visits) rows; see the module docstring for the layout."""

    def __init__(self, directory: Path, header: dict, *, readonly: bool = False):
        self.directory = Path(directory)
        self.header = header
        self.num_rows = int(header["num_rows"])
        mode = "r" if readonly else "r+"
        self._rows = np.memmap(self.directory / DATA_FILE, dtype=ROW_DTYPE, mode=mode, shape=(self.num_rows,))

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

    def copy_to(self, directory: str | os.PathLike) -> UTable:
        """Flush and copy the table to `directory`, copying only allocated regions (holes stay holes)."""
        self.flush()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        sparse_copy(self.directory / DATA_FILE, directory / DATA_FILE)
        write_json_atomic(directory / HEADER_FILE, self.header)
        return UTable(directory, dict(self.header))

    def snapshot(self, *, block: int = 1 << 24) -> TableSnapshot:
        """Flush and read the table's allocated regions into memory (its size at most, less when sparse)."""
        self.flush()
        path = self.directory / DATA_FILE
        size = os.path.getsize(path)
        with open(path, "rb") as fin:
            fd = fin.fileno()
            pieces = [(offset, os.pread(fd, length, offset)) for offset, length in _data_regions(fd, size, block=block)]
        return TableSnapshot(json.loads(json.dumps(self.header)), size, pieces)

    def close(self) -> None:
        self.flush()
        del self._rows
