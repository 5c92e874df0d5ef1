"""Scale evidence for distributed HGCL with chunking: memory per rank O(b x chunk), not O(b x B).

Target (checked at B=32768, W=16, b=2048, D=1024, float32):
  peak memory of the loss call with chunk 4096 is at least 4x lower than unchunked, and
  its wall time is within 1.5x of unchunked (chunked / unchunked <= 1.5).
Chunked and unchunked feature gradients must also agree (max |diff| <= 1e-4 x max |grad|).

One rank is simulated in one process: its b local anchors go through `GlobalContrastiveLoss`
(forward + backward of the objective) against the global batch of B = W x b pairs. The gather
returns precomputed global tensors, as an all-gather over W ranks would: the global features
as they are (this rank's rows are already in them), and the global log(eps + u) with this
rank's freshly computed rows spliced into the other ranks' values. The other ranks' values are
estimated once, outside the measurement, against a 256-column subsample (their exact values
would cost the whole O(B^2) batch; they only set the size of the exp weights, not the work).

Memory: each global batch runs in a fresh worker process holding the inputs (global features,
2 x B x D floats: the all-gather output, the same for every chunk size). Before every loss call
the worker collects garbage, trims the heap and resets the RSS high-water mark
(/proc/self/clear_refs); the call's peak is VmHWM after it minus VmRSS before it, and the
table shows the median over calls. Workers run with a fixed 1 MB glibc mmap threshold, so every
tensor above 1 MB is returned to the OS when freed and RSS follows the live tensor bytes
(glibc's default dynamic threshold parks freed blocks of up to 32 MB on the heap, where
fragmentation moved the chunked peaks by up to 2x between identical runs). Where the reset is
not permitted the fallback is ru_maxrss before vs after, flagged in the output. Time: median
wall time of the calls, each a full forward + backward; the chunk sizes of one batch run in
interleaved rounds (order rotated per round), so load from other processes hits them alike.
Process CPU time is shown next to it: on a loaded machine it separates waiting from working.

Choices: W = 16 throughout (a fixed cluster, growing batch), so b = B / 16 = 64 ... 2048; the
loss costs O(b x B x D), so B = 32768 dominates (about 10 s per call on 2 idle cores). The rank
is W // 2, so its offset is neither 0 nor the end. Chunk 0 means the whole global batch; chunk
>= B is the same computation as unchunked. The whole run should take about 2.5 minutes on 2
idle CPU cores (from the per-call times; 5-6 minutes measured on cores shared with other
jobs); `--quick` runs B in {1024, 4096}, chunk {0, 1024} once each (about 10 s) and checks
agreement only.

    python benchmarks/chunked_loss.py            # full run, checks the target
    python benchmarks/chunked_loss.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import FIXED_MMAP_THRESHOLD_ENV, Column, Table, peak_window, round_order, timed

FEATURE_DIM = 1024  # ViT-H/14 embedding width
WORLD_SIZE = 16
GLOBAL_BATCHES = (1024, 4096, 16384, 32768)
CHUNK_SIZES = (0, 1024, 4096)
QUICK_GLOBAL_BATCHES = (1024, 4096)
QUICK_CHUNK_SIZES = (0, 1024)
NUM_REPEATS = 3
NUM_SUBSAMPLE_COLUMNS = 256  # columns used to estimate the other ranks' log Phi
GAMMA = 0.9

HEADLINE_BATCH = 32768
HEADLINE_CHUNK = 4096
TARGET_MEMORY_RATIO = 4.0  # unchunked peak / chunked peak, at least
TARGET_TIME_RATIO = 1.5  # chunked time / unchunked time, at most
AGREEMENT_RTOL = 1e-4  # max |grad_chunked - grad_unchunked| / max |grad_unchunked|

MIB = 1024 * 1024
TABLE = Table(Column("B", 6), Column("W", 3), Column("b", 5), Column("chunk", 6), Column("b x c MB", 9, ".1f"),
              Column("peak MB", 8, ".1f"), Column("max MB", 8, ".1f"), Column("peak/blk", 8, ".1f"),
              Column("time s", 7, ".2f"), Column("cpu s", 7, ".2f"), Column("max rel diff", 12, ".1e"))


# --------------------------------------------------------------------------- worker (one batch size)
class SimulatedGather:
    """All-gather stand-in for one rank: returns what W ranks would assemble along dim 0.

    Called by the loss in order: image features, text features, log(eps+u_x), log(eps+u_z).
    Features come back as the precomputed global tensors (this rank's rows must already be in
    them); the log weights are copies of the other ranks' values with this rank's rows spliced in.
    """

    def __init__(self, global_tensors, *, offset: int):
        self.global_tensors = global_tensors
        self.offset = offset
        self.num_calls = 0

    def __call__(self, local):
        import torch

        global_tensor = self.global_tensors[self.num_calls % len(self.global_tensors)]
        self.num_calls += 1
        rows = slice(self.offset, self.offset + local.shape[0])
        if local.dim() == 2:
            assert torch.equal(global_tensor[rows], local), "gathered features lost this rank's rows"
            return global_tensor
        gathered = global_tensor.clone()
        gathered[rows] = local
        return gathered


def _random_pairs(num_pairs: int, *, seed: int):
    """Random L2-normalised image and text features [num_pairs, FEATURE_DIM], float32."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    features = []
    for _ in range(2):
        x = torch.randn(num_pairs, FEATURE_DIM, generator=generator)
        x /= x.norm(dim=1, keepdim=True)
        features.append(x)
    return features


def _build_rank_inputs(global_batch: int, *, world_size: int, seed: int) -> dict:
    """Everything one rank holds before its loss call: global tensors, local leaves, u rows."""
    import torch

    from engine.objectives.contrastive import SurrogateSpec, anchor_log_phi, log_eps_plus

    num_local = global_batch // world_size
    offset = (world_size // 2) * num_local
    f_global, g_global = _random_pairs(global_batch, seed=seed)
    eps = SurrogateSpec().eps
    # Other ranks' first-visit log Phi, estimated against the first columns of the batch.
    num_columns = min(NUM_SUBSAMPLE_COLUMNS, global_batch)
    log_phi_x, log_phi_z = anchor_log_phi(
        f_global, g_global, f_global[:num_columns], g_global[:num_columns], offset=0,
        spec=SurrogateSpec(kind="hgcl"),
    )
    rows = slice(offset, offset + num_local)
    return {
        "global_tensors": [f_global, g_global, log_eps_plus(log_phi_x, eps), log_eps_plus(log_phi_z, eps)],
        "image_features": f_global[rows].clone().requires_grad_(True),
        "text_features": g_global[rows].clone().requires_grad_(True),
        "log_u_x": log_phi_x[rows].clone(),
        "log_u_z": log_phi_z[rows].clone(),
        "seen": torch.ones(num_local, dtype=torch.bool),
        "offset": offset,
        "world_size": world_size,
    }


def _loss_step(inputs: dict, *, chunk_size: int) -> None:
    """One rank's loss call as a training step runs it: forward, then backward of the objective."""
    from engine.objectives.contrastive import GlobalContrastiveLoss, SurrogateSpec

    loss = GlobalContrastiveLoss(
        SurrogateSpec(kind="hgcl", chunk_size=chunk_size),
        gather=SimulatedGather(inputs["global_tensors"], offset=inputs["offset"]),
        world_size=inputs["world_size"],
    )
    inputs["image_features"].grad = None
    inputs["text_features"].grad = None
    objective = loss(
        inputs["image_features"], inputs["text_features"], log_u_x=inputs["log_u_x"],
        log_u_z=inputs["log_u_z"], seen=inputs["seen"], gamma=GAMMA, offset=inputs["offset"],
    )
    objective.backward()


def run_worker(args: argparse.Namespace) -> None:
    """Measure every chunk size at one global batch, rounds interleaved; print one JSON line."""
    import gc

    from engine.evaluate.evaluator import release_free_heap

    chunk_sizes = [int(size) for size in args.chunk_sizes.split(",")]
    # Warm-up on a tiny batch: starts the thread pool and kernels outside the measurement.
    warm_up = _build_rank_inputs(256, world_size=args.world_size, seed=1)
    for chunk_size in chunk_sizes:
        _loss_step(warm_up, chunk_size=chunk_size)
    del warm_up
    inputs = _build_rank_inputs(args.global_batch, world_size=args.world_size, seed=args.global_batch)
    results = {size: {"peaks_mib": [], "times_s": [], "cpu_times_s": []} for size in chunk_sizes}
    out_dir = Path(args.out_dir)
    probes = set()
    for round_index in range(args.repeats):
        for chunk_size in round_order(chunk_sizes, round_index):
            gc.collect()
            release_free_heap()  # setup garbage must not hide the loss call's growth
            with peak_window() as memory, timed() as timing:
                _loss_step(inputs, chunk_size=chunk_size)
            probes.add(memory.probe)
            results[chunk_size]["peaks_mib"].append(memory.growth_bytes / MIB)
            results[chunk_size]["times_s"].append(timing.wall_s)
            results[chunk_size]["cpu_times_s"].append(timing.cpu_s)
            if round_index == args.repeats - 1:
                stem = f"B{args.global_batch}_c{chunk_size}"
                np.save(out_dir / f"{stem}_grad_f.npy", inputs["image_features"].grad.numpy())
                np.save(out_dir / f"{stem}_grad_g.npy", inputs["text_features"].grad.numpy())
    print(json.dumps({"probe": ", ".join(sorted(probes)), "results": {str(size): result for size, result in results.items()}}))


# --------------------------------------------------------------------------- driver
def _run_global_batch(global_batch: int, chunk_sizes, *, world_size: int, repeats: int, out_dir: str) -> dict:
    """All chunk sizes of one global batch, in a fresh worker process."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--global-batch", str(global_batch),
        "--world-size", str(world_size), "--chunk-sizes", ",".join(str(size) for size in chunk_sizes),
        "--repeats", str(repeats), "--out-dir", out_dir,
    ]
    # Without a fixed mmap threshold, fragmentation made RSS drift from the live tensor bytes by 2x between runs.
    env = dict(os.environ, **FIXED_MMAP_THRESHOLD_ENV)
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"worker failed for B={global_batch}")
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    return {int(size): dict(result, probe=report["probe"]) for size, result in report["results"].items()}


def _max_relative_diff(out_dir: Path, global_batch: int, chunk_size: int) -> float:
    """max |grad(chunk) - grad(unchunked)| / max |grad(unchunked)| over both feature gradients."""
    worst = 0.0
    for name in ("grad_f", "grad_g"):
        reference = np.load(out_dir / f"B{global_batch}_c0_{name}.npy")
        chunked = np.load(out_dir / f"B{global_batch}_c{chunk_size}_{name}.npy")
        worst = max(worst, float(np.abs(chunked - reference).max() / np.abs(reference).max()))
    return worst


def run_benchmark(args: argparse.Namespace) -> int:
    """Run every configuration, print the table and the headline; return the exit status."""
    global_batches = QUICK_GLOBAL_BATCHES if args.quick else GLOBAL_BATCHES
    chunk_sizes = QUICK_CHUNK_SIZES if args.quick else CHUNK_SIZES
    repeats = 1 if args.quick else args.repeats
    peaks: dict[tuple[int, int], float] = {}
    times: dict[tuple[int, int], float] = {}
    cpu_times: dict[tuple[int, int], float] = {}
    probes, failures = set(), []
    load_1min = os.getloadavg()[0]
    print(f"HGCL loss call (forward + backward) of one simulated rank; D={FEATURE_DIM}, float32, "
          f"{repeats} interleaved rounds, {os.cpu_count()} CPUs, load average {load_1min:.1f} at start")
    print(TABLE.header())
    with tempfile.TemporaryDirectory() as out_dir:
        for global_batch in global_batches:
            num_local = global_batch // args.world_size
            results = _run_global_batch(global_batch, chunk_sizes, world_size=args.world_size,
                                        repeats=repeats, out_dir=out_dir)
            for chunk_size in chunk_sizes:
                result = results[chunk_size]
                probes.add(result["probe"])
                columns = min(chunk_size, global_batch) if chunk_size > 0 else global_batch
                block_mib = num_local * columns * 4 / MIB  # one float32 similarity block
                diff = 0.0 if chunk_size == 0 else _max_relative_diff(Path(out_dir), global_batch, chunk_size)
                if diff > AGREEMENT_RTOL:
                    failures.append(f"B={global_batch} chunk={chunk_size}: gradients differ by {diff:.2e}")
                key = (global_batch, chunk_size)
                peak = peaks[key] = statistics.median(result["peaks_mib"])
                times[key] = statistics.median(result["times_s"])
                cpu_times[key] = statistics.median(result["cpu_times_s"])
                print(TABLE.row(global_batch, args.world_size, num_local, chunk_size, block_mib, peak,
                                max(result["peaks_mib"]), peak / block_mib, times[key], cpu_times[key], diff),
                      flush=True)
    print(f"peak MB = RSS high-water during the call minus RSS before it ({', '.join(sorted(probes))}), "
          f"median over calls (max MB = largest); b x c MB = one b x chunk float32 block (chunk 0 = B); "
          f"time s = median wall, cpu s = median process CPU (all threads)")

    if args.quick:
        print(f"quick run: agreement checked, memory/time targets only in the full run; "
              f"{'FAIL ' + '; '.join(failures) if failures else 'ok'}")
        return 1 if failures else 0

    memory_ratio = peaks[HEADLINE_BATCH, 0] / peaks[HEADLINE_BATCH, HEADLINE_CHUNK]
    time_ratio = times[HEADLINE_BATCH, HEADLINE_CHUNK] / times[HEADLINE_BATCH, 0]
    cpu_ratio = cpu_times[HEADLINE_BATCH, HEADLINE_CHUNK] / cpu_times[HEADLINE_BATCH, 0]
    if memory_ratio < TARGET_MEMORY_RATIO:
        failures.append(f"memory ratio {memory_ratio:.2f}x < {TARGET_MEMORY_RATIO}x")
    if time_ratio > TARGET_TIME_RATIO:
        failures.append(f"time ratio {time_ratio:.2f}x > {TARGET_TIME_RATIO}x")
    verdict = "PASS" if not failures else "FAIL (" + "; ".join(failures) + ")"
    print(f"headline B={HEADLINE_BATCH} W={args.world_size}: peak memory unchunked/chunk{HEADLINE_CHUNK} = "
          f"{memory_ratio:.2f}x (target >= {TARGET_MEMORY_RATIO}x), time chunk{HEADLINE_CHUNK}/unchunked = "
          f"{time_ratio:.2f}x (target <= {TARGET_TIME_RATIO}x; cpu {cpu_ratio:.2f}x): {verdict}")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small batches, one repeat")
    parser.add_argument("--world-size", type=int, default=WORLD_SIZE, help="simulated number of ranks W")
    parser.add_argument("--repeats", type=int, default=NUM_REPEATS, help="timed repeats per configuration")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--global-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-sizes", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    batches = QUICK_GLOBAL_BATCHES if args.quick else GLOBAL_BATCHES
    if args.world_size < 1 or any(batch % args.world_size for batch in batches):
        parser.error(f"--world-size must divide every global batch {batches}, got {args.world_size}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    raise SystemExit(run_benchmark(args))


if __name__ == "__main__":
    main()
