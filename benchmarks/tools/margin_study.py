"""Table of a margin study: per setting (runs grouped by a folder-name pattern), the margin used, the share of
pairs inside the hinge at w0, and the metric at the base, lowest, final and best (mean +- sd over seeds).

    python -m benchmarks.tools.margin_study --metric shapes-retrieval/mean_recall@1 \\
        "m=0.1:runs/study/loss.margin=0.1,run.seed=*" "OSR+GCL:runs/demo/runs/osr+gcl/seed*"
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.evaluate import headline_metric
from engine.results.summary import run_records


def _mean_sd(values: list[float]) -> str:
    if not values:
        return ""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):6.2f} +- {sd:4.2f}"


def study_row(name: str, folders: list[Path], metric: str) -> list[str]:
    """One setting: margin, inside-hinge share at w0 and the metric's statistics over its runs (x100)."""
    margins, inside, base, lowest, final, best = [], [], [], [], [], []
    for folder in folders:
        log = run_records(folder / "log.jsonl")
        evals = [100 * headline_metric(r["results"], metric) for r in log if r.get("event") == "eval"]
        if len(evals) < 2:
            continue
        base.append(evals[0])
        lowest.append(min(evals[1:]))
        final.append(evals[-1])
        best.append(max(evals))
        chosen = [r["margin"] for r in log if r.get("event") == "margin_chosen"]
        start = next(r for r in log if r.get("event") == "start")
        loss = start["config"]["loss"]
        if chosen:
            margins.append(chosen[-1])
        elif loss.get("surrogate") != "gcl" and start["config"]["method"] == "tuneclip":
            margins.append(float(loss["margin"]))
        if start["config"].get("method") != "tuneclip" or loss.get("surrogate") == "gcl":
            continue  # no hinge: the share inside it means nothing
        loaded = [r for r in log if r.get("event") == "osr_loaded"]
        osr_log = run_records(Path(loaded[-1]["from"]).parents[1] / "log.jsonl") if loaded else log
        osr = [r for r in osr_log if r.get("event") == "step" and r.get("stage") == "osr" and "inside_hinge" in r]
        if osr:  # the first OSR step: d at w0 against the margin OSR used
            inside.append(100 * osr[0]["inside_hinge"])
    return [name, str(len(final)), _mean_sd(margins) if margins else "-", _mean_sd(inside) if inside else "-",
            _mean_sd(base), _mean_sd(lowest), _mean_sd(final), _mean_sd(best)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+", help="NAME:GLOB of run folders")
    parser.add_argument("--metric", default="shapes-retrieval/mean_recall@1")
    args = parser.parse_args(argv)
    header = ["setting", "runs", "m", "% inside at w0", "base", "lowest", "final", "best"]
    rows = []
    for setting in args.settings:
        name, _, pattern = setting.partition(":")
        rows.append(study_row(name, sorted(Path(p) for p in glob.glob(pattern)), args.metric))
    print(f"metric: {args.metric} (x100), mean +- sd over runs")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
