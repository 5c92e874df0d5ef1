"""`run.py sweep`: a grid of fine-tuning runs from recovered OSR statistics, and one report of them all.

`--set key=v1,v2,...` makes `key` an axis of the grid (a plain `--set key=v` stays fixed). Every grid
point fine-tunes from OSR statistics: those of `--osr-from` when given (then no axis may change what
defines them, e.g. `loss.margin` for HGCL's u*), otherwise one OSR per distinct value of the axes that
define the statistics (the fields marked `osr` in engine/config/), shared by every point that agrees on
them: an lr sweep needs one OSR, a margin sweep one per margin. Each point is a run folder under
`--out`; the sweep ends with `report.html` / `report.md` comparing them.
"""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path

from engine.config import METHOD_RUNS_OSR, field_rule, load_config

logger = logging.getLogger(__name__)


def split_grid(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Fixed `key=value` overrides and grid axes (`key=v1,v2`: a comma outside brackets and quotes)."""
    fixed, axes = [], {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        if not sep:
            raise ValueError(f"--set {text!r} must look like section.key=value (or =v1,v2,... for a grid axis)")
        if "," in raw and not raw.lstrip().startswith(("[", "{", "'", '"')):
            values = [v.strip() for v in raw.split(",") if v.strip()]
            if key.strip() in axes:
                raise ValueError(f"--set {key.strip()} is given twice as a grid axis; list its values once")
            axes[key.strip()] = values
        else:
            fixed.append(text)
    return fixed, axes


def point_name(point: dict[str, str]) -> str:
    """A folder name for a grid point: `loss.margin=0.05,optim.lr=1e-05` with unsafe characters replaced."""
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(f"{k}={v}" for k, v in point.items())) or "run"


def run_sweep(config: str | None, overrides: list[str], *, out: str | Path, osr_from: str | None = None,
              local_rank: int | None = None) -> tuple[list[Path], Path]:
    """Run every grid point (fine-tuning from shared OSR statistics); returns the run folders and the report."""
    from engine.results.report_page import write_report
    from engine.trainer import Trainer

    fixed, axes = split_grid(overrides)
    if not axes:
        raise ValueError("sweep: no grid axis; give at least one --set key=v1,v2,...")
    base = load_config(config, fixed)  # validates the fixed part once
    points = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    for point in points:  # every point's configuration, checked before anything runs
        load_config(config, fixed + [f"{k}={v}" for k, v in point.items()])
    out = Path(out)
    runs_osr = METHOD_RUNS_OSR[base.method] and base.osr.epochs > 0
    # Fields marked osr (their value, or the OSR surrogate they choose) define the recovered statistics.
    defining = [k for k in axes if field_rule(k, "osr")]
    if osr_from and defining:
        raise ValueError(f"sweep --osr-from: {', '.join(defining)} define(s) the recovered statistics, so one OSR "
                         "cannot serve every value; drop --osr-from (the sweep runs one OSR per value) or fix them")
    osr_runs: dict[tuple, str | None] = {}
    run_dirs = []
    for point in points:
        group = tuple((k, point[k]) for k in defining)
        if runs_osr and group not in osr_runs:
            if osr_from:
                osr_runs[group] = osr_from
            else:
                osr_dir = out / ("osr" + ("-" + point_name(dict(group)) if group else ""))
                print(f"[sweep] OSR for {dict(group) or 'every point'} -> {osr_dir}")
                trainer = Trainer(load_config(config, fixed + [f"{k}={v}" for k, v in group]
                                              + [f"run.out_dir={osr_dir}"]), local_rank=local_rank)
                try:
                    trainer.tune(finetune=False)
                    osr_runs[group] = str(trainer.checkpoints.find("latest"))
                finally:
                    trainer.close()
        run_dir = out / point_name(point)
        extra = [f"run.out_dir={run_dir}"] + ([f"osr.load_from={osr_runs[group]}"] if runs_osr else [])
        print(f"[sweep] fine-tuning {point} -> {run_dir}")
        trainer = Trainer(load_config(config, fixed + [f"{k}={v}" for k, v in point.items()] + extra),
                          local_rank=local_rank)
        try:
            trainer.tune()
        finally:
            trainer.close()
        run_dirs.append(run_dir)
    report, _ = write_report(run_dirs, out / "report")
    return run_dirs, report
