"""The python pieces of benchmarks/gpu_check.sh: each prints one JSON line `{"check": ..., "ok": ..., ...}`.

    python benchmarks/tools/gpu_check.py losses --device cuda        # loss vs the naive equations, fp32 and bf16
    python benchmarks/tools/gpu_check.py tune --device cuda          # a tiny OSR + fine-tuning job, single process
    python benchmarks/tools/gpu_check.py throughput --device cuda    # ViT-B-16 bf16: OpenCLIP step vs TuneCLIP step

`--device cpu` with `--tiny` runs the same code small and quickly (the shell script's --cpu-dry-run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import round_order

# bf16 rounds features to 8 bits of mantissa: loss, log u and gradients are compared at this tolerance
# (relative to each quantity's scale); fp32 uses the unit tests' tolerances.
TOLERANCES = {"fp32": (1e-5, 1e-4), "bf16": (3e-2, 6e-2)}  # (value, gradient)


def check_losses(device: torch.device, *, tiny: bool) -> dict:
    """GCL/HGCL (chunked and not) and MBCL on `device` against the float64 naive equations on CPU."""
    import open_clip

    from engine.objectives.contrastive import GlobalContrastiveLoss, MiniBatchContrastiveLoss, SurrogateSpec
    from tests.test_objectives_contrastive import _features, naive_sogclr

    batch, dim, gamma, eps, tau = (9, 16, 0.8, 1e-8, 0.07) if tiny else (257, 512, 0.8, 1e-8, 0.03)
    worst = {}
    f64, g64 = _features(batch, dim, seed=0)
    seen = torch.arange(batch) % 2 == 0
    gen = torch.Generator().manual_seed(1)
    u_x_prev = torch.rand(batch, generator=gen, dtype=torch.float64) * 3 + 0.5
    u_z_prev = torch.rand(batch, generator=gen, dtype=torch.float64) * 3 + 0.5
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        f_in, g_in = f64.to(dtype), g64.to(dtype)  # the reference sees the same rounded inputs
        for kind in ("gcl", "hgcl"):
            ref = naive_sogclr(f_in.double(), g_in.double(), u_x_prev, u_z_prev, seen, gamma, kind=kind,
                               margin=0.1, tau=tau, eps=eps)
            for chunk in (0, 3):
                spec = SurrogateSpec(kind=kind, margin=0.1, tau=tau, eps=eps, chunk_size=chunk)
                f = f_in.to(device).clone().requires_grad_(True)
                g = g_in.to(device).clone().requires_grad_(True)
                out = GlobalContrastiveLoss(spec)(f, g, log_u_x=u_x_prev.log().float().to(device),
                                                  log_u_z=u_z_prev.log().float().to(device), seen=seen.to(device),
                                                  gamma=gamma, output_dict=True)
                out["loss"].backward()
                scale = ref["grad_f"].abs().max()
                errors = {
                    "value": _rel(out["loss"], ref["value"]),
                    "log_u": max(_rel(out["log_u_x"], ref["u_x"].log()), _rel(out["log_u_z"], ref["u_z"].log())),
                    "grad": max(_rel(f.grad, ref["grad_f"], scale), _rel(g.grad, ref["grad_g"], scale)),
                }
                worst[f"{kind} chunk {chunk} {precision}"] = errors
        # MBCL: open_clip's ClipLoss in float64 on CPU is the reference.
        logit_scale = torch.tensor(1 / tau, dtype=torch.float64)
        ref_loss = open_clip.ClipLoss()(f_in.double(), g_in.double(), logit_scale)
        ours = MiniBatchContrastiveLoss(tau=tau)(f_in.to(device), g_in.to(device), output_dict=True)
        worst[f"mbcl {precision}"] = {"value": _rel(ours["loss_value"], ref_loss)}
    failed = []
    for name, errors in worst.items():
        value_tol, grad_tol = TOLERANCES[name.split()[-1]]
        failed += [f"{name} {what} {err:.2e}" for what, err in errors.items()
                   if not err <= (grad_tol if what == "grad" else value_tol)]
    largest = {p: max(e for n, errs in worst.items() if n.endswith(p) for e in errs.values()) for p in TOLERANCES}
    return {"check": f"losses vs naive ({device.type})", "ok": not failed, "failed": failed,
            "detail": ", ".join(f"{p} max rel err {e:.1e}" for p, e in largest.items())}


def _rel(ours: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """Largest |ours - ref| over `scale` (default: the largest |ref|, at least 1e-12)."""
    ours, ref = ours.detach().double().cpu().reshape(ref.shape), ref.detach().double()
    scale = ref.abs().max().clamp_min(1e-12) if scale is None else scale
    return float(((ours - ref).abs().max() / scale).item())


def _shards(root: Path, num_samples: int) -> Path:
    from engine.data.build import build_shards
    from engine.demo.synthetic import render_pairs

    csv = render_pairs(root / "raw", num_samples=num_samples, seed=0, split_name="train")
    build_shards(csv, root / "shards", samples_per_shard=max(8, num_samples // 2))
    return root / "shards"


def check_tune(device: torch.device, *, tiny: bool) -> dict:
    """A tiny TuneCLIP job (OSR 1 epoch, fine-tuning 1 epoch, tiny-vit) in one process on `device`."""
    from engine.config import load_config
    from engine.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="gpu_check_tune_") as tmp:
        shards = _shards(Path(tmp), 32)
        out = Path(tmp) / "run"
        cfg = load_config(base={
            "method": "tuneclip", "model": {"name": "tiny-vit", "precision": "bf16" if device.type == "cuda" else "fp32"},
            "data": {"train": str(shards), "batch_size": 8, "shuffle_buffer": 8, "num_workers": 0},
            "optim": {"lr": 1e-3}, "osr": {"epochs": 1}, "eval": {"at_start": False},
            "run": {"out_dir": str(out), "epochs": 1, "progress": False, "seed": 0, "device": str(device)},
        })
        started = time.perf_counter()
        trainer = Trainer(cfg)
        try:
            on_device = next(trainer.backend.model.parameters()).device.type == device.type
            trainer.tune()
            steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            losses = [r["loss"] for r in steps if r.get("event") == "step"]
            seen = trainer.normaliser.num_seen()
        finally:
            trainer.close()
        problems = [] if on_device else [f"the model is not on {device}"]
        if not losses or not all(torch.isfinite(torch.tensor(losses))):
            problems.append(f"non-finite or missing losses {losses}")
        if seen != 32:
            problems.append(f"u table has {seen} of 32 samples")
        if not (out / "final.safetensors").exists():
            problems.append("no final.safetensors")
    return {"check": f"tiny tune ({device.type}, {cfg.model.precision})", "ok": not problems, "failed": problems,
            "detail": f"{len(losses)} logged steps, last loss {losses[-1]:.4f}, {time.perf_counter() - started:.0f} s"
            if losses else ""}


def check_throughput(device: torch.device, *, tiny: bool) -> dict:
    """Images/s per device, MFU and peak GPU memory of a Trainer.train_step with the OpenCLIP loss (MBCL) vs
    TuneCLIP's (HGCL + u table), eager and with run.compile=blocks (ViT-B-16 also =step: the whole forward and the
    loss's block work), bf16 autocast: ViT-B-16 and ViT-L-14, and
    ViT-H-14 where the device has the memory (eager only: its compile alone would take minutes); best of
    interleaved rounds of the same Trainer, model and batch."""
    sizes = [("tiny-vit", 16, 2, 2, ("none", "blocks", "step"))] if tiny else [
        ("ViT-B-16", 256, 6, 2, ("none", "blocks", "step")), ("ViT-L-14", 128, 4, 2, ("none", "blocks"))]
    if not tiny and device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory > 70e9:
        sizes.append(("ViT-H-14", 64, 3, 2, ("none",)))
    rows, failed, details = [], [], []
    for model_name, batch_size, steps, rounds, modes in sizes:
        for mode in modes:
            try:
                measured = _throughput(device, model_name, batch_size, steps, rounds, mode)
            except Exception as exc:  # noqa: BLE001 (one size failing, e.g. out of memory, is a row)
                traceback.print_exc()
                failed.append(f"{model_name} compile={mode}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            rows.extend(measured["rows"])
            details.append(measured["detail"])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"check": f"train step throughput, bf16 ({device.type})", "ok": not failed, "failed": failed,
            "rows": rows, "detail": "; ".join(details)}


def _throughput(device: torch.device, model_name: str, batch_size: int, steps: int, rounds: int,
                compile_mode: str) -> dict:
    """One model and compile mode of `check_throughput`: MBCL and HGCL steps on the same Trainer."""
    from engine.config import load_config
    from engine.data import Batch
    from engine.objectives.table import UTable
    from engine.run.throughput import device_peak_flops, model_flops_per_sample
    from engine.trainer import Trainer

    table_rows = 1_000_000
    flops = model_flops_per_sample(model_name)
    _, peak_flops = device_peak_flops(device, "bf16")
    with tempfile.TemporaryDirectory(prefix="gpu_check_speed_") as tmp:
        shards = _shards(Path(tmp), 16)
        cfg = load_config(base={
            "method": "tuneclip", "model": {"name": model_name, "precision": "bf16"},
            "data": {"train": str(shards), "batch_size": min(batch_size, 16), "shuffle_buffer": 1},
            "optim": {"lr": 1e-5}, "eval": {"at_start": False},
            "run": {"out_dir": str(Path(tmp) / "run"), "progress": False, "seed": 0, "device": str(device),
                    "compile": compile_mode},
        })
        trainer = Trainer(cfg)
        try:
            trainer.normaliser.table.close()  # a table as large as a real dataset's, rows drawn at random
            fingerprint = trainer.manifest.fingerprint()
            UTable.create(Path(tmp) / "table", num_rows=table_rows, dataset_fingerprint=fingerprint).close()
            trainer.normaliser.table = UTable.open(Path(tmp) / "table", dataset_fingerprint=fingerprint)
            model = trainer.backend.model
            gen = torch.Generator().manual_seed(0)
            images = torch.randn(batch_size, 3, *model.visual.image_size, generator=gen).to(device)
            texts = torch.randint(1, model.vocab_size, (batch_size, model.context_length), generator=gen).to(device)
            keys = [str(i) for i in range(batch_size)]
            term = trainer.objective.term("contrastive")
            objectives = {"openclip (MBCL)": term.build("mbcl"), "tuneclip (HGCL + u)": term.build("hgcl")}
            best = {name: float("inf") for name in objectives}
            peak = dict.fromkeys(objectives, 0)

            def run(name: str, num: int) -> float:
                sync(device)
                started = time.perf_counter()
                for _ in range(num):
                    rows = torch.randint(0, table_rows, (batch_size,), generator=gen)
                    term.objective = objectives[name]  # the kind this step measures
                    metrics = trainer.train_step(Batch(images=images, texts=texts, rows=rows, keys=keys),
                                                 lr=1e-5, grad_clip=1.0)
                    if metrics.get("skipped"):
                        raise FloatingPointError(f"{name}: step skipped (non-finite)")
                sync(device)
                return time.perf_counter() - started

            compile_started = time.perf_counter()
            for name in objectives:  # warm-up: compile, kernels, autotuning, allocator
                run(name, 2)
            warmup_s = time.perf_counter() - compile_started
            for index in range(rounds):
                for name in round_order(list(objectives), index):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    best[name] = min(best[name], run(name, steps))
                    if device.type == "cuda":
                        peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device))
        finally:
            trainer.close()
    rates = {name: batch_size * steps / seconds for name, seconds in best.items()}
    mbcl, hgcl = rates.values()
    rows = [{"model": model_name, "compile": compile_mode, "step": name, "images_per_s": rates[name],
             "mfu": (flops * rates[name] / peak_flops) if peak_flops else None, "peak_gpu_gb": peak[name] / 1e9}
            for name in rates]
    return {"rows": rows, "detail": f"{model_name} compile={compile_mode}: tuneclip/openclip {hgcl / mbcl:.3f}, "
                                    f"warm-up incl. compile {warmup_s:.0f} s, {flops / 1e9:.1f} GFLOPs/sample"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CHECKS = {"losses": check_losses, "tune": check_tune, "throughput": check_throughput}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small sizes (the CPU dry run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available to torch")
        result = CHECKS[args.check](device, tiny=args.tiny)
    except Exception as exc:  # noqa: BLE001 (one failing check is a row of the table, not the end of the script)
        traceback.print_exc()
        result = {"check": args.check, "ok": False, "failed": [f"{type(exc).__name__}: {str(exc)[:300]}"]}
    print("GPU_CHECK " + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
