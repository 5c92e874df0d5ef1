"""Keeping what the base knew: each method and remedy on the demo's data, its dip, its end, interpolated, its cost.

    python run.py demo --out runs/demo                                   # the data, the base model, the methods
    python benchmarks/tools/remedies_study.py --demo runs/demo --out runs/remedies \
        [--only "osr+gcl,tuneclip + teacher"] [--seeds 0,1,2] [--eval-every 1] \
        [--interpolate 0:1:0.25] [--report]

Every variant is one `run.py sweep` over the seeds, started from the configuration the demo used for its
method (its first run's log) with a few settings changed and evaluation every `--eval-every` fine-tuning
steps, so the first steps are seen one by one. The table gives, per variant and metric (x100, mean +- sd over
the seeds): the base, the first evaluation after it, the lowest, the step of the lowest, how many
evaluations fall below the base (of how many), the final and the best; then the median fine-tuning
samples/s relative to TuneCLIP's. `--interpolate` runs `run.py interpolate` on every run and tabulates the
metrics at each a; `--report` writes one `run.py report` of all runs. Finished runs are reused when rerun.
Nothing here is a target: it measures, and the user guide reports what it found.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.evaluate import headline_metric
from engine.results.interpolate import parse_alphas
from engine.results.summary import run_records

# name -> (the demo method it starts from, overrides). Warm-up lengths are in fine-tuning steps (the full demo
# has 16 per epoch); the teacher variants need the `wma_teacher` term.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "openclip": ("openclip", []),
    "fastclip": ("fastclip", []),
    "teacher alone": ("openclip", ["loss.terms.wma_teacher=1.0"]),
    "osr+gcl": ("osr+gcl", []),
    "osr+gcl warmup 4": ("osr+gcl", ["optim.warmup_steps=4"]),
    "osr+gcl warmup 16": ("osr+gcl", ["optim.warmup_steps=16"]),
    "osr+gcl no seed moments": ("osr+gcl", ["osr.seed_moments=false"]),
    "osr+gcl no seed u": ("osr+gcl", ["osr.seed_u=false"]),
    "osr+gcl lr/2": ("osr+gcl", ["optim.lr=5e-5"]),
    "osr+gcl + teacher": ("osr+gcl", ["loss.terms.wma_teacher=1.0"]),
    "tuneclip": ("tuneclip", []),
    "tuneclip warmup 16": ("tuneclip", ["optim.warmup_steps=16"]),
    "tuneclip + teacher": ("tuneclip", ["loss.terms.wma_teacher=1.0"]),
    "osr+gcl + neural": ("osr+gcl", ["loss.normaliser=neural"]),
    "tuneclip + neural": ("tuneclip", ["loss.normaliser=neural"]),
}
REFERENCE = "tuneclip"  # step times are relative to this variant's (when it is in the study)


def demo_config(demo: Path, method: str) -> dict:
    """The configuration the demo fine-tuned `method` with (its first seed's start record)."""
    runs = sorted((demo / "runs" / method).glob("seed*/log.jsonl"))
    if not runs:
        raise SystemExit(f"error: {demo / 'runs' / method} has no run; run `python run.py demo --out {demo}` first")
    for record in run_records(runs[0]):
        if record.get("event") == "start" and isinstance(record.get("config"), dict):
            return record["config"]
    raise SystemExit(f"error: {runs[0]} has no start record")


def run_variant(demo: Path, out: Path, name: str, method: str, overrides: list[str], *, seeds: str,
                eval_every: int, threads: int = 0) -> list[Path]:
    """Sweep the seeds of one variant (skipped when its folders already hold finished runs)."""
    folder = out / name.replace(" ", "_").replace("/", "-").replace("+", "plus")
    config = demo_config(demo, method)
    config["run"].update({"progress": False, "out_dir": str(folder)})
    config["eval"]["every_steps"] = eval_every
    folder.mkdir(parents=True, exist_ok=True)
    config_file = folder / "config.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    runs = sorted(p for p in folder.glob("run.seed=*") if (p / "summary.json").is_file())
    if len(runs) < len(seeds.split(",")):
        command = [sys.executable, str(ROOT / "run.py"), "sweep", "--config", str(config_file), "--out", str(folder),
                   "--set", f"run.seed={seeds},"]  # the comma keeps one seed a grid axis
        for text in overrides:
            command += ["--set", text]
        print(f"[study] {name}: {' '.join(command[2:])} (log: {folder / 'sweep.log'})", flush=True)
        with open(folder / "sweep.log", "w") as log:
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            done = subprocess.run(command, check=False, stdout=log, stderr=subprocess.STDOUT, env=env)
        if done.returncode:
            tail = (folder / "sweep.log").read_text().strip().splitlines()[-1:]
            raise SystemExit(f"error: variant {name!r} failed ({' '.join(tail)}); see {folder / 'sweep.log'}")
        runs = sorted(p for p in folder.glob("run.seed=*") if (p / "summary.json").is_file())
    return runs


def curve(run: Path, metric: str) -> list[tuple[int, float]]:
    """(fine-tuning step, metric x100) of each evaluation of a run, the base first."""
    return [(r.get("ft_step", 0), 100 * headline_metric(r["results"], metric))
            for r in run_records(run / "log.jsonl") if r.get("event") == "eval"]


def _mean_sd(values: list[float], spec: str = ".2f") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{spec}} +- {sd:{spec}}"


def row(name: str, runs: list[Path], metric: str, tolerance: float) -> dict:
    """One variant's statistics over its runs (x100)."""
    stats: dict[str, list[float]] = {k: [] for k in ("base", "first", "lowest", "lowest_step", "below", "final", "best")}
    evaluations = 0
    for run in runs:
        points = curve(run, metric)
        base, during = points[0][1], points[1:]
        low_step, low = min(during, key=lambda p: p[1])
        stats["base"].append(base)
        stats["first"].append(during[0][1])
        stats["lowest"].append(low)
        stats["lowest_step"].append(low_step)
        stats["below"].append(sum(v < base - tolerance for _, v in during))
        stats["final"].append(during[-1][1])
        stats["best"].append(max(v for _, v in points))
        evaluations = len(during)
    return {"variant": name, "runs": len(runs), "evaluations": evaluations, **stats}


def format_rows(rows: list[dict], metric: str) -> str:
    head = ["variant", "runs", "base", "first", "lowest", "at step", "below base", "final", "best"]
    cells = [[r["variant"], str(r["runs"]), _mean_sd(r["base"]), _mean_sd(r["first"]), _mean_sd(r["lowest"]),
              _mean_sd(r["lowest_step"], ".1f"), f"{statistics.fmean(r['below']):.1f} of {r['evaluations']}",
              _mean_sd(r["final"]), _mean_sd(r["best"])] for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    lines = [metric, "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def samples_per_s(run: Path) -> float:
    """Median fine-tuning samples/s of a run's logged steps."""
    rates = [r["samples_per_s"] for r in run_records(run / "log.jsonl")
             if r.get("event") == "step" and r.get("stage") == "finetune"]
    return statistics.median(rates)


def step_times(results: dict[str, list[Path]]) -> str:
    """Median fine-tuning seconds per sample of each variant relative to TuneCLIP's (same machine, same run)."""
    speed = {name: statistics.median(samples_per_s(run) for run in runs) for name, runs in results.items()}
    if REFERENCE not in speed:
        return "step time: no tuneclip variant in this study to compare with"
    lines = [f"fine-tuning time per sample relative to {REFERENCE} (median samples/s of logged steps):"]
    lines += [f"  {name:<28} {speed[REFERENCE] / rate:5.2f}x  ({rate:.0f} samples/s)" for name, rate in speed.items()]
    return "\n".join(lines)


def interpolate(results: dict[str, list[Path]], alphas: str, metrics: list[str]) -> str:
    """`run.py interpolate` of every run (reused when its interpolate.json has these alphas); per variant and
    metric the mean over seeds at each a (a = 0 is the base, a = 1 the final model)."""
    lines = []
    for name, runs in results.items():
        curves = []
        for run in runs:
            done = run / "interpolate.json"
            if not done.is_file() or json.loads(done.read_text()).get("alphas") != parse_alphas(alphas):
                command = [sys.executable, str(ROOT / "run.py"), "interpolate", str(run), "--alphas", alphas]
                with open(run / "interpolate.log", "w") as log:
                    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
            curves.append(json.loads(done.read_text())["evaluations"])
        for metric in metrics:
            task, _, key = metric.partition("/")
            points = [[100 * p["results"][task][key] for p in curve] for curve in curves]
            alphas_seen = [p["alpha"] for p in curves[0]]
            means = [statistics.fmean(values) for values in zip(*points)]
            lines.append(f"  {name:<28} {metric:<36} " + "  ".join(f"a={a:g}: {m:6.2f}" for a, m in
                                                                    zip(alphas_seen, means)))
    return "interpolation with the base (x100, mean over seeds):\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished `run.py demo --out` folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the study's runs (reused when rerun)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--metric", action="append", default=None,
                        help="TASK/METRIC to tabulate (repeatable; default: every task of the demo's eval section)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="points below base that still count as equal")
    parser.add_argument("--interpolate", default=None, metavar="ALPHAS",
                        help="also interpolate every run with its base at these a (run.py interpolate --alphas)")
    parser.add_argument("--report", action="store_true", help="one run.py report of all runs in OUT/report")
    parser.add_argument("--jobs", type=int, default=1, help="variants run at once (step times then share the CPU)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of each run (0: inherited)")
    args = parser.parse_args(argv)
    chosen = [v.strip() for v in args.only.split(",")] if args.only else list(VARIANTS)
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: --only {', '.join(unknown)}: no such variant; use any of {', '.join(VARIANTS)}")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each variant is its own `run.py sweep` process
        futures = {name: pool.submit(run_variant, args.demo, args.out, name, *VARIANTS[name], seeds=args.seeds,
                                     eval_every=args.eval_every, threads=args.threads) for name in chosen}
        results = {name: future.result() for name, future in futures.items()}
    metrics = args.metric
    if not metrics:
        base_eval = demo_config(args.demo, "osr+gcl")["eval"]
        metrics = ([f"{t['name']}/acc1" for t in base_eval.get("zeroshot", [])]
                   + [f"{t['name']}/mean_recall@1" for t in base_eval.get("retrieval", [])])
    tables = {metric: [row(name, runs, metric, args.tolerance) for name, runs in results.items()] for metric in metrics}
    for metric, rows in tables.items():
        print(format_rows(rows, metric) + "\n")
    print(step_times(results) + "\n")
    if args.interpolate:
        print(interpolate(results, args.interpolate, metrics) + "\n")
    if args.report:
        runs = [str(run) for runs in results.values() for run in runs]
        subprocess.run([sys.executable, str(ROOT / "run.py"), "report", "--out", str(args.out / "report"), *runs],
                       check=True, stdout=subprocess.DEVNULL)
        print(f"report: {args.out / 'report' / 'report.html'}")
    (args.out / "study.json").write_text(json.dumps(tables, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
