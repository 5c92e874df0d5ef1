"""The self-contained demo: synthetic data, a briefly pretrained tiny CLIP, four fine-tuning methods, 3 seeds.

Renders image-caption pairs (no downloads), pretrains a tiny CLIP with the OpenCLIP loss on all six colours to get
a "pretrained" checkpoint, then fine-tunes it on a disjoint split of four colours whose captions are often partial
("a red shape" fits many images: false negatives, as in web data) with OpenCLIP, FastCLIP, OSR + GCL
and TuneCLIP (OSR + HGCL with `loss.margin=auto`), each over 3 seeds, evaluating zero-shot
classification and retrieval along the way on two task groups: in-domain (the fine-tuning colours) and
retained (the two held-out colours only pretraining showed: what fine-tuning can keep or forget, never trained on).
Prints a mean +- sd table per group and writes `curves.png`
(metric vs fine-tuning step, bands = +- sd: the shape of the paper's Figure 2), `summary.json`,
`report/report.html` and the engine's detail in `demo.log`. Numbers are whatever the engine measures.
The demo marks its folder (`.tuneclip-demo`) and holds its run lock while it runs: `--overwrite` replaces
only a marked folder that no live job holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import statistics
import time
from pathlib import Path

from engine.config import load_config
from engine.data.build import build_shards
from engine.demo.synthetic import COLORS, render_pairs, render_retrieval_task, render_zeroshot_task
from engine.distributed import DistContext
from engine.io import write_json_atomic
from engine.run.lock import LOCK_FILE, OWNER_FILE, RunLock
from engine.trainer import Trainer

logger = logging.getLogger(__name__)

# name -> config sections (paper Table 9, plus OSR + GCL: OSR without the hinge).
METHODS: dict[str, dict] = {
    "openclip": {"method": "openclip"},
    "fastclip": {"method": "fastclip"},
    "osr+gcl": {"method": "tuneclip", "loss": {"surrogate": "gcl"}},
    "tuneclip": {"method": "tuneclip", "loss": {"margin": "auto"}},
}
SEEDS = (0, 1, 2)
# Pretraining shows every colour; fine-tuning never shows these, so the "retained" tasks measure what the base
# knew and fine-tuning can only keep or lose.
HELD_OUT_COLORS = ("purple", "orange")
FINETUNE_COLORS = tuple(c for c in COLORS if c not in HELD_OUT_COLORS)
# At 1e-4 the 48 fine-tuning steps hardly move the weights: no method changed either task group beyond seed noise.
FINETUNE_LR = 5e-4
DEMO_MARKER = ".tuneclip-demo"  # written into every folder the demo creates; --overwrite removes no other


def _sizes(quick: bool) -> dict:
    if quick:
        return {"pretrain": 384, "finetune": 128, "per_class": 3, "retrieval": 48, "pre_epochs": 2,
                "ft_epochs": 2, "osr_epochs": 1, "batch": 32, "eval_every": 4, "seeds": SEEDS[:2]}
    return {"pretrain": 4000, "finetune": 1024, "per_class": 8, "retrieval": 100, "pre_epochs": 12,
            "ft_epochs": 3, "osr_epochs": 1, "batch": 64, "eval_every": 8, "seeds": SEEDS}


def _prepare_data(root: Path, sizes: dict) -> dict:
    """Render the pretraining and fine-tuning pairs, shard them, and render the in-domain and retained tasks."""
    raw = root / "raw"
    pre_csv = render_pairs(raw, num_samples=sizes["pretrain"], seed=1, split_name="pretrain")
    # Half the fine-tuning captions are partial: many images share near-identical captions.
    ft_csv = render_pairs(raw, num_samples=sizes["finetune"], seed=2, split_name="finetune",
                          partial_caption_prob=0.5, colors=FINETUNE_COLORS)
    build_shards(pre_csv, root / "shards" / "pretrain", samples_per_shard=1000)
    build_shards(ft_csv, root / "shards" / "finetune", samples_per_shard=512)
    tasks: dict[str, list] = {"zeroshot": [], "retrieval": []}
    for group, colors, seed in (("in-domain", FINETUNE_COLORS, 3), ("retained", HELD_OUT_COLORS, 5)):
        (zs_name, _, _), (rt_name, _, _) = GROUPS[group]
        # As many images in each group: fewer colours, more images per class.
        per_class = sizes["per_class"] * len(FINETUNE_COLORS) // len(colors)
        zs_csv, classnames, templates = render_zeroshot_task(
            root / "eval" / zs_name, num_per_class=per_class, seed=seed, colors=colors)
        rt_csv = render_retrieval_task(root / "eval" / rt_name, num_images=sizes["retrieval"], seed=seed + 1,
                                       colors=colors)
        tasks["zeroshot"].append({"name": zs_name, "csv": str(zs_csv), "classnames": str(classnames),
                                  "templates": str(templates)})
        tasks["retrieval"].append({"name": rt_name, "csv": str(rt_csv)})
    return tasks


def _job(root: Path, *, train: str, out: str, weights: str | None, eval_cfg: dict, sizes: dict, epochs: int,
         lr: float, eval_every: int, osr_epochs: int, seed: int = 0, method: dict) -> dict:
    job = {
        "model": {"name": "tiny-vit", "weights": weights},
        "data": {"train": str(root / "shards" / train), "batch_size": sizes["batch"], "train_transform": "eval"},
        "optim": {"lr": lr, "warmup_steps": 0},
        "osr": {"epochs": osr_epochs},
        # 32-px images decode faster in the main process than loader workers start.
        "eval": {**eval_cfg, "every_steps": eval_every, "best_metric": "shapes-retrieval/mean_recall@1",
                 "num_workers": 0},
        "run": {"out_dir": str(root / out), "epochs": epochs, "seed": seed, "progress": True, "log_every": 5},
    }
    for key, value in method.items():
        job[key] = {**job.get(key, {}), **value} if isinstance(value, dict) else value
    return job


@contextlib.contextmanager
def _detail_to_file(path: Path):
    """The engine's log lines go to `path` only; the console keeps progress bars, the demo's lines and errors."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    consoles = [(h, h.level) for h in root.handlers]
    for h, _ in consoles:
        h.setLevel(logging.ERROR)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for h, level in consoles:
            h.setLevel(level)


def run_demo(root: Path, *, quick: bool = False, overwrite: bool = False) -> dict:
    """Run the whole demo under `root`; returns the summary it also writes to summary.json.

    An existing, non-empty `root` is replaced only with `overwrite`, only if an earlier demo wrote it (its
    marker file) and only once this job holds its run lock.
    """
    started = time.perf_counter()
    sizes = _sizes(quick)
    replace = root.exists() and any(root.iterdir())
    if replace and not overwrite:
        raise ValueError(f"--out {root} exists and is not empty; pass --overwrite to replace it, or pick "
                         "another --out")
    if replace and not _is_demo_folder(root):
        raise ValueError(f"--out {root} holds no {DEMO_MARKER} file, so no demo wrote it; --overwrite replaces "
                         "only a demo's folder: nothing was deleted; pick another --out")
    lock = RunLock(root, DistContext())  # refuses a folder a live job (a demo running there) holds
    try:
        if replace:
            _empty_folder(root, keep={LOCK_FILE, OWNER_FILE})
        write_json_atomic(root / DEMO_MARKER, {"written_by": "run.py demo", "started": time.time()})
        with _detail_to_file(root / "demo.log"):
            return _run(root, sizes, quick=quick, started=started)
    finally:
        lock.release()


def _is_demo_folder(root: Path) -> bool:
    marker = root / DEMO_MARKER
    return marker.is_file() and not marker.is_symlink()


def _empty_folder(root: Path, *, keep: set[str]) -> None:
    """Remove everything inside `root` but the names in `keep`; links are removed, never followed."""
    for entry in root.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _run(root: Path, sizes: dict, *, quick: bool, started: float) -> dict:
    print(f"[demo] rendering synthetic data under {root} (engine log: {root / 'demo.log'})")
    eval_cfg = _prepare_data(root, sizes)

    print("[demo] pretraining a tiny CLIP (OpenCLIP loss, random init) to get a base checkpoint")
    pre = Trainer(load_config(base=_job(root, train="pretrain", out="pretrain", weights=None, eval_cfg=eval_cfg,
                                        sizes=sizes, epochs=sizes["pre_epochs"], lr=2e-3, eval_every=10**9, osr_epochs=0,
                                        method={"method": "openclip", "data": {"train_transform": "augment"}})))  # evaluates at its end only
    pre.cfg.eval.at_start = False
    pre.tune()
    pre.close()
    base = root / "base.safetensors"
    os.replace(root / "pretrain" / "final.safetensors", base)

    histories: dict[str, dict[int, list]] = {}
    margins: dict[str, float] = {}
    run_dirs = []
    for name, method in METHODS.items():
        histories[name] = {}
        for seed in sizes["seeds"]:
            print(f"[demo] fine-tuning with {name}, seed {seed}")
            out = f"runs/{name}/seed{seed}"
            trainer = Trainer(load_config(base=_job(
                root, train="finetune", out=out, weights=str(base), eval_cfg=eval_cfg, sizes=sizes,
                epochs=sizes["ft_epochs"], lr=FINETUNE_LR, eval_every=sizes["eval_every"], osr_epochs=sizes["osr_epochs"],
                seed=seed, method=method,
            )))
            history = trainer.tune()
            histories[name][seed] = [{"step": r["ft_step"], "results": r["results"]} for r in history]
            margin = trainer.objective.term("contrastive").margin
            if margin is not None and trainer.cfg.surrogate == "hgcl":
                margins[f"{name}/seed{seed}"] = margin
            trainer.close()
            run_dirs.append(root / out)

    from engine.results.report_page import write_report

    report, _ = write_report(run_dirs, root / "report")
    summary = {"histories": histories, "table": aggregate(histories), "margins": margins,
               "seconds": round(time.perf_counter() - started, 1), "quick": quick, "seeds": list(sizes["seeds"])}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(summary["table"]))
    if margins:
        print("[demo] TuneCLIP margin (loss.margin=auto): " + ", ".join(f"{k} m={v:.3f}" for k, v in margins.items()))
    plot_curves(histories, root / "curves.png")
    print(f"[demo] plot: {root / 'curves.png'}   report: {report}   summary: {root / 'summary.json'}   "
          f"time: {summary['seconds']:.0f} s")
    return summary


# Task group -> (task, metric, label) per metric: the fine-tuning distribution, and what only pretraining showed.
GROUPS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "in-domain": (("shapes-zeroshot", "acc1", "zero-shot acc@1"),
                  ("shapes-retrieval", "mean_recall@1", "retrieval mean R@1")),
    "retained": (("retained-zeroshot", "acc1", "zero-shot acc@1"),
                 ("retained-retrieval", "mean_recall@1", "retrieval mean R@1")),
}
GROUP_TITLES = {"in-domain": f"in-domain (fine-tuning colours: {', '.join(FINETUNE_COLORS)})",
                "retained": f"retained (held-out colours, pretraining only: {', '.join(HELD_OUT_COLORS)})"}
METRICS = tuple(metric for metrics in GROUPS.values() for metric in metrics)
STATS = ("base", "first", "lowest", "final", "best")


def _stats(records: list[dict], task: str, metric: str) -> dict[str, float]:
    """One run's base, first evaluation, lowest, final and best (in %) of a metric."""
    values = [r["results"][task][metric] * 100 for r in records]
    during = values[1:] or values
    return dict(zip(STATS, (values[0], during[0], min(during), values[-1], max(during))))


def aggregate(histories: dict[str, dict[int, list]]) -> dict:
    """Per method and metric: mean and sd over seeds of each statistic (sd 0 with one seed)."""
    table = {}
    for method, runs in histories.items():
        table[method] = {}
        for task, metric, _ in METRICS:
            per_seed = [_stats(records, task, metric) for records in runs.values()]
            table[method][f"{task}/{metric}"] = {
                stat: {"mean": statistics.fmean(s[stat] for s in per_seed),
                       "sd": statistics.stdev([s[stat] for s in per_seed]) if len(per_seed) > 1 else 0.0}
                for stat in STATS}
    return table


def format_table(table: dict) -> str:
    """Per task group, method and metric: base model, first evaluation, lowest, final and best (in %, mean +- sd
    over seeds)."""
    width = 11 * len(STATS) + len(STATS) - 1
    blocks = []
    for group, metrics in GROUPS.items():
        lines = [GROUP_TITLES[group],
                 f"{'':<9}" + "".join(f" | {label:^{width}}" for _, _, label in metrics),
                 f"{'method':<9}" + " | ".join([""] + [" ".join(f"{c:>11}" for c in STATS)] * len(metrics))]
        lines.append("-" * len(lines[2]))
        for method, cells_by_metric in table.items():
            row = f"{method:<9}"
            for task, metric, _ in metrics:
                cells = cells_by_metric[f"{task}/{metric}"]
                row += " | " + " ".join(f"{cells[s]['mean']:>5.1f}+-{cells[s]['sd']:<4.1f}" for s in STATS)
            lines.append(row)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot_curves(histories: dict[str, dict[int, list]], path: Path) -> None:
    """Per task group (rows) zero-shot accuracy and retrieval R@1 (columns) vs fine-tuning step per method: mean
    over seeds, band = +- sd, dashed line = the base model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(len(metrics) for metrics in GROUPS.values())
    fig, axes = plt.subplots(len(GROUPS), columns, figsize=(5 * columns, 3.4 * len(GROUPS)), squeeze=False)
    for row, (group, metrics) in zip(axes, GROUPS.items()):
        for ax, (task, metric, label) in zip(row, metrics):
            _plot_metric(ax, histories, task, metric)
            ax.set_title(f"{group}: {label}", fontsize=10)
            ax.set_ylabel(label + " (%)")
    for ax in axes[-1]:
        ax.set_xlabel("fine-tuning step")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Self-supervised fine-tuning of a tiny CLIP on synthetic shapes (mean +- sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_metric(ax, histories: dict[str, dict[int, list]], task: str, metric: str) -> None:
    """One metric's mean curve and +- sd band per method, and the base model as a dashed line."""
    for i, (method, runs) in enumerate(histories.items()):
        curves = list(runs.values())
        steps = [r["step"] for r in curves[0]]
        values = [[r["results"][task][metric] * 100 for r in records] for records in curves]
        mean = [statistics.fmean(v) for v in zip(*values)]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*values)]
        ax.plot(steps, mean, marker="o", markersize=3, label=method, color=f"C{i}")
        ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                        color=f"C{i}", alpha=0.2)
    base = next(iter(next(iter(histories.values())).values()))[0]["results"][task][metric] * 100
    ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model")
    ax.grid(alpha=0.3)
