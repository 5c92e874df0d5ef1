"""Is retrieval scoring bounded in memory? Peak RSS of the metrics at 2,000 / 8,000 / 50,000 caption-image pairs.

Target: the engine's retrieval metrics (`RetrievalScoring.metrics`, blockwise) grow peak RSS by less than
300 MB at 50,000 pairs (the full captions x images matrix would be 10 GB), and give the same numbers as ranking
the full matrix where that fits (2,000 and 8,000 pairs). Exit status 1 when missed.

Data: random unit features, D = 512, one caption per image, each caption its image's feature plus noise (so
recall is neither 0 nor 1). Every measurement runs in a fresh process: the features are built first, then the
peak RSS growth of the metrics call alone is measured (`harness.peak_window`). "full matrix" is the previous
path (`retrieval_metrics` on the whole similarity matrix), measured where it fits.

    python benchmarks/retrieval_memory.py           # ~1 min
    python benchmarks/retrieval_memory.py --quick   # 500 / 1,000 / 2,000 pairs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import FIXED_MMAP_THRESHOLD_ENV, Column, Table, peak_window, timed

TARGET_GROWTH_MB = 300
FULL_MATRIX_MAX_PAIRS = 8000  # 8,000^2 floats: 256 MB; the full path is not run above this
DIM = 512
MB = 1024 * 1024
TABLE = Table(Column("pairs", 7), Column("path", 12, align="<"), Column("peak growth MB", 15, ".1f"),
              Column("seconds", 8, ".2f"), Column("mean_recall@1", 14, ".4f"))


def child(path: str, pairs: int) -> None:
    """One measurement in this fresh process; prints a JSON line."""
    import torch
    import torch.nn.functional as F

    from engine.evaluate.tasks import RetrievalScoring, retrieval_metrics

    generator = torch.Generator().manual_seed(pairs)
    images = F.normalize(torch.randn(pairs, DIM, generator=generator), dim=-1)
    texts = F.normalize(images + 6.0 * torch.randn(pairs, DIM, generator=generator) / DIM**0.5, dim=-1)
    kept = {"image_features": images, "text_features": texts, "num_captions": torch.ones(pairs, dtype=torch.long)}
    order = torch.arange(pairs)
    with peak_window() as window, timed() as timing:
        if path == "engine":
            metrics = RetrievalScoring().metrics(None, kept, order)
        else:
            metrics = retrieval_metrics(texts @ images.t(), order)
    print(json.dumps({"growth_mb": window.growth_bytes / MB, "seconds": timing.wall_s, "metrics": metrics}))


def measure(path: str, pairs: int) -> dict:
    env = {**__import__("os").environ, **FIXED_MMAP_THRESHOLD_ENV}
    out = subprocess.run([sys.executable, __file__, "--child", path, "--pairs", str(pairs)], check=True,
                         capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=("engine", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--pairs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.pairs)
        return 0
    sizes = (500, 1000, 2000) if args.quick else (2000, 8000, 50000)
    print(f"retrieval metrics of random D={DIM} features, one caption per image, fresh process per row")
    print(TABLE.header())
    engine, same = {}, True
    for pairs in sizes:
        engine[pairs] = measure("engine", pairs)
        print(TABLE.row(pairs, "engine", engine[pairs]["growth_mb"], engine[pairs]["seconds"],
                        engine[pairs]["metrics"]["mean_recall@1"]))
        if pairs <= FULL_MATRIX_MAX_PAIRS:
            full = measure("full", pairs)
            print(TABLE.row(pairs, "full matrix", full["growth_mb"], full["seconds"], full["metrics"]["mean_recall@1"]))
            same &= full["metrics"] == engine[pairs]["metrics"]
    growth = engine[sizes[-1]]["growth_mb"]
    ok = growth < TARGET_GROWTH_MB and same
    print(f"peak growth at {sizes[-1]} pairs: {growth:.0f} MB (target < {TARGET_GROWTH_MB}); metrics equal to the "
          f"full matrix's where it was run: {same}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
