"""Disk held by a run's checkpoints with the u table saved as base + deltas: folders kept only for the chain kept whole
(before) vs trimmed to the u table's files (after), run.keep_last_n=2 and run.u_table_full_every=8.

Each save writes a stand-in for the backend's files (`--backend-mb`: model + optimizer state, e.g. ViT-H/14 with
Adam ~16 GB at 1/1000 scale) and a real u table of `--rows` rows (12 B each; 1e6: DataComp-1B's 12 GB at the same
scale), every row written once before the first save (an epoch done), `--touched` rows, in regions of 1000
consecutive rows, written since the previous save. Two runs write the same rows side by side; before
purges as the engine did (`chain_parts=[]`: a required folder stays whole). After every save: the allocated bytes
under checkpoints/; at the end the newest checkpoint of each is read back and compared with the live table.

Target: the most disk the checkpoints hold drops to <= 0.5x before (keep_last_n=2, full_every=8: up to 6 chain
folders more, each a whole folder before).
Run: python benchmarks/checkpoint_trim.py [--saves 24] [--backend-mb 16] [--rows 1e6] [--touched 1e4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Column, Table
from engine.checkpoint import CheckpointManager, latest_checkpoint
from engine.checkpoint_chain import purge
from engine.distributed import DistContext
from engine.objectives.normaliser import TableNormaliser
from engine.objectives.table import DATA_FILE

MB = 1e6


class Backend:
    """The backend's files: `size` bytes of model and optimizer state per checkpoint."""

    def __init__(self, size: int):
        self.size = size

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "optim.pt").write_bytes(os.urandom(self.size))

    def load(self, directory: Path, *, reshard: bool = False) -> None:
        pass


class WholeChainManager(CheckpointManager):
    """The purge as it was: a folder a kept checkpoint requires stays whole."""

    def _purge(self) -> None:
        purge(self.root, keep_last_n=self.keep_last_n, chain_parts=[])


def allocated_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=24)
    parser.add_argument("--backend-mb", type=float, default=16)
    parser.add_argument("--rows", type=float, default=1e6)
    parser.add_argument("--touched", type=float, default=1e4)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="checkpoint_trim_", dir=args.dir))
    table = Table(Column("save", 4), Column("kind", 5), Column("folders before", 14), Column("MB before", 10, ".1f"),
                  Column("folders after", 13), Column("MB after", 9, ".1f"))
    print(table.header())
    print(table.rule())
    try:
        backend = Backend(int(args.backend_mb * MB))
        norms, runs = {}, {}
        for name, cls in (("before", WholeChainManager), ("after", CheckpointManager)):
            norms[name] = TableNormaliser(root / f"live_{name}", num_rows=int(args.rows), dataset_fingerprint="bench",
                                          ctx=DistContext(), gamma_min=0.5, gamma_decay_epochs=1, fresh=True,
                                          full_every=8)
            runs[name] = cls(root / name, DistContext(), parts={"backend": backend, "normaliser": norms[name]},
                             keep_last_n=2)
        rng, peak = np.random.default_rng(0), {"before": 0, "after": 0}
        for start in range(0, int(args.rows), 100_000):  # every row written once: the table after its first epoch
            rows = torch.arange(start, min(start + 100_000, int(args.rows)))
            for norm in norms.values():
                norm.table.write(rows, torch.zeros(len(rows)), torch.zeros(len(rows)))
        for step in range(1, args.saves + 1):
            for start in rng.integers(0, int(args.rows) - 1000, size=max(1, int(args.touched) // 1000)):
                rows = torch.arange(int(start), int(start) + 1000)
                values = torch.from_numpy(rng.standard_normal(1000).astype(np.float32))
                for norm in norms.values():  # the same rows in both runs' tables
                    norm.table.write(rows, values, -values)
            cells = []
            for name, manager in runs.items():
                folder = manager.save(step)
                disk = allocated_bytes(manager.root)
                peak[name] = max(peak[name], disk)
                cells += [len(list(manager.root.glob("step_*"))), disk / MB]
            kind = "delta" if (folder / "normaliser" / "u_delta.bin").exists() else "base"
            print(table.row(step, kind, *cells), flush=True)
        same = {}
        for name, manager in runs.items():
            norms[name].table.flush()
            live = (root / f"live_{name}" / DATA_FILE).read_bytes()
            reader = TableNormaliser(root / f"read_{name}", num_rows=int(args.rows), dataset_fingerprint="bench",
                                     ctx=DistContext(), gamma_min=0.5, gamma_decay_epochs=1, fresh=True)
            reader.load(latest_checkpoint(manager.root) / "normaliser")
            same[name] = (root / f"read_{name}" / DATA_FILE).read_bytes() == live
            reader.close()
            norms[name].close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = peak["after"] / peak["before"]
    print(f"newest checkpoint reads back the live table: before {same['before']}, after {same['after']}")
    print(f"most disk held: before {peak['before'] / MB:.1f} MB, after {peak['after'] / MB:.1f} MB: "
          f"{ratio:.2f}x (target <= 0.5x)")
    return 0 if ratio <= 0.5 and all(same.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
