"""Is evaluation bounded in memory and as fast as a bare loop? Peak RSS at 2,000 / 8,000 / 50,000 images.

Target: peak RSS (the evaluating process plus its largest loader worker) grows by less than 300 MB from
2,000 to 50,000 images, and the engine's images/s is within 1.2x of a bare loop that decodes and
forwards the same images (bare images/s / engine images/s <= 1.2). Exit status 1 when missed.

Data: synthetic 224-px JPEG images (engine.demo.synthetic shapes, --unique distinct images repeated under
new keys) in webdataset tars of 1,000 samples with a `cls` label, cached under --cache (deleted at the
end unless --keep). Model: a 2-layer ViT, patch 32, 224-px input (what is measured is the pipeline, not
the model). Engine path: `Evaluator` on a zero-shot task over the tars (10 classes, 1 template),
--workers DataLoader workers, batch --batch-size; the whole call (classifier, streaming, gather,
metrics). Bare loop: webdataset's own reader and decoder (`wds.WebDataset(...).decode("pil")`), the
same transform, workers and batch, `encode_image` under no_grad, nothing kept. Every measurement runs
in a fresh process (peak RSS from getrusage: ru_maxrss of the process and of its largest worker).
Throughput is the median of --repeats runs at --speed-images, engine and bare interleaved.

    python benchmarks/eval_memory.py          # ~10 min on 2 shared cores
    python benchmarks/eval_memory.py --quick                        # smoke run: 500 / 1,000 / 2,000 images
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import Column, Table, peak_rss_bytes, side_by_side, timed

TARGET_GROWTH_MB = 300
TARGET_RATIO = 1.2
MB = 1024 * 1024  # as ru_maxrss counts: KiB / 1024
TABLE = Table(Column("images", 8), Column("images/s", 9, ".1f"), Column("peak RSS main MB", 17, ".0f"),
              Column("largest worker MB", 18, ".0f"), Column("total MB", 9, ".0f"))
SHARD_SIZE = 1000
NUM_CLASSES = 10
MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_data(cache: Path, num_images: int, num_unique: int) -> None:
    """`num_images` samples in tars of SHARD_SIZE under cache/shards, and the model config (once)."""
    from engine.demo.synthetic import random_spec, render_image

    shards = cache / "shards"
    needed = -(-num_images // SHARD_SIZE)
    if (cache / "done.json").is_file() and json.loads((cache / "done.json").read_text())["num_images"] >= num_images:
        return
    shutil.rmtree(shards, ignore_errors=True)
    shards.mkdir(parents=True)
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(num_unique):
        buffer = io.BytesIO()
        render_image(random_spec(rng), rng, image_size=224).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    for shard in range(needed):
        with tarfile.open(shards / f"{shard:06d}.tar", "w") as tar:
            for i in range(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE):
                for name, data in ((f"{i:08d}.jpg", jpegs[i % num_unique]), (f"{i:08d}.cls", str(i % NUM_CLASSES).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (cache / "model.json").write_text(json.dumps(MODEL_CONFIG))
    (cache / "classnames.txt").write_text("".join(f"shape number {c}\n" for c in range(NUM_CLASSES)))
    (cache / "templates.txt").write_text("a photo of a {c}.\n")
    (cache / "done.json").write_text(json.dumps({"num_images": needed * SHARD_SIZE}))


def child(args: argparse.Namespace) -> None:
    """One measurement in this fresh process; prints a JSON line."""
    import torch

    torch.set_num_threads(1)
    from models import build_model

    cache = Path(args.cache)
    bundle = build_model(str(cache / "model.json"), seed=0)
    pattern = str(cache / "shards" / f"{{000000..{args.images // SHARD_SIZE - 1:06d}}}.tar")
    with timed() as timing:
        result = _evaluate(args, bundle, cache, pattern)
    print(json.dumps({"seconds": timing.wall_s, **result,
                      "rss_main_mb": peak_rss_bytes() / MB, "rss_worker_mb": peak_rss_bytes(children=True) / MB}))


def _evaluate(args: argparse.Namespace, bundle, cache: Path, pattern: str) -> dict:
    """The engine's Evaluator or the bare loop over `pattern`; what to check of it."""
    import torch

    if args.child == "engine":
        from engine.config import EvalConfig
        from engine.evaluate import Evaluator, build_tasks

        tasks = build_tasks(EvalConfig(zeroshot=[{"name": "synthetic", "wds": pattern,
                                                  "classnames": str(cache / "classnames.txt"),
                                                  "templates": str(cache / "templates.txt")}]))
        results = Evaluator(tasks, batch_size=args.batch_size, num_workers=args.workers)(
            bundle.model, bundle.tokenizer, bundle.eval_transform)
        count = None
        extra = results["synthetic"]["acc1"]
    else:
        import webdataset as wds
        from torch.utils.data import DataLoader

        dataset = (wds.WebDataset(pattern, shardshuffle=False, nodesplitter=wds.split_by_node,
                                  workersplitter=wds.split_by_worker)
                   .decode("pil").to_tuple("jpg", "cls").map_tuple(bundle.eval_transform, int)
                   .batched(args.batch_size, partial=True))
        count = 0
        with torch.no_grad():
            for images, _ in DataLoader(dataset, batch_size=None, num_workers=args.workers):
                bundle.model.encode_image(images)
                count += len(images)
        extra = None
    return {"count": count, "acc1": extra}


def measure(kind: str, images: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--images", str(images), "--cache", args.cache,
           "--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["count"] is not None and result["count"] != images:
        raise AssertionError(f"bare loop read {result['count']} images, expected {images}")
    result["images_s"] = images / result["seconds"]
    result["rss_mb"] = result["rss_main_mb"] + result["rss_worker_mb"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", default="/tmp/eval_memory_cache")
    parser.add_argument("--keep", action="store_true", help="keep the cached tars")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speed-images", type=int, default=8000)
    parser.add_argument("--unique", type=int, default=500, help="distinct rendered images")
    parser.add_argument("--child", choices=("engine", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    sizes = (1000, 2000, 4000) if args.quick else (2000, 8000, 50000)
    speed_images = 2000 if args.quick else args.speed_images
    repeats = 1 if args.quick else args.repeats
    cache = Path(args.cache)
    try:
        started = time.perf_counter()
        write_data(cache, max(sizes), args.unique)
        print(f"data: {max(sizes)} images of 224 px in {cache} ({time.perf_counter() - started:.0f} s)")
        rows = []
        for images in sizes:
            r = measure("engine", images, args)
            rows.append((images, r))
            print(f"  engine {images:>6} images: {r['images_s']:7.1f} images/s, peak RSS main {r['rss_main_mb']:6.0f} MB"
                  f" + worker {r['rss_worker_mb']:6.0f} MB", flush=True)
        speeds = {"engine": [], "bare": []}
        for _ in range(repeats):
            for kind in ("bare", "engine"):
                speeds[kind].append(measure(kind, speed_images, args)["images_s"])
        print(f"\nevaluation of synthetic 224-px JPEGs, 2-layer ViT-32 at 224 px, {args.workers} workers, "
              f"batch {args.batch_size}")
        print(TABLE.header())
        for images, r in rows:
            print(TABLE.row(images, r["images_s"], r["rss_main_mb"], r["rss_worker_mb"], r["rss_mb"]))
        ratio = side_by_side(speeds["bare"], speeds["engine"]).median
        bare, engine = statistics.median(speeds["bare"]), statistics.median(speeds["engine"])
        print(f"throughput at {speed_images} images, median of {repeats}: bare loop {bare:.1f} images/s "
              f"{[round(s, 1) for s in speeds['bare']]}, engine {engine:.1f} images/s "
              f"{[round(s, 1) for s in speeds['engine']]}")
        growth = rows[-1][1]["rss_mb"] - rows[0][1]["rss_mb"]
        ok = growth < TARGET_GROWTH_MB and ratio <= TARGET_RATIO
        print(f"peak RSS growth {sizes[0]} -> {sizes[-1]} images: {growth:+.0f} MB (target < {TARGET_GROWTH_MB}); "
              f"bare / engine images/s: {ratio:.2f}x (target <= {TARGET_RATIO}): {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
