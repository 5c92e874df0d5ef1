"""Speed of the global contrastive losses (GCL, HGCL) against one matmul and open_clip's ClipLoss.

Target (issue 27, "the loss"): at B = 1024 and 4096 (D = 512, float32, one process, chunk 1024),
GCL and HGCL forward + backward each cost <= 5x one B x D x B matmul and no more than open_clip's
`ClipLoss` forward + backward at the same B. Exits non-zero when a checked ratio is missed.

What is timed, per B, on the same features (random, L2-normalised, B x D, with grad):
  matmul        `f @ g.T`, the similarity block alone: the unit of the table;
  ClipLoss      open_clip's `ClipLoss` at logit scale 100, forward + backward;
  GCL / HGCL    `GlobalContrastiveLoss` forward (log Phi, SogCLR's update of u, the closed-form
                feature gradients) + backward, tau 0.01, margin 0.1, u rows seen before (u near
                Phi), at chunk 1024 (checked) and chunk 0 = the whole batch (shown, not checked;
                at B = 1024 both are one block).
  ... compiled   with `--compiled`: the same with run.compile=step's block kernels (inductor; shown, not
                checked): the elementwise passes fused; the first (warm-up) call compiles, its time is printed.
The floor of an exact step is three B x D x B products (the similarity block and the two feature
gradients), so 3x plus the elementwise passes. Paths run in interleaved rounds (order rotated every
round) after one warm-up call each; the table shows each path's fastest call and its ratio to the
fastest matmul and to the fastest ClipLoss of the same run: other processes can only add time, so
the minimum is the estimate their load cannot bias. Median ms is printed next to it.

    python benchmarks/loss_speed.py            # B 1024 and 4096, 7 rounds (~1-2 min on 2 cores)
    python benchmarks/loss_speed.py --quick    # B 1024, 2 rounds, no check
    python benchmarks/loss_speed.py --threads 1   # on cores shared with other jobs: see below
    python benchmarks/loss_speed.py --compiled    # also GCL / HGCL with the loss compiled (run.compile=step)

On cores shared with other jobs, a 2-thread op waits for its slower thread, and the elementwise passes
(many short ops) suffer more than one long matmul: the ratios then drift up for every loss alike.
`--threads 1` measures the work itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import Column, Table, round_order, timed
from engine.objectives.block_kernels import BlockKernels
from engine.objectives.contrastive import GlobalContrastiveLoss, SurrogateSpec, anchor_log_phi

FEATURE_DIM = 512
GLOBAL_BATCHES = (1024, 4096)
CHECKED_CHUNK = 1024
CHUNK_SIZES = (CHECKED_CHUNK, 0)
NUM_ROUNDS = 7
GAMMA = 0.9
LOGIT_SCALE = 100.0
TARGET_MATMUL_RATIO = 5.0  # GCL / HGCL at the checked chunk: at most this many matmuls
TARGET_CLIP_RATIO = 1.0  # ... and no slower than ClipLoss

TABLE = Table(Column("B", 5), Column("path", 14, align="<"), Column("chunk", 5), Column("min ms", 8, ".1f"),
              Column("median ms", 9, ".1f"), Column("x matmul", 8, ".2f"), Column("x ClipLoss", 10, ".2f"),
              Column("target", 22, align="<"))


def _features(batch: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features [batch, FEATURE_DIM], L2-normalised, pairs correlated, leaves with grad."""
    generator = torch.Generator().manual_seed(seed)
    f = F.normalize(torch.randn(batch, FEATURE_DIM, generator=generator), dim=1)
    g = F.normalize(f + torch.randn(batch, FEATURE_DIM, generator=generator), dim=1)
    return f.requires_grad_(True), g.requires_grad_(True)


def _paths(f: torch.Tensor, g: torch.Tensor, *, compiled: bool) -> dict[tuple[str, int], callable]:
    """Each timed path as a no-argument call; keys are (name, chunk), chunk -1 where it does not apply; with
    `compiled` also GCL / HGCL with their block kernels compiled by inductor."""
    from open_clip.loss import ClipLoss

    clip_loss = ClipLoss()
    scale = torch.tensor(LOGIT_SCALE)
    spec = SurrogateSpec(kind="hgcl")
    log_u_x, log_u_z = anchor_log_phi(f, g, f, g, offset=0, spec=spec)  # u of an earlier visit: near Phi
    seen = torch.ones(f.shape[0], dtype=torch.bool)

    def matmul():
        with torch.no_grad():
            f @ g.T

    def clip():
        f.grad = g.grad = None
        clip_loss(f, g, scale).backward()

    def global_loss(kind: str, chunk_size: int, kernels: BlockKernels | None = None):
        loss = GlobalContrastiveLoss(SurrogateSpec(kind=kind, chunk_size=chunk_size), kernels=kernels)

        def step():
            f.grad = g.grad = None
            loss(f, g, log_u_x=log_u_x, log_u_z=log_u_z, seen=seen, gamma=GAMMA).backward()

        return step

    paths = {("matmul", -1): matmul, ("ClipLoss", -1): clip}
    for kind in ("gcl", "hgcl"):
        for chunk_size in CHUNK_SIZES:
            paths[(kind.upper(), chunk_size)] = global_loss(kind, chunk_size)
    if compiled:
        kernels = BlockKernels("inductor")
        for kind in ("gcl", "hgcl"):
            for chunk_size in CHUNK_SIZES:
                paths[(f"{kind.upper()} compiled", chunk_size)] = global_loss(kind, chunk_size, kernels)
    return paths


def measure(batch: int, rounds: int, *, compiled: bool = False) -> dict[tuple[str, int], list[float]]:
    """Seconds per call of every path at one batch size, rounds interleaved (the compiled paths' first call,
    which compiles, printed)."""
    f, g = _features(batch, seed=batch)
    torch._dynamo.reset()  # each batch size compiles afresh, as a run of that batch size would
    paths = _paths(f, g, compiled=compiled)
    for key, call in paths.items():  # warm-up: thread pool, allocator, kernels (compiled paths: compilation)
        with timed() as timing:
            call()
        if "compiled" in key[0]:
            print(f"  B {batch} {key[0]} chunk {key[1]}: first call (compiles) {timing.wall_s:.1f} s", flush=True)
    times = {key: [] for key in paths}
    for round_index in range(rounds):
        for key in round_order(list(paths), round_index):
            with timed() as timing:
                paths[key]()
            times[key].append(timing.wall_s)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B 1024, 2 rounds, no target check")
    parser.add_argument("--rounds", type=int, default=NUM_ROUNDS, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compiled", action="store_true",
                        help="also GCL / HGCL with their block kernels compiled by inductor (run.compile=step)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = GLOBAL_BATCHES[:1] if args.quick else GLOBAL_BATCHES
    rounds = 2 if args.quick else args.rounds
    print(f"loss forward + backward, one process, D={FEATURE_DIM}, float32, {torch.get_num_threads()} threads, "
          f"{rounds} interleaved rounds, load average {os.getloadavg()[0]:.1f} at start")
    print(TABLE.header())
    failures, headline = [], []
    for batch in batches:
        times = measure(batch, rounds, compiled=args.compiled)
        matmul, clip = min(times[("matmul", -1)]), min(times[("ClipLoss", -1)])
        for (name, chunk_size), values in times.items():
            checked = name in ("GCL", "HGCL") and chunk_size == CHECKED_CHUNK
            x_matmul, x_clip = min(values) / matmul, min(values) / clip
            verdict = ""
            if checked:
                missed = x_matmul > TARGET_MATMUL_RATIO or x_clip > TARGET_CLIP_RATIO
                verdict = f"<= {TARGET_MATMUL_RATIO:g}x, <= ClipLoss: {'FAIL' if missed else 'ok'}"
                headline.append(f"{name} B{batch} {x_matmul:.2f}x")
                if missed:
                    failures.append(f"{name} B={batch}: {x_matmul:.2f}x matmul, {x_clip:.2f}x ClipLoss")
            print(TABLE.row(batch, name, "-" if chunk_size < 0 else chunk_size, min(values) * 1e3,
                            statistics.median(values) * 1e3, x_matmul, x_clip, verdict), flush=True)
    print("min ms = fastest call; x matmul, x ClipLoss = fastest over the fastest of that path in the same run; "
          "chunk 0 = the whole batch")
    if args.quick:
        print("quick run: no target check")
        return
    verdict = "PASS" if not failures else "FAIL (" + "; ".join(failures) + ")"
    print(f"headline (chunk {CHECKED_CHUNK}, x one matmul, target <= {TARGET_MATMUL_RATIO:g}x and <= ClipLoss): "
          f"{', '.join(headline)}: {verdict}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
