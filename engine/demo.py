"""The self-contained demo: synthetic data, a briefly pretrained tiny CLIP, three fine-tuning methods.

Renders image-caption pairs (no downloads), pretrains a tiny CLIP with the OpenCLIP loss to get
a "pretrained" checkpoint, then fine-tunes it on a disjoint split with OpenCLIP, FastCLIP and
TuneCLIP (paper Table 9), evaluating zero-shot classification and retrieval along the way.
Prints a before/after table and writes `curves.png` (zero-shot metric vs fine-tuning step, the
shape of the paper's Figure 2) and `summary.json`. Numbers are whatever the engine measures.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from engine.config import load_config
from engine.data.build import build_shards
from engine.synthetic import render_pairs, render_retrieval_task, render_zeroshot_task
from engine.trainer import Trainer

logger = logging.getLogger(__name__)

METHODS = ("openclip", "fastclip", "tuneclip")


def _sizes(quick: bool) -> dict:
    if quick:
        return {"pretrain": 384, "finetune": 256, "per_class": 3, "retrieval": 48, "pre_epochs": 2,
                "ft_epochs": 2, "osr_epochs": 1, "batch": 32, "eval_every": 4}
    return {"pretrain": 4000, "finetune": 2000, "per_class": 12, "retrieval": 300, "pre_epochs": 12,
            "ft_epochs": 4, "osr_epochs": 2, "batch": 64, "eval_every": 8}


def _prepare_data(root: Path, sizes: dict) -> dict:
    raw = root / "raw"
    pre_csv = render_pairs(raw, num_samples=sizes["pretrain"], seed=1, split_name="pretrain")
    ft_csv = render_pairs(raw, num_samples=sizes["finetune"], seed=2, split_name="finetune")
    zs_csv, classnames, templates = render_zeroshot_task(root / "eval" / "zeroshot", num_per_class=sizes["per_class"],
                                                         seed=3)
    rt_csv = render_retrieval_task(root / "eval" / "retrieval", num_images=sizes["retrieval"], seed=4)
    build_shards(pre_csv, root / "shards" / "pretrain", samples_per_shard=1000)
    build_shards(ft_csv, root / "shards" / "finetune", samples_per_shard=500)
    return {
        "zeroshot": [{"name": "shapes-zeroshot", "csv": str(zs_csv), "classnames": str(classnames),
                      "templates": str(templates)}],
        "retrieval": [{"name": "shapes-retrieval", "csv": str(rt_csv)}],
    }


def _job(root: Path, *, method: str, train: str, out: str, weights: str | None, eval_cfg: dict, sizes: dict,
         epochs: int, lr: float, eval_every: int, osr_epochs: int) -> dict:
    return {
        "method": method,
        "model": {"name": "tiny-vit", "weights": weights},
        "data": {"train": str(root / "shards" / train), "batch_size": sizes["batch"]},
        "optim": {"lr": lr, "warmup_steps": 0},
        "osr": {"epochs": osr_epochs},
        # 32-px images decode faster in the main process than loader workers start.
        "eval": {**eval_cfg, "every_steps": eval_every, "best_metric": "shapes-zeroshot/acc1", "num_workers": 0},
        "run": {"out_dir": str(root / out), "epochs": epochs, "seed": 0, "progress": True, "log_every": 5},
    }


def run_demo(root: Path, *, quick: bool = False, overwrite: bool = False) -> dict:
    """Run the whole demo under `root`; returns the summary it also writes to summary.json.

    An existing, non-empty `root` is replaced only with `overwrite` (never silently).
    """
    started = time.perf_counter()
    sizes = _sizes(quick)
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {root} exists and is not empty; pass --overwrite to replace it, or pick "
                             "another --out")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    print(f"[demo] rendering synthetic data under {root}")
    eval_cfg = _prepare_data(root, sizes)

    print("[demo] pretraining a tiny CLIP (OpenCLIP loss, random init) to get a base checkpoint")
    pre = Trainer(load_config(base=_job(root, method="openclip", train="pretrain", out="pretrain", weights=None,
                                        eval_cfg=eval_cfg, sizes=sizes, epochs=sizes["pre_epochs"], lr=2e-3,
                                        eval_every=10**9, osr_epochs=0)))  # evaluate at the end only
    pre.cfg.eval.at_start = False
    pre.tune()
    pre.close()
    base = root / "base.safetensors"
    os.replace(root / "pretrain" / "final.safetensors", base)

    histories = {}
    for method in METHODS:
        print(f"[demo] fine-tuning with {method}")
        trainer = Trainer(load_config(base=_job(
            root, method=method, train="finetune", out=method, weights=str(base), eval_cfg=eval_cfg,
            sizes=sizes, epochs=sizes["ft_epochs"], lr=1e-4, eval_every=sizes["eval_every"],
            osr_epochs=sizes["osr_epochs"],
        )))
        history = trainer.tune()
        # x axis = fine-tuning steps: OSR steps do not move the weights.
        histories[method] = [
            {"step": 0 if r["stage"] == "start" else r["step"] - trainer.osr_steps, "results": r["results"]}
            for r in history
        ]
        trainer.close()

    summary = {"histories": histories, "seconds": round(time.perf_counter() - started, 1), "quick": quick}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(histories))
    plot_curves(histories, root / "curves.png")
    print(f"[demo] plot: {root / 'curves.png'}   summary: {root / 'summary.json'}   "
          f"time: {summary['seconds']:.0f} s")
    return summary


METRICS = (("shapes-zeroshot", "acc1", "zero-shot acc@1"),
           ("shapes-retrieval", "mean_recall@1", "retrieval mean R@1"))


def format_table(histories: dict) -> str:
    """Per method and metric: base model, first evaluation, lowest, final and best (in %)."""
    cols = ("base", "first", "lowest", "final", "best")
    lines = [f"{'':<10}" + "".join(f" | {label:^38}" for _, _, label in METRICS),
             f"{'method':<10}" + " | ".join([""] + [" ".join(f"{c:>7}" for c in cols)] * len(METRICS))]
    lines.append("-" * len(lines[1]))
    for method, records in histories.items():
        row = f"{method:<10}"
        for task, metric, _ in METRICS:
            values = [r["results"][task][metric] * 100 for r in records]
            during = values[1:] or values
            stats = (values[0], during[0], min(during), values[-1], max(during))
            row += " | " + " ".join(f"{v:>7.2f}" for v in stats)
        lines.append(row)
    return "\n".join(lines)


def plot_curves(histories: dict, path: Path) -> None:
    """Zero-shot accuracy and retrieval R@1 vs fine-tuning step for each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.6))
    for ax, (task, metric, label) in zip(axes, METRICS):
        for method, records in histories.items():
            steps = [r["step"] for r in records]
            values = [r["results"][task][metric] * 100 for r in records]
            ax.plot(steps, values, marker="o", markersize=3, label=method)
        base = next(iter(histories.values()))[0]["results"][task][metric] * 100
        ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(label + " (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Self-supervised fine-tuning of a tiny CLIP on synthetic shapes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
