"""`run.py report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page (and a Markdown twin) comparing runs.

Every evaluation metric vs fine-tuning step (`ft_step`: OSR drawn apart in its own panel, so methods
with and without OSR line up), one line per run, the base model as a dashed line (the shape of the
paper's Figure 2); a before / best / final table; a Table-2-style ablation table when the runs are
TuneCLIP's seeding ablations; loss terms, lr and gamma; skipped samples; the runs' warnings.
Figures are inline SVG drawn by matplotlib: the page needs no network and no other file. The
Markdown twin links the same figures, written as SVG files next to it.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.io import write_atomic
from engine.results.summary import run_records, run_summary

STEP_SERIES = ("loss", "contrastive_loss", "batch_loss", "lr", "gamma", "grad_norm")

_MD_INLINE = re.compile(r"([\\`*_\[\]()!|~$])")  # emphasis, code, links, images, tables, math: backslash-escaped
_MD_BLOCK_START = re.compile(r"^(#{1,6}|[-+]|\d{1,9}[.)])(?=\s|$)")  # a heading or list marker at the start


def _md(text: str) -> str:
    """`text` (a run name, path, task or warning) as literal Markdown: no HTML, link, emphasis, math or new block."""
    text = " ".join(str(text).split())  # a line break would start a new block
    text = _MD_BLOCK_START.sub(lambda m: m.group(1)[:-1] + "\\" + m.group(1)[-1], _MD_INLINE.sub(r"\\\1", text))
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass
class Run:
    """What the report needs of one run folder."""

    label: str
    path: Path
    config: dict
    summary: dict
    evals: list[dict]
    steps: list[dict]
    osr_steps: list[dict]
    skipped: dict = field(default_factory=dict)
    interpolation: dict | None = None  # interpolate.json, when run.py interpolate / run.interpolate wrote one

    @property
    def base(self) -> dict | None:
        return next((r for r in self.evals if r["stage"] == "start"), None)


def load_run(path: Path, label: str) -> Run:
    """The records of the run in `path` (its last fresh start and the resumes after it)."""
    log_path = Path(path) / "log.jsonl"
    if not log_path.exists():
        raise FileNotFoundError(f"{path} holds no log.jsonl: give run folders (run.out_dir of tune / finetune)")
    records = run_records(log_path)
    starts = [r for r in records if r.get("event") == "start"]
    evals = [r for r in records if r.get("event") == "eval"]
    for r in evals:  # logs written before ft_step existed: the global step
        r.setdefault("ft_step", 0 if r["stage"] == "start" else r["step"])
    steps = [r for r in records if r.get("event") == "step" and r.get("stage") == "finetune"]
    for r in steps:
        r.setdefault("ft_step", r.get("stage_step", r["step"]))
    osr_steps = [r for r in records if r.get("event") == "step" and r.get("stage") == "osr"]
    epoch_ends = [r for r in records if r.get("event") == "epoch_end"]
    return Run(label=label, path=Path(path), config=starts[-1].get("config", {}) if starts else {},
               summary=run_summary(Path(path)), evals=evals, steps=steps, osr_steps=osr_steps,
               skipped=epoch_ends[-1].get("skipped", {}) if epoch_ends else {},
               interpolation=_read_interpolation(Path(path)))


def _read_interpolation(path: Path) -> dict | None:
    """The run's interpolate.json (its evaluations per a), or None when there is none."""
    from engine.results.interpolate import INTERPOLATE_FILE

    file = path / INTERPOLATE_FILE
    if not file.is_file():
        return None
    found = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(found, dict) or not isinstance(found.get("evaluations"), list):
        raise ValueError(  # noqa: TRY004 (a user error: the CLI reports ValueErrors)
            f"{file} holds no evaluations list: not written by run.py interpolate; remove it or rerun "
            "run.py interpolate")
    return found


def _labels(paths: list[Path]) -> list[str]:
    """Short unique names: folder names, or paths relative to the runs' common parent when names repeat."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    return [str(p.resolve().relative_to(common)) or p.name for p in paths]


def _metrics(records: list[dict]) -> list[str]:
    """Every `task/metric` of the evaluation records' results, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for task, metrics in r["results"].items():
            for metric in metrics:
                seen[f"{task}/{metric}"] = None
    return list(seen)


def _value(record: dict, key: str) -> float | None:
    task, _, metric = key.rpartition("/")
    value = record["results"].get(task, {}).get(metric)
    return None if value is None else float(value)


def _svg(fig) -> str:
    """A matplotlib figure as inline SVG markup (no XML prolog, no DOCTYPE: nothing to fetch)."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figures(runs: list[Run]) -> dict[str, str]:
    """Name -> SVG markup of every figure of the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Glyphs as paths (no font to load); names are text, never mathtext (a `$` in a run name).
    with plt.rc_context({"svg.fonttype": "path", "text.parse_math": False}):
        return _draw_figures(runs, plt)


def _panels(plt, keys: list[str]):
    """A figure with one panel per key, 3 to a row (spare panels hidden), and its panels in key order."""
    columns = min(3, max(1, len(keys)))
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.3 * rows), squeeze=False)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    return fig, list(axes.flat)[:len(keys)]


def _interpolation_figure(runs: list[Run], plt, colors: dict[str, str]) -> str | None:
    """Every metric vs the interpolation weight a (0 = base, 1 = final), one line per run that has
    interpolate.json, the chosen a (run.interpolate_select / --select) ringed; None when no run has one."""
    interpolated = [run for run in runs if run.interpolation and run.interpolation["evaluations"]]
    if not interpolated:
        return None
    keys = _metrics([row for run in interpolated for row in run.interpolation["evaluations"]])
    logged = _metrics([r for run in interpolated for r in run.evals])  # panels in the order of the metrics figure
    keys.sort(key=lambda key: logged.index(key) if key in logged else len(logged))
    fig, axes = _panels(plt, keys)
    for ax, key in zip(axes, keys):
        for run in interpolated:
            points = [(row["alpha"], _value(row, key)) for row in run.interpolation["evaluations"]
                      if _value(row, key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=colors[run.label], label=run.label)
            chosen = run.interpolation.get("chosen_alpha")
            if chosen is not None and any(a == chosen for a, _ in points):
                ax.plot([chosen], [dict(points)[chosen]], marker="o", markersize=9, fillstyle="none",
                        color=colors[run.label])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("a (0 = base, 1 = fine-tuned)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    svg = _svg(fig)
    plt.close(fig)
    return svg


def _draw_figures(runs: list[Run], plt) -> dict[str, str]:
    colors = {run.label: f"C{i % 10}" for i, run in enumerate(runs)}
    figures = {}
    metrics = _metrics([r for run in runs for r in run.evals])
    if metrics:
        fig, axes = _panels(plt, metrics)
        for ax, key in zip(axes, metrics):
            bases = set()
            for run in runs:
                points = [(r["ft_step"], _value(r, key)) for r in run.evals if _value(r, key) is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", markersize=3, color=colors[run.label], label=run.label)
                if run.base is not None and _value(run.base, key) is not None:
                    bases.add(round(100 * _value(run.base, key), 6))
            for i, base in enumerate(sorted(bases)):
                ax.axhline(base / 100, color="grey", linestyle="--", linewidth=1,
                           label="base model" if i == 0 else None)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("fine-tuning step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        figures["metrics"] = _svg(fig)
        plt.close(fig)
    interpolation = _interpolation_figure(runs, plt, colors)
    if interpolation is not None:
        figures["interpolation"] = interpolation
    series = [name for name in STEP_SERIES if any(name in r for run in runs for r in run.steps)]
    if series:
        fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 3.0), squeeze=False)
        for ax, name in zip(axes.flat, series):
            for run in runs:
                points = [(r["ft_step"], r[name]) for r in run.steps if isinstance(r.get(name), (int, float))]
                if points:
                    ax.plot(*zip(*points), color=colors[run.label], label=run.label, linewidth=1)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("fine-tuning step")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        figures["training"] = _svg(fig)
        plt.close(fig)
    osr_runs = [run for run in runs if run.osr_steps]
    if osr_runs:
        names = [n for n in ("loss", "d_q50", "inside_hinge") if any(n in r for run in osr_runs for r in run.osr_steps)]
        fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.0), squeeze=False)
        for ax, name in zip(axes.flat, names):
            for run in osr_runs:
                points = [(r["stage_step"], r[name]) for r in run.osr_steps if isinstance(r.get(name), (int, float))]
                if points:
                    ax.plot(*zip(*points), color=colors[run.label], label=run.label, linewidth=1)
            ax.set_title(f"OSR: {name}", fontsize=9)
            ax.set_xlabel("OSR step (weights frozen)")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        figures["osr"] = _svg(fig)
        plt.close(fig)
    return figures


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _speed(summary: dict) -> str:
    """Fine-tuning's median samples/s per device, with MFU where the device's peak is known."""
    speed = summary.get("throughput", {}).get("finetune")
    if not speed:
        return ""
    return f"{speed['samples_per_s_per_device']:.4g}" + (f" ({100 * speed['mfu']:.1f}%)" if "mfu" in speed else "")


def _tables(runs: list[Run]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Name -> (header, rows) of every table of the report."""
    tables = {}
    rows = []
    for run in runs:
        s = run.summary
        osr = s.get("cost", {}).get("osr")
        ft = s.get("cost", {}).get("finetune")
        margin = s.get("margin")
        if s.get("metric"):
            best, final, base = s["best"], s["final"], s.get("base")
            rows.append([run.label, str(run.config.get("method", "")), s["metric"],
                         _pct(base["value"]) if base else "", f"{_pct(best['value'])} @ {best['ft_step']}"
                         + (" (base)" if best["is_base"] else ""),
                         f"{_pct(final['value'])} @ {final['ft_step']}",
                         f"{100 * final['change']:+.2f}" if "change" in final else "",
                         str(margin["value"]) if margin else "",
                         f"{osr['seconds']:.1f} s / {osr['device_hours']:.3g} dev-h" if osr else "",
                         f"{ft['seconds']:.1f} s" if ft else "", _speed(s), str(s.get("num_skipped", 0))])
        else:
            rows.append([run.label, str(run.config.get("method", "")), "(no evaluation)"] + [""] * 9)
    tables["results"] = (["run", "method", "metric (x100)", "base", "best @ ft step", "final @ ft step",
                          "final - base", "margin m", "OSR cost", "fine-tuning time", "samples/s per device (MFU)",
                          "skipped"], rows)
    ablation = _ablation(runs)
    if ablation:
        tables["ablation"] = ablation
    skipped = [[run.label, shard, reason, str(n)] for run in runs for shard, reasons in sorted(run.skipped.items())
               for reason, n in sorted(reasons.items())]
    if skipped:
        tables["skipped"] = (["run", "shard", "reason", "samples"], skipped)
    return tables


def _ablation(runs: list[Run]) -> tuple[list[str], list[list[str]]] | None:
    """Paper Table 2: TuneCLIP runs that differ in seeding (m, v) and u from OSR, with their final and best."""
    tuned = [run for run in runs if run.config.get("method") == "tuneclip" and run.summary.get("metric")]
    switches = {(run.config.get("osr", {}).get("seed_moments", True), run.config.get("osr", {}).get("seed_u", True))
                for run in tuned}
    if len(switches) < 2:
        return None
    rows = []
    for run in sorted(tuned, key=lambda r: (not r.config["osr"].get("seed_moments", True),
                                            not r.config["osr"].get("seed_u", True))):
        osr = run.config.get("osr", {})
        s = run.summary
        rows.append([run.label, "yes" if osr.get("seed_moments", True) else "no",
                     "yes" if osr.get("seed_u", True) else "no", _pct(s["base"]["value"]) if s.get("base") else "",
                     _pct(s["final"]["value"]), _pct(s["best"]["value"])])
    metric = tuned[0].summary["metric"]
    return (["run", "seed m, v (OSR)", "seed u (OSR)", f"base {metric}", "final", "best"], rows)


TABLE_TITLES = {"results": "Before / best / final (selection metric)",
                "ablation": "Ablation (paper Table 2): what OSR seeds",
                "skipped": "Skipped samples"}
FIGURE_TITLES = {"metrics": "Evaluation metrics vs fine-tuning step (dashed: base model)",
                 "training": "Loss terms, learning rate and gamma vs fine-tuning step",
                 "interpolation": "Weight-space interpolation: metric vs a, theta_a = (1 - a) base + a fine-tuned "
                                  "(ringed: the a chosen on the validation metric)",
                 "osr": "OSR (weights frozen), drawn apart: steps not counted in fine-tuning"}


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(_md(c) for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header))] + [line(r) for r in rows])


STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #bbb;padding:3px 8px;font-size:13px}
th{background:#eee}td{text-align:right}td:first-child{text-align:left}.warn{color:#a40000}
figure{margin:8px 0 24px}svg{max-width:100%;height:auto}"""


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `report.html` (self-contained) and `report.md` (+ `figures/*.svg`) comparing `run_dirs` into
    `out_dir`; returns the two paths."""
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, label) for p, label in zip(paths, _labels(paths))]
    figures = _figures(runs)
    tables = _tables(runs)
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    warnings = [(run.label, w) for run in runs for w in run.summary.get("warnings", [])]
    notes = [(run.label, run.summary["best"]["note"]) for run in runs
             if run.summary.get("best", {}).get("note")]
    margins = [(run.label, run.summary["margin"]) for run in runs if run.summary.get("margin")]

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>TuneCLIP-engine report</title>",
             f"<style>{STYLE}</style></head><body><h1>TuneCLIP-engine report</h1>",
             "<p>Runs: " + ", ".join(f"<b>{html.escape(r.label)}</b> ({html.escape(str(r.path))})" for r in runs)
             + "</p>"]
    md = ["# TuneCLIP-engine report", "", "Runs: " + ", ".join(f"**{_md(r.label)}** ({_md(r.path)})" for r in runs), ""]
    for name in ("results", "ablation"):
        if name in tables:
            parts += [f"<h2>{TABLE_TITLES[name]}</h2>", _html_table(*tables[name])]
            md += [f"## {TABLE_TITLES[name]}", "", _md_table(*tables[name]), ""]
    for label, margin in margins:
        line = f"{label}: HGCL margin m = {margin['value']} ({margin['rule']})"
        parts.append(f"<p>{html.escape(line)}</p>")
        md += [f"- {_md(line)}"]
    for label, note in notes:
        parts.append(f"<p>{html.escape(label)}: {html.escape(note)}</p>")
        md += [f"- {_md(label)}: {_md(note)}"]
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(
            f"<li class='warn'>{html.escape(label)}: {html.escape(w)}</li>" for label, w in warnings) + "</ul>")
        md += ["", "## Warnings", ""] + [f"- **{_md(label)}**: {_md(w)}" for label, w in warnings]
    md.append("")
    for name, svg in figures.items():
        parts += [f"<h2>{FIGURE_TITLES[name]}</h2>", f"<figure id='fig-{name}'>{svg}</figure>"]
        write_atomic(out_dir / "figures" / f"{name}.svg", svg)
        md += [f"## {FIGURE_TITLES[name]}", "", f"![{name}](figures/{name}.svg)", ""]
    if "skipped" in tables:
        parts += [f"<h2>{TABLE_TITLES['skipped']}</h2>", _html_table(*tables["skipped"])]
        md += [f"## {TABLE_TITLES['skipped']}", "", _md_table(*tables["skipped"]), ""]
    parts.append("</body></html>")
    page = "\n".join(parts)
    assert not re.search(r"(src|href)\s*=\s*[\"']?https?:", page), "the report must not load anything"
    html_path = write_atomic(out_dir / "report.html", page)
    md_path = write_atomic(out_dir / "report.md", "\n".join(md))
    return html_path, md_path
