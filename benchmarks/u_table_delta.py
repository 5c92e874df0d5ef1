"""u table checkpoints: a full copy each save (before: run.u_table_full_every=1) vs a delta of the pages written
since the previous save (after: a base every 8 saves).

Two tables, each written between saves as training does (the loader streams shards: `--touched` rows as regions of
`--region` consecutive rows at random places):
  sparse     `--rows` rows (default 1 B: 12 GB apparent, a sparse file; only what was written is allocated),
             so the full copy is what has been written so far, not the 12 GB a table holds after one epoch;
  allocated  `--allocated-rows` rows (default 100 M, 1.2 GB) written in full first: a table after its first epoch.
Per save: bytes written (allocated blocks of the checkpoint's files), seconds (sync save), host RAM a background
save stages (peak RSS growth while it reads what it writes), and, for the allocated table, the resume (reseeding
the live table from the newest checkpoint: base + deltas, or the full copy).

`--order uniform`: the worst case instead, `--touched` distinct rows drawn uniformly at random over the table (not
the loader's shard order), so nearly every page is dirty once a save's rows reach ~1 per 100 rows of the table; the
delta is then measured against the full copy, not against the target. `--rows 0` skips the sparse table.

Target: a delta save writes <= 1.5x (touched rows x 12 B + 1 MB) and stages <= 1.5x its delta bytes in RAM.
Run: python benchmarks/u_table_delta.py [--dir /tmp/x] [--quick] [--order uniform]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Column, Table, peak_window
from engine.checkpoint import CheckpointManager
from engine.distributed import DistContext
from engine.objectives.normaliser import TableNormaliser
from engine.objectives.table import DATA_FILE, ROW_DTYPE

GB = 1e9


def allocated_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def touch(norm: TableNormaliser, rng: np.random.Generator, *, touched: int, region: int, order: str,
          block: int = 1 << 20) -> int:
    """Write `touched` rows as regions of `region` consecutive rows at random places (shards), or (`uniform`) as
    distinct rows drawn uniformly at random; returns the rows written."""
    if order == "uniform":
        rows = np.unique(rng.integers(0, norm.num_rows, size=touched))  # ~touched^2 / 2 num_rows repeats dropped
        for start in range(0, rows.size, block):
            part = torch.from_numpy(rows[start : start + block])
            values = torch.from_numpy(rng.standard_normal(part.numel()).astype(np.float32))
            norm.table.write(part, values, -values)
        written = int(rows.size)
    else:
        starts = rng.integers(0, norm.num_rows - region, size=max(1, touched // region))
        for start in starts:
            rows = torch.arange(int(start), int(start) + region)
            values = torch.from_numpy(rng.standard_normal(region).astype(np.float32))
            norm.table.write(rows, values, -values)
        written = int(starts.size) * region
    norm.table.flush()
    with open(norm.live_dir / DATA_FILE, "rb") as fh:  # written back before either save is timed
        os.fsync(fh.fileno())
    return written


def fill(path: Path, num_rows: int, *, block_rows: int = 1 << 22) -> None:
    """Every row written once (visits 1): the table after an epoch."""
    block = np.zeros(block_rows, dtype=ROW_DTYPE)
    block["log_u_x"], block["visits"] = -1.0, 1
    with open(path, "r+b") as fh:
        fh.writelines(block[: min(block_rows, num_rows - start)].tobytes()
                      for start in range(0, num_rows, block_rows))


def scenario(name: str, root: Path, *, num_rows: int, touched: int, region: int, saves: int, filled: bool,
             table: Table, results: list, order: str = "shards") -> None:
    rng = np.random.default_rng(0)
    norm = TableNormaliser(root / "live", num_rows=num_rows, dataset_fingerprint="bench", ctx=DistContext(),
                           gamma_min=0.5, gamma_decay_epochs=1, fresh=True, full_every=8)
    if filled:
        norm.table.close()
        fill(root / "live" / DATA_FILE, num_rows)
        norm.table = type(norm.table).open(root / "live")
    manager = CheckpointManager(root / "ckpt", DistContext(), parts={"normaliser": norm}, keep_last_n=2)
    chain_deltas = 0
    for step in range(1, saves + 1):
        written = touch(norm, rng, touched=touched, region=region, order=order)
        # Before: the whole table's allocated regions, copied (sync) or read into RAM (background).
        start = time.perf_counter()
        norm.table.copy_to(root / "full").close()
        full_s = time.perf_counter() - start
        full_bytes = allocated_bytes(root / "full")
        shutil.rmtree(root / "full")
        with peak_window() as window:
            snapshot = norm.table.snapshot()
        full_ram = window.growth_bytes
        del snapshot
        # After: what the save stages in RAM (the pages written since the last save), then the save itself.
        pages = norm.table.dirty_pages()
        if step > 1:
            with peak_window() as window:
                delta = norm.table.read_pages(pages)
            delta_ram, staged = window.growth_bytes, delta.nbytes
            del delta
        start = time.perf_counter()
        folder = manager.save(step)
        delta_s = time.perf_counter() - start
        delta_bytes = allocated_bytes(folder / "normaliser")
        kind = "delta" if (folder / "normaliser" / "u_delta.bin").exists() else "base"
        if kind == "base":
            delta_ram, staged = full_ram, full_ram
        print(table.row(name, step, kind, full_bytes / GB, full_s, full_ram / GB, delta_bytes / GB, delta_s,
                        delta_ram / GB), flush=True)
        chain_deltas = chain_deltas + 1 if kind == "delta" else 0  # deltas the newest checkpoint's resume applies
        if kind == "delta":
            results.append((f"{name} save {step}", written * ROW_DTYPE.itemsize, delta_bytes, delta_ram, staged,
                            full_bytes))
    if filled:  # resume: reseed a live table from the newest checkpoint (base + deltas) vs from a full copy
        norm.table.copy_to(root / "fullckpt").close()
        other = TableNormaliser(root / "live2", num_rows=num_rows, dataset_fingerprint="bench", ctx=DistContext(),
                                gamma_min=0.5, gamma_decay_epochs=1, fresh=True)
        start = time.perf_counter()
        other.load(folder / "normaliser")
        chain_s = time.perf_counter() - start
        same = (root / "live2" / DATA_FILE).read_bytes() == (root / "live" / DATA_FILE).read_bytes()
        start = time.perf_counter()
        other.load(root / "fullckpt")
        full_load_s = time.perf_counter() - start
        other.close()
        print(f"{name}: resume from base + {chain_deltas} deltas {chain_s:.2f} s (table equal: {same}), "
              f"from a full copy {full_load_s:.2f} s")
        if not same:
            results.append((name, 0, 1, 0, 0, 1))  # a failure
    norm.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=float, default=1e9, help="0: skip the sparse table")
    parser.add_argument("--allocated-rows", type=float, default=1e8, help="0: skip the allocated table")
    parser.add_argument("--touched", type=float, default=1e7)
    parser.add_argument("--region", type=int, default=10_000)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--order", choices=("shards", "uniform"), default="shards",
                        help="rows written as shards' regions (training) or uniformly at random (the worst case)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--quick", action="store_true", help="1e7 sparse rows, 1e6 allocated, 1e5 touched")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.allocated_rows, args.touched = 1e7, 1e6, 1e5
    root = Path(tempfile.mkdtemp(prefix="u_table_delta_", dir=args.dir))
    table = Table(Column("table", 9, align="<"), Column("save", 4), Column("kind", 5),
                  Column("full GB", 8, ".3f"), Column("full s", 7, ".2f"), Column("full RAM GB", 11, ".3f"),
                  Column("ours GB", 8, ".3f"), Column("ours s", 7, ".2f"), Column("ours RAM GB", 11, ".3f"))
    print(table.header())
    print(table.rule())
    results: list = []
    try:
        if args.rows:
            scenario("sparse", root / "sparse", num_rows=int(args.rows), touched=int(args.touched),
                     region=args.region, saves=args.saves, filled=False, table=table, results=results,
                     order=args.order)
        if args.allocated_rows:
            scenario("allocated", root / "allocated", num_rows=int(args.allocated_rows), touched=int(args.touched),
                     region=args.region, saves=args.saves, filled=True, table=table, results=results,
                     order=args.order)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ok = True
    for name, touched_bytes, written, ram, staged, full_bytes in results:
        bytes_ratio = written / (touched_bytes + 1e6) if touched_bytes else float("inf")
        ram_ratio = max(ram, staged) / written  # the staged bytes exactly, or RSS growth when larger
        print(f"{name}: delta bytes / (touched x 12 B + 1 MB) = {bytes_ratio:.2f}, background-save RAM / delta = "
              f"{ram_ratio:.2f}, delta bytes / full copy = {written / full_bytes:.3f}")
        if args.order == "uniform":  # the worst case: no target, the delta against the full copy
            ok &= touched_bytes > 0
        else:
            ok &= bytes_ratio <= 1.5 and ram_ratio <= 1.5
    if args.order == "uniform":
        print(f"worst case (rows uniformly at random) measured; every resume read the table back equal: {ok}")
    else:
        print(f"delta saves within target (<= 1.5x): {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
