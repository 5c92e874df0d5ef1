"""u table bases as copy-on-write clones (reflink) against copies of the allocated regions, on one filesystem.

A table of `--rows` rows written in full (a table after its first epoch) in `--dir`, which must be on a filesystem
that clones (XFS made with reflink=1, btrfs; not ext4 or tmpfs: the script says so and exits 1). Per path, side by
side on the same table: seconds of a base save (sync: `UTable.copy_to`; clone: `UTable.clone_to`, what a save takes
where the filesystem clones), disk blocks the save adds (free space before and after, from statvfs), host RAM a
background save stages (the copy reads the table into memory first; the clone stages nothing), then the same after
`--rewrite` of the live table's rows are written again (copy on write: the clone's disk grows by what changed), and
the resume (reseeding a live table from the base: copy or clone).

    python benchmarks/u_table_clone.py --dir /mnt/xfs     # 100 M rows (1.2 GB), about 4 GB free needed

Nothing here is a target: it measures what a clone saves where the filesystem makes one.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Column, Table, peak_window
from engine.objectives.table import DATA_FILE, UTable, sparse_copy, try_clone

TABLE = Table(Column("path", 6, align="<"), Column("what", 22, align="<"), Column("s", 8, ".3f"),
              Column("disk GB", 8, ".3f"), Column("RAM GB", 7, ".3f"))


def free_bytes(path: Path) -> int:
    os.sync()
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(table: UTable, rng: np.random.Generator, rows: np.ndarray, *, block: int = 1 << 22) -> None:
    import torch

    for start in range(0, rows.size, block):
        part = torch.from_numpy(rows[start:start + block])
        values = torch.from_numpy(rng.standard_normal(part.numel()).astype(np.float32))
        table.write(part, values, -values)
    table.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="a folder on a filesystem with reflink")
    parser.add_argument("--rows", type=float, default=1e8)
    parser.add_argument("--rewrite", type=float, default=1e7, help="rows written again after the save")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="u_clone_", dir=args.dir))
    try:
        probe = root / "probe"
        probe.write_bytes(b"x" * 4096)
        if not try_clone(probe, root / "probe_clone"):
            print(f"error: {args.dir} is on a filesystem that does not clone (reflink); use XFS with reflink=1 or btrfs")
            return 1
        num_rows = int(args.rows)
        rng = np.random.default_rng(0)
        table = UTable.create(root / "live", num_rows=num_rows, dataset_fingerprint="bench")
        fill(table, rng, np.arange(num_rows, dtype=np.int64))
        print(f"u table of {num_rows:,} rows ({num_rows * 12 / 1e9:.2f} GB) in {args.dir}, then {int(args.rewrite):,} "
              "rows written again (shard regions of 10 000)")
        print(TABLE.header())
        print(TABLE.rule())
        for path in ("copy", "clone"):
            before = free_bytes(root)
            start = time.perf_counter()
            if path == "copy":
                (root / path).mkdir()
                sparse_copy(table.directory / DATA_FILE, root / path / DATA_FILE)
            elif not table.clone_to(root / path):
                raise RuntimeError("clone failed")
            seconds = time.perf_counter() - start
            with peak_window() as window:
                staged = table.snapshot() if path == "copy" else None  # what a background save holds in memory
            del staged
            print(TABLE.row(path, "base save", seconds, (before - free_bytes(root)) / 1e9, window.growth_bytes / 1e9))
        before = free_bytes(root)
        regions = rng.choice(num_rows // 10_000, size=int(args.rewrite) // 10_000, replace=False)
        fill(table, rng, (regions[:, None] * 10_000 + np.arange(10_000)).ravel().astype(np.int64))
        print(TABLE.row("live", f"{int(args.rewrite) / 1e6:g} M rows rewritten", 0.0, (before - free_bytes(root)) / 1e9, 0.0))
        for path in ("copy", "clone"):
            target = root / f"resumed_{path}"
            target.mkdir()
            start = time.perf_counter()
            if path == "copy":
                sparse_copy(root / path / DATA_FILE, target / DATA_FILE)
            elif not try_clone(root / path / DATA_FILE, target / DATA_FILE):
                raise RuntimeError("clone failed")
            print(TABLE.row(path, "resume (reseed)", time.perf_counter() - start, 0.0, 0.0))
        same = filecmp.cmp(root / "copy" / DATA_FILE, root / "clone" / DATA_FILE, shallow=False)
        print(f"the clone holds the table as saved, not the rows written after it: {same}")
        table.close()
        return 0 if same else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
